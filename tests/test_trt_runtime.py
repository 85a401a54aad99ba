"""TrtEngine and TensorRT validation up to the GPU boundary: real TensorRT-RTX plans of the tiny preset,
TensorRT's runtime objects replaced by tests/fake_trt.py (which computes with ONNX Runtime on the ONNX each
plan was built from, through the addresses TrtEngine binds). What these tests cannot show -- TensorRT's own
kernels on a GPU -- is what `make trt-check` (tests/test_trt_check.py) runs on the user's GPU."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

import fake_trt
from conftest import assert_error, copy_export, run_cli
from sdexport.errors import BackendUnavailable, CannotRunHere, IntegrityError, ShapeError
from sdexport.runtime import ExportDir


@pytest.fixture
def fake(built, monkeypatch):
    """The built engines, loadable on this CPU through the fake runtime: (export dir, fake tensorrt module)."""
    import sdexport.backends.trt as backend

    module = fake_trt.fake_tensorrt(version="1.7.1.116")
    fake_trt.register_plans(module, built[0], memory_bytes=lambda entry: 1000 + len(entry["file"]))
    monkeypatch.setattr(backend, "check_installed", lambda entry, component, root: module)
    monkeypatch.setattr(backend, "check_gpu", lambda *a: None)
    fake_trt.FakeCuda.install(monkeypatch)
    return built[0], module


def _engines(out, **options):
    from sdexport.backends.trt import TrtEngine

    export = ExportDir.open(out)
    return TrtEngine.load_all(export, ["text_encoder", "unet", "vae_decoder"], device="cpu", **options)


def _ort(out, component, feed):
    import onnxruntime

    manifest = json.loads((out / "manifest.json").read_text())
    session = onnxruntime.InferenceSession(str(out / manifest["components"][component]["file"]),
                                           providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {k: v.numpy() for k, v in feed.items()})))


def _feeds(out, component, dims_list):
    spec = ExportDir.open(out).spec(component)
    return [spec.sample_inputs(spec.dims_for(g) if hasattr(g, "images") else g, seed=i) for i, g in enumerate(dims_list)]


def test_interleaved_calls_share_one_buffer_and_agree_with_onnxruntime(fake):
    """The pipeline's order (text encoder, UNet, VAE, UNet) at two shapes, through one shared scratch buffer:
    each output is what ONNX Runtime computes on the same ONNX, at the shape TensorRT reports."""
    from sdexport.components import Geometry

    out, module = fake
    engines = _engines(out)
    sizes = {c: e.device_memory_size for c, e in engines.items()}
    memory = {c: [call for call in engines[c].context.calls if call[0] == "set_device_memory"] for c in engines}
    assert len({m[0][1] for m in memory.values()}) == 1, "one buffer for all contexts"
    assert {m[0][2] for m in memory.values()} == {max(sizes.values())}
    assert all(ctx.strategy == fake_trt.ExecutionContextAllocationStrategy.USER_MANAGED
               for e in module.engines for ctx in e.contexts)
    for geo in (Geometry(1, 128, 128), Geometry(2, 64, 128, guidance=False)):
        calls = [("text_encoder", _feeds(out, "text_encoder", [geo])[0]), ("unet", _feeds(out, "unet", [geo])[0]),
                 ("vae_decoder", _feeds(out, "vae_decoder", [geo])[0]), ("unet", _feeds(out, "unet", [geo])[0])]
        for component, feed in calls:
            got = engines[component](feed)
            want = _ort(out, component, feed)
            assert set(got) == set(want)
            for name in want:
                assert tuple(got[name].shape) == want[name].shape and got[name].dtype == torch.float32
                np.testing.assert_allclose(got[name].numpy(), want[name], rtol=0, atol=1e-6)
    stream = fake_trt.FakeCuda.default_stream.cuda_stream
    unet = engines["unet"].context.calls
    assert [c for c in unet if c[0] == "execute_async_v3"] == [("execute_async_v3", stream, 0)] * 4
    assert {c[1] for c in unet if c[0] == "set_tensor_address"} == {"sample", "timestep", "encoder_hidden_states",
                                                                      "out_sample"}


def _static_engine(built, out, component, monkeypatch, **options):
    """``component`` of the built tiny export, built again with one static 128x64 profile (one image) into
    ``out``, loaded through the fake runtime: (engine, its export dir, the fake CUDA, the backend module)."""
    import sdexport.backends.trt as backend
    from sdexport.build import build

    copy_export(built[0], out)
    build(out, components=[component], static="128x64", batch=1)
    module = fake_trt.fake_tensorrt(version="1.7.1.116")
    fake_trt.register_plans(module, out)
    monkeypatch.setattr(backend, "check_installed", lambda entry, component, root: module)
    monkeypatch.setattr(backend, "check_gpu", lambda *a: None)
    cuda = fake_trt.FakeCuda.install(monkeypatch)
    engine = backend.TrtEngine.load_all(ExportDir.open(out), [component], device="cpu", **options)[component]
    return engine, out, cuda, backend


def test_static_engine_replays_its_cuda_graph_with_new_inputs(built, trt, tmp_path, monkeypatch):
    """A static engine runs once, captures the same call on a side stream, and later calls copy new inputs into
    the captured buffers and replay: outputs equal an eager run of the same inputs, and the context is never
    re-bound after the capture."""
    engine, out, cuda, backend = _static_engine(built, tmp_path / "static", "vae_decoder", monkeypatch)
    assert engine.captures_own_graph and engine.graph_capture_refusal()
    feeds = [engine.spec.sample_inputs({"batch": 1, "latent_height": 16, "latent_width": 8}, seed=s) for s in (1, 2, 3)]
    outputs = [engine(f)["sample"].clone() for f in feeds]
    graph = engine.graph
    assert graph is not None and len(graph.ops) == 1 and graph.replays == 2
    calls = engine.context.calls
    executes = [c for c in calls if c[0] == "execute_async_v3"]
    assert executes[0][1] == cuda.default_stream.cuda_stream and executes[1][1] != executes[0][1]  # side stream
    assert ("is_stream_capturable", executes[1][1]) in calls
    last_bind = max(i for i, c in enumerate(calls) if c[0] == "set_tensor_address")
    assert last_bind < calls.index(executes[0]), "nothing re-bound after the first run"
    for feed, got in zip(feeds, outputs):
        np.testing.assert_allclose(got.numpy(), _ort(out, "vae_decoder", feed)["sample"], rtol=0, atol=1e-6)
    assert not np.allclose(outputs[1].numpy(), outputs[2].numpy())

    # where TensorRT says the context cannot be captured: one warning, then the eager call, same numbers
    warnings: list[str] = []
    engine = backend.TrtEngine.load_all(ExportDir.open(out), ["vae_decoder"], device="cpu",
                                        warn=warnings.append)["vae_decoder"]
    engine.context.capturable = False
    got = [engine(f)["sample"].clone() for f in feeds]
    assert engine.graph is None and not engine.captures_own_graph
    assert len(warnings) == 1 and "cannot be captured" in warnings[0]
    for a, b in zip(got, outputs):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=0, atol=1e-6)

    # --step-graph opens engines without their own graph (cuda_graph=False): the step capture may take them
    engine = backend.TrtEngine.load_all(ExportDir.open(out), ["vae_decoder"], device="cpu",
                                        cuda_graph=False)["vae_decoder"]
    assert not engine.captures_own_graph and engine.graph_capture_refusal() is None
    graph = fake_trt.FakeGraph()
    with torch.cuda.graph(graph):  # a caller's capture: the engine enqueues into it
        captured = engine(feeds[0])["sample"]
    assert len(graph.ops) == 1 and engine.graph is None
    graph.replay()
    np.testing.assert_allclose(captured.numpy(), outputs[0].numpy(), rtol=0, atol=1e-6)
    engine.context.capturable = False
    with pytest.raises(backend.NotCapturable), torch.cuda.graph(fake_trt.FakeGraph()):
        engine(feeds[0])


def test_static_engine_pads_a_call_with_fewer_rows(built, trt, tmp_path, monkeypatch):
    """A static text encoder is built for two rows per image (guidance); SDXL sends one when the negative
    prompt is zeros. The call is padded to the profile's batch and cut back: the row equals ONNX Runtime's on
    that row alone; more rows than the profile is the engine's ShapeError."""
    engine, out, _, _ = _static_engine(built, tmp_path / "static-text", "text_encoder", monkeypatch)
    assert engine.static and engine.axes["batch"][0] == 2
    feed = engine.spec.sample_inputs({"batch": 1}, seed=4)
    got = {k: v.clone() for k, v in engine(feed).items()}
    want = _ort(out, "text_encoder", feed)
    assert {k: tuple(v.shape) for k, v in got.items()} == {k: v.shape for k, v in want.items()}
    for k, v in want.items():
        np.testing.assert_allclose(got[k].numpy(), v, rtol=0, atol=1e-3)
    with pytest.raises(ShapeError, match="outside the engine's profile"):
        engine(engine.spec.sample_inputs({"batch": 3}, seed=4))


