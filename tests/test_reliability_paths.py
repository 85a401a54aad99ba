"""Output paths against every input and artifact, and writability, checked before any work (issue 9:
items 1, 2, 3, 12 and 20's model-directory hint). Each case runs the real CLI in a subprocess and checks
the exit code, exactly one ``error:`` line, no traceback, that nothing was created, and that the source
model and the export are byte-identical afterwards."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
from conftest import assert_refused, cli, tree_digest


def _untouched(*roots):
    before = {str(r): tree_digest(r) for r in roots}
    return lambda: all(tree_digest(r) == before[str(r)] for r in roots)


# --- export ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("where, needle", [
    ("model", "would overwrite the model directory"),
    ("model/sub", "would write inside the model directory"),
    ("model/unet", "would write inside the model directory"),
    ("parent", "would contain the model directory"),
    ("link", "would overwrite the model directory"),  # a symbolic link to the model
])
def test_export_output_is_not_the_model(model, tmp_path, where, needle):
    unchanged = _untouched(model)
    out = {"model": model, "model/sub": model / "sub", "model/unet": model / "unet", "parent": tmp_path,
           "link": tmp_path / "link"}[where]
    if where == "link":
        os.symlink(model, out)
    assert_refused(cli("export", model, "-o", out), 2, needle)
    assert unchanged() and not (model / "sub").exists() and not (model / "manifest.json").exists()


def test_export_into_a_directory_that_holds_other_things(model, tiny_model, tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine\n")
    other = shutil.copytree(tiny_model, tmp_path / "other")  # another diffusers model: its unet/ would be replaced
    unchanged = _untouched(model, notes, other)
    assert_refused(cli("export", model, "-o", notes), 2, "not empty", "todo.txt")
    assert_refused(cli("export", model, "-o", other), 2, "not empty", "no manifest.json")
    assert unchanged()


@pytest.mark.parametrize("kind, code, needle", [
    ("file", 2, "is a file"),
    ("under-file", 2, "Not a directory"),
    ("proc", 2, "cannot write in /proc"),
    ("long-name", 2, "too long"),
])
def test_export_output_that_cannot_be_written(model, tmp_path, kind, code, needle):
    (tmp_path / "afile").write_text("x")
    out = {"file": tmp_path / "afile", "under-file": tmp_path / "afile" / "out", "proc": "/proc/sdexport-out",
           "long-name": tmp_path / ("o" * 240)}[kind]
    assert_refused(cli("export", model, "-o", out), code, needle)
    assert (tmp_path / "afile").read_text() == "x"


def test_export_output_on_a_read_only_filesystem(model, mount_tmpfs):
    ro = mount_tmpfs("1m")
    subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
    assert_refused(cli("export", model, "-o", ro / "out"), 2, "cannot write in", "Read-only file system")


def test_export_of_a_preset_into_its_own_cache(tmp_path):
    cache = tmp_path / "cache"
    from sdexport import __version__

    out = cache / "presets" / f"tiny-{__version__}"
    assert_refused(cli("export", "tiny", "-o", out, env={"SDEXPORT_CACHE": cache}), 2, "model directory")
    assert not out.exists()


def test_export_of_a_preset_name_that_a_directory_here_hides(export_fp32, tmp_path):
    """``export tiny -o tiny`` run twice: ./tiny, the first run's export, is what ``tiny`` names now (a path
    wins); the one error line says so and how to get the preset, not "-o tiny: would overwrite the model
    directory tiny" (nor, with another -o, "tiny: missing vae/")."""
    shutil.copytree(export_fp32, tmp_path / "tiny")
    unchanged = _untouched(tmp_path / "tiny")
    for out in ("tiny", "other"):
        assert_refused(cli("export", "tiny", "-o", out, cwd=tmp_path), 3, "is the directory ./tiny here (an "
                       "sdexport export, not a diffusers model), not the built-in preset tiny",
                       "'sdexport preset tiny -o DIR'")
    assert unchanged() and not (tmp_path / "other").exists()


