"""TensorRT engines: real TensorRT-RTX builds of the tiny fp16 export (no GPU needed), what the manifest
records about them, skipping unchanged engines, and every bad input (wrong export, corrupt or foreign
plans, interrupted builds, engines that cannot run here)."""

from __future__ import annotations

import json
import os
import shutil
import struct

import pytest

from conftest import assert_error, copy_export, run_cli, tensorrt_form_problems

COMPONENTS = ("text_encoder", "unet", "vae_decoder", "vae_encoder")  # the SD family's
from sdexport.errors import BackendUnavailable, CannotRunHere, IntegrityError, ShapeError, UsageError
from sdexport.manifest import sha256_file
from sdexport.runtime import ExportDir

RTX_TARGETS = ["8.0", "8.6", "8.9", "12.0"]


def _copy(src, dst, with_engines=True):
    return copy_export(src, dst, with_engines)


def _manifest(path):
    return json.loads((path / "manifest.json").read_text())


_run = run_cli
_one_line = assert_error


# --- what a build makes -----------------------------------------------------------------------

def test_engines_and_manifest_entries(built, trt):
    from sdexport.backends.trt import read_rtx_header

    out, report, messages = built
    manifest = _manifest(out)
    specs = ExportDir.open(out).specs
    version = trt.__version__
    assert report["built"] == list(COMPONENTS) and report["up_to_date"] == []
    assert set(manifest["engines"]) == set(COMPONENTS)
    for name in COMPONENTS:
        entry, onnx, spec = manifest["engines"][name], manifest["components"][name], specs[name]
        short = ".".join(version.split(".")[:3])
        assert entry["file"] == f"engines/{name}.rtx-{short}.fp16.dyn.sm80-86-89-120.plan"
        plan = out / entry["file"]
        assert plan.is_file() and sha256_file(plan) == entry["sha256"] and plan.stat().st_size == entry["size_bytes"]
        assert (entry["flavour"], entry["version"], entry["precision"]) == ("rtx", version, "fp16")
        assert entry["compute_capabilities"] == RTX_TARGETS
        # the profile TensorRT accepted (read back from it) is the spec's min/opt/max
        assert entry["profile"] == spec.to_json()["profile"] == onnx["profile"]
        assert entry["profile_kind"] == "dyn"
        assert entry["axes"] == {a: [ax.min, ax.opt, ax.max] for a, ax in spec.axes.items()}
        assert entry["onnx"] == {"component": name, "file": onnx["file"], "sha256": onnx["sha256"]}
        # I/O as TensorRT parsed the network: the spec's names, dtypes, ranks; -1 exactly on named axes
        for kind, tensors in (("inputs", spec.inputs), ("outputs", spec.outputs)):
            assert [(t["name"], t["dtype"]) for t in entry[kind]] == [(t.name, t.dtype) for t in tensors]
            assert [t["shape"] for t in entry[kind]] == [[d if isinstance(d, int) else -1 for d in t.dims]
                                                          for t in tensors]
        assert entry["timing_cache"].startswith("not used") and entry["opt_level"] == 3
        header = read_rtx_header(plan.read_bytes()[:64])
        assert header["size"] == plan.stat().st_size
        assert header["version"] == tuple(int(x) for x in version.split(".")[:3])
        assert header["targets"] == RTX_TARGETS
        assert entry["builder_flags"] == {"TF32": False, "REQUIRE_USER_ALLOCATION": True}  # read back from TensorRT
        assert entry["key"]["builder_flags"] == {"TF32": False, "REQUIRE_USER_ALLOCATION": True}
        assert entry["activation_memory_bytes"] > 0
    assert any("timing cache not used" in m for m in messages)
    wrote = [m for m in messages if "wrote engines/" in m]
    assert len(wrote) == 4 and all(" s, " in m and "MiB activation memory" in m for m in wrote), messages


def test_fp16_graphs_have_the_forms_tensorrt_expects(export_fp16):
    """Softmax FP32 between Casts with Q and K scaled before the first MatMul, FP32 Resize and normalizations
    (scale and bias included), no ConvTranspose: read from the files (README, TensorRT engines)."""
    manifest = _manifest(export_fp16)
    seen = {}
    for name in COMPONENTS:
        counts, problems = tensorrt_form_problems(export_fp16 / manifest["components"][name]["file"])
        assert problems == [], (name, problems[:5])
        seen[name] = counts
    assert seen["unet"]["Softmax"] == 8 and seen["unet"]["Resize"] >= 1 and seen["text_encoder"]["LayerNormalization"]


