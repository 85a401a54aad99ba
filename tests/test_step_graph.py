"""The whole denoising step as one CUDA graph (Pipeline(step_graph=True), infer/bench --step-graph).

The GPU tests run where CUDA is (the device runs of benchmarks/README.md run them: `pytest -m gpu`); the
reference is the eager loop of the same pipeline on the same engines, which tests/test_pipeline.py ties to
diffusers' own StableDiffusionPipeline. On a CPU-only machine only the error paths run.
"""

from __future__ import annotations

import pytest
import torch

from sdexport.errors import UsageError
from sdexport.pipeline import Pipeline
from sdexport.runtime import ExportDir

from conftest import assert_error, run_cli

PROMPT = "a lighthouse on a cliff at dusk, oil painting"
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")


def test_step_graph_needs_cuda(export_fp32):
    with pytest.raises(UsageError, match="--step-graph needs a CUDA device"):
        Pipeline({}, ExportDir.open(export_fp32), device="cpu", step_graph=True)


@pytest.mark.parametrize("command", ["infer", "bench"])
def test_step_graph_flag_on_cpu_is_a_usage_error(export_fp32, tmp_path, command):
    extra = ["--prompt", "x", "-o", str(tmp_path / "a.png")] if command == "infer" else []
    result = run_cli(command, export_fp32, "--step-graph", "--device", "cpu", *extra)
    assert_error(result, 2, "--step-graph needs a CUDA device")
    assert not (tmp_path / "a.png").exists()


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "ort"])
@pytest.mark.parametrize("scheduler", ["euler", "ddim", "dpm++2m", "unipc", "pndm", "euler-a"])
def test_step_graph_matches_the_eager_loop(export_fp32, backend, scheduler):
    from sdexport.backends import load_engines
    from sdexport.components import Geometry

    export = ExportDir.open(export_fp32)
    size = export.ranges.opt_size
    options = {"static": Geometry(1, size, size)} if backend == "ort" else {}
    engines = load_engines(export_fp32, backend, device="cuda", **options)
    settings = dict(steps=7, guidance_scale=7.5, height=size, width=size, scheduler=scheduler)
    eager = Pipeline(engines, export, device="cuda")
    warnings: list[str] = []
    graphed = Pipeline(engines, export, device="cuda", step_graph=True, warn=warnings.append)
    for seed in (0, 1):  # the second request replays the graphs captured by the first, with new inputs
        want = eager(PROMPT, seed=seed, **settings)
        got = graphed(PROMPT, seed=seed, **settings)
        if scheduler == "euler-a":  # draws step noise from the request's CPU generator: not capturable
            assert got.loop == "eager" and any("CPU generator" in w for w in warnings)
        elif got.loop == "eager":  # a scheduler whose step cannot be captured falls back, and says why
            assert scheduler in ("unipc", "pndm") and any("step graph not used" in w for w in warnings), warnings
        else:
            assert got.loop == "step-graph" and len(got.timings_ms["unet"]) == len(want.timings_ms["unet"])
        scale = want.latents.abs().max().item()
        diff = (got.latents - want.latents).abs().max().item()
        assert diff <= 1e-4 * scale, f"{scheduler}/{backend} seed {seed}: latents differ by {diff} (scale {scale})"
    assert len(warnings) <= 1  # one warning per request kind, not per request


def test_step_graph_bookkeeping(export_fp32):
    """Capture runs once per request kind, a failure warns once and is remembered (the eager loop runs),
    and at most MAX_STEP_GRAPH_KINDS kinds are kept (the oldest goes). CUDA itself is not needed here."""
    from sdexport import pipeline as pl

    warnings: list[str] = []
    pipe = Pipeline({}, ExportDir.open(export_fp32), device="cuda:0", step_graph=True, warn=warnings.append)
    calls = []

    def ok(key):
        return lambda: calls.append(key) or f"graphs {key}".encode()

    assert pipe._step_graphs("a", ok("a")) == b"graphs a"
    assert pipe._step_graphs("a", ok("again")) == b"graphs a" and calls == ["a"]

    def refuse():
        raise pl._NotCapturable("the scheduler draws noise from a CPU generator every step")

    def crash():
        raise RuntimeError("operation not permitted when stream is capturing\nmore")

    assert pipe._step_graphs("b", refuse) is None and pipe._step_graphs("b", refuse) is None
    assert pipe._step_graphs("c", crash) is None
    assert warnings == [
        "step graph not used (the scheduler draws noise from a CPU generator every step); running the denoising "
        "loop eagerly",
        "step graph not used (capture failed: RuntimeError: operation not permitted when stream is capturing); "
        "running the denoising loop eagerly"]
    for key in "defg":
        pipe._step_graphs(key, ok(key))
    assert len(pipe._graphs) == pl.MAX_STEP_GRAPH_KINDS and "a" not in pipe._graphs and "g" in pipe._graphs
