"""The TensorRT first-run check: `make trt-check` (`pytest -m trt`), run once on the GPU host.

Without a CUDA GPU everything here is skipped, with the reason. Tests marked ``trt_engines`` execute TensorRT
engines; they are skipped, with TensorRT's reason, where the installed TensorRT cannot run on this GPU (e.g.
TensorRT-RTX on an H100/H200, or on a T4 where its engines cannot hold the FP16 UNet). The others need a GPU
and (most) an installed TensorRT but execute no engine, so they also run on Hopper:

    python -m pytest -q -rs -m "trt and not trt_engines" tests/test_trt_check.py

The flavour under test is ``--trt auto`` unless SDEXPORT_TRT=tensorrt|rtx (make trt-check TRT=tensorrt).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import copy_export, sdexport_cmd, sdexport_env
from sdexport.errors import CannotRunHere, IntegrityError
from sdexport.runtime import ExportDir

pytestmark = pytest.mark.trt
FLAVOUR = os.environ.get("SDEXPORT_TRT", "auto")
PROMPT = "a lighthouse on a cliff at dusk, oil painting"


@pytest.fixture(scope="session")
def here():
    """(TensorRT status for the flavour under test, this GPU's compute capability)."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU visible: run `make trt-check` on the GPU host")
    from sdexport.backends.trt import gpu_capability, trt_status

    cc = gpu_capability()
    status = trt_status(cc, FLAVOUR)
    if status["flavour"] is None:
        pytest.skip(f"no TensorRT installed: {status['why']}")
    return status, cc


@pytest.fixture(scope="session")
def runnable(here):
    status, cc = here
    if not status["can_run"]:
        pytest.skip(f"{status['flavour']} {status['version']} cannot run engines on this GPU (compute capability "
                    f"{cc[0]}.{cc[1]}): {status['why']}")
    return here


def _build(src, dst, **options):
    from sdexport.build import build

    out = copy_export(src, dst, with_engines=False)
    messages: list[str] = []
    report = build(out, flavour=FLAVOUR, say=messages.append, **options)
    return out, report, messages


@pytest.fixture(scope="session")
def dyn(here, export_fp16, tmp_path_factory):
    """The tiny FP16 export with dynamic-shape engines for all components."""
    return _build(export_fp16, tmp_path_factory.mktemp("trt-check") / "dyn")


@pytest.fixture(scope="session")
def static(here, export_fp16, tmp_path_factory):
    """The same with static engines (one image of 128x128 with guidance)."""
    return _build(export_fp16, tmp_path_factory.mktemp("trt-check") / "static", static="128x128", batch=1)


@pytest.fixture(scope="session")
def fp32(here, export_fp32, tmp_path_factory):
    return _build(export_fp32, tmp_path_factory.mktemp("trt-check") / "fp32", precision="fp32")


def _run(*args, **env):
    return subprocess.run(sdexport_cmd(*args), env=sdexport_env(**env), capture_output=True, text=True, timeout=900)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


# --- no engine executes: these also run on Hopper -----------------------------------------------

def test_env_reports_flavour_compute_capability_and_can_run(here):
    from sdexport.backends.trt import cc_text

    status, cc = here
    result = _run("env", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["machine"]["compute_capability"] == cc_text(cc)
    text = _run("env").stdout
    assert f"compute capability {cc_text(cc)}" in text
    if FLAVOUR == "auto":
        assert report["tensorrt"]["flavour"] == status["flavour"] and report["tensorrt"]["version"] == status["version"]
        assert report["backends"]["trt"]["can_run"] == status["can_run"]
        line = next(l for l in text.splitlines() if l.startswith("trt "))
        assert ("can run here" in line) == status["can_run"], line


def test_builds_dynamic_and_static_and_a_second_build_rebuilds_nothing(dyn, static, here):
    from sdexport.build import build

    status, cc = here
    out, report, messages = dyn
    assert sorted(report["built"]) == sorted(report["engines"]) and len(report["built"]) == 4
    assert all(e["profile_kind"] == "static" for e in _manifest(static[0])["engines"].values())
    for entry in report["engines"].values():
        assert entry["builder_flags"]["TF32"] is False
        if entry["flavour"] == "rtx":
            assert entry["builder_flags"]["REQUIRE_USER_ALLOCATION"] is True
    again: list[str] = []
    second = build(out, flavour=FLAVOUR, say=again.append)
    assert second["built"] == [] and len(second["up_to_date"]) == 4
    if report["flavour"] == "TensorRT":  # NVIDIA's tensorrt: one timing cache, written by the first build, reused
        cache = out / "engines" / f"timing.trt-{'.'.join(report['version'].split('.')[:3])}.cache"
        assert cache.is_file() and any("(new)" in m for m in messages) and any("(reused)" in m for m in again)
    else:
        assert any("timing cache not used" in m for m in again)
    gpu = f"{cc[0]}.{cc[1]}"
    if report["flavour"] == "TensorRT-RTX" and (gpu not in report["targets"] or not status["can_run"]):
        assert any(m.startswith("warning: ") and gpu in m for m in messages), messages


def test_tensorrt_names_why_a_plan_cannot_load(dyn, here, tmp_path):
    """TensorRT's own answer for plans it cannot load on this GPU, as sdexport tells it (TensorRT-RTX 1.7:
    Runtime.get_engine_validity)."""
    from sdexport.backends.trt import RTX_MAGIC, capture_logger, deserialize, import_trt

    status, cc = here
    out, report, _ = dyn
    entry = report["engines"]["text_encoder"]
    trt, _ = import_trt(entry["flavour"])
    runtime = trt.Runtime(capture_logger(trt))
    plan = (out / entry["file"]).read_bytes()
    bad = tmp_path / "engines" / "bad.plan"
    bad.parent.mkdir()
    bad.write_bytes(plan[: len(plan) // 3])
    with pytest.raises((IntegrityError, CannotRunHere)) as exc:
        deserialize(trt, runtime, bad, "text_encoder")
    assert "\n" not in str(exc.value)
    if entry["flavour"] != "rtx":
        return
    version = bytearray(plan)
    version[24] ^= 0x7F  # the version bytes of the TensorRT-RTX 1.7 header
    bad.write_bytes(bytes(version))
    with pytest.raises(CannotRunHere, match="another TensorRT version"):
        deserialize(trt, runtime, bad, "text_encoder")
    gpu = f"{cc[0]}.{cc[1]}"
    other = next(t for t in ("8.6", "8.0") if t != gpu)
    foreign, _, _ = _build(out, tmp_path / "foreign", components=["text_encoder"], compute_capabilities=other)
    path = foreign / _manifest(foreign)["engines"]["text_encoder"]["file"]
    assert path.read_bytes()[:4] == RTX_MAGIC
    with pytest.raises(CannotRunHere, match="another compute capability"):
        deserialize(trt, runtime, path, "text_encoder")


def test_engines_for_another_gpu_or_tensorrt_version_exit_8(dyn, here, tmp_path):
    from sdexport.backends.trt import cc_text

    status, cc = here
    out = copy_export(dyn[0], tmp_path / "foreign")
    data = _manifest(out)
    data["engines"]["unet"]["version"] = "0.0.1"
    (out / "manifest.json").write_text(json.dumps(data))
    result = _run("infer", out, "--backend", "trt", "--prompt", "p", "--steps", 1, "-o", tmp_path / "x.png")
    assert result.returncode == 8 and "built with" in result.stderr and "0.0.1" in result.stderr, result.stderr
    data = _manifest(dyn[0])
    other = next(t for t in ("8.6", "8.0", "8.9") if t != cc_text(cc))
    for entry in data["engines"].values():
        entry["compute_capabilities"] = [other]
    (out / "manifest.json").write_text(json.dumps(data))
    result = _run("validate", out, "--backend", "trt")
    assert result.returncode == 8, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and f"is {cc_text(cc)}" in last and other in last, last
    assert not (out / "validation.json").exists()


def _gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.skipif(_gpus() < 2, reason="needs two CUDA GPUs")
def test_engines_load_on_the_requested_device(built, monkeypatch):
    """--device cuda:1 on a machine with two GPUs: deserialization, contexts, buffers and enqueues on device 1.
    TensorRT's runtime is the stand-in of tests/fake_trt.py (so this runs on any two CUDA GPUs); torch is real."""
    import torch

    import fake_trt
    import sdexport.backends.trt as backend

    module = fake_trt.fake_tensorrt(version="1.7.1.116")
    fake_trt.register_plans(module, built[0])
    monkeypatch.setattr(backend, "check_installed", lambda entry, component, root: module)
    monkeypatch.setattr(backend, "check_gpu", lambda *a: None)
    torch.cuda.set_device(0)
    engines = backend.TrtEngine.load_all(ExportDir.open(built[0]), ["unet"], device="cuda:1")
    unet = engines["unet"]
    out = unet(unet.spec.sample_inputs({"batch": 2, "latent_height": 16, "latent_width": 16}, device="cuda:0"))
    assert [d for _, d in module.deserialized] == [1] and unet.context.created_on == 1
    assert unet.memory.device == torch.device("cuda:1") and out["out_sample"].device == torch.device("cuda:1")
    execute = [c for c in unet.context.calls if c[0] == "execute_async_v3"]
    assert execute == [("execute_async_v3", torch.cuda.current_stream(1).cuda_stream, 1)]
    assert torch.cuda.current_device() == 0


@pytest.mark.skipif(_gpus() < 1, reason="needs a CUDA GPU")
def test_a_reference_that_does_not_fit_runs_on_the_cpu(export_fp32):
    """Validation with a PyTorch reference that runs out of device memory at the larger shapes: those shapes run
    their reference on the CPU, the report says so, and the comparison still passes."""
    import torch

    from sdexport.validate import validate

    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_allocated(0) + (16 << 20)) / total, 0)
    try:
        report = validate(export_fp32, backend="ort", device="cuda", components=["vae_decoder"], write_report=False)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, 0)
    where = [r["reference_device"] for r in report["results"]]
    assert report["passed"] and "cpu" in where, where


# --- these execute TensorRT engines ----------------------------------------------------------------

@pytest.mark.trt_engines
def test_each_engines_device_memory_fits(runnable, dyn):
    import torch

    from sdexport.backends.trt import TrtEngine, memory_report

    engines = TrtEngine.load_all(ExportDir.open(dyn[0]), list(dyn[1]["engines"]), device="cuda")
    free, total = torch.cuda.mem_get_info()
    sizes = memory_report(engines)
    print("device_memory_size_v2:", {c: f"{s / 2**20:.1f} MiB" for c, s in sizes.items()},
          f"free {free / 2**30:.1f} GiB")
    assert 0 < max(sizes.values()) < total
    assert all(e.memory is engines["unet"].memory for e in engines.values()), "one shared buffer"


@pytest.mark.trt_engines
def test_dtypes_and_output_shapes_match_the_spec_across_the_profile(runnable, dyn):
    import torch

    from sdexport.backends.trt import TrtEngine, profile_geometries

    export = ExportDir.open(dyn[0])
    engines = TrtEngine.load_all(export, list(dyn[1]["engines"]), device="cuda")
    for name, engine in engines.items():
        geometries = profile_geometries(dyn[1]["engines"][name])
        assert len(geometries) >= 3, name  # min, opt, max (and non-square where the profile allows)
        for i, geo in enumerate(geometries):
            dims = engine.spec.dims_for(geo)
            outs = engine(engine.spec.sample_inputs(dims, seed=i, device="cuda"))
            for t in engine.spec.outputs:
                assert tuple(outs[t.name].shape) == t.shape(dims) and outs[t.name].dtype == getattr(torch, t.dtype)
                assert torch.isfinite(outs[t.name]).all(), (name, geo)


@pytest.mark.trt_engines
def test_interleaved_engines_with_shared_memory_agree_with_onnxruntime(runnable, dyn):
    """Text encoder, UNet, VAE decoder, UNet -- the pipeline's order -- through one shared scratch buffer; each
    output agrees with ONNX Runtime (CPU) on the ONNX the engine was built from, within the FP16 thresholds."""
    import onnxruntime
    import torch

    from sdexport.backends.trt import TrtEngine
    from sdexport.components import Geometry
    from sdexport.validate import THRESHOLDS, error_metrics, passes

    export = ExportDir.open(dyn[0])
    engines = TrtEngine.load_all(export, ["text_encoder", "unet", "vae_decoder"], device="cuda")
    geo = Geometry(1, 128, 128)
    first = None
    for name in ("text_encoder", "unet", "vae_decoder", "unet"):
        spec = export.spec(name)
        feed = spec.sample_inputs(spec.dims_for(geo), seed=7)
        got = engines[name]({k: v.cuda() for k, v in feed.items()})
        session = onnxruntime.InferenceSession(str(export.root / export.manifest.component(name)["file"]),
                                               providers=["CPUExecutionProvider"])
        want = dict(zip([o.name for o in session.get_outputs()],
                        session.run(None, {k: v.numpy() for k, v in feed.items()})))
        for out_name, value in want.items():
            metrics = error_metrics(got[out_name].float().cpu().numpy(), value)
            assert passes(metrics, THRESHOLDS["fp16"]), (name, out_name, metrics)
        if name == "unet":
            if first is not None:  # the same UNet input after the VAE used the shared buffer: the same output
                # (TensorRT-RTX may swap in shape-specialised kernels between calls: equal within FP16 rounding)
                scale = float(first.abs().max())
                torch.testing.assert_close(got["out_sample"], first, rtol=0, atol=1e-3 * scale)
            first = got["out_sample"].clone()


@pytest.mark.trt_engines
def test_static_engines_cuda_graph_gives_the_eager_output_also_after_new_inputs(runnable, static):
    import torch

    from sdexport.backends.trt import TrtEngine

    export = ExportDir.open(static[0])
    warnings: list[str] = []
    graphed = TrtEngine.load_all(export, ["unet", "vae_decoder"], device="cuda", warn=warnings.append)
    eager = TrtEngine.load_all(export, ["unet", "vae_decoder"], device="cuda", cuda_graph=False)
    for name in ("unet", "vae_decoder"):
        spec = export.spec(name)
        dims = {a: lo for a, (lo, _, _) in graphed[name].axes.items()}
        feeds = [spec.sample_inputs(dims, seed=s, device="cuda") for s in (1, 2, 1)]
        results = []
        for feed in feeds:  # A, B, A: the second A replays the graph with new input values copied in
            got, want = graphed[name](feed), eager[name](feed)
            for k in want:
                torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-4 * float(want[k].abs().max()) + 1e-6)
            results.append(got)
        assert graphed[name].graph is not None, f"{name}: not captured ({warnings})"
        key = spec.outputs[0].name
        assert not torch.allclose(results[0][key], results[1][key])
        torch.testing.assert_close(results[0][key], results[2][key], rtol=0,
                                   atol=1e-4 * float(results[0][key].abs().max()))


