"""Numerical validation: every exported component against PyTorch eager on the source model.

Execution goes through Polygraphy's ``Comparator`` with one runner per backend
(Polygraphy's own ``OnnxrtRunner`` for ONNX Runtime, and ``EngineRunner`` below over
sdexport's own engines: the PyTorch reference, since Polygraphy's ``PytRunner`` always
moves inputs to CUDA, and TensorRT's ``TrtEngine``, the class ``infer`` runs, with its
shared device memory and CUDA graphs). Inputs come from the component specs, at several
shapes across the exported dynamic range (validation_geometries) or, for engines, across
their profile.

Device memory: the Comparator activates one runner at a time, and a reference model is
loaded on activation and dropped on deactivation, so one reference at a time is on the
GPU next to the engines; a shape whose PyTorch reference does not fit runs its reference
on the CPU (``reference_device`` in the report says where).

A comparison passes when, for every output, there is no NaN/Inf, the relative L2
error is within ``rel_l2`` and the max absolute error within ``atol + rtol * max|ref|``
for the export's dtype (THRESHOLDS; documented in the README). Validation never
only warns: any miss makes ``validate`` exit non-zero.
"""

from __future__ import annotations

import contextlib
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .components import Geometry, validation_geometries
from .errors import UsageError
from .manifest import versions, write_json
from .runtime import ExportDir

# Per export dtype, against PyTorch eager FP32 on the same inputs.
THRESHOLDS = {
    "fp32": {"rel_l2": 1e-4, "atol": 1e-3, "rtol": 1e-3},
    "fp16": {"rel_l2": 1e-2, "atol": 5e-2, "rtol": 2e-2},
    "int8": {"rel_l2": 1.5e-1, "atol": 1.0, "rtol": 2e-1},
}


def _engine_runner_class():
    from polygraphy.backend.base import BaseRunner

    class EngineRunner(BaseRunner):
        """A Polygraphy runner over an sdexport Engine (numpy in, numpy out).

        ``load(device)`` makes the engine when the runner is activated and it is dropped when deactivated (pass
        ``engine`` instead to run one that stays loaded). With ``fallback`` (a device), a feed that runs out of
        memory on the engine's device is run again on a second engine loaded there; ``fell_back`` lists those
        feeds by index."""

        def __init__(self, spec, name: str, load=None, engine=None, device: str = "cpu", fallback: str | None = None):
            super().__init__(name=name, prefix="engine-runner")
            self.spec, self.load, self.engine, self.device, self.fallback = spec, load, engine, device, fallback
            self.keep = engine is not None
            self.spare = None
            self.calls = 0
            self.fell_back: list[int] = []

        def activate_impl(self):
            if self.engine is None:
                self.engine = self.load(self.device)
            self.calls = 0

        def deactivate_impl(self):
            if not self.keep:
                self.engine = self.spare = None
                _release_device_memory(self.device)

        def get_input_metadata_impl(self):
            from polygraphy.common import TensorMetadata

            meta = TensorMetadata()
            for t in self.spec.inputs:
                meta.add(t.name, np.dtype(t.dtype), [d if isinstance(d, int) else -1 for d in t.dims])
            return meta

        def _run(self, engine, feed_dict):
            import torch

            feed = {k: torch.from_numpy(np.ascontiguousarray(v)).to(engine.device) for k, v in feed_dict.items()}
            return {k: v.detach().cpu().numpy() for k, v in engine(feed).items()}

        def infer_impl(self, feed_dict):
            import torch

            index, self.calls = self.calls, self.calls + 1
            t0 = time.perf_counter()
            try:
                outs = self._run(self.engine, feed_dict)
            except torch.OutOfMemoryError:
                if self.fallback is None:
                    raise
                _release_device_memory(self.device)
                if self.spare is None:
                    self.spare = self.load(self.fallback)
                outs = self._run(self.spare, feed_dict)
                self.fell_back.append(index)
            self.inference_time = time.perf_counter() - t0
            return OrderedDict(outs)

    return EngineRunner


def _release_device_memory(device: str) -> None:
    if device.startswith("cuda"):
        import gc

        import torch

        gc.collect()
        torch.cuda.empty_cache()