def test_step_graphs_refuse_dynamic_and_self_graphed_engines(fake, export_fp32):
    """The pipeline reads one capability of every engine: a dynamic-shape TensorRT engine (one context captured at
    several shapes is not something TensorRT promises to keep valid) and an engine replaying its own graph are
    refused before any capture, and the eager loop runs with one warning."""
    from sdexport import pipeline as pl

    out, _ = fake
    engines = _engines(out)
    refusal = engines["unet"].graph_capture_refusal()
    assert "dynamic-shape profile" in refusal and "--static" in refusal
    pipe = pl.Pipeline(engines, ExportDir.open(out), device="cuda:0", step_graph=True, warn=lambda m: None)
    with pytest.raises(pl._NotCapturable, match="dynamic-shape profile"):
        pl._StepGraphs.capture(pipe, None, None, None, None, {}, None, 1, {})
    from sdexport.backends.base import CudaGraphed

    class Own(type(engines["unet"])):
        captures_own_graph = True

    own = Own.__new__(Own)
    own.spec, own.use_graph, own.static = engines["unet"].spec, True, True
    assert "captures its own CUDA graph" in own.graph_capture_refusal()
    assert CudaGraphed.captures_own_graph is False  # the class default; instances set it (base.CudaGraphed)


def test_engine_checks_tensorrts_answers(fake, monkeypatch):
    """set_input_shape / set_tensor_address refusals and an output shape other than the spec's are errors naming
    the tensor; so is an engine whose I/O dtypes differ from the spec."""
    out, module = fake
    engine = _engines(out)["vae_decoder"]
    feed = engine.spec.sample_inputs({"batch": 1, "latent_height": 16, "latent_width": 16})
    monkeypatch.setattr(fake_trt.FakeContext, "set_input_shape", lambda self, name, shape: False)
    with pytest.raises(ShapeError, match="TensorRT refused the shape .* for 'latent_sample'"):
        engine(feed)
    monkeypatch.undo()
    fake_trt.FakeCuda.install(monkeypatch)
    monkeypatch.setattr(fake_trt.FakeContext, "get_tensor_shape", lambda self, name: (1, 3, 64, 64))
    with pytest.raises(IntegrityError, match=r"computes 'sample' as \(1, 3, 64, 64\).*spec says \(1, 3, 128, 128\)"):
        engine(feed)
    monkeypatch.undo()
    fake_trt.FakeCuda.install(monkeypatch)
    monkeypatch.setattr(fake_trt.FakeContext, "set_tensor_address", lambda self, name, address: False)
    with pytest.raises(RuntimeError, match="refused the address of 'latent_sample'"):
        engine(feed)
    monkeypatch.undo()

    import sdexport.backends.trt as backend

    monkeypatch.setattr(backend, "check_installed", lambda entry, component, root: module)
    monkeypatch.setattr(backend, "check_gpu", lambda *a: None)
    fake_trt.FakeCuda.install(monkeypatch)
    monkeypatch.setattr(fake_trt.FakeEngine, "get_tensor_dtype", lambda self, name: fake_trt.DataType("HALF"))
    with pytest.raises(IntegrityError, match="the engine's tensors are .*'float16'.*declares"):
        _engines(out)