def test_the_form_check_sees_an_fp16_softmax_and_an_fp16_resize(tmp_path):
    import onnx
    from onnx import TensorProto as T
    from onnx import helper

    half = T.FLOAT16
    inputs = [helper.make_tensor_value_info(n, half, [1, 4, 8, 8]) for n in ("q", "k", "v")]
    scales = helper.make_tensor("scales", T.FLOAT, [4], [1, 1, 2, 2])
    nodes = [helper.make_node("MatMul", ["q", "k"], ["s"]), helper.make_node("Softmax", ["s"], ["p"], axis=-1),
             helper.make_node("MatMul", ["p", "v"], ["o"]), helper.make_node("Resize", ["o", "", "scales"], ["r"])]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("r", half, None)], [scales])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "m.onnx")
    problems = tensorrt_form_problems(tmp_path / "m.onnx")[1]
    assert [p[0] for p in problems] == ["Softmax", "Resize"], problems


def test_every_attention_block_is_fused_by_tensorrt(built):
    """Each attention of the FP16 graphs (MatMul -> Cast FP32 -> Softmax -> Cast FP16 -> MatMul, Q and K scaled
    by sqrt(scale) before the first MatMul) is assigned to TensorRT's fused self-attention kernel: the builder
    names both MatMuls and the Softmax of every block. Where that fails TensorRT materialises the scores
    (batch x heads x tokens^2; about 69 GB for SD 1.5 at 4 x 1024 px)."""
    import onnx

    out, report, _ = built
    manifest = _manifest(out)
    for name in COMPONENTS:
        graph = onnx.load(out / manifest["components"][name]["file"], load_external_data=False).graph
        softmax = [n for n in graph.node if n.op_type == "Softmax"]
        fused = set(report["attention_nodes"][name])
        if name != "vae_encoder":
            assert softmax, name
        for node in softmax:
            scores = next(n for n in graph.node if node.input[0] in n.output)  # the Cast to FP32 (or a mask Add)
            assert node.name in fused, (name, node.name)
            assert scores.op_type in ("Cast", "Add"), (name, scores.op_type)
        assert manifest["engines"][name]["fused_attention_nodes"] == len(fused) == 3 * len(softmax), name


def test_second_build_rebuilds_nothing(built):
    from sdexport.build import build

    out, _, _ = built
    before = {p.name: (p.stat().st_mtime_ns, sha256_file(p)) for p in (out / "engines").glob("*.plan")}
    messages: list[str] = []
    report = build(out, precision="fp16", say=messages.append)
    assert report["built"] == [] and report["up_to_date"] == list(COMPONENTS)
    assert sum(m.endswith("not rebuilt") for m in messages) == 4 and "nothing to build" in messages[-1]
    assert {p.name: (p.stat().st_mtime_ns, sha256_file(p)) for p in (out / "engines").glob("*.plan")} == before
    result = _run("build", out)  # the command says so too
    assert result.exit_code == 0, result.stderr
    assert "0 built, 4 up to date" in result.stdout and "nothing to build" in result.stderr
    result = _run("build", out, "--components", "unet")  # what it built, and all the export holds
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith(f"{out}/manifest.json: 0 built, 1 up to date (TensorRT-RTX ")
    assert result.stdout.rstrip().endswith("; the export holds 4 TensorRT engine(s): " + ", ".join(COMPONENTS))


def test_changed_inputs_rebuild_only_that_engine(built, tmp_path):
    from sdexport.build import build

    out = _copy(built[0], tmp_path / "copy")
    old = _manifest(out)["engines"]
    report = build(out, components=["vae_encoder"], opt_level=2)
    assert report["built"] == ["vae_encoder"]
    new = _manifest(out)["engines"]
    assert new["vae_encoder"]["opt_level"] == 2 and new["vae_encoder"]["key"] != old["vae_encoder"]["key"]
    assert {k: v for k, v in new.items() if k != "vae_encoder"} == {k: v for k, v in old.items() if k != "vae_encoder"}