# --- preset ----------------------------------------------------------------------------------------
def test_preset_never_replaces_what_a_directory_holds(model, tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "a.txt").write_text("keep me\n")
    unchanged = _untouched(notes, model)
    assert_refused(cli("preset", "tiny", "-o", notes), 2, "not empty", "a.txt")
    # A model directory that is not this preset (another preset's mark, or none) is refused too.
    (model / "SDEXPORT_PRESET.txt").write_text("sdexport preset 'sd15-random': ...\n")
    unchanged = _untouched(notes, model)
    assert_refused(cli("preset", "tiny", "-o", model), 2, "not empty", "'tiny' preset")
    (tmp_path / "f").write_text("x")
    assert_refused(cli("preset", "tiny", "-o", tmp_path / "f"), 2, "is a file")
    assert unchanged() and (tmp_path / "f").read_text() == "x"


@pytest.mark.slow
def test_preset_writes_into_an_empty_directory_and_over_itself(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    first = cli("preset", "tiny", "-o", out)
    assert first.returncode == 0, first.stderr[-2000:]
    assert (out / "model_index.json").is_file()
    # progress is sdexport's own lines, without the libraries' bars (transformers' "Writing model shards")
    assert first.stderr.splitlines()[-1] == f"saving tiny to {out}", first.stderr
    assert all(line.startswith(("building tiny: ", "saving tiny to ")) for line in first.stderr.splitlines()), \
        first.stderr
    again = cli("preset", "tiny", "-o", out)  # already this preset: rewritten, same bytes
    assert again.returncode == 0, again.stderr[-2000:]
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()


# --- infer ------------------------------------------------------------------------------------------
INFER = ("--prompt", "a kite", "--steps", "1", "--height", "64", "--width", "64")


@pytest.mark.parametrize("name, needle", [
    ("manifest.png", "sidecar"),             # its sidecar would be OUT/manifest.json
    ("validation.png", "validation.json"),
    ("model_index.png", "model_index.json"),
    ("unet/model.png", "would write inside"),
    ("tokenizer/x.png", "would write inside"),
    ("scheduler/scheduler_config.png", "would write inside"),
    ("engines/new.png", "would write inside"),  # build writes there
])
def test_infer_output_onto_the_export(export, name, needle):
    unchanged = _untouched(export)
    out = export / name
    assert_refused(cli("infer", export, *INFER, "-o", out), 2, needle)
    assert unchanged()


def test_infer_output_onto_the_source_model(export, tiny_model, tmp_path):
    recorded = json.loads((export / "manifest.json").read_text())["model"]["path"]
    unchanged = _untouched(recorded)
    assert_refused(cli("infer", export, *INFER, "-o", os.path.join(recorded, "unet", "config.png")), 2,
                   "part of the source model")
    assert_refused(cli("infer", export, *INFER, "-o", os.path.join(recorded, "model_index.png")), 2,
                   "model_index.json")
    assert unchanged()


def test_infer_output_through_a_link_and_in_a_batch(export, tmp_path):
    unchanged = _untouched(export)
    os.symlink(export / "manifest.json", tmp_path / "img.json")  # the sidecar name is a link to the manifest
    assert_refused(cli("infer", export, *INFER, "-o", tmp_path / "img.png"), 2, "manifest.json")
    os.symlink(export / "unet", tmp_path / "u")
    assert_refused(cli("infer", export, *INFER, "--batch-size", "2", "-o", tmp_path / "u" / "b.png"), 2,
                   "would write inside")
    assert unchanged()
    assert not list(tmp_path.glob("*.png"))


@pytest.mark.parametrize("kind, needle", [
    ("proc", "cannot write in /proc"),
    ("under-file", "Not a directory"),
    ("directory", "is a directory"),
    ("not-png", "must be a .png"),
    ("long", "too long"),
    ("device", "character device"),
])
def test_infer_output_that_cannot_be_written(export_fp32, tmp_path, kind, needle):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "d.png").mkdir()
    out = {"proc": "/proc/x.png", "under-file": tmp_path / "afile" / "x.png", "directory": tmp_path / "d.png",
           "not-png": tmp_path / "x.jpg", "long": tmp_path / ("i" * 230 + ".png"), "device": "/dev/null"}[kind]
    if kind == "device":
        os.symlink("/dev/null", tmp_path / "null.png")
        out = tmp_path / "null.png"
    assert_refused(cli("infer", export_fp32, *INFER, "-o", out), 2, needle)
    assert os.path.exists("/dev/null") and not os.path.isfile("/dev/null")