def test_engines_load_on_the_requested_device(fake, monkeypatch):
    """--device cuda:1: every engine is deserialized and gets its context with device 1 current, its scratch
    buffer is allocated there, and the free memory checked is device 1's."""
    out, module = fake
    cuda = fake_trt.FakeCuda
    asked = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index=None: asked.append(index) or (1 << 40, 1 << 41))
    real_empty = torch.empty
    placed = []
    monkeypatch.setattr(torch, "empty", lambda *a, device=None, **k: placed.append(device) or real_empty(*a, **k))
    from sdexport.backends.trt import TrtEngine

    TrtEngine.load_all(ExportDir.open(out), ["text_encoder", "unet"], device="cuda:1")
    assert [d for _, d in module.deserialized] == [1, 1] and cuda.current_device == 0
    assert placed == ["cuda:1"] and asked == [1]


def test_engines_that_do_not_fit_say_so(fake, monkeypatch):
    from sdexport.backends.trt import TrtEngine

    out, module = fake
    for plan, (onnx, profile, _) in list(module.plans.items()):
        module.plans[plan] = (onnx, profile, (5 << 30) if "unet" in str(onnx) else 1 << 20)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index=None: (4 << 30, 16 << 30))
    monkeypatch.setattr(torch, "empty", lambda *a, **k: pytest.fail("allocated although it cannot fit"))
    with pytest.raises(CannotRunHere, match=r"the unet engine needs 5.00 GiB .* 4.00 GiB is free on cuda.*--max-size"):
        TrtEngine.load_all(ExportDir.open(out), ["text_encoder", "unet"], device="cuda")