def test_builder_flags_are_applied_and_in_the_rebuild_key(built, trt, tmp_path, monkeypatch):
    """The flags reach TensorRT's builder config (spied on the real one), and a change of them rebuilds."""
    from sdexport import build as build_module

    configs = []
    create = trt.Builder.create_builder_config
    monkeypatch.setattr(trt.Builder, "create_builder_config", lambda self: configs.append(create(self)) or configs[-1])
    out = _copy(built[0], tmp_path / "flags")
    assert build_module.build(out, components=["vae_encoder"])["built"] == []
    monkeypatch.setitem(build_module.BUILDER_FLAGS, "rtx", {"TF32": True, "REQUIRE_USER_ALLOCATION": True})
    assert build_module.build(out, components=["vae_encoder"])["built"] == ["vae_encoder"]
    assert configs[-1].get_flag(trt.BuilderFlag.TF32) and configs[-1].get_flag(trt.BuilderFlag.REQUIRE_USER_ALLOCATION)
    assert _manifest(out)["engines"]["vae_encoder"]["builder_flags"] == {"TF32": True, "REQUIRE_USER_ALLOCATION": True}
    monkeypatch.undo()
    monkeypatch.setattr(trt.Builder, "create_builder_config", lambda self: configs.append(create(self)) or configs[-1])
    assert build_module.build(out, components=["vae_encoder"])["built"] == ["vae_encoder"]
    assert not configs[-1].get_flag(trt.BuilderFlag.TF32)  # TensorRT's default is on
    assert configs[-1].get_flag(trt.BuilderFlag.REQUIRE_USER_ALLOCATION)


@pytest.mark.parametrize("cc, gpu, needles", [
    ((7, 5), "Tesla T4", ["will not run on this GPU (Tesla T4, compute capability 7.5", "cannot build the FP16 UNet",
                          "pip install tensorrt-cu13", "--trt tensorrt"]),
    ((9, 0), "NVIDIA H100 80GB HBM3", ["cannot run on compute capability 9.0", "--trt tensorrt"]),
    ((12, 1), "NVIDIA GB10", ["will not run on this GPU (NVIDIA GB10", "--compute-capability 12.1"]),
    ((8, 6), "NVIDIA RTX A6000", []),
])
def test_build_warns_when_the_targets_exclude_this_gpu(built, cc, gpu, needles, tmp_path, monkeypatch):
    """TensorRT-RTX builds ahead of time for its default targets; with a GPU they leave out, the build says so
    and what works there (the engines themselves are up to date: nothing is rebuilt)."""
    import torch

    from sdexport.build import build

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cc)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: gpu)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    messages: list[str] = []
    assert build(built[0], say=messages.append)["built"] == []
    warnings = [m for m in messages if m.startswith("warning: ")]
    if not needles:
        assert warnings == []
    else:
        assert len(warnings) == 1
        for needle in needles:
            assert needle in warnings[0], warnings[0]


def test_status_on_a_t4_points_at_nvidias_tensorrt(trt):
    """sdexport env on a T4 with only TensorRT-RTX installed: it builds, but not the engines this GPU can run.
    (``trt``: TensorRT-RTX must be installed, as the T4 host here has it; CI fails without it.)"""
    from sdexport.backends.trt import trt_status

    status = trt_status((7, 5), flavour="rtx")
    assert status["can_build"] and not status["can_run"]
    assert "pip install tensorrt-cu13" in status["why"] and "--trt tensorrt" in status["why"]
    assert trt_status((8, 0), flavour="rtx")["can_run"]


def test_known_build_failures_say_what_works(export_other, export_fp16):
    from sdexport.build import BuildFailed, _known_failure

    myelin = BuildFailed("text_encoder: TensorRT could not build the engine for 8.6: ... Error Code 1: Myelin (...)")
    hint = _known_failure(ExportDir.open(export_other), "text_encoder", "rtx", "fp16", ["8.6"], myelin)
    root = ExportDir.open(export_other).root
    assert "head dimension (12)" in hint and f"sdexport build {root}-fp32 --precision fp32" in hint
    assert "--force" not in hint  # an FP32 re-export into this FP16 export would replace it (refused now)
    assert _known_failure(ExportDir.open(export_fp16), "text_encoder", "rtx", "fp16", ["8.6"], myelin) == ""  # 8
    assert _known_failure(ExportDir.open(export_other), "text_encoder", "rtx", "fp32", ["8.6"], myelin) == ""
    turing = _known_failure(ExportDir.open(export_fp16), "unet", "rtx", "fp16", ["7.5"], BuildFailed("SM75"))
    assert "--trt tensorrt" in turing


