"""Bad input of every kind gets one line and its exit code, found before any model loads (issue 9: items
10, 11, 15, 17). Options are checked while the command line is parsed; malformed or absurd JSON in a
model or an export is named with its file; non-regular files are refused instead of read forever;
prompt files and calibration files are bounded before they are read."""

from __future__ import annotations

import json
import os
import shutil
import zipfile

import numpy as np
import pytest
from conftest import LOCK_NAMES, assert_error, assert_refused, cli, run_cli, tree_digest

BIG_SEED = str(2**64)


# --- options ---------------------------------------------------------------------------------------------
INFER_CASES = [
    (["--guidance-scale", "inf"], 2, "finite"),
    (["--guidance-scale", "-inf"], 2, "finite"),
    (["--guidance-scale", "nan"], 2, "finite"),
    (["--guidance-scale", "1e309"], 2, "finite"),
    (["--guidance-scale", "1e6"], 2, "at most 100"),
    (["--guidance-scale", "-0.5"], 2, "negative"),
    (["--width", "0"], 2, "--width 0"),
    (["--height", "0"], 2, "--height 0"),
    (["--height", "-64"], 2, "--height -64"),
    (["--height", "64.5"], 2, "not a valid integer"),
    (["--steps", "-1"], 2, "--steps -1"),
    (["--steps", "1001"], 2, "--steps 1001"),
    (["--steps", "1000"], 2, "cannot run 1000 steps"),  # PNDM with steps_offset 1: an index past the table
    (["--steps", "1000", "--scheduler", "dpm++2m"], 2, "cannot run 1000 steps"),  # NaN at the last step
    (["--seed", "-1"], 2, "--seed -1"),
    (["--seed", BIG_SEED], 2, "at most 18446744073709551615"),
    (["--batch-size", "0"], 2, "--batch-size 0"),
    (["--batch-size", "5"], 4, "[1, 4]"),
    (["--device", "tpu"], 2, "auto, cpu, cuda"),
    (["--device", "cuda:"], 2, "auto, cpu, cuda"),
    (["--device", ""], 2, "auto, cpu, cuda"),
    (["--negative-prompt", "x" * 20000], 2, "at most 16,384"),
    (["--scheduler", "lms"], 2, "lms"),
]


@pytest.mark.parametrize("args, code, needle", INFER_CASES, ids=[" ".join(a)[:40] for a, _, _ in INFER_CASES])
def test_infer_options(export_fp32, tmp_path, args, code, needle):
    out = tmp_path / "x.png"
    assert_refused(cli("infer", export_fp32, "--prompt", "a fox", "-o", out, *args), code, needle)
    assert not list(tmp_path.iterdir())