def _validate_without_cuda_toolkit(out):
    """validate --backend trt in a process whose environment names no CUDA toolkit and in which Polygraphy's
    TensorRT backend and its libcudart lookup would fail if anything used them."""
    code = ("import sys; sys.modules['polygraphy.backend.trt'] = None\n"
            "import polygraphy.cuda.cuda as c\n"
            "def boom(self): raise OSError('libcudart lookup')\n"
            "c.Cuda.__init__ = boom\n"
            "from sdexport.cli import main\n"
            f"sys.argv = ['sdexport', 'validate', {str(out)!r}, '--backend', 'trt']\n"
            "main()\n")
    env = sdexport_env()
    for name in ("LD_LIBRARY_PATH", "CUDA_HOME", "CUDA_PATH", "CUDA_ROOT"):
        env.pop(name, None)
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if "cuda" not in p.lower())
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.trt_engines
@pytest.mark.parametrize("which", ["dyn", "static"])
def test_validate_trt_passes_without_a_cuda_toolkit(runnable, which, request):
    out = request.getfixturevalue(which)[0]
    result = _validate_without_cuda_toolkit(out)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((out / "validation.json").read_text())
    assert report["passed"] and report["backend"] == "trt" and report["engine_device_memory_bytes"]
    assert "device_memory_size_v2" in result.stderr