@pytest.mark.slow
def test_tensorrt_rtx_fp16_text_encoder_with_head_dim_12_fails_as_documented(trt, other_model, tmp_path):
    """The documented TensorRT-RTX 1.7.1 limitation, reproduced (a CLIP with hidden size 48 and 4 heads): the build
    fails inside Myelin, exit 9 names the condition and the FP32 way out, and that way builds. When a TensorRT-RTX
    release fixes it, this test fails and the README's limitation can go."""
    from sdexport.export import export

    out = tmp_path / "other16"
    export(str(other_model), out, dtype="fp16", components=["text_encoder"], max_images=2)
    result = _run("build", out, "--compute-capability", "8.6")
    _one_line(result, 9, "Myelin", "head dimension (12)", "--precision fp32")
    assert not list((out / "engines").glob("*.plan"))
    export(str(other_model), out, components=["text_encoder"], max_images=2, force=True)
    assert _run("build", out, "--precision", "fp32", "--components", "text_encoder",
                "--compute-capability", "8.6").exit_code == 0



def test_tensorrt_rtx_fp16_text_encoder_2_with_head_dim_12_is_the_same_limitation(trt, sdxl_tiny_model, tmp_path):
    """sdxl-tiny's second text encoder (hidden size 48, 4 heads: head dimension 12) fails the same way; exit 9 names
    the condition for it too (before, only a component named text_encoder was recognised), and the way out it names
    keeps the rest of the export: an export holds one dtype, so re-exporting one component in FP32 with --force into
    it would replace every other component."""
    from sdexport.export import export

    out = tmp_path / "sdxl16"
    export(str(sdxl_tiny_model), out, dtype="fp16", components=["text_encoder_2"], max_images=2)
    result = _run("build", out, "--compute-capability", "8.6")
    _one_line(result, 9, "Myelin", "head dimension (12)", f"-o {out}-fp32", "--precision fp32")
    assert "--force" not in result.stderr.strip().splitlines()[-1]
    assert not list((out / "engines").glob("*.plan"))

@pytest.mark.slow
def test_a_failed_build_prints_one_error_line_in_a_real_process(trt, sdxl_tiny_model, tmp_path):
    """The documented TensorRT-RTX failure in a real process: TensorRT-RTX's compiler prints its own
    "Internal Error: MyelinCheckException" on file descriptor 2 (the in-process runner never sees it); sdexport
    holds that descriptor during the build, so stderr ends with its one error line and no other error text,
    while sdexport's own progress lines still reach stderr."""
    import subprocess

    import conftest
    from sdexport.export import export

    out = tmp_path / "sdxl16"
    export(str(sdxl_tiny_model), out, dtype="fp16", components=["text_encoder_2"], max_images=2)
    proc = subprocess.run(conftest.sdexport_cmd("build", out, "--compute-capability", "8.6"),
                          env=conftest.sdexport_env(), capture_output=True, text=True, timeout=600)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 9 and lines[-1].startswith("error: ") and "head dimension (12)" in lines[-1], lines
    assert not [line for line in lines[:-1] if "Error" in line or "error" in line], lines
    assert any("text_encoder_2" in line and "building" in line for line in lines[:-1]), lines


def test_a_successful_build_writes_back_what_tensorrt_printed(monkeypatch, capfd):
    """Held native stderr is written back where the build succeeded (TensorRT's warnings are the user's) and
    dropped where it failed."""
    import os

    from sdexport.build import _native_stderr_held

    for failed, want in ((False, True), (True, False)):
        with _native_stderr_held() as held:
            os.write(2, b"native line from the builder\n")
            held.failed = failed
        err = capfd.readouterr().err
        assert ("native line from the builder" in err) is want, (failed, err)