def test_infer_on_a_read_only_filesystem_is_refused_before_generating(export_fp32, mount_tmpfs):
    ro = mount_tmpfs("1m")
    subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
    assert_refused(cli("infer", export_fp32, *INFER, "-o", ro / "x.png"), 2, "Read-only file system")


def test_infer_writes_into_the_export_root(export, tmp_path):
    """The neighbour that must keep working: a new file directly in the export (make demo does this)."""
    unchanged = _untouched(export)
    proc = cli("infer", export, *INFER, "-o", export / "image.png")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (export / "image.png").is_file() and (export / "image.json").is_file()
    (export / "image.png").unlink()
    (export / "image.json").unlink()
    assert unchanged()


def test_infer_on_a_model_directory_says_to_export_elsewhere(tiny_model, tmp_path):
    line = assert_refused(cli("infer", tiny_model, *INFER, "-o", tmp_path / "x.png"), 5, "diffusers model directory",
                          "not an export")
    assert f"-o {tiny_model} " not in line + " " and f"-o {tiny_model}-onnx" in line


@pytest.mark.parametrize("command, inside", [
    (["infer", *INFER, "-o", "TMP/x.png"], "unet"),
    (["serve"], "unet"),
    (["bench", "--steps", "1"], "unet/model.onnx"),  # a file of the export
    (["validate"], "nowhere"),  # a missing path inside it
    (["build", "--backend", "ort"], "tokenizer"),
], ids=lambda c: c[0] if isinstance(c, list) else c)
def test_readers_on_a_directory_inside_an_export_name_the_export(export, tmp_path, command, inside):
    """A path inside an export given where the export belongs: every reader (one place: ExportDir.open) names
    the export to give; it said "run 'sdexport export MODEL -o EXPORT/unet' first", which would export inside it."""
    unchanged = _untouched(export)
    args = [str(a).replace("TMP", str(tmp_path / "out")) for a in command]
    line = assert_refused(cli(args[0], export / inside, *args[1:]), 5, f"{export / inside}: inside the export "
                          f"{export.resolve()}", f"give the export directory: {export.resolve()}")
    assert "sdexport export" not in line
    assert unchanged() and not (tmp_path / "out").exists()


def _picture(path, size=64):
    from PIL import Image

    Image.new("RGB", (size, size), (200, 120, 40)).save(path, format="PNG")
    return path


@pytest.mark.parametrize("out, inputs, needle", [
    ("in.png", {"--image": "in.png"}, "--image"),
    ("b.png", {"--image": "b-1.png", "--batch-size": "2"}, "--image"),  # the batch's second image
    ("pic.png", {"--image": "in.png", "--lora": "pic.json"}, "--lora"),  # the sidecar onto the LoRA
])
def test_infer_output_onto_its_image_or_lora(export_fp32, tmp_path, out, inputs, needle):
    """infer reads --image/--mask/--lora besides the export: no output (image, batch image, sidecar) may be one."""
    args = []
    for option, value in inputs.items():
        if option in ("--image", "--lora"):
            path = tmp_path / value
            _picture(path) if option == "--image" else path.write_bytes(b"a LoRA's bytes")
            value = path
        args += [option, value]
    unchanged = _untouched(tmp_path)
    assert_refused(cli("infer", export_fp32, "--prompt", "a kite", "--steps", "2", "--strength", "1", *args,
                       "-o", tmp_path / out), 2, needle, "would overwrite")
    assert unchanged()


def test_bench_json_onto_its_image(export_fp32, tmp_path):
    image = _picture(tmp_path / "in.json")
    unchanged = _untouched(tmp_path)
    assert_refused(cli("bench", export_fp32, "--steps", "2", "--image", image, "--json", image), 2, "--image",
                   "would overwrite")
    assert unchanged()