@pytest.mark.parametrize("flags, cls, needles", [
    (4, CannotRunHere, ["NVIDIA driver is older", "update the NVIDIA driver"]),
    (2 | 1, CannotRunHere, ["another compute capability", "another TensorRT version", "sdexport build"]),
    (16, CannotRunHere, ["not enough free GPU memory"]),
    (32, IntegrityError, ["not a plan TensorRT can read", "--force"]),
    (0, IntegrityError, ["could not deserialize", "no message"]),
])
def test_deserialization_names_the_cause(fake, flags, cls, needles):
    """Runtime.get_engine_validity (TensorRT-RTX 1.7): each diagnostic bit becomes its cause in one line."""
    from sdexport.backends.trt import TrtEngine

    out, module = fake
    module.Runtime.get_engine_validity = lambda self, blob: (fake_trt.EngineValidity.INVALID, flags)
    with pytest.raises(cls) as exc:
        TrtEngine.load_all(ExportDir.open(out), ["unet"], device="cpu")
    for needle in needles:
        assert needle in str(exc.value), str(exc.value)
    assert module.deserialized == [], "refused before deserializing"


def test_deserialization_without_validity_api_reads_tensorrts_message(fake):
    """TensorRT 10/11 has no get_engine_validity: the first error it logs decides the cause."""
    from sdexport.backends.trt import TrtEngine

    out, module = fake

    def refuse(self, blob):
        self.logger.log(fake_trt.Severity.ERROR, "IRuntime::deserializeCudaEngine: Error Code 1: Serialization "
                        "(Serialization assertion stdVersionRead == kSERIALIZATION_VERSION failed.Version tag does "
                        "not match. Note: Current Version: 239, Serialized Engine Version: 236)")
        return None

    module.Runtime.deserialize_cuda_engine = refuse
    with pytest.raises(CannotRunHere, match="another TensorRT version.*Version tag does not match"):
        TrtEngine.load_all(ExportDir.open(out), ["unet"], device="cpu")


def test_suboptimal_engines_warn(fake):
    from sdexport.backends.trt import TrtEngine

    out, module = fake
    module.Runtime.get_engine_validity = lambda self, blob: (fake_trt.EngineValidity.SUBOPTIMAL, 0)
    warnings: list[str] = []
    TrtEngine.load_all(ExportDir.open(out), ["unet"], device="cpu", warn=warnings.append)
    assert len(warnings) == 1 and "may run slower here" in warnings[0]