def test_infer_on_a_host_without_the_device(export_fp32, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this host has a CUDA GPU")
    assert_refused(cli("infer", export_fp32, "--prompt", "p", "-o", tmp_path / "x.png", "--device", "cuda"), 8,
                   "no CUDA GPU")
    assert_refused(cli("validate", export_fp32, "--device", "cuda:1"), 8, "no CUDA GPU")
    assert_refused(cli("validate", export_fp32, "--device", "tpu"), 2, "auto, cpu, cuda")


def test_prompts_that_are_not_utf8_text(export_fp32, tmp_path):
    """Bytes that are not UTF-8 reach Python's argv as lone surrogates; they never reach the tokenizer or JSON."""
    out = tmp_path / "x.png"
    for option in ("--prompt", "--negative-prompt"):
        args = ["--prompt", "p", "--negative-prompt", "n"]
        args[args.index(option) + 1] = "a \udcff fox"
        assert_refused(cli("infer", export_fp32, *args, "-o", out), 2, option, "UTF-8")
    assert_refused(cli("infer", export_fp32, "--prompt", "x" * 20000, "-o", out), 2, "--prompt", "16,384")
    assert not out.exists()


def test_lora_path_that_is_not_utf8(export_fp32, tmp_path):
    """A LoRA file whose name is not UTF-8: diffusers' loader cannot open it, and the file was called
    "not a LoRA this model can load" (exit 5); the name is the problem (exit 2)."""
    lora = os.fsdecode(os.fsencode(str(tmp_path)) + b"/\xff.safetensors")
    with open(lora, "wb") as f:
        f.write(b"x")
    out = tmp_path / "x.png"
    assert_refused(cli("infer", export_fp32, "--prompt", "p", "--steps", "1", "--lora", lora, "-o", out), 2,
                   "--lora", "not valid UTF-8")
    assert not out.exists()


@pytest.mark.parametrize("args, needle", [
    (["--runs", "0"], "--runs 0"), (["--runs", "1001"], "at most 1000"), (["--warmup", "-1"], "--warmup -1"),
    (["--threads", "0"], "--threads 0"), (["--guidance-scale", "nan"], "finite"), (["--height", "0"], "--height 0"),
    (["--steps", "0"], "--steps 0"), (["--batch-size", "-2"], "--batch-size -2"),
    (["--torch-compile"], "--backend ort runs its own engines"),  # was ignored: the table timed no torch.compile
    (["--no-eager", "--eager-dtype", "fp16"], "--eager-dtype fp16"),  # was ignored: no eager row at all, exit 0
])
def test_bench_options(export_fp32, tmp_path, args, needle):
    assert_refused(cli("bench", export_fp32, "--json", tmp_path / "b.json", *args), 2, needle)
    assert not (tmp_path / "b.json").exists()


@pytest.mark.parametrize("args, code, needle", [
    (["--num-prompts", "0"], 2, "--num-prompts 0"), (["--max-samples", "0"], 2, "--max-samples 0"),
    (["--max-samples", "1000000"], 2, "at most 65536"), (["--steps", "0"], 2, "--steps 0"),
    (["--guidance-scale", "inf"], 2, "finite"), (["--height", "0"], 2, "--height 0"),
    (["--height", "100000"], 2, "at most 512"), (["--width", "4096"], 2, "at most 512"),
    (["--seed", str(2**64 - 1), "--num-prompts", "2"], 2, "seed + 1 passes 2^64-1"),
    (["--negative-prompt", "\udcff"], 2, "UTF-8"), (["--device", "npu"], 2, "auto, cpu, cuda"),
])
def test_calibrate_options(tiny_model, tmp_path, args, code, needle):
    assert_refused(cli("calibrate", tiny_model, "-o", tmp_path / "c.npz", *args), code, needle)
    assert not (tmp_path / "c.npz").exists()


@pytest.mark.parametrize("args, needle", [
    (["--backend", "ort", "--static", "64x64"], "--static"), (["--backend", "ort", "--refittable"], "--refittable"),
    (["--backend", "ort", "--precision", "fp32"], "--precision"), (["--backend", "ort", "--force"], "--force"),
    (["--backend", "inductor", "--device", "cpu", "--precision", "fp32", "--static", "64x64", "--refittable"],
     "--refittable"),
    (["--backend", "inductor", "--device", "cpu", "--precision", "fp32", "--static", "64x64", "--min-size", "64"],
     "--min-size"),
    (["--backend", "inductor", "--device", "cpu", "--precision", "fp32", "--static", "64x64", "--timing-cache",
      "/tmp/t.cache"], "--timing-cache"),
])
def test_build_options_of_another_backend_are_refused(export_fp32, args, needle):
    """Options that --backend ort/inductor do not read were silently ignored (exit 0 without what was asked)."""
    unchanged = tree_digest(export_fp32)
    assert_refused(cli("build", export_fp32, *args), 2, needle, "not an option of build --backend")
    assert tree_digest(export_fp32) == unchanged


@pytest.mark.parametrize("args, needle", [
    (["--batch", "0", "--static", "64x64"], "--batch 0"), (["--max-batch", "0"], "--max-batch 0"),
    (["--opt-batch", "-1"], "--opt-batch -1"), (["--opt-level", "6"], "at most 5"), (["--workspace", "0"], "--workspace 0"),
])
def test_build_options(export_fp32, args, needle):
    unchanged = tree_digest(export_fp32)
    assert_refused(cli("build", export_fp32, *args), 2, needle)
    assert tree_digest(export_fp32) == unchanged


@pytest.mark.parametrize("args", [
    ["--precision", "fp32", "--static", "128"], ["--precision", "fp32", "--min-size", "64"],
    ["--precision", "fp32", "--opt-size", "64"], ["--precision", "fp32", "--max-size", "128"],
    ["--backend", "inductor", "--device", "cpu", "--precision", "fp32", "--static", "128"],
])
def test_build_sizes_take_height_x_width(export_fp32, args):
    """`--static 128` was built as 128x128 (any lone number was a square); every option that takes an image size
    takes HEIGHTxWIDTH, through one parser, and says so in one line."""
    option, value = args[-2:]
    unchanged = tree_digest(export_fp32)
    assert_refused(cli("build", export_fp32, *args), 2, f"{option} takes HEIGHTxWIDTH in pixels, e.g. 1024x1024 "
                   f"(got '{value}')")
    assert tree_digest(export_fp32) == unchanged


@pytest.mark.parametrize("args, needle", [
    (["--max-batch", "0"], "--max-batch 0"), (["--max-batch", "65"], "at most 64"), (["--opset", "13"], "--opset 13"),
    (["--min-size", "0"], "--min-size 0"), (["--max-size", "100000"], "at most 512 px"),
    (["--max-size", "-64"], "--max-size -64"),
])
def test_export_options(tiny_model, tmp_path, args, needle):
    assert_refused(cli("export", tiny_model, "-o", tmp_path / "out", *args), 2, needle)
    assert not (tmp_path / "out").exists()


# --- malformed JSON in a model -----------------------------------------------------------------------------
def _write(path, content):
    os.unlink(path) if os.path.islink(path) else None
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content if isinstance(content, str) else json.dumps(content))