def error_metrics(out: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    out64, ref64 = out.astype(np.float64), ref.astype(np.float64)
    finite = bool(np.isfinite(out64).all())
    diff = np.abs(out64 - ref64)
    denom = float(np.linalg.norm(ref64)) or 1.0
    return {
        "max_abs_err": float(diff.max()) if finite else float("inf"),
        "rel_l2_err": float(np.linalg.norm(out64 - ref64) / denom) if finite else float("inf"),
        "max_abs_ref": float(np.abs(ref64).max()),
        "finite": finite,
    }


def checks(metrics: dict[str, float], thresholds: dict[str, float]) -> list[tuple[str, float, float]]:
    """The checks of one comparison as (metric, value, limit): each passes when value <= limit."""
    return [("max_abs", metrics["max_abs_err"], thresholds["atol"] + thresholds["rtol"] * metrics["max_abs_ref"]),
            ("rel_l2", metrics["rel_l2_err"], thresholds["rel_l2"])]


def passes(metrics: dict[str, float], thresholds: dict[str, float]) -> bool:
    return bool(metrics["finite"]) and all(value <= limit for _, value, limit in checks(metrics, thresholds))


def _comparisons(metrics: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """One output's comparisons: against PyTorch, and (TensorRT) against ONNX Runtime."""
    return [("", metrics)] + ([("vs onnxruntime ", metrics["vs_onnxruntime"])] if "vs_onnxruntime" in metrics else [])


def _ratio(metrics: dict[str, Any], thresholds: dict[str, float]) -> float:
    """How far a comparison is from its thresholds: its largest value / limit (above 1 fails; inf if non-finite)."""
    if not metrics["finite"]:
        return float("inf")
    return max(value / limit for _, value, limit in checks(metrics, thresholds))


def _margin(metrics: dict[str, Any], thresholds: dict[str, float]) -> float:
    return max(_ratio(m, thresholds) for _, m in _comparisons(metrics))


def reported_output(outputs: dict[str, dict[str, Any]], thresholds: dict[str, float]) -> str:
    """The output a result's line reports: of the failing outputs (else of all), the one furthest past (else
    closest to) its thresholds, as the largest metric / limit."""
    failing = [name for name, m in outputs.items() if not m["pass"]]
    return max(failing or list(outputs), key=lambda name: _margin(outputs[name], thresholds))


def _limit(x: float) -> str:
    return f"{x:.1e}".replace(".0e", "e")


def show_check(metric: str, value: float, limit: float, minimum: bool = False, fmt: str = ".2e", unit: str = "") -> str:
    """'rel_l2 3.10e-02 > 1e-02': a metric next to the threshold it is checked against (``minimum``: value must
    be >= limit, else <= limit); the sign says which side it is on."""
    ok = value >= limit if minimum else value <= limit
    sign = (">=" if ok else "<") if minimum else ("<=" if ok else ">")
    shown = _limit(limit) if fmt == ".2e" else f"{limit:g}"
    return f"{metric} {value:{fmt}}{unit} {sign} {shown}{unit}"


def describe_outputs(outputs: dict[str, dict[str, Any]], thresholds: dict[str, float]) -> str:
    """'NAME: max_abs V <= LIMIT, rel_l2 V > LIMIT' for the reported output (its failing comparisons, else its
    closest one), and how many outputs fail when more than one does."""
    name = reported_output(outputs, thresholds)
    metrics = outputs[name]
    shown = [(how, m) for how, m in _comparisons(metrics) if not passes(m, thresholds)]
    if not shown:
        shown = [max(_comparisons(metrics), key=lambda c: _ratio(c[1], thresholds))]
    parts = []
    for how, m in shown:
        parts.append(how + ("non-finite, " if not m["finite"] else "") + ", ".join(
            show_check(metric, value, limit) for metric, value, limit in checks(m, thresholds)))
    failing = sum(not m["pass"] for m in outputs.values())
    return f"{name}: " + "; ".join(parts) + (f"  ({failing} of {len(outputs)} outputs fail)" if failing > 1 else "")


def _device(device: str | None) -> str:
    from .limits import device as resolve_device

    return resolve_device("--device", device or "auto")


def backend_runner(export: ExportDir, component: str, backend: str, device: str):
    """The Polygraphy runner for the ONNX Runtime engine under test."""
    if backend == "ort":
        path = export.manifest.verified_path(export.manifest.component(component))
        return _ort_runner(path, f"onnxruntime:{component}", device)
    if backend == "inductor":
        from .backends.inductor import InductorEngine

        return _engine_runner_class()(export.specs[component], f"inductor:{component}",
                                      engine=InductorEngine(export, component, device), device=device)
    raise UsageError(f"validate --backend {backend}: choose ort, trt or inductor")


def _ort_runner(path: Path, name: str, device: str):
    """Polygraphy runner over an ONNX file in ONNX Runtime; on CUDA with TF32 off (FP32 means FP32)."""
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    from .backends.ort import cuda_provider

    providers = [cuda_provider(device, tf32=False)] if device.startswith("cuda") else ["CPUExecutionProvider"]
    return OnnxrtRunner(SessionFromOnnx(str(path), providers=providers), name=name)


def validate(export_dir: str | Path, backend: str = "ort", device: str | None = None,
             components: list[str] | None = None, geometries: list[Geometry] | None = None,
             say: Callable[[str], None] = lambda msg: None, write_report: bool = True,
             model_dir: str | Path | None = None) -> dict[str, Any]:
    from polygraphy.logger import G_LOGGER

    from .paths import check_output, source_inputs

    G_LOGGER.module_severity = G_LOGGER.ERROR

    export = ExportDir.open(export_dir, model=model_dir)
    export.check_requested(components or [], list(export.manifest.components))
    if write_report:
        check_output("validate", export.root / "validation.json", source_inputs(export, model_dir),
                     what=f"{export.root}/validation.json (the report validate writes)")
    device = _device(device)
    export.source_model()  # the PyTorch reference: found (and its weights checked) before any engine runs
    with _true_fp32(device):
        return _validate(export, export_dir, backend, device, components, geometries, say, write_report)


@contextlib.contextmanager
def _true_fp32(device: str):
    """The PyTorch FP32 reference in FP32 proper: on CUDA torch lets cuDNN convolutions use TF32 by default
    (``torch.backends.cudnn.allow_tf32``), which would make the reference itself ~1e-3 off."""
    if not device.startswith("cuda"):
        yield
        return
    import torch

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _validate(export, export_dir, backend, device, components, geometries, say, write_report) -> dict[str, Any]:
    from polygraphy.comparator import Comparator

    from .backends.torch import TorchEngine

    engines: dict[str, Any] = {}
    EngineRunner = _engine_runner_class()
    if backend == "trt":  # every engine's checks first (exit 8 with the reason where engines cannot run), then
        # all engines loaded as infer loads them: one shared device-memory buffer, CUDA graphs for static ones
        from .backends.trt import TrtEngine, engine_components, memory_report, profile_geometries

        components = components or engine_components(export)
        loaded = TrtEngine.load_all(export, components, device=device, warn=lambda m: say(f"warning: {m}"))
        engines = {c: export.manifest.engines[c] for c in components}
        memory = memory_report(loaded)
        say("      TensorRT device memory (device_memory_size_v2, shared buffer of the largest): "
            + ", ".join(f"{c} {size / 2**20:.1f} MiB" for c, size in memory.items()))
    if backend == "inductor":  # each package at the one shape it was compiled for
        from .inductor import SECTION

        packages = export.manifest.data.get(SECTION, {})
        components = components or [c for c in export.pipeline_components + ["vae_encoder"] if c in packages]
        if not components:
            from .errors import IntegrityError

            raise IntegrityError(f"{export.root}: no Inductor engines; run 'sdexport build {export.root} --backend "
                                 "inductor --static HxW'")
        for c in components:
            engines[c] = {"precision": packages.get(c, {}).get("precision", "fp16"), "inductor": packages.get(c)}
    components = components or list(export.manifest.components)
    chosen_geometries = geometries is not None
    geometries = geometries or validation_geometries(export.ranges)
    for geo in geometries:
        export.ranges.check(geo)
    results, all_pass = [], True
    targets = []  # (component, label, dtype, runner under test)
    for name in components:
        if name in engines and backend == "trt":
            runner = EngineRunner(export.spec(name), f"tensorrt:{name}", engine=loaded[name], device=device)
            targets.append((name, name, engines[name]["precision"], runner))
            continue
        if name in engines:  # inductor
            targets.append((name, name, engines[name]["precision"], backend_runner(export, name, backend, device)))
            continue
        entry = export.manifest.component(name)
        targets.append((name, name, entry["precision"]["dtype"], backend_runner(export, name, backend, device)))
        variant = export.manifest.data.get("ort_cuda", {}).get(name)
        if backend == "ort" and device.startswith("cuda") and variant:
            # The ONNX Runtime-fused FP16 variant is what `infer --backend ort` runs on CUDA: check it too.
            # (On an H200 its FP16 CLIP once gave rel-L2 1.15 on CUDA and 1.2e-3 on the CPU EP.)
            targets.append((name, f"{name} (ort_cuda)", "fp16", _ort_runner(
                export.manifest.verified_path(variant), f"onnxruntime:{name}:ort_cuda", device)))
    for name, label, dtype, runner in targets:
        limits = THRESHOLDS[dtype]
        spec = export.specs[name] if backend == "inductor" else export.spec(name)
        reference = EngineRunner(spec, f"torch:{name}", device=device, fallback="cpu" if device != "cpu" else None,
                                 load=lambda dev, name=name: TorchEngine.load_all(export, [name], device=dev,
                                                                                  dtype="fp32")[name])
        runners = [runner, reference]
        component_geometries = geometries
        if name in engines and "inductor" in engines[name]:  # one package, one shape
            from .components import Geometry

            built = Geometry(**engines[name]["inductor"]["geometry"])
            component_geometries = [built] + ([Geometry(1, built.height, built.width, built.guidance)]
                                              if engines[name]["inductor"].get("batch_range") else [])
        elif name in engines:  # TensorRT: also against ONNX Runtime on the ONNX it was built from, across its profile
            runners.append(backend_runner(export, engines[name]["onnx"]["component"], "ort", device))
            component_geometries = geometries if chosen_geometries else profile_geometries(engines[name])
        feeds, geos, seen = [], [], []
        for i, geo in enumerate(component_geometries):
            dims = spec.dims_for(geo)
            if dims in seen:  # the text encoder only sees the batch: skip repeats
                continue
            seen.append(dims)
            geos.append(geo)
            feeds.append({k: v.cpu().numpy() for k, v in spec.sample_inputs(dims, seed=100 + i).items()})
        t0 = time.perf_counter()
        run = Comparator.run(runners, data_loader=feeds)
        seconds = time.perf_counter() - t0
        test_outs, ref_outs, *others = [outs for _, outs in run.items()]
        ort_outs = others[0] if others else [None] * len(feeds)
        for i, (geo, feed, got, want, ort) in enumerate(zip(geos, feeds, test_outs, ref_outs, ort_outs)):
            outputs = {}
            for out_spec in spec.outputs:
                m = error_metrics(np.asarray(got[out_spec.name]), np.asarray(want[out_spec.name]))
                m["max_abs_limit"] = checks(m, limits)[0][2]
                m["pass"] = passes(m, limits)
                if ort is not None:
                    vs = error_metrics(np.asarray(got[out_spec.name]), np.asarray(ort[out_spec.name]))
                    vs["max_abs_limit"] = checks(vs, limits)[0][2]
                    vs["pass"] = passes(vs, limits)
                    m["vs_onnxruntime"] = vs
                    m["pass"] = m["pass"] and vs["pass"]
                outputs[out_spec.name] = m
                all_pass &= m["pass"]
            ok = all(o["pass"] for o in outputs.values())
            shapes = {k: list(v.shape) for k, v in feed.items()}
            where = "cpu" if i in reference.fell_back else device
            results.append({"component": label, "dtype": dtype, "geometry": vars(geo), "input_shapes": shapes,
                            "outputs": outputs, "reported_output": reported_output(outputs, limits), "pass": ok,
                            "reference_device": where})
            say(f"{'PASS' if ok else 'FAIL'} {label:<12} {dtype} {_shape_label(shapes)}  "
                + describe_outputs(outputs, limits)
                + (f"  (reference on {where}: out of device memory)" if where != device else ""))
        say(f"      {label}: {len(feeds)} shapes in {seconds:.1f} s")
    int8 = None
    if "unet_int8" in components and backend == "ort":  # INT8 UNet: pipeline-level agreement (quantize.py)
        from .quantize import int8_report

        int8 = int8_report(export, device=device, say=say)
        all_pass &= int8["passed"]
    if backend == "trt":
        for engine in loaded.values():
            engine.close()
    report = {
        "export": str(Path(export_dir).resolve()), "backend": backend, "device": device,
        "reference": "PyTorch eager FP32 on the source model"
        + ("; and ONNX Runtime on the ONNX each engine was built from" if backend == "trt" else ""),
        "thresholds": THRESHOLDS,
        "passed": all_pass, "results": results, "versions": versions(),
    }
    if int8 is not None:
        report["int8"] = int8
    if backend == "trt":
        report["engine_device_memory_bytes"] = memory
    if write_report:
        write_json(Path(export_dir) / "validation.json", report)
    return report


def _shape_label(shapes: dict[str, list[int]]) -> str:
    first = next(iter(shapes.values()))
    return "x".join(map(str, first))
