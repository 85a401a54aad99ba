"""The command line: the whole job on the tiny preset, and bad input -> one line, an exit code, no artifact."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from conftest import assert_error, run_cli


run = run_cli


def assert_one_line_error(result, code, *needles):
    assert_error(result, code, *needles, only_line=True)


def test_infer_writes_image_and_sidecar(export_fp32, tmp_path):
    from PIL import Image

    out = tmp_path / "img.png"
    args = [export_fp32, "--prompt", "a teapot", "-o", out, "--steps", 2, "--height", 64, "--width", 96,
            "--seed", 5, "--scheduler", "dpm++2m"]
    result = run("infer", *args)
    assert result.exit_code == 0, result.stderr
    assert Image.open(out).size == (96, 64)
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["seed"] == 5 and meta["scheduler"] == "dpm++2m" and meta["backend"] == "ort"
    assert meta["timings_ms"]["unet_steps"] == 2 and meta["timings_ms"]["total_ms"] > 0
    first = out.read_bytes()
    assert run("infer", *args).exit_code == 0  # re-running into the same place is safe and deterministic
    assert out.read_bytes() == first


def test_batch_writes_one_png_per_image(export_fp32, tmp_path):
    result = run("infer", export_fp32, "--prompt", "a kite", "-o", tmp_path / "b.png", "--steps", 1,
                 "--height", 64, "--width", 64, "--batch-size", 2, "--backend", "torch")
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "b-0.png").is_file() and (tmp_path / "b-1.png").is_file()


@pytest.mark.parametrize("args, code, needles", [
    (["--steps", 0], 2, ["--steps 0"]),
    (["--guidance-scale", -2], 2, ["negative"]),
    (["--scheduler", "lms-ish"], 2, ["lms-ish"]),
    (["--backend", "tensorflow"], 2, ["tensorflow"]),
    (["--height", 72], 4, ["multiple of 16"]),
    (["--height", 1024], 4, ["[64, 256]"]),
    (["--batch-size", 9], 4, ["[1, 4]"]),
    (["--cuda-graph", "--device", "cpu"], 2, ["CUDA device"]),
])
def test_bad_infer_options(export_fp32, tmp_path, args, code, needles):
    out = tmp_path / "x.png"
    result = run("infer", export_fp32, "--prompt", "p", "-o", out, *args)
    assert_one_line_error(result, code, *needles)
    assert not out.exists() and not out.with_suffix(".json").exists()


def test_long_prompt_warns(export_fp32, tmp_path):
    result = run("infer", export_fp32, "--prompt", "castle " * 100, "-o", tmp_path / "l.png", "--steps", 1,
                 "--height", 64, "--width", 64)
    assert result.exit_code == 0
    assert "truncated" in result.stderr
    assert json.loads((tmp_path / "l.json").read_text())["prompt_truncated"] is True


def test_negative_prompt_without_guidance_warns_once(export_fp32, tmp_path):
    """`infer --guidance-scale 0 --negative-prompt blurry` (any scale <= 1: no classifier-free guidance) dropped
    the negative prompt without a word (an LCM UNet already warned). One warning line now, exit 0; none with
    guidance 7.5 (it is used) or without a negative prompt. The warning is true: the image is the one without
    the negative prompt, as diffusers' pipelines ignore it below guidance 1."""
    import numpy as np
    from PIL import Image

    said = "negative prompt is not used"
    pixels = {}
    for name, guidance, negative, warned in (("g0", 0, "blurry", True), ("g1", 1, "blurry", True),
                                             ("g7", 7.5, "blurry", False), ("g0-none", 0, None, False)):
        out = tmp_path / f"{name}.png"
        result = run("infer", export_fp32, "--prompt", "a kite", "-o", out, "--steps", 1, "--height", 64,
                     "--width", 64, "--guidance-scale", guidance, *(("--negative-prompt", negative) if negative else ()))
        assert result.exit_code == 0, result.stderr
        lines = [line for line in result.stderr.splitlines() if said in line]
        assert len(lines) == (1 if warned else 0), result.stderr
        if warned:
            assert lines[0].startswith("warning: ") and f"guidance scale {guidance:g}" in lines[0], lines[0]
        pixels[name] = np.asarray(Image.open(out))
    assert np.array_equal(pixels["g0"], pixels["g0-none"])