def test_static_profile(trt, export_fp16, tmp_path):
    from sdexport.build import build

    out = _copy(export_fp16, tmp_path / "static", with_engines=False)
    build(out, components=["unet", "vae_decoder"], static="128x64", batch=1)
    engines = _manifest(out)["engines"]
    unet, vae = engines["unet"], engines["vae_decoder"]
    assert unet["profile_kind"] == "static" and "static-b1-128x64" in unet["file"]
    # one image with guidance: two UNet rows; the VAE decodes one image; latent = pixels / 8
    assert unet["profile"]["sample"] == [[2, 4, 16, 8]] * 3
    assert unet["profile"]["encoder_hidden_states"] == [[2, 77, 32]] * 3
    assert vae["profile"]["latent_sample"] == [[1, 4, 16, 8]] * 3
    assert all(lo == opt == hi for lo, opt, hi in unet["axes"].values())
    # and validation would use exactly that shape
    from sdexport.backends.trt import profile_geometries

    assert [(g.images, g.height, g.width, g.guidance) for g in profile_geometries(unet)] == [(1, 128, 64, True)]
    with pytest.raises(ShapeError, match=r"\[64, 256\]"):
        build(out, static="512x512")


def test_profile_requests_in_user_terms(export_fp16):
    from sdexport.build import component_profile, profile_request

    export = ExportDir.open(export_fp16)
    kind, req = profile_request(export.ranges)
    assert kind == "dyn"
    for name, spec in export.specs.items():
        profile, _ = component_profile(spec, req)
        assert profile == spec.to_json()["profile"], name
    kind, req = profile_request(export.ranges, opt_size="192x128", opt_batch=2, max_batch=2, min_size="96x96")
    profile, axes = component_profile(export.specs["unet"], req)
    assert kind == "custom"
    assert profile["sample"] == [[1, 4, 12, 12], [4, 4, 24, 16], [4, 4, 32, 32]]
    assert axes == {"batch": [1, 4, 4], "latent_height": [12, 24, 32], "latent_width": [12, 16, 32]}
    assert component_profile(export.specs["vae_decoder"], req)[1]["batch"] == [1, 2, 2]
    with pytest.raises(ShapeError, match="min <= opt <= max"):
        profile_request(export.ranges, min_size="192x192", opt_size="128x128")
    with pytest.raises(ShapeError, match="multiple of 16"):
        profile_request(export.ranges, opt_size="100x100")
    with pytest.raises(UsageError, match="--batch goes with --static"):
        profile_request(export.ranges, batch=2)
    for option, value in (("static", "big"), ("static", "128"), ("min_size", "96"), ("opt_size", "128x"),
                          ("max_size", "128x128x2"), ("static", "0x64")):
        # a lone number was taken as a square (128 -> 128x128): every size option takes height x width
        with pytest.raises(UsageError, match=rf"^--{option.replace('_', '-')} takes HEIGHTxWIDTH in pixels, "
                                             rf"e\.g\. 1024x1024 \(got '{value}'\)$"):
            profile_request(export.ranges, **{option: value})


# --- bad input at build time ------------------------------------------------------------------

def test_precision_must_match_the_export(trt, export_fp32, export_fp16, tmp_path):
    from sdexport.build import build

    before = _manifest(export_fp32)
    with pytest.raises(UsageError, match="is an fp32 export.*--dtype fp16"):
        build(export_fp32, precision="fp16")
    assert _manifest(export_fp32) == before and not (export_fp32 / "engines").exists()
    _one_line(_run("build", export_fp32, "--precision", "fp16"), 2, "--dtype fp16")
    with pytest.raises(UsageError, match="is an fp16 export"):
        build(export_fp16, precision="fp32")
    with pytest.raises(UsageError, match="run sdexport quantize"):
        build(export_fp16, precision="int8")
    out = _copy(export_fp32, tmp_path / "fp32", with_engines=False)  # --precision fp32 builds an FP32 export
    build(out, precision="fp32", components=["vae_decoder"])
    entry = _manifest(out)["engines"]["vae_decoder"]
    assert entry["precision"] == "fp32" and ".fp32.dyn." in entry["file"] and (out / entry["file"]).is_file()
    assert entry["builder_flags"]["TF32"] is False  # FP32 means FP32: judged at FP32 thresholds