def test_tensorrt_before_10_is_refused(monkeypatch):
    from sdexport.backends.trt import import_trt

    old = fake_trt.fake_tensorrt(name="tensorrt", version="8.6.1")
    old.Builder = object
    monkeypatch.setitem(sys.modules, "tensorrt", old)
    with pytest.raises(BackendUnavailable, match=r"^TensorRT 8.6.1 is installed; sdexport needs TensorRT 10 or newer"):
        import_trt("tensorrt")
    old.__version__ = "10.0.1"
    assert import_trt("tensorrt") == (old, "tensorrt")


def test_trt_flavour_that_is_missing_names_the_one_installed(export_fp32, monkeypatch):
    """`build --trt tensorrt` without NVIDIA's tensorrt, TensorRT-RTX installed, said "no TensorRT found (tensorrt);
    install TensorRT: 'pip install tensorrt-rtx-cu13...'", an install hint for what was there. The line says which
    package does not import, how to install it, and the other flavour where that one is here."""
    rtx = fake_trt.fake_tensorrt(name="tensorrt_rtx", version="1.7.1.116")
    nvidia = fake_trt.fake_tensorrt(name="tensorrt", version="10.13.3.9")
    rtx.Builder = nvidia.Builder = object
    build = ("build", export_fp32, "--precision", "fp32", "--trt")
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # importing it raises ImportError
    monkeypatch.setitem(sys.modules, "tensorrt_rtx", rtx)
    result = run_cli(*build, "tensorrt")
    assert_error(result, 7, "NVIDIA's TensorRT (the Python package 'tensorrt') is not importable here",
                 "pip install tensorrt-cu13", "TensorRT-RTX 1.7.1.116 is installed here: --trt rtx")
    assert "tensorrt-rtx-cu13" not in result.stderr
    monkeypatch.setitem(sys.modules, "tensorrt_rtx", None)  # the neighbour: --trt rtx without tensorrt_rtx
    monkeypatch.setitem(sys.modules, "tensorrt", nvidia)
    assert_error(run_cli(*build, "rtx"), 7, "TensorRT-RTX (the Python package 'tensorrt_rtx') is not importable here",
                 "to install it: pip install tensorrt-rtx-cu13==1.7.1.116", "TensorRT 10.13.3.9 is installed here: "
                 "--trt tensorrt")
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # neither: the install hint alone
    result = run_cli(*build, "rtx")
    assert_error(result, 7, "'tensorrt_rtx') is not importable here; to install it: pip install tensorrt-rtx-cu13")
    assert "installed here" not in result.stderr


def test_validate_trt_runs_trtengine_without_polygraphys_tensorrt_or_cudart(fake, monkeypatch):
    """validate --backend trt runs the engines through TrtEngine (what infer runs) against PyTorch and ONNX
    Runtime at the profile's shapes; Polygraphy's TensorRT backend is never imported and its CUDA wrapper (the
    libcudart lookup that fails on pip-only hosts) never created."""
    import polygraphy.cuda.cuda as polygraphy_cuda

    from sdexport.validate import validate

    out, _ = fake
    monkeypatch.setitem(sys.modules, "polygraphy.backend.trt", None)  # importing it now raises ImportError
    monkeypatch.setattr(polygraphy_cuda.Cuda, "__init__", lambda self: pytest.fail("libcudart looked up"))
    messages: list[str] = []
    report = validate(out, backend="trt", device="cpu", components=["text_encoder", "unet"], write_report=False,
                      say=messages.append)
    assert report["passed"] and "ONNX Runtime" in report["reference"]
    shapes = sorted(tuple(r["input_shapes"]["sample"]) for r in report["results"] if r["component"] == "unet")
    assert shapes == [(1, 4, 8, 8), (2, 4, 8, 32), (2, 4, 16, 16), (8, 4, 32, 32)]  # min, non-square, opt, max
    for r in report["results"]:
        for out_metrics in r["outputs"].values():
            vs = out_metrics["vs_onnxruntime"]
            assert vs["pass"] and vs["max_abs_err"] <= 1e-6  # the stand-in computes with ONNX Runtime
        assert r["reference_device"] == "cpu"
    assert set(report["engine_device_memory_bytes"]) == {"text_encoder", "unet"}
    assert any("device_memory_size_v2" in m and "unet" in m for m in messages)
    lines = [m for m in messages if m.startswith("PASS ")]  # one per result, naming an output with its thresholds
    assert len(lines) == len(report["results"])
    for line, r in zip(lines, report["results"]):
        assert line.split()[1] == r["component"] and f"  {r['reported_output']}: max_abs " in line, line
        assert r["reported_output"] in r["outputs"] and ", rel_l2 " in line and " > " not in line, line