BUILD_OTHER_BACKENDS = [("--backend", "inductor", "--device", "cpu", "--precision", "fp32", "--static", "64x64"),
                        ("--backend", "ort")]


@pytest.mark.parametrize("args", BUILD_OTHER_BACKENDS, ids=["inductor", "ort"])
def test_build_other_backends_on_no_export(args, tmp_path):
    """A missing path, a file: exit 5 naming it (the writer's lock file was opened first: a traceback)."""
    assert_refused(cli("build", tmp_path / "nowhere", *args), 5, "no such export directory")
    (tmp_path / "file").write_text("x")
    assert_refused(cli("build", tmp_path / "file", *args), 5, "not an export directory")
    assert sorted(os.listdir(tmp_path)) == ["file"]


@pytest.mark.parametrize("command", [["infer", "--prompt", "a", "-o", "OUT/x.png"], ["validate"], ["bench"],
                                     ["serve", "--write-repository", "OUT/repo"], ["build", *BUILD_OTHER_BACKENDS[0]],
                                     ["build", *BUILD_OTHER_BACKENDS[1]]], ids=lambda c: " ".join(c[:3]))
def test_commands_on_a_model_directory_leave_nothing_in_it(model, tmp_path, command):
    """The source model given where an export belongs: exit 5, and not even a lock file is left in it."""
    names = sorted(os.listdir(model))
    args = [str(a).replace("OUT", str(tmp_path)) for a in command]
    assert_refused(cli(args[0], model, *args[1:]), 5, "not an export")
    assert sorted(os.listdir(model)) == names


@pytest.mark.parametrize("where, name, needle", [
    ("EXPORT", "sdexport", "would write inside the export"),
    ("EXPORT/unet", "sdexport", "a directory of the export"),
    ("MODEL", "sdexport", "would write inside the source model"),
    ("MODEL/..", "MODELNAME", "would overwrite the source model"),  # DIR/<model-name> is the model itself
    ("EXPORT/..", "EXPORTNAME", "would overwrite the export"),
    ("TMP", "notes", "not a model written by 'sdexport serve'"),  # another directory's contents
    ("TMP", "file", "not a directory"),
    ("/proc", "sdexport", "cannot write"),
    ("TMP/file/sub", "sdexport", "cannot be written"),  # under a regular file
])
def test_serve_write_repository_onto_its_inputs(export, tmp_path, where, name, needle):
    """--write-repository DIR writes (and replaces) DIR/<model-name>: it wrote into the export and the source
    model, replaced whatever DIR/<model-name> held (the source model itself), and gave a traceback on /proc."""
    recorded = json.loads((export / "manifest.json").read_text())["model"]["path"]
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    (tmp_path / "file").write_text("mine")
    subs = {"EXPORTNAME": export.name, "MODELNAME": os.path.basename(recorded), "EXPORT": str(export),
            "MODEL": recorded, "TMP": str(tmp_path)}
    for key, value in subs.items():
        where, name = where.replace(key, value), name.replace(key, value)
    unchanged = _untouched(export, recorded, tmp_path / "notes", tmp_path / "file")
    assert_refused(cli("serve", export, "--write-repository", where, "--model-name", name), 2, needle)
    assert unchanged()
    assert not os.path.exists(os.path.join(where, name)) or name in ("notes", "file", os.path.basename(recorded),
                                                                      export.name)


def test_serve_write_repository_replaces_its_own_model_only(export_fp32, tmp_path):
    repo = tmp_path / "repo"
    for _ in range(2):  # the second run replaces the model the first one wrote
        proc = cli("serve", export_fp32, "--write-repository", repo)
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(os.listdir(repo)) == ["sdexport"]
    assert_refused(cli("serve", export_fp32, "--write-repository", repo, "--max-queue-delay-ms", "nan"), 2,
                   "--max-queue-delay-ms nan", "finite")


# --- bench, calibrate, quantize, build, validate ------------------------------------------------------
@pytest.mark.parametrize("target, needle", [
    ("manifest.json", "manifest.json"),
    ("unet/model.onnx", "unet"),
    ("validation.json", "validation.json"),
])
def test_bench_json_onto_the_export(export, target, needle):
    unchanged = _untouched(export)
    assert_refused(cli("bench", export, "--steps", "1", "--json", export / target), 2, needle)
    assert unchanged()