@pytest.mark.trt_engines
def test_fp32_engines_pass_validate(runnable, fp32):
    """FP32 engines against PyTorch FP32 at the FP32 thresholds (rel. L2 1e-4): with TF32 on (TensorRT's default)
    an Ampere or newer GPU misses them."""
    from sdexport.validate import validate

    out, report, _ = fp32
    assert all(e["builder_flags"]["TF32"] is False for e in report["engines"].values())
    result = validate(out, backend="trt", device="cuda")
    assert result["passed"], [r for r in result["results"] if not r["pass"]]
    assert {r["dtype"] for r in result["results"]} == {"fp32"}


@pytest.mark.trt_engines
def test_infer_trt_gives_onnxruntimes_image(runnable, dyn, tmp_path):
    """The same seed through TensorRT (GPU) and ONNX Runtime (CPU) on the same FP16 export."""
    from PIL import Image

    out = dyn[0]
    args = ["--prompt", PROMPT, "--steps", 4, "--seed", 3]
    trt = _run("infer", out, "--backend", "trt", "--device", "cuda", *args, "-o", tmp_path / "trt.png")
    assert trt.returncode == 0, trt.stderr
    ort = _run("infer", out, "--backend", "ort", "--device", "cpu", *args, "-o", tmp_path / "ort.png")
    assert ort.returncode == 0, ort.stderr
    a, b = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in ("trt", "ort"))
    psnr = _psnr(a, b)
    print(f"TensorRT vs ONNX Runtime, same seed: PSNR {psnr:.1f} dB")
    assert psnr >= 35, psnr
    assert json.loads((tmp_path / "trt.json").read_text())["backend"] == "trt"


