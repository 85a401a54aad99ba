"""The smaller promises of issue 9: the ONNX Runtime quantizer on a small calibration set (14), the
truncation warning (18), explicit bench threads and its report (19), a moved source model (20), help
texts (21) and the one-command install's package data (22)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_refused, cli

INFER = ("--steps", "1", "--height", "64", "--width", "64")


# --- 14: ONNX Runtime's calibration, batch by batch ------------------------------------------------------
def _matmul_model(path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))


@pytest.mark.parametrize("batches", [1, 3, 4, 8])
def test_ort_calibration_counts_every_batch(tmp_path, batches):
    """The range is the largest |x| over all batches, wherever it lies: ONNX Runtime 1.31's
    CalibMaxIntermediateOutputs dropped every 4th batch's predecessors, and 4 or 8 batches ended in
    'No data is collected'."""
    from onnxruntime.quantization import CalibrationMethod

    from sdexport.quantize import _calibrated_ranges

    _matmul_model(tmp_path / "m.onnx")
    rng = np.random.default_rng(0)
    feed = [{"x": rng.standard_normal((2, 4)).astype(np.float32)} for _ in range(batches)]
    feed[0]["x"][0, 0] = 50.0  # the extreme is in the first batch
    ranges = _calibrated_ranges(tmp_path / "m.onnx", tmp_path, feed, CalibrationMethod.MinMax, False)
    want = max(float(np.abs(b["x"]).max()) for b in feed)
    assert ranges["x"] == pytest.approx((-want, want))


@pytest.mark.slow
def test_quantize_with_the_ort_quantizer_on_a_small_calibration_set(export_fp32, tiny_model, tmp_path):
    calib = tmp_path / "c.npz"
    proc = cli("calibrate", tiny_model, "--num-prompts", "4", "--steps", "4", "--max-samples", "32", "-o", calib)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = shutil.copytree(export_fp32, tmp_path / "export", ignore=shutil.ignore_patterns("unet_int8"))
    proc = cli("quantize", out, "--calib", calib, "--quantizer", "ort")  # 32 samples: 4 batches of 8
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "No data is collected" not in proc.stderr
    entry = json.loads((out / "manifest.json").read_text())["components"]["unet_int8"]
    assert entry["precision"]["quantizer"].startswith("onnxruntime") and entry["calibration"]["samples"] == 32


# --- 18: the truncation warning ---------------------------------------------------------------------------
def _warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("warning:")]


@pytest.mark.parametrize("which", ["prompt", "negative", "both"])
def test_truncation_warning_names_the_dropped_words(export_fp32, tmp_path, which):
    long_prompt = "castle " * 80 + "zebra unicorn"
    long_negative = "blurry " * 80 + "walrus narwhal"
    args = ["--prompt", long_prompt if which in ("prompt", "both") else "a castle",
            "--negative-prompt", long_negative if which in ("negative", "both") else ""]
    proc = cli("infer", export_fp32, *args, *INFER, "-o", tmp_path / "x.png")  # guidance 7.5: negative rows first
    assert proc.returncode == 0, proc.stderr[-2000:]
    warnings = _warnings(proc.stderr)
    text = " ".join(warnings)
    assert "endoftext" not in text and "<|" not in text  # never the padding
    if which in ("prompt", "both"):
        line = next(w for w in warnings if w.startswith("warning: prompt "))
        assert "zebra unicorn" in line and "walrus" not in line
    if which in ("negative", "both"):
        line = next(w for w in warnings if w.startswith("warning: negative prompt "))
        assert "walrus narwhal" in line and "zebra" not in line
    assert len(warnings) == (2 if which == "both" else 1)
    assert json.loads((tmp_path / "x.json").read_text())["prompt_truncated"] is True


# --- 19: bench threads and report ------------------------------------------------------------------------------
def test_bench_sets_and_records_threads_and_the_scheduler(export_fp32, tmp_path):
    path = tmp_path / "bench.json"
    proc = cli("bench", export_fp32, "--steps", "2", "--runs", "2", "--warmup", "0", "--threads", "1", "--height",
               "64", "--width", "64", "--json", path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(path.read_text())
    assert report["threads"]["torch_intra_op"] == 1 and report["threads"]["onnxruntime_intra_op"] == 1
    assert report["threads"]["usable_cores"] >= 1 and "load_average_1m_at_start" in report["threads"]
    assert report["settings"]["scheduler"] == "PNDMScheduler" == report["settings"]["scheduler_class"]
    assert isinstance(report["noise_warnings"], list)
    assert all(r["unet_step_spread"] >= 1.0 for r in report["results"])
    assert "threads: torch 1, onnxruntime 1" in proc.stdout
    named = cli("bench", export_fp32, "--steps", "2", "--runs", "1", "--warmup", "0", "--no-eager", "--scheduler",
                "euler", "--height", "64", "--width", "64", "--json", tmp_path / "b2.json")
    assert named.returncode == 0, named.stderr[-2000:]
    settings = json.loads((tmp_path / "b2.json").read_text())["settings"]
    assert settings["scheduler"] == "euler" and settings["scheduler_class"] == "EulerDiscreteScheduler"


def test_ort_sessions_get_the_thread_count(export_fp32):
    from sdexport.backends.ort import OrtEngine
    from sdexport.runtime import ExportDir

    engine = OrtEngine(ExportDir.open(export_fp32), "vae_decoder", threads=1)
    options = engine.session.get_session_options()
    assert options.intra_op_num_threads == 1 and options.inter_op_num_threads == 1


def test_noise_warning_from_the_spread():
    from sdexport.bench import NOISY_SPREAD, noise_warnings

    steady = {"label": "ort", "unet_step_ms": {"median_ms": 10.0, "p90_ms": 11.0, "n": 20}}
    noisy = {"label": "torch", "unet_step_ms": {"median_ms": 10.0, "p90_ms": 10.0 * NOISY_SPREAD + 1, "n": 20}}
    threads = {"usable_cores": 2, "load_average_1m_at_start": 0.1}
    warnings = noise_warnings([steady, noisy], threads)
    assert len(warnings) == 1 and warnings[0].startswith("torch:") and "noise" in warnings[0]
    assert len(noise_warnings([steady], {"usable_cores": 2, "load_average_1m_at_start": 5.0})) == 1


# --- 20: a moved source model -------------------------------------------------------------------------------
@pytest.fixture
def moved(export_fp32, tiny_model, tmp_path):
    """A copy of the export whose recorded source model is gone (moved to ``moved.model``)."""
    out = shutil.copytree(export_fp32, tmp_path / "export")
    model = shutil.copytree(tiny_model, tmp_path / "moved-model")
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["model"]["path"] = str(tmp_path / "was-here")
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out, model


def test_validate_with_a_moved_source_model(moved, other_model):
    export, model = moved
    assert_refused(cli("validate", export, "--components", "vae_decoder"), 3, "not available", "--model DIR")
    proc = cli("validate", export, "--components", "vae_decoder", "--model", model)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_refused(cli("validate", export, "--components", "vae_decoder", "--model", other_model), 5,
                   "are not the ones")


def test_bench_finds_a_missing_source_before_the_engine_half(moved):
    export, model = moved
    proc = cli("bench", export, "--steps", "1", "--runs", "1", "--warmup", "0")
    assert_refused(proc, 3, "not available")
    assert "loading engines" not in proc.stderr
    ok = cli("bench", export, "--steps", "1", "--runs", "1", "--warmup", "0", "--height", "64", "--width", "64",
             "--model", model)
    assert ok.returncode == 0, ok.stderr[-2000:]


def test_infer_torch_with_a_moved_source_model(moved, tmp_path):
    export, model = moved
    assert_refused(cli("infer", export, "--prompt", "p", *INFER, "--backend", "torch", "-o", tmp_path / "a.png"), 3,
                   "--model")
    proc = cli("infer", export, "--prompt", "p", *INFER, "--backend", "torch", "--model", model,
               "-o", tmp_path / "b.png")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_refused(cli("infer", export, "--prompt", "p", *INFER, "--backend", "torch", "--model", model,
                       "-o", model / "unet" / "c.png"), 2, "would write inside")


# --- 21: help texts ---------------------------------------------------------------------------------------------
def test_every_option_has_a_help_text():
    import click

    from sdexport.cli import cli as group

    missing = [f"{name} {'/'.join(p.opts)}" for name, command in group.commands.items() for p in command.params
               if isinstance(p, click.Option) and not (p.help or "").strip()]
    assert not missing, missing


def test_help_shows_the_workflow_and_what_infer_writes():
    top = cli("--help")
    assert top.returncode == 0
    for step in ("sdexport export MODEL -o OUT", "sdexport validate OUT", "sdexport infer OUT", "sdexport bench OUT"):
        assert step in top.stdout
    infer = cli("infer", "--help").stdout
    flat = " ".join(infer.split())
    assert "FILE-0.png" in flat and "FILE.json" in flat and "torch: the source model's own PyTorch modules" in flat


# --- 22: what the package ships ------------------------------------------------------------------------------------
def test_package_data_and_dependencies():
    import tomllib

    import sdexport
    from sdexport.calibration import DEFAULT_PROMPTS

    root = Path(__file__).resolve().parent.parent
    project = tomllib.loads((root / "pyproject.toml").read_text())
    deps = project["project"]["dependencies"]
    assert "nvidia-modelopt==0.47.0" in deps and not any("open_clip" in d or "[onnx]" in d for d in deps)
    assert not (root / "requirements-nodeps.txt").exists()
    # one version: the wheel's is the one `sdexport --version` and the manifests report (0.1.0 vs 0.2.0 once)
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "sdexport.__version__"}
    data = project["tool"]["setuptools"]["package-data"]["sdexport"]
    package = Path(sdexport.__file__).resolve().parent
    assert DEFAULT_PROMPTS.parent == package / "data" and DEFAULT_PROMPTS.is_file()
    for name in data:
        assert (package / name).is_file(), name