def test_bench_json_onto_the_source_model_or_nowhere(export_fp32, tmp_path):
    recorded = json.loads((export_fp32 / "manifest.json").read_text())["model"]["path"]
    unchanged = _untouched(recorded)
    assert_refused(cli("bench", export_fp32, "--json", os.path.join(recorded, "model_index.json")), 2,
                   "source model")
    assert_refused(cli("bench", export_fp32, "--json", "/proc/bench.json"), 2, "/proc")
    (tmp_path / "dir.json").mkdir()
    assert_refused(cli("bench", export_fp32, "--json", tmp_path / "dir.json"), 2, "directory")
    assert unchanged()


def test_calibrate_output_onto_its_inputs(model, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\na lighthouse\n")
    os.symlink(prompts, tmp_path / "link.npz")
    unchanged = _untouched(model, prompts)
    for out, needle in ((prompts, "prompt file"), (tmp_path / "link.npz", "prompt file"),
                        (model / "unet" / "c.npz", "would write inside"),
                        (model / "model_index.json", "model_index.json")):
        assert_refused(cli("calibrate", model, "--prompts", prompts, "--num-prompts", "1", "-o", out), 2, needle)
    assert unchanged()


def test_calibrate_output_onto_an_export(model, export):
    """A calibration file may be a new file in an export's root (quantize's --calib there), never one of the
    export's own files: -o OUT/unet/model.onnx overwrote the UNet the manifest lists (exit 0)."""
    unchanged = _untouched(export)
    for out, needle in ((export / "unet" / "model.onnx", "listed in"), (export / "manifest.json", "manifest.json"),
                        (export / "unet" / "c.npz", "would write inside")):
        assert_refused(cli("calibrate", model, "--num-prompts", "1", "--steps", "1", "-o", out), 2, needle)
    assert unchanged()


def test_quantize_calibration_file_inside_what_it_replaces(export, tmp_path):
    (export / "unet_int8").mkdir(exist_ok=True)
    calib = export / "unet_int8" / "calib.npz"
    calib.write_bytes(b"not read")
    unchanged = _untouched(export)
    assert_refused(cli("quantize", export, "--calib", calib), 2, "would contain the calibration file")
    assert unchanged()


@pytest.mark.parametrize("target", ["manifest.json", "unet/model.onnx", "model_index.json"])
def test_build_timing_cache_onto_the_export(export, target):
    unchanged = _untouched(export)
    assert_refused(cli("build", export, "--timing-cache", export / target), 2, target.split("/")[-1])
    assert unchanged()


def test_validate_on_a_read_only_export_is_refused_before_running(export_fp32, mount_tmpfs):
    ro = mount_tmpfs("64m")
    copy = shutil.copytree(export_fp32, ro / "export")
    subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
    assert_refused(cli("validate", copy, "--components", "vae_decoder"), 2, "validation.json",
                   "Read-only file system")


# --- symbolic link loops and damaged exports (bad-input audit) -------------------------------------
LOOP_COMMANDS = [["infer", "--prompt", "a", "-o", "OUT/x.png"], ["validate"], ["bench"],
                 ["serve", "--write-repository", "OUT/repo"], ["build", *BUILD_OTHER_BACKENDS[0]],
                 ["build", *BUILD_OTHER_BACKENDS[1]], ["quantize", "--calib", "OUT/c.npz"]]


@pytest.mark.parametrize("command", LOOP_COMMANDS, ids=lambda c: " ".join(c[:3]))
def test_a_symlink_loop_given_as_the_export(tmp_path, command):
    """A link to itself where the export belongs: a RuntimeError traceback from paths.resolved (Path.resolve
    raises 'Symlink loop'); now exit 5 naming the path, and nothing written beside it."""
    loop = tmp_path / "loop"
    os.symlink(loop, loop)
    args = [str(a).replace("OUT", str(tmp_path)) for a in command]
    assert_refused(cli(args[0], loop, *args[1:]), 5, str(loop), "symbolic link loop")
    assert os.listdir(tmp_path) == ["loop"]


def test_a_symlink_loop_as_an_output(export, tmp_path):
    """A loop as the output of export and serve --write-repository: exit 2, 'cannot be written' (a traceback)."""
    loop = tmp_path / "loop"
    os.symlink(loop, loop)
    unchanged = _untouched(export)
    assert_refused(cli("export", "tiny", "-o", loop), 2, str(loop), "cannot be written")
    assert_refused(cli("serve", export, "--write-repository", loop), 2, str(loop), "cannot be written")
    assert unchanged() and sorted(os.listdir(tmp_path)) == ["export", "loop"]


@pytest.mark.parametrize("command", [["infer", "--prompt", "a", "-o", "OUT/x.png"], ["validate"],
                                     ["serve", "--write-repository", "OUT/repo"], ["build", *BUILD_OTHER_BACKENDS[0]],
                                     ["build", *BUILD_OTHER_BACKENDS[1]]], ids=lambda c: " ".join(c[:3]))
def test_a_symlink_loop_inside_the_export(export, tmp_path, command):
    """unet/model.onnx replaced by a link to itself: infer gave a traceback, build --backend ort built on it and
    serve --write-repository wrote a repository (exit 0). Now exit 5 naming the file, and nothing written."""
    victim = export / "unet" / "model.onnx"
    victim.unlink()
    os.symlink("model.onnx", victim)
    manifest = (export / "manifest.json").read_bytes()
    before = sorted(n for n in os.listdir(export) if n != ".sdexport.lock")
    args = [str(a).replace("OUT", str(tmp_path)) for a in command]
    assert_refused(cli(args[0], export, *args[1:]), 5, str(victim), "symbolic link loop")
    assert (export / "manifest.json").read_bytes() == manifest
    assert sorted(n for n in os.listdir(export) if n != ".sdexport.lock") == before
    assert sorted(os.listdir(tmp_path)) == ["export"]


DAMAGES = {"truncated": lambda p: os.truncate(p / "unet" / "model.onnx", 1000),
           "removed": lambda p: (p / "unet" / "model.onnx").unlink(),
           "config removed": lambda p: (p / "unet" / "config.json").unlink()}
DAMAGE_NEEDLES = {"truncated": ("unet/model.onnx", "does not match the manifest"),
                  "removed": ("unet/model.onnx", "missing"), "config removed": ("unet/config.json", "missing")}


@pytest.mark.parametrize("args", BUILD_OTHER_BACKENDS, ids=["inductor", "ort"])
def test_build_other_backends_refuse_a_damaged_export(export, tiny_model, args):
    """A truncated unet/model.onnx: build --backend ort/inductor exited 0, wrote engines and rewrote the manifest;
    the reading commands refused the export (exit 5) and the repair ('export MODEL -o E') was refused as it 'would
    drop' those engines. Now build refuses with the reading commands' line and writes nothing; the repair works."""
    DAMAGES["truncated"](export)
    unchanged = _untouched(export)
    line = assert_refused(cli("build", export, *args), 5, *DAMAGE_NEEDLES["truncated"])
    assert line == assert_refused(cli("validate", export), 5)  # one message: Manifest.check_file's
    assert unchanged() and not (export / "ort_cuda").exists() and not (export / "inductor").exists()
    repair = cli("export", tiny_model, "-o", export)
    assert repair.returncode == 0, repair.stderr[-2000:]
    data = json.loads((export / "manifest.json").read_text())
    assert tree_digest(export)["unet/model.onnx"] == data["components"]["unet"]["sha256"]
    assert cli("validate", export, "--components", "unet").returncode in (0, 6)


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_serve_write_repository_refuses_a_damaged_export(export, tmp_path, damage):
    """serve --write-repository exited 0 on an export with its UNet truncated or removed, or its config removed:
    now exit 5 naming the file, as the reading commands, and DIR is not created."""
    DAMAGES[damage](export)
    repo = tmp_path / "repo"
    assert_refused(cli("serve", export, "--write-repository", repo), 5, *DAMAGE_NEEDLES[damage])
    assert not repo.exists()