def test_reference_that_does_not_fit_runs_on_the_cpu():
    """One reference at a time: loaded on activation, dropped on deactivation; a feed that runs out of device
    memory runs again on a CPU copy, and the runner says which feeds did."""
    from polygraphy.comparator import Comparator

    from sdexport.components import TensorSpec
    from sdexport.validate import _engine_runner_class

    class Doubler:
        def __init__(self, where):
            self.where, self.device, self.spec = where, "cpu", spec  # tensors stay on the CPU here

        def __call__(self, feed):
            x = feed["x"]
            if self.where != "cpu" and x.shape[0] > 2:
                raise torch.OutOfMemoryError("CUDA out of memory")
            return {"y": x * 2}

    spec = type("Spec", (), {"inputs": [TensorSpec("x", "float32", ("n",))], "outputs": [TensorSpec("y", "float32", ("n",))]})
    loads = []
    runner = _engine_runner_class()(spec, "torch:x", device="gpu-stand-in", fallback="cpu",
                                    load=lambda device: loads.append(device) or Doubler(device))
    feeds = [{"x": np.ones(n, np.float32)} for n in (1, 4, 2)]
    results = Comparator.run([runner], data_loader=feeds)
    outs = [o for _, o in results.items()][0]
    assert [o["y"].tolist() for o in outs] == [[2.0], [2.0] * 4, [2.0] * 2]
    assert runner.fell_back == [1] and loads == ["gpu-stand-in", "cpu"]
    assert runner.engine is None and runner.spare is None, "dropped after the comparison"


def test_bench_step_graph_opens_engines_without_their_own_graph(export_fp32, monkeypatch):
    from sdexport import bench

    seen = {}

    def record(export, backend, device, settings, runs, warmup, say, **options):
        seen.update(options)
        raise SystemExit

    monkeypatch.setattr(bench, "run_backend", record)
    from sdexport import limits

    monkeypatch.setattr(limits, "device", lambda option, device: device)  # no GPU here: the options are the point
    with pytest.raises(SystemExit):
        bench.bench(export_fp32, backend="trt", device="cuda", steps=1, step_graph=True)
    assert seen["step_graph"] is True and seen["cuda_graph"] is False


def test_no_sdexport_module_imports_polygraphys_tensorrt_backend():
    """Polygraphy fixes which TensorRT module its backend uses when polygraphy.backend.trt is first imported
    (POLYGRAPHY_USE_TENSORRT_RTX); sdexport picks the module itself from the manifest and never imports that
    backend, so no import order can pick the wrong TensorRT."""
    import ast
    from pathlib import Path

    import sdexport

    found = []
    for path in Path(sdexport.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [f"{path.name}: {n}" for n in names if n.startswith(("polygraphy.backend.trt", "polygraphy.cuda"))]
    assert found == []


@pytest.mark.parametrize("command", ["validate", "infer"])
def test_without_engines_the_hint_names_the_exports_precision(export_fp32, tmp_path, command):
    """The hint is a build that runs: `--precision fp16` on an FP32 export is itself refused (exit 2)."""
    from conftest import assert_refused, cli

    out = copy_export(export_fp32, tmp_path / "e32", with_engines=False)
    args = ["--prompt", "x", "-o", tmp_path / "x.png"] if command == "infer" else []
    line = assert_refused(cli(command, out, "--backend", "trt", *args), 5, "no TensorRT engine")
    assert f"'sdexport build {out} --precision fp32'" in line


@pytest.mark.parametrize("dtype, precision", [("fp16", "fp16"), ("fp32", "fp32"), ("?", "fp16")])
def test_build_command_follows_the_export_dtype(dtype, precision):
    from types import SimpleNamespace

    from sdexport.backends.trt import build_command

    assert build_command(SimpleNamespace(root="OUT", dtype=dtype)) == f"'sdexport build OUT --precision {precision}'"