def _edit(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    _write(path, data)


MODEL_CASES = {
    "index-array": ("model_index.json", "[]", "expected a JSON object"),
    "index-not-utf8": ("model_index.json", b'{"_class_name": "\xff\xfe"}', "not UTF-8"),
    "index-truncated": ("model_index.json", '{"_class_name": ', "not valid JSON"),
    "index-no-class": ("model_index.json", "{}", "_class_name"),
    "index-class-number": ("model_index.json", '{"_class_name": 5}', "not a string"),
    "index-nan": ("model_index.json", '{"_class_name": NaN}', "not valid JSON"),
    "unet-array": ("unet/config.json", "[1, 2]", "expected a JSON object"),
    "unet-four": ("unet/config.json", {"in_channels": "four"}, "'four' is not a whole number"),
    "unet-huge-channels": ("unet/config.json", {"block_out_channels": [10**9, 64]}, "outside"),
    "unet-float-channels": ("unet/config.json", {"block_out_channels": [32.5, 64]}, "not a whole number"),
    "unet-many-layers": ("unet/config.json", {"layers_per_block": 100000}, "outside"),
    "unet-blocks-number": ("unet/config.json", {"down_block_types": 5}, "not a list of names"),
    "unet-sample-negative": ("unet/config.json", {"sample_size": -1}, "outside"),
    "unet-bool": ("unet/config.json", {"in_channels": True}, "not a whole number"),
    "unet-unknown-block": ("unet/config.json", {"down_block_types": ["NoSuchBlock2D", "DownBlock2D"]},
                           "cannot build the unet"),
    "unet-mismatched-blocks": ("unet/config.json", {"block_out_channels": [32, 64, 64]}, "cannot build the unet"),
    "vae-scaling-string": ("vae/config.json", {"scaling_factor": "0.18"}, "not a finite number"),
    "vae-not-utf8": ("vae/config.json", b"\x80\x81", "not UTF-8"),
    "text-hidden-string": ("text_encoder/config.json", {"hidden_size": "x"}, "not a whole number"),
    "text-positions-huge": ("text_encoder/config.json", {"max_position_embeddings": 10**9}, "outside"),
    "scheduler-array": ("scheduler/scheduler_config.json", "[]", "expected a JSON object"),
    "scheduler-zero-steps": ("scheduler/scheduler_config.json", {"num_train_timesteps": 0}, "outside"),
}


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_malformed_model_configs(model, tmp_path, case):
    rel, content, needle = MODEL_CASES[case]
    path = model / rel
    if isinstance(content, dict):
        _edit(path, **content)
    else:
        _write(path, content)
    assert_refused(cli("export", model, "-o", tmp_path / "out"), 3, needle, rel.split("/")[-1])
    assert not (tmp_path / "out").exists()


def test_absurd_but_well_typed_sizes_are_refused_before_allocating(model, tmp_path):
    """Every field within its bound, the whole beyond any memory: found on the meta device (exit 3)."""
    _edit(model / "unet" / "config.json", block_out_channels=[65536, 65536], norm_num_groups=8,
          attention_head_dim=8)
    line = assert_refused(cli("export", model, "-o", tmp_path / "out", timeout=120), 3, "parameters", "memory")
    assert "available" in line and not (tmp_path / "out").exists()


def test_scheduler_config_diffusers_cannot_use(model, tmp_path):
    _edit(model / "scheduler" / "scheduler_config.json", beta_schedule="no-such-schedule")
    assert_refused(cli("calibrate", model, "--num-prompts", "1", "-o", tmp_path / "c.npz"), 3, "scheduler")
    assert not (tmp_path / "c.npz").exists()


# --- malformed JSON in an export ---------------------------------------------------------------------------
def _manifest_case(data, case):
    if case == "array":
        return "[]"
    if case == "not-utf8":
        return b"\xff" + json.dumps(data).encode()
    if case == "truncated":
        return json.dumps(data)[:200]
    if case == "nan":
        data["ranges"]["max_size"] = float("nan")
        return json.dumps(data)  # Python writes NaN; strict JSON has none
    if case == "no-version":
        data.pop("manifest_version")
    elif case == "components-list":
        data["components"] = []
    elif case == "file-number":
        data["components"]["unet"]["file"] = 5
    elif case == "sha-short":
        data["components"]["unet"]["sha256"] = "abc"
    elif case == "no-model":
        data.pop("model")
    elif case == "ranges-string":
        data["ranges"]["min_size"] = "64"
    elif case == "ranges-extra":
        data["ranges"]["colour"] = 3
    elif case == "ranges-min-above-max":  # was "height 128 is outside the exported range [512, 256]": the request blamed
        data["ranges"]["min_size"] = data["ranges"]["max_size"] * 2
    elif case == "ranges-opt-outside":  # was "height 8 is not a multiple of 16" for an infer given no --height
        data["ranges"]["opt_size"] = 8
    elif case == "ranges-off-the-multiple":
        data["ranges"]["max_size"] += data["ranges"]["pixel_multiple"] // 2
    elif case == "configs-four":
        data["model"]["configs"]["unet"]["in_channels"] = "four"
    elif case == "no-dtype":
        data["components"]["unet"]["precision"] = {}
    elif case == "external-data-string":
        data["components"]["unet"]["external_data"] = "model.onnx_data"
    return json.dumps(data)


@pytest.mark.parametrize("case", ["array", "not-utf8", "truncated", "nan", "no-version", "components-list",
                                  "file-number", "sha-short", "no-model", "ranges-string", "ranges-extra",
                                  "ranges-min-above-max", "ranges-opt-outside", "ranges-off-the-multiple",
                                  "configs-four", "no-dtype", "external-data-string"])
def test_malformed_manifest(export, tmp_path, case):
    data = json.loads((export / "manifest.json").read_text())
    _write(export / "manifest.json", _manifest_case(data, case))
    assert_refused(cli("infer", export, "--prompt", "p", "-o", tmp_path / "x.png"), 5, "manifest.json")
    assert_refused(cli("bench", export, "--steps", "1"), 5, "manifest.json")
    assert not (tmp_path / "x.png").exists()


def test_malformed_scheduler_config_in_an_export(export, tmp_path):
    _write(export / "scheduler" / "scheduler_config.json", "[]")
    assert_refused(cli("infer", export, "--prompt", "p", "-o", tmp_path / "x.png"), 5, "scheduler_config.json")


# --- files that are not regular files --------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "directory"])
def test_weights_that_are_not_regular_files(model, tmp_path, kind):
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    weights.unlink()
    if kind == "fifo":
        os.mkfifo(weights)
    elif kind == "dev-zero":
        os.symlink("/dev/zero", weights)
    else:
        weights.mkdir()
    proc = cli("export", model, "-o", tmp_path / "out", timeout=120)  # hashing a FIFO would block forever
    assert_refused(proc, 3, "diffusion_pytorch_model.safetensors", "not a regular file")
    assert not (tmp_path / "out").exists()


# --- damaged weights: another component's file, a garbled safetensors header (exit 3) ----------------------
WEIGHT_FILES = {"text_encoder": "model.safetensors", "unet": "diffusion_pytorch_model.safetensors",
                "vae": "diffusion_pytorch_model.safetensors"}


def _damage_weights(model, case: str) -> str:
    """Damage one component's weights in ``model``; returns that component's name."""
    if case.startswith("swapped-"):  # another component's weights: none of the names this model needs
        part = case.removeprefix("swapped-")
        other = "vae" if part == "unet" else "unet"
        shutil.copyfile(model / other / WEIGHT_FILES[other], model / part / WEIGHT_FILES[part])
        return part
    part = case.removeprefix("garbled-")  # a header whose length is right and whose bytes are not JSON
    path = model / part / WEIGHT_FILES[part]
    blob = path.read_bytes()
    path.write_bytes((64).to_bytes(8, "little") + bytes(range(0x80, 0xc0)) + blob[72:])
    return part


def _written(out) -> list:
    return [p for p in out.rglob("*") if p.is_file() and p.name not in LOCK_NAMES] if out.exists() else []


@pytest.mark.parametrize("case", ["swapped-text_encoder", "swapped-vae", "swapped-unet", "garbled-text_encoder",
                                  "garbled-unet"])
def test_damaged_weights_are_refused(tiny_model, tmp_path, case):
    """Before: another component's weights in text_encoder/ exported random weights (exit 0: transformers
    initialises what the file lacks); in vae/ or unet/ a traceback (diffusers leaves them on the meta
    device); a garbled text-encoder header a SafetensorError traceback."""
    model = shutil.copytree(tiny_model, tmp_path / "model")
    part = _damage_weights(model, case)
    result = run_cli("export", model, "-o", tmp_path / "out")
    assert_error(result, 3, f"{part}", *(["lacks", "is it this component's file?"] if "swapped" in case
                                          else ["cannot load weights"]))
    assert sum(line.startswith("error:") for line in result.stderr.splitlines()) == 1, result.stderr
    assert _written(tmp_path / "out") == []
    if case in ("swapped-text_encoder", "garbled-text_encoder"):  # calibrate's PyTorch pipeline: the same loader
        result = run_cli("calibrate", model, "--num-prompts", 1, "--steps", 1, "-o", tmp_path / "c.npz")
        assert_error(result, 3, part)
        assert not (tmp_path / "c.npz").exists()


def test_configs_and_tokenizer_files_that_are_fifos(tiny_model, tmp_path):
    for i, rel in enumerate(("unet/config.json", "tokenizer/vocab.json", "model_index.json")):
        model = shutil.copytree(tiny_model, tmp_path / f"m{i}")  # the FIFO is made after the copy
        (model / rel).unlink()
        os.mkfifo(model / rel)
        assert_refused(cli("export", model, "-o", tmp_path / f"o{i}", timeout=120), 3, rel.split("/")[-1],
                       "regular file")
        assert not (tmp_path / f"o{i}").exists()


def test_export_artifacts_that_are_not_regular_files(export, tmp_path):
    onnx = export / "unet" / "model.onnx"
    onnx.unlink()
    os.mkfifo(onnx)
    proc = cli("infer", export, "--prompt", "p", "--steps", "1", "-o", tmp_path / "x.png", timeout=120)
    assert_refused(proc, 5, "model.onnx")
    assert not (tmp_path / "x.png").exists()


def test_prompt_and_calibration_files_that_are_fifos(tiny_model, export_fp32, tmp_path):
    os.mkfifo(tmp_path / "prompts.txt")
    assert_refused(cli("calibrate", tiny_model, "--prompts", tmp_path / "prompts.txt", "-o", tmp_path / "c.npz",
                       timeout=120), 2, "FIFO")
    os.mkfifo(tmp_path / "calib.npz")
    assert_refused(cli("quantize", export_fp32, "--calib", tmp_path / "calib.npz", timeout=120), 2, "FIFO")


# --- bounded reads -------------------------------------------------------------------------------------------
def test_prompt_files_are_bounded(tiny_model, tmp_path):
    out = tmp_path / "c.npz"
    many = tmp_path / "many.txt"
    many.write_text("a red kite\n" * 200_001)
    assert_refused(cli("calibrate", tiny_model, "--prompts", many, "-o", out), 2, "more than 200,000 lines")
    one_line = tmp_path / "one.txt"
    with open(one_line, "wb") as f:  # a 20 MB prompt on one line: refused after reading 64 KiB of it
        f.write(b"castle " * (20 * 2**20 // 7))
    assert_refused(cli("calibrate", tiny_model, "--prompts", one_line, "-o", out), 2, "line 1 is longer")
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"a kite\n\xff\xfe\x00\x01\n")
    assert_refused(cli("calibrate", tiny_model, "--prompts", binary, "-o", out), 2, "line 2 is not UTF-8")
    assert not out.exists()


def _npz_with_headers(path, arrays: dict[str, tuple[tuple, str]], meta: str = '{"format": 1}'):
    """An .npz whose .npy headers declare ``arrays`` (shape, dtype) with no data behind them."""
    with zipfile.ZipFile(path, "w") as archive:
        for name, (shape, dtype) in arrays.items():
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
            with archive.open(f"{name}.npy", "w") as handle:
                np.lib.format.write_array_header_1_0(handle, header)
                handle.write(b"\0" * 64)
        with archive.open("meta.npy", "w") as handle:
            np.lib.format.write_array(handle, np.array(meta))


@pytest.mark.parametrize("arrays, code, needle", [
    ({"sample": ((1_000_000, 4, 16, 16), "f4"), "timestep": ((1_000_000,), "f4"),
      "encoder_hidden_states": ((1_000_000, 77, 32), "f4")}, 5, "calibrate writes at most 65,536"),
    ({"sample": ((60_000, 4, 2048, 2048), "f4"), "timestep": ((60_000,), "f4"),
      "encoder_hidden_states": ((60_000, 77, 32), "f4")}, 5, "memory"),
    ({"sample": ((8, 4, 16, 16), "O"), "timestep": ((8,), "f4"), "encoder_hidden_states": ((8, 77, 32), "f4")},
     5, "dtype object"),
    ({"sample": ((8, 4, 16), "f4"), "timestep": ((8,), "f4"), "encoder_hidden_states": ((8, 77, 32), "f4")},
     4, "rank 4"),
    ({"sample": ((8, 4, 16, 16), "f4"), "timestep": ((9,), "f4"), "encoder_hidden_states": ((8, 77, 32), "f4")},
     5, "disagree"),
])
def test_calibration_files_are_checked_from_their_headers(export_fp32, tmp_path, arrays, code, needle):
    """A small .npz that declares a huge array is refused from its .npy headers, before any array is read."""
    path = tmp_path / "calib.npz"
    _npz_with_headers(path, arrays)
    assert path.stat().st_size < 10_000
    unchanged = tree_digest(export_fp32)
    assert_refused(cli("quantize", export_fp32, "--calib", path, timeout=120), code, needle)
    assert tree_digest(export_fp32) == unchanged


def test_fp16_export_that_would_not_fit_memory_is_refused_before_any_work(tiny_model, tmp_path, monkeypatch):
    """FP16 conversion peaks at several times a component's FP32 weights (precision.FP16_EXPORT_MEMORY_FACTOR;
    the kernel killed SD 1.5's FP16 export on a 24 GiB machine and SDXL's on a 256 GiB one before): with a
    little less memory available than that, the FP16 export is refused in one line naming the sizes and the way
    out, nothing written; the FP32 export, which needs no conversion, still runs."""
    from sdexport import limits
    from sdexport.errors import UsageError
    from sdexport.export import export
    from sdexport.models import ModelInfo
    from sdexport.precision import FP16_EXPORT_MEMORY_FACTOR
    from sdexport.schema import check_loadable

    unet_fp32 = 4 * check_loadable(ModelInfo.open(tiny_model), ("unet",))["unet"]
    monkeypatch.setattr(limits, "available_memory_bytes", lambda: int(0.9 * FP16_EXPORT_MEMORY_FACTOR * unet_fp32))
    with pytest.raises(UsageError, match=r"^exporting unet in FP16 \(.* of FP32 weights; ModelOpt AutoCast holds "
                                         r"several copies of them\) needs .* of memory; this machine has .* "
                                         r"available \(export --dtype fp32 here"):
        export(str(tiny_model), tmp_path / "e16", dtype="fp16", components=["unet"])
    assert not (tmp_path / "e16").exists()
    monkeypatch.setattr(limits, "available_memory_bytes", lambda: int(1.1 * FP16_EXPORT_MEMORY_FACTOR * unet_fp32))
    export(str(tiny_model), tmp_path / "e16", dtype="fp16", components=["unet"])  # just enough: it runs
    monkeypatch.setattr(limits, "available_memory_bytes", lambda: int(0.9 * FP16_EXPORT_MEMORY_FACTOR * unet_fp32))
    export(str(tiny_model), tmp_path / "e32", dtype="fp32", components=["unet"])


@pytest.fixture(scope="module")
def small_calib(tiny_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.npz"
    proc = cli("calibrate", tiny_model, "--num-prompts", "4", "--steps", "4", "-o", path, timeout=300)  # 40 rows
    assert proc.returncode == 0, proc.stderr
    return path


def test_int8_quantize_that_would_not_fit_memory_is_refused_before_any_work(export_fp32, small_calib, tmp_path,
                                                                            monkeypatch):
    """ModelOpt's INT8 PTQ was killed for memory at 7.2 times SD 1.5's FP32 UNet (quantize.MODELOPT_MEMORY_AT_LEAST):
    with less available, quantize with ModelOpt (auto or modelopt; auto with max) is refused in one line, the export
    untouched. ONNX Runtime's quantizer (--quantizer ort, or auto with percentile, which ModelOpt lacks), which
    peaked at 5.2 times (quantize.ORT_QUANTIZE_MEMORY_PEAK), gets past it: to the disk check, made to refuse here so
    that nothing is quantized; with less than its own peak available it is refused too. A quantize with nothing to
    do (up to date) is not refused; the same with --force is."""
    from sdexport import limits
    from sdexport.errors import DiskFull, UsageError
    from sdexport.quantize import MODELOPT_MEMORY_AT_LEAST, ORT_QUANTIZE_MEMORY_PEAK, quantize

    size = json.loads((export_fp32 / "manifest.json").read_text())["components"]["unet"]["size_bytes"]
    low = lambda: int(0.9 * MODELOPT_MEMORY_AT_LEAST * size)  # noqa: E731
    memory = r"^quantizing .*/unet with ModelOpt \(.* of FP32 weights\) needs more than .* of memory; this machine " \
             r"has .* available \(it was killed"
    monkeypatch.setattr(limits, "available_memory_bytes", low)
    unchanged = tree_digest(export_fp32)
    for quantizer, method in (("auto", "max"), ("modelopt", "max")):
        with pytest.raises(UsageError, match=memory):
            quantize(export_fp32, small_calib, quantizer=quantizer, method=method)
    monkeypatch.setattr(limits, "free_disk_bytes", lambda path: 0)
    for quantizer, method in (("ort", "max"), ("auto", "percentile")):
        with pytest.raises(DiskFull):
            quantize(export_fp32, small_calib, quantizer=quantizer, method=method)
    monkeypatch.setattr(limits, "available_memory_bytes", lambda: int(0.9 * ORT_QUANTIZE_MEMORY_PEAK * size))
    ort_memory = r"^quantizing .*/unet with ONNX Runtime \(.* of FP32 weights\) needs .* of memory; this machine has " \
                 r".* available \(its peak was 5.2 times"
    for quantizer, method in (("ort", "max"), ("auto", "percentile")):
        with pytest.raises(UsageError, match=ort_memory):
            quantize(export_fp32, small_calib, quantizer=quantizer, method=method)
    assert tree_digest(export_fp32) == unchanged
    monkeypatch.undo()

    from conftest import copy_export

    done = copy_export(export_fp32, tmp_path / "e")
    quantize(done, small_calib, quantizer="auto")  # with the machine's own memory
    monkeypatch.setattr(limits, "available_memory_bytes", low)
    assert quantize(done, small_calib, quantizer="auto").get("up_to_date")
    with pytest.raises(UsageError, match=memory):
        quantize(done, small_calib, quantizer="auto", force=True)


def test_memory_and_disk_checks_name_what_is_needed(tmp_path):
    from sdexport import limits
    from sdexport.errors import UsageError

    with pytest.raises(UsageError, match=r"needs 909\.5 TiB of memory; this machine has .* available"):
        limits.check_memory("a test allocation", 10**15)
    limits.check_memory("a small allocation", 1024)
    with pytest.raises(limits.DiskFull, match=r"needs about 909\.5 TiB of disk space; .* free there"):
        limits.check_disk(tmp_path, 10**15, "a test artifact")