@pytest.mark.trt_engines
def test_step_graph_a_b_a_gives_identical_a_images(runnable, static):
    """Static engines opened without graphs of their own (what --step-graph does); request A, then B (another
    step count: a second capture on the same contexts), then A again: A's image is identical both times, and
    agrees with the eager loop."""
    from sdexport.backends import load_engines
    from sdexport.pipeline import Pipeline

    out = static[0]
    export = ExportDir.open(out)
    engines = load_engines(out, "trt", device="cuda", cuda_graph=False)
    warnings: list[str] = []
    pipe = Pipeline(engines, export, device="cuda", step_graph=True, warn=warnings.append)
    a = dict(prompt=PROMPT, seed=0, steps=4, height=128, width=128, scheduler="euler")
    b = dict(a, seed=1, steps=6)
    first, other, again = pipe(**a), pipe(**b), pipe(**a)
    assert first.loop == other.loop == again.loop == "step-graph", warnings
    assert np.array_equal(first.uint8(), again.uint8())
    assert not np.array_equal(first.uint8(), other.uint8())
    eager = Pipeline(engines, export, device="cuda")(**a)
    scale = float(eager.latents.abs().max())
    assert float((first.latents - eager.latents).abs().max()) <= 1e-3 * scale


@pytest.mark.trt_engines
def test_step_graph_falls_back_for_dynamic_engines(runnable, dyn):
    from sdexport.backends import load_engines
    from sdexport.pipeline import Pipeline

    engines = load_engines(dyn[0], "trt", device="cuda", cuda_graph=False)
    warnings: list[str] = []
    pipe = Pipeline(engines, ExportDir.open(dyn[0]), device="cuda", step_graph=True, warn=warnings.append)
    result = pipe(PROMPT, steps=2, height=128, width=128, scheduler="euler")
    assert result.loop == "eager" and len(warnings) == 1 and "--static" in warnings[0]


def _manifest(path):
    return json.loads((path / "manifest.json").read_text())