def test_int8_builds_the_quantized_unet(trt, export_fp32, tmp_path):
    """--precision int8: the UNet engine comes from manifest.components['unet_int8'] (what quantize writes),
    the other components are built as exported. A copy of the FP32 UNet stands in for the quantized one."""
    from sdexport.build import build

    out = _copy(export_fp32, tmp_path / "int8", with_engines=False)
    shutil.copytree(out / "unet", out / "unet_int8")
    data = _manifest(out)
    data["components"]["unet_int8"] = dict(data["components"]["unet"], file="unet_int8/model.onnx",
                                           precision={"dtype": "int8"})
    (out / "manifest.json").write_text(json.dumps(data))
    messages: list[str] = []
    build(out, precision="int8", components=["unet", "vae_decoder"], say=messages.append)
    engines = _manifest(out)["engines"]
    assert engines["unet"]["onnx"]["component"] == "unet_int8" and engines["unet"]["precision"] == "int8"
    assert engines["unet"]["onnx"]["sha256"] == data["components"]["unet_int8"]["sha256"]
    assert ".int8.dyn." in engines["unet"]["file"]
    assert engines["vae_decoder"]["precision"] == "fp32" and engines["vae_decoder"]["onnx"]["component"] == "vae_decoder"
    assert any("vae_decoder is an fp32 export" in m for m in messages)
    assert build(out, precision="int8", components=["unet", "vae_decoder"])["built"] == []


def test_bad_targets_and_flavours(trt, export_fp16):
    from sdexport.build import parse_ccs

    assert parse_ccs("8.0, 86,sm_89,sm120") == ["8.0", "8.6", "8.9", "12.0"]
    _one_line(_run("build", export_fp16, "--compute-capability", "9.0"), 2, "cannot target", "8.0, 8.6")
    _one_line(_run("build", export_fp16, "--compute-capability", "eight"), 2, "8.0,8.6")
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        # TensorRT-RTX is here (the trt fixture): the line names the package that is missing, and --trt rtx
        _one_line(_run("build", export_fp16, "--trt", "tensorrt"), 7, "'tensorrt') is not importable here",
                  "pip install tensorrt-cu13", f"TensorRT-RTX {trt.__version__} is installed here: --trt rtx")


def test_failed_build_leaves_nothing(trt, export_fp16, tmp_path):
    """TensorRT-RTX cannot compile FP32 GEMMs for Turing (7.5); the UNet's FP32 time embedding has one."""
    from sdexport.build import BuildFailed, build

    out = _copy(export_fp16, tmp_path / "sm75", with_engines=False)
    with pytest.raises(BuildFailed, match="could not build the engine for 7.5: .*(Turing|SM75)"):
        build(out, components=["unet"], compute_capabilities="7.5")
    assert list((out / "engines").glob("*")) == [] and _manifest(out)["engines"] == {}