def test_calibrate_warns_of_a_negative_prompt_it_does_not_use(tiny_model, export_fp32, tmp_path):
    """`calibrate --guidance-scale 1 --negative-prompt blurry` ran diffusers' pipeline, which drops the negative
    prompt at guidance <= 1, without a word. Now infer's one warning line, word for word (one rule,
    families.base.unused_negative_prompt), exit 0; none at 7.5 (used: the capture has its negative rows) or
    without a negative prompt. The warning is true: at guidance 1 the capture holds one row per UNet call."""
    from sdexport.calibration import load_calibration

    said = "negative prompt is not used"
    infer = run("infer", export_fp32, "--prompt", "a kite", "-o", tmp_path / "i.png", "--steps", 1, "--height", 64,
                "--width", 64, "--guidance-scale", 1, "--negative-prompt", "blurry")
    assert infer.exit_code == 0, infer.stderr
    want = [line for line in infer.stderr.splitlines() if said in line]
    assert len(want) == 1, infer.stderr
    for name, guidance, negative, warned, rows in (("g1", 1, "blurry", True, 1), ("g7", 7.5, "blurry", False, 2),
                                                   ("g1-none", 1, None, False, 1)):
        path = tmp_path / f"{name}.npz"
        result = run("calibrate", tiny_model, "--num-prompts", 2, "--steps", 2, "--scheduler", "euler", "--height", 64,
                     "--width", 64, "--guidance-scale", guidance, "-o", path,
                     *(("--negative-prompt", negative) if negative else ()))
        assert result.exit_code == 0, result.stderr
        assert [line for line in result.stderr.splitlines() if said in line] == (want if warned else []), result.stderr
        assert load_calibration(path).meta["rows_seen"] == 2 * 2 * rows  # 2 prompts x 2 Euler steps x rows a call