def test_parser_errors_are_reported(trt, export_fp16, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from sdexport.build import build

    out = _copy(export_fp16, tmp_path / "badop", with_engines=False)
    path = out / "vae_decoder" / "model.onnx"
    x = helper.make_tensor_value_info("latent_sample", TensorProto.FLOAT, ["batch", 4, "latent_height", "latent_width"])
    y = helper.make_tensor_value_info("sample", TensorProto.FLOAT,
                                      ["batch", 3, "latent_height * 8", "latent_width * 8"])
    graph = helper.make_graph([helper.make_node("FooBarOp", ["latent_sample"], ["sample"])], "bad", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    data = _manifest(out)
    data["components"]["vae_decoder"]["sha256"] = sha256_file(path)
    (out / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(IntegrityError, match="ONNX parser refused it.*FooBarOp"):
        build(out, components=["vae_decoder"])
    assert not list((out / "engines").glob("*.plan"))


def test_interrupted_build_keeps_the_previous_engine(built, trt, tmp_path, monkeypatch):
    from sdexport.build import build

    out = _copy(built[0], tmp_path / "interrupt")
    entry = _manifest(out)["engines"]["vae_decoder"]
    plan = out / entry["file"]
    before = plan.read_bytes()

    def interrupted(self, network, config):
        raise KeyboardInterrupt

    monkeypatch.setattr(trt.Builder, "build_serialized_network", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build(out, components=["vae_decoder"], force=True)  # same file name: must not be replaced
    with pytest.raises(KeyboardInterrupt):
        build(out, components=["vae_decoder"], static="64x64")  # a new file name: must not appear
    assert plan.read_bytes() == before
    assert _manifest(out)["engines"]["vae_decoder"] == entry
    assert sorted(p.name for p in (out / "engines").iterdir()) == sorted(
        p.name for p in (built[0] / "engines").iterdir()), "no temporary or partial plan left"


def test_ctrl_c_cancels_a_running_build(trt, export_fp16, tmp_path, monkeypatch):
    """A real SIGINT while TensorRT builds: the build is cancelled through its progress monitor."""
    import signal

    from sdexport import build as build_module

    out = _copy(export_fp16, tmp_path / "sigint", with_engines=False)
    phase_start = build_module._Progress.phase_start

    def interrupt_once(self, phase_name, parent_phase, num_steps):
        if not getattr(self, "sent", False):
            self.sent = True
            os.kill(os.getpid(), signal.SIGINT)
        return phase_start(self, phase_name, parent_phase, num_steps)

    monkeypatch.setattr(build_module._Progress, "phase_start", interrupt_once)
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        build_module.build(out, components=["unet"])
    assert signal.getsignal(signal.SIGINT) is handler
    assert not list((out / "engines").glob("*")) and _manifest(out)["engines"] == {}


# --- bad input at load time -------------------------------------------------------------------

def _load(out, device="cuda"):
    from sdexport.backends import load_engines

    return load_engines(out, "trt", device=device)


def test_corrupt_or_truncated_plans(built, trt, tmp_path):
    out = _copy(built[0], tmp_path / "corrupt")
    data = _manifest(out)
    plan = out / data["engines"]["unet"]["file"]
    blob = plan.read_bytes()
    plan.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(IntegrityError, match="does not match the manifest.*truncated or corrupt"):
        _load(out)
    _one_line(_run("infer", out, "--prompt", "p", "-o", tmp_path / "x.png", "--backend", "trt"), 5, "sha256")
    # the same file with its sha256 re-recorded: the TensorRT-RTX header still gives it away
    data["engines"]["unet"]["sha256"] = sha256_file(plan)
    (out / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(IntegrityError, match=rf"header says {len(blob)} bytes, the file has {len(blob) // 2}"):
        _load(out)
    plan.write_bytes(b"XXXX" + blob[4:])
    data["engines"]["unet"]["sha256"] = sha256_file(plan)
    (out / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(IntegrityError, match="not a TensorRT-RTX plan"):
        _load(out)
    other = bytearray(blob)
    other[32:36] = struct.pack("<I", 1 << 1)  # header claims SM80 only
    plan.write_bytes(bytes(other))
    data["engines"]["unet"]["sha256"] = sha256_file(plan)
    (out / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(IntegrityError, match="header targets 8.0, the manifest 8.0, 8.6, 8.9, 12.0"):
        _load(out)


def test_refused_plans_are_named_by_tensorrt(built, trt, tmp_path):
    """What TensorRT-RTX itself answers (Runtime.get_engine_validity, before anything needs CUDA), as sdexport tells
    it: a file without the plan magic is a bad file (exit 5); an intact plan on a host without a usable driver
    cannot run here (exit 8), with TensorRT's own words."""
    from sdexport.backends.trt import capture_logger, deserialize

    src = built[0] / _manifest(built[0])["engines"]["vae_decoder"]["file"]
    path = tmp_path / "engines" / "x.plan"
    path.parent.mkdir()
    runtime = trt.Runtime(capture_logger(trt))
    path.write_bytes(b"XXXX" + src.read_bytes()[4:])
    with pytest.raises(IntegrityError, match="not a plan TensorRT can read.*sdexport build .* --force"):
        deserialize(trt, runtime, path, "vae_decoder")
    import torch

    if torch.cuda.is_available():
        return
    path.write_bytes(src.read_bytes())
    with pytest.raises(CannotRunHere, match="NVIDIA driver .*TensorRT: .*CUDA driver version is insufficient") as exc:
        deserialize(trt, runtime, path, "vae_decoder")
    assert "--force" not in str(exc.value)  # no rebuild helps a driver


def test_engine_of_another_tensorrt(built, trt, tmp_path):
    out = _copy(built[0], tmp_path / "foreign")
    data = _manifest(out)
    data["engines"]["unet"]["version"] = "1.6.0.50"
    (out / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(CannotRunHere) as exc:  # exit 8: the engine is intact, this host's TensorRT cannot run it
        _load(out)
    msg = str(exc.value)
    assert "TensorRT-RTX 1.6.0.50" in msg and f"TensorRT-RTX {trt.__version__} is installed" in msg
    assert "rebuild" in msg and "\n" not in msg
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        data["engines"]["unet"].update(flavour="tensorrt", flavour_name="TensorRT", version="10.13.3.9")
        (out / "manifest.json").write_text(json.dumps(data))
        with pytest.raises(BackendUnavailable, match=rf"built with TensorRT 10.13.3.9.*TensorRT-RTX {trt.__version__}"):
            _load(out)
    # an engine built from an ONNX that has since changed
    data = _manifest(built[0])
    data["components"]["unet"]["sha256"] = "0" * 64
    (out / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(IntegrityError, match="built from an ONNX that is no longer in the export"):
        _load(out)


@pytest.mark.parametrize("cc, gpu, needles", [
    ((9, 0), "NVIDIA H100 80GB HBM3", ["(NVIDIA H100 80GB HBM3) is 9.0", "TensorRT-RTX cannot run on compute "
                                       "capability 9.0", "pip install tensorrt-cu13", "--trt tensorrt"]),
    # T4: TensorRT-RTX runs there but cannot build the FP16 UNet for it, so --compute-capability 7.5 is no advice
    ((7, 5), "Tesla T4", ["targets compute capability 8.0, 8.6, 8.9, 12.0", "(Tesla T4) is 7.5",
                          "cannot build the FP16 UNet for compute capability 7.5", "pip install tensorrt-cu13",
                          "--trt tensorrt"]),
    ((12, 1), "NVIDIA GB10", ["(NVIDIA GB10) is 12.1", "--compute-capability 12.1"]),
])
def test_engine_for_another_gpu(built, cc, gpu, needles, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cc)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: gpu)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    with pytest.raises(CannotRunHere) as exc:
        _load(built[0], device="cuda")
    for needle in needles:
        assert needle in str(exc.value), str(exc.value)
    assert ("--compute-capability 7.5" not in str(exc.value)) and "\n" not in str(exc.value)


def test_shape_outside_the_engine_profile(built):
    from sdexport.backends.trt import TrtEngine

    engine = TrtEngine.__new__(TrtEngine)  # the profile check needs no GPU
    entry = dict(_manifest(built[0])["engines"]["unet"], axes={"batch": [2, 2, 2], "latent_height": [16, 16, 16],
                                                                "latent_width": [16, 16, 16]})
    engine.spec, engine.entry = ExportDir.open(built[0]).specs["unet"], entry
    engine.axes = {a: tuple(v) for a, v in entry["axes"].items()}
    engine.check_profile({"batch": 2, "latent_height": 16, "latent_width": 16})
    with pytest.raises(ShapeError, match=r"latent_height=8 is outside the engine's profile \[16, 16\]"):
        engine.check_profile({"batch": 2, "latent_height": 8, "latent_width": 16})


# --- validate / infer / bench where engines cannot run -----------------------------------------

def test_validate_trt_says_why_it_cannot_run_here(built):
    import torch

    from sdexport.validate import validate

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: this test is about hosts without one")
    out = built[0]
    with pytest.raises(CannotRunHere, match="no CUDA GPU visible"):
        validate(out, backend="trt")
    assert not (out / "validation.json").exists(), "never a silent pass"
    _one_line(_run("validate", out, "--backend", "trt"), 8, "cannot run TensorRT engines here", "12.0")
    _one_line(_run("infer", out, "--backend", "trt", "--prompt", "p", "-o", out / "x.png"), 8, "no CUDA GPU")
    _one_line(_run("bench", out, "--backend", "trt", "--steps", 1), 8, "no CUDA GPU")


def test_long_tensorrt_messages_are_cut_between_words():
    from sdexport.build import _clip

    message = "Error Code 1: Myelin ([myelin_graph.h:1295] MyelinCheckException: CHECK(status == cudaSuccess) " * 3
    cut = _clip(message)
    assert len(cut) <= 164 and cut.endswith(" ...") and message.startswith(cut[:-4])
    assert message[len(cut) - 4] == " "  # the cut falls where a word ends
    assert _clip("short message") == "short message"
    assert _clip(" " + "x" * 300).startswith(" xxxx") and len(_clip(" " + "x" * 300)) == 164  # no word end to cut at