def test_bad_models(tmp_path, tiny_model):
    assert_one_line_error(run("export", tmp_path / "missing", "-o", tmp_path / "o1"), 3, "no such directory")
    (tmp_path / "plain").mkdir()
    assert_one_line_error(run("export", tmp_path / "plain", "-o", tmp_path / "o2"), 3, "model_index.json")
    other = tmp_path / "sd3"
    shutil.copytree(tiny_model, other)
    index = json.loads((other / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusion3Pipeline"
    (other / "model_index.json").write_text(json.dumps(index))
    assert_one_line_error(run("export", other, "-o", tmp_path / "o3"), 3, "StableDiffusion3Pipeline")
    assert not (tmp_path / "o3" / "unet").exists()
    assert_one_line_error(run("export", tiny_model, "-o", tmp_path / "o4", "--components", "unet,clip"), 2, "clip")
    assert_one_line_error(run("preset", "sd99", "-o", tmp_path / "p"), 3, "unknown preset")


def test_an_export_given_for_the_model(export_fp32, tiny_model, tmp_path):
    """An export holds a model_index.json (Optimum's layout), so `calibrate EXPORT` and `export EXPORT` said
    "missing vae/; not a complete Stable Diffusion 1.x/2.x directory". They say what it is, and which model
    directory to give: the one its manifest records."""
    recorded = json.loads((export_fp32 / "manifest.json").read_text())["model"]["path"]
    assert recorded == str(tiny_model.resolve())
    line = (f"{export_fp32}: an sdexport export, not a diffusers model directory; give the diffusers model "
            f"directory it was exported from: {recorded}")
    for command in (("calibrate", export_fp32, "-o", tmp_path / "c.npz"),
                    ("export", export_fp32, "-o", tmp_path / "e")):
        result = run(*command)
        assert_one_line_error(result, 3, line)
        assert "missing vae/" not in result.stderr
    assert not (tmp_path / "c.npz").exists() and not (tmp_path / "e").exists()


def test_tampered_onnx_is_refused(export_fp32, tmp_path):
    bad = tmp_path / "tampered"
    shutil.copytree(export_fp32, bad)
    with open(bad / "unet" / "model.onnx", "ab") as f:
        f.write(b"junk")
    result = run("infer", bad, "--prompt", "p", "-o", tmp_path / "t.png", "--steps", 1)
    assert_one_line_error(result, 5, "does not match the manifest")
    assert_one_line_error(run("validate", tmp_path / "nowhere"), 5, "no such export directory")


def test_validate_cli_exit_codes(export_fp32, tmp_path):
    assert run("validate", export_fp32, "--components", "vae_decoder").exit_code == 0
    from test_validate import _copy_with_scaled_weight

    _copy_with_scaled_weight(export_fp32, tmp_path / "bad", 1.05)
    result = run("validate", tmp_path / "bad", "--components", "unet")
    assert result.exit_code == 6
    lines = result.stderr.strip().splitlines()  # one FAIL line per shape (progress), then the error
    assert sum(line.startswith("FAIL unet") for line in lines) >= 3
    assert lines[-1].startswith("error: unet missed the thresholds") and "Traceback" not in result.stderr


def test_bench_json(export_fp32, tmp_path):
    path = tmp_path / "bench.json"
    result = run("bench", export_fp32, "--steps", 2, "--runs", 2, "--warmup", 1, "--height", 64, "--width", 64,
                 "--scheduler", "euler",
                 "--json", path)
    assert result.exit_code == 0, result.stderr
    assert "UNet x 2" in result.stdout and "Images / second" in result.stdout
    report = json.loads(path.read_text())
    engine, eager = report["results"]
    assert engine["backend"] == "ort" and eager["backend"] == "torch"
    for r in (engine, eager):
        assert r["unet_step_ms"]["n"] == 4 and r["unet_step_ms"]["median_ms"] > 0
        assert r["stages_ms"]["pipeline_total"] >= r["stages_ms"]["unet_total"]
        assert r["memory"]["process_rss_peak_mib"] > 0
    assert set(engine["speedup_vs_eager"]) >= {"unet_total", "pipeline_total", "unet_step_median"}
    assert report["machine"]["cpu_count"] and report["versions"]["torch"] and report["command"]


@pytest.mark.parametrize("args, dtypes", [
    (["--backend", "torch", "--torch-compile", "--no-eager"], ["fp32"]),
    (["--backend", "torch", "--torch-compile", "--eager-dtype", "bf16"], ["bf16"]),  # torch's own precision
    (["--backend", "torch", "--no-eager"], ["fp32"]),
    (["--backend", "ort", "--eager-dtype", "bf16"], [None, "bf16"]),  # the eager half, never compiled
])
def test_bench_labels_say_what_ran(export_fp32, tmp_path, monkeypatch, args, dtypes):
    """A torch row is named for what ran: "torch.compile DTYPE" iff torch.compile wrapped its modules, else
    "torch eager DTYPE", in the table, the per-step line, the progress lines and bench.json. --torch-compile
    rows were called "torch eager fp32" (the label ignored the compile option)."""
    import torch

    compiled = []

    def counting_compile(module, *a, **kw):  # what ran: the modules torch.compile was asked to wrap
        compiled.append(module)
        return module  # run them as they are: the label, not Inductor, is under test

    monkeypatch.setattr(torch, "compile", counting_compile)
    path = tmp_path / "bench.json"
    result = run("bench", export_fp32, "--steps", 1, "--runs", 1, "--warmup", 0, "--height", 64, "--width", 64,
                 "--json", path, *args)
    assert result.exit_code == 0, result.stderr
    report = json.loads(path.read_text())
    assert [r["options"].get("dtype") for r in report["results"]] == dtypes
    labels = []
    for r in report["results"]:
        if r["backend"] != "torch":
            assert r["label"] == r["backend"]
            continue
        was_compiled = bool(compiled)  # one torch row a run: --torch-compile is refused beside another backend
        assert (r["options"].get("compile") == "True") == was_compiled
        expected = f"{'torch.compile' if was_compiled else 'torch eager'} {r['options']['dtype']}"
        assert r["label"] == expected, (r["label"], len(compiled))
        labels.append(expected)
    assert labels and ("--torch-compile" in args) == bool(compiled)
    table = result.stdout.splitlines()
    header = next(line for line in table if line.startswith("stage"))
    for label in labels:
        assert f" {label}" in header, header
        assert any(line.startswith(f"{label}: UNet step median") for line in table), result.stdout
        assert f"{label}: loading engines" in result.stderr
    wrong = "torch eager" if compiled else "torch.compile"
    assert wrong not in result.stdout and wrong not in result.stderr


def test_console_script_entry_point(tmp_path):
    """The installed entry point itself: exit codes survive outside click's test runner."""
    proc = subprocess.run([sys.executable, "-m", "sdexport.cli", "export", str(tmp_path / "none"), "-o",
                           str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode == 3 and proc.stderr.startswith("error:") and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "sdexport.cli", "env"], capture_output=True, text=True)
    assert proc.returncode == 0 and "onnxruntime" in proc.stdout and "trt" in proc.stdout


def test_top_level_help_lists_every_exit_code():
    """`sdexport --help` names each exit code an sdexport error carries (errors.py) and the signal ones."""
    import re

    import sdexport.build  # noqa: F401  (BuildFailed lives beside the builder)
    import sdexport.serve  # noqa: F401
    from sdexport import errors

    def subclasses(cls):
        return {cls} | {s for sub in cls.__subclasses__() for s in subclasses(sub)}

    codes = {cls.exit_code for cls in subclasses(errors.SdexportError) if cls.exit_code > 1}
    result = run_cli("--help")
    assert result.exit_code == 0
    listed = {int(c) for c in re.findall(r"\b(\d{1,3})\b", result.stdout.split("Errors:", 1)[1].split("see the")[0])}
    assert codes | {130, 143} == listed, (codes, listed)
