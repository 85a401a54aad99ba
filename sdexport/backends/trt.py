"""TensorRT backend: flavour detection, engine checks, the Polygraphy runner and ``TrtEngine``.

Two flavours: NVIDIA's ``tensorrt`` (10.x, 11.x; builds for the GPU it runs on) and
``tensorrt_rtx`` (TensorRT-RTX; builds ahead of time, without a GPU, for listed compute
capabilities). Engine building lives in build.py. Before any engine is deserialized,
``prepare`` checks, in this order: the manifest entry, that the engine was built from the
ONNX now in the export (sha256), the plan's own sha256 (and, for TensorRT-RTX, its header),
that the installed TensorRT is the flavour and version that built it, and that this host has
a GPU the engine targets. Each failure is one line naming what was found and what to do.

``TrtEngine`` runs on torch's device and current stream: buffers are torch tensors bound by
pointer, contexts are created without device memory and share one torch buffer sized to the
largest engine of the pipeline, and static-shape engines are replayed as CUDA graphs.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

from ..errors import BackendUnavailable, CannotRunHere, IntegrityError, ShapeError, UsageError
from .base import Engine

TRT_INSTALL = ("install TensorRT: 'pip install tensorrt-rtx-cu13==1.7.1.116' (TensorRT-RTX; builds without a GPU) "
               "or NVIDIA's 'tensorrt' 10.x/11.x")
FLAVOUR_NAMES = {"tensorrt": "TensorRT", "rtx": "TensorRT-RTX"}
MODULES = {"tensorrt": "tensorrt", "rtx": "tensorrt_rtx"}

# TensorRT-RTX 1.7 runs engines on these compute capabilities only (Hopper, 9.0, is not among them).
RTX_RUNNABLE_CC = ((7, 5), (8, 0), (8, 6), (8, 9), (12, 0), (12, 1))
# Default TensorRT-RTX targets: Ampere (A100 8.0, RTX 30xx 8.6), Ada (8.9), Blackwell (12.0).
# Turing (T4, 7.5) and GB10 (12.1) are opt-in with --compute-capability.
RTX_DEFAULT_TARGETS = ("8.0", "8.6", "8.9", "12.0")

# TensorRT-RTX 1.7 plan header, found by probing 1.7.1 plans (undocumented; a best-effort check):
# b"vtrt" at 0, uint64 LE plan size at 16, version bytes at 24..26, uint32 target bitmask at 32.
RTX_MAGIC = b"vtrt"
RTX_CC_BITS = {"7.5": 0, "8.0": 1, "8.6": 2, "8.9": 3, "12.0": 4, "12.1": 5}

TRT_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT8": "int8", "INT32": "int32",
              "INT64": "int64", "BOOL": "bool", "UINT8": "uint8", "FP8": "float8"}


# --- flavours -----------------------------------------------------------------------

def import_trt(flavour: str = "auto"):
    """Return (module, flavour) for ``tensorrt`` or ``tensorrt_rtx``; ``auto`` prefers ``tensorrt``."""
    import importlib

    order = {"auto": ("tensorrt", "tensorrt_rtx"), "tensorrt": ("tensorrt",), "rtx": ("tensorrt_rtx",)}
    if flavour not in order:
        raise BackendUnavailable(f"unknown TensorRT flavour '{flavour}' (choose auto, tensorrt or rtx)")
    for name in order[flavour]:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if getattr(module, "Builder", None) is None:  # the PyPI 'tensorrt' stub without libraries
            continue
        return module, ("rtx" if name == "tensorrt_rtx" else "tensorrt")
    raise BackendUnavailable(f"no TensorRT found ({'/'.join(order[flavour])}); {TRT_INSTALL}")


def select_flavour(requested: str, gpu_cc: tuple[int, int] | None):
    """The TensorRT that builds here: ``tensorrt`` when it is installed and a GPU is visible,
    else TensorRT-RTX (which builds without one). An explicit ``requested`` flavour is used as is."""
    if requested != "auto":
        return import_trt(requested)
    if gpu_cc is not None:
        try:
            return import_trt("tensorrt")
        except BackendUnavailable:
            pass
    try:
        return import_trt("rtx")
    except BackendUnavailable:
        return import_trt("auto")  # tensorrt without a GPU (refused later, with the reason), or the install hint


def version_of(trt) -> str:
    return str(getattr(trt, "__version__", "?"))


def rtx_targets(trt) -> list[str]:
    """Compute capabilities this TensorRT-RTX can build for (its ComputeCapability enum)."""
    names = [n for n in getattr(trt.ComputeCapability, "__members__", {}) if n.startswith("SM")]
    return [f"{n[2:-1]}.{n[-1]}" for n in names]


def gpu_capability(device: str | None = None) -> tuple[int, int] | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    index = torch.device(device).index if device and device.startswith("cuda") else None
    return tuple(torch.cuda.get_device_capability(index or 0))


def cc_text(cc: tuple[int, int]) -> str:
    return f"{cc[0]}.{cc[1]}"


def trt_status(gpu_cc: tuple[int, int] | None, flavour: str = "auto") -> dict[str, Any]:
    """Which TensorRT is installed and whether it can build and run engines here, with the reason."""
    try:
        trt, flavour = select_flavour(flavour, gpu_cc)
    except BackendUnavailable as exc:
        return {"flavour": None, "version": None, "can_build": False, "can_run": False, "why": str(exc)}
    version = version_of(trt)
    name = FLAVOUR_NAMES[flavour]
    status = {"flavour": name, "version": version, "can_build": True, "can_run": False, "why": None,
              "build_targets": rtx_targets(trt) if flavour == "rtx" else
              ([cc_text(gpu_cc)] if gpu_cc else [])}
    if gpu_cc is None:
        if flavour == "tensorrt":
            status["can_build"] = False
            status["why"] = ("no CUDA GPU visible: TensorRT builds for the GPU it runs on "
                             "(TensorRT-RTX builds without one: pip install tensorrt-rtx-cu13==1.7.1.116)")
        else:
            status["why"] = "no CUDA GPU visible; engines can be built (ahead of time) but not run here"
    elif flavour == "rtx" and tuple(gpu_cc) not in RTX_RUNNABLE_CC:
        status["why"] = (f"TensorRT-RTX {version} cannot run on compute capability {cc_text(gpu_cc)} "
                         f"(it runs on {', '.join(cc_text(c) for c in RTX_RUNNABLE_CC)})")
    else:
        status["can_run"] = True
    return status


# --- logging ------------------------------------------------------------------------

_LOGGERS: dict[str, Any] = {}


def capture_logger(trt):
    """One logger per process and flavour (TensorRT keeps the first one registered): it keeps the
    warnings and errors of the current operation so that a failure can be told in one line."""
    if trt.__name__ in _LOGGERS:
        return _LOGGERS[trt.__name__]

    class CaptureLogger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.messages: list[tuple[int, str]] = []

        def log(self, severity, msg):
            if int(severity) <= int(trt.ILogger.Severity.WARNING):
                self.messages.append((int(severity), str(msg)))

        def clear(self):
            self.messages = []

        def summary(self, default: str = "no message from TensorRT") -> str:
            errors = [m for s, m in self.messages if s <= int(trt.ILogger.Severity.ERROR)]
            # The first error is the cause; "catchCudaError" lines only echo that CUDA is unusable.
            first = next((m for m in errors if "catchCudaError" not in m), errors[0] if errors else default)
            return " ".join(first.split())[:400]

    _LOGGERS[trt.__name__] = CaptureLogger()
    return _LOGGERS[trt.__name__]


# --- engine checks ------------------------------------------------------------------

def engine_components(export) -> list[str]:
    """Components with an engine, in pipeline order."""
    engines = export.manifest.engines
    if not engines:
        raise IntegrityError(f"{export.root}: no TensorRT engines; run 'sdexport build {export.root} --precision fp16'")
    order = export.family.components(export.info)
    return [c for c in order if c in engines] + [c for c in engines if c not in order]


def engine_entry(export, component: str) -> dict[str, Any]:
    entry = export.manifest.engines.get(component)
    if not entry:
        raise IntegrityError(f"{export.root}: no TensorRT engine for {component}; "
                             f"run 'sdexport build {export.root} --precision fp16'")
    return entry


def read_rtx_header(head: bytes) -> dict[str, Any] | None:
    """Fields of a TensorRT-RTX 1.7 plan header, or None if ``head`` does not start with its magic."""
    if len(head) < 36 or head[:4] != RTX_MAGIC:
        return None
    mask = struct.unpack_from("<I", head, 32)[0]
    return {"size": struct.unpack_from("<Q", head, 16)[0], "version": tuple(head[24:27]), "cc_mask": mask,
            "targets": [cc for cc, bit in RTX_CC_BITS.items() if mask >> bit & 1]}


def check_rtx_header(path: Path, entry: dict[str, Any]) -> None:
    """Best-effort check of a TensorRT-RTX plan's header against the file and the manifest."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(64)
    header = read_rtx_header(head)
    if header is None:
        raise IntegrityError(f"{path}: not a TensorRT-RTX plan (no '{RTX_MAGIC.decode()}' header); "
                             f"rebuild: sdexport build {path.parent.parent}")
    if header["size"] != size:
        raise IntegrityError(f"{path}: truncated or corrupt (its header says {header['size']} bytes, the file has "
                             f"{size}); rebuild: sdexport build {path.parent.parent} --force")
    want = tuple(int(x) for x in entry["version"].split(".")[:3])
    if want[:2] == (1, 7) and header["version"] != want:  # layout known for 1.7 only
        raise IntegrityError(f"{path}: its header says TensorRT-RTX {'.'.join(map(str, header['version']))}, "
                             f"the manifest {entry['version']}; rebuild: sdexport build {path.parent.parent} --force")
    if want[:2] == (1, 7) and set(entry["compute_capabilities"]) - set(header["targets"]):
        raise IntegrityError(f"{path}: its header targets {', '.join(header['targets']) or 'none'}, the manifest "
                             f"{', '.join(entry['compute_capabilities'])}; rebuild: sdexport build "
                             f"{path.parent.parent} --force")


def verify_plan(export, component: str) -> tuple[Path, dict[str, Any]]:
    """The engine file of ``component`` after checking it against the manifest and its ONNX."""
    entry = engine_entry(export, component)
    onnx = entry["onnx"]
    current = export.manifest.components.get(onnx["component"])
    if current is None or current["sha256"] != onnx["sha256"]:
        raise IntegrityError(f"{export.root}/{entry['file']}: built from an ONNX that is no longer in the export "
                             f"({onnx['file']} sha256 {onnx['sha256'][:12]}… changed); rebuild: "
                             f"sdexport build {export.root}")
    path = export.manifest.verified_path(entry, remedy=f"rebuild: sdexport build {export.root} --force")
    if entry["flavour"] == "rtx":
        check_rtx_header(path, entry)
    return path, entry


def check_installed(entry: dict[str, Any], component: str, root) -> Any:
    """The installed TensorRT module, if it is the flavour and version that built the engine."""
    built = f"{FLAVOUR_NAMES[entry['flavour']]} {entry['version']}"
    try:
        trt, _ = import_trt(entry["flavour"])
    except BackendUnavailable:
        others = []
        for flavour in ("tensorrt", "rtx"):
            try:
                others.append(f"{FLAVOUR_NAMES[flavour]} {version_of(import_trt(flavour)[0])}")
            except BackendUnavailable:
                pass
        have = f"; installed here: {', '.join(others)} (rebuild with it: sdexport build {root} --force)" if others else ""
        raise BackendUnavailable(f"the {component} engine was built with {built}, which is not installed{have}; "
                                 f"{TRT_INSTALL}") from None
    if version_of(trt) != entry["version"]:
        raise IntegrityError(f"the {component} engine was built with {built}, but {FLAVOUR_NAMES[entry['flavour']]} "
                             f"{version_of(trt)} is installed; engines run only on the version that built them: "
                             f"rebuild with 'sdexport build {root} --force' (or install {built})")
    return trt


def check_gpu(entry: dict[str, Any], component: str, device: str, root) -> None:
    """Raise CannotRunHere unless ``device`` is a GPU that the engine targets and its flavour runs on."""
    import torch

    name = FLAVOUR_NAMES[entry["flavour"]]
    targets = ", ".join(entry["compute_capabilities"]) or "?"
    if not torch.cuda.is_available():
        raise CannotRunHere(f"cannot run TensorRT engines here: no CUDA GPU visible (the {name} {entry['version']} "
                            f"engines target compute capability {targets}; building and checking them needs no GPU, "
                            "running them needs one of those)")
    if not device.startswith("cuda"):
        raise CannotRunHere(f"TensorRT engines run on a CUDA device, not '{device}': pass --device cuda")
    cc = gpu_capability(device)
    gpu = torch.cuda.get_device_name(torch.device(device).index or 0)
    if entry["flavour"] == "rtx" and cc not in RTX_RUNNABLE_CC:
        raise CannotRunHere(f"{name} {entry['version']} cannot run on this GPU ({gpu}, compute capability "
                            f"{cc_text(cc)}); it runs on {', '.join(cc_text(c) for c in RTX_RUNNABLE_CC)}: "
                            f"build with NVIDIA's tensorrt here (sdexport build {root} --trt tensorrt)")
    if cc_text(cc) not in entry["compute_capabilities"]:
        fix = (f"sdexport build {root} --compute-capability {cc_text(cc)}" if entry["flavour"] == "rtx"
               else f"sdexport build {root} --force on this machine")
        raise CannotRunHere(f"the {component} engine was built for compute capability {targets}, this GPU "
                            f"({gpu}) is {cc_text(cc)}: rebuild with '{fix}'")


def preflight(export, components: list[str], device: str) -> dict[str, tuple[Any, Path, dict[str, Any]]]:
    """Every engine's checks before anything is loaded: first the files and the installed TensorRT for
    all engines, then the GPU (so a corrupt or foreign engine is named even where none could run).
    Returns {component: (trt module, plan path, manifest entry)}."""
    checked = {}
    for component in components:
        path, entry = verify_plan(export, component)
        checked[component] = (check_installed(entry, component, export.root), path, entry)
    for component, (_, _, entry) in checked.items():
        check_gpu(entry, component, device, export.root)
    return checked


def prepare(export, component: str, device: str) -> tuple[Any, Path, dict[str, Any]]:
    """All checks before deserializing ``component``'s engine; returns (trt module, plan path, entry)."""
    return preflight(export, [component], device)[component]


def deserialize(trt, runtime, path: Path, component: str):
    log = capture_logger(trt)
    log.clear()
    engine = runtime.deserialize_cuda_engine(path.read_bytes())
    if engine is None:
        raise IntegrityError(f"{path}: TensorRT could not deserialize the {component} engine ({log.summary()}); "
                             f"rebuild: sdexport build {path.parent.parent} --force")
    return engine


def profile_geometries(entry: dict[str, Any]):
    """Shapes across an engine's profile, in user terms: its min and max corners, its opt shape,
    and a non-square shape where the profile allows one (one shape for a static engine)."""
    from ..components import Geometry

    req = {k: Geometry(**v) for k, v in entry["request"].items()}
    lo, opt, hi = req["min"], req["opt"], req["max"]
    shapes = [lo, opt, Geometry(1, lo.height, hi.width, guidance=True), hi]
    unique = []
    for g in shapes:
        inside = (lo.images <= g.images <= hi.images and lo.height <= g.height <= hi.height
                  and lo.width <= g.width <= hi.width)
        if inside and g not in unique:
            unique.append(g)
    return unique


# --- Polygraphy ---------------------------------------------------------------------

def polygraphy_runner(export, component: str, device: str = "cuda"):
    """Polygraphy's TrtRunner over the engine (after every check ``prepare`` makes)."""
    trt, path, entry = prepare(export, component, device)
    if entry["flavour"] == "rtx":
        # Polygraphy picks tensorrt_rtx from this variable (read into polygraphy.config at import).
        os.environ["POLYGRAPHY_USE_TENSORRT_RTX"] = "1"
        import polygraphy.config

        polygraphy.config.USE_TENSORRT_RTX = True
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    runtime = trt.Runtime(capture_logger(trt))
    return TrtRunner(EngineFromBytes(path.read_bytes(), runtime=runtime), name=f"tensorrt:{component}")


# --- runtime ------------------------------------------------------------------------

def _create_context(trt, engine):
    """An execution context without its own device memory (the pipeline's engines share one buffer)."""
    strategy = getattr(trt, "ExecutionContextAllocationStrategy", None)
    if strategy is not None:
        return engine.create_execution_context(strategy.USER_MANAGED)  # TensorRT 10+, TensorRT-RTX
    return engine.create_execution_context_without_device_memory()  # TensorRT < 10


def _device_memory_size(engine) -> int:
    if hasattr(engine, "device_memory_size_v2"):  # TensorRT 10.1+ (the only one in 11.x), TensorRT-RTX
        return int(engine.device_memory_size_v2)
    return int(engine.device_memory_size)


class TrtEngine(Engine):
    backend = "trt"

    def __init__(self, export, component: str, device: str, trt, runtime, path: Path, entry: dict[str, Any],
                 cuda_graph: bool | str = "auto"):
        super().__init__(export.spec(component), device)
        self.trt, self.path, self.entry = trt, path, entry
        self.axes = {a: tuple(v) for a, v in entry["axes"].items()}
        self.engine = deserialize(trt, runtime, path, component)
        self.context = _create_context(trt, self.engine)
        if self.context is None:
            raise CannotRunHere(f"{path}: TensorRT could not create an execution context "
                                f"({capture_logger(trt).summary()})")
        static = all(lo == hi for lo, _, hi in self.axes.values())
        self.use_graph = static if cuda_graph == "auto" else bool(cuda_graph) and static
        self.graph = None
        self.memory = None

    @property
    def device_memory_size(self) -> int:
        return _device_memory_size(self.engine)

    def bind_memory(self, buffer) -> None:
        """Give the context scratch memory: a torch buffer shared with the other engines of the pipeline
        (they run one after another on one stream)."""
        self.memory = buffer
        if hasattr(self.context, "set_device_memory"):  # TensorRT 10.1+, TensorRT-RTX
            self.context.set_device_memory(buffer.data_ptr(), buffer.numel())
        else:
            self.context.device_memory = buffer.data_ptr()

    @classmethod
    def load_all(cls, export, components: list[str], device: str = "cuda", cuda_graph: bool | str = "auto",
                 **options):
        import torch

        if os.environ.get("SDEXPORT_TRT_CUDA_GRAPH") == "0":
            cuda_graph = False
        if options.get("unet") == "int8" and "unet" in components:  # infer/bench --unet int8
            entry = engine_entry(export, "unet")
            if entry["precision"] != "int8":
                raise UsageError(f"--unet int8: the UNet engine in {export.root} is {entry['precision']}; "
                                 f"build the INT8 one: sdexport build {export.root} --precision int8")
        graph_parts = options.get("cuda_graph_components") or components
        checked = preflight(export, components, device)  # every check before any load
        runtimes: dict[str, Any] = {}
        engines = {}
        for c, (trt, path, entry) in checked.items():
            if trt.__name__ not in runtimes:
                runtimes[trt.__name__] = trt.Runtime(capture_logger(trt))
            engines[c] = cls(export, c, device, trt, runtimes[trt.__name__], path, entry,
                             cuda_graph=cuda_graph if c in graph_parts else False)
        size = max([e.device_memory_size for e in engines.values()] + [256])
        shared = torch.empty(size, dtype=torch.uint8, device=device)  # torch blocks are 512-byte aligned
        for e in engines.values():
            e.bind_memory(shared)
        return engines

    def check_profile(self, dims: dict[str, int]) -> None:
        for axis, (lo, _, hi) in self.axes.items():
            if not lo <= dims[axis] <= hi:
                raise ShapeError(f"{self.spec.name}: {axis}={dims[axis]} is outside the engine's profile "
                                 f"[{lo}, {hi}] ({self.entry['file']}); rebuild with a profile that covers it")

    def _enqueue(self, inputs: dict[str, Any], outputs: dict[str, Any]) -> None:
        import torch

        ctx = self.context
        for name, t in inputs.items():
            ctx.set_input_shape(name, tuple(t.shape))
            ctx.set_tensor_address(name, t.data_ptr())
        for name, t in outputs.items():
            ctx.set_tensor_address(name, t.data_ptr())
        if not ctx.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise RuntimeError(f"{self.spec.name}: TensorRT could not enqueue the engine "
                               f"({capture_logger(self.trt).summary()})")

    def _outputs(self, dims: dict[str, int]) -> dict[str, Any]:
        import torch

        return {t.name: torch.empty(t.shape(dims), dtype=getattr(torch, t.dtype), device=self.device)
                for t in self.spec.outputs}

    def __call__(self, feed: dict[str, Any]) -> dict[str, Any]:
        import torch

        dims = self.dims(feed)
        self.check_profile(dims)
        inputs = {t.name: feed[t.name].to(device=self.device, dtype=getattr(torch, t.dtype)).contiguous()
                  for t in self.spec.inputs}
        if not self.use_graph:
            outputs = self._outputs(dims)
            self._enqueue(inputs, outputs)
            return outputs
        if self.graph is None:  # first call: run once, then capture (the only synchronisation)
            self.static_in = {k: v.clone() for k, v in inputs.items()}
            self.static_out = self._outputs(dims)
            self._enqueue(self.static_in, self.static_out)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):  # the capture stream is torch's current stream inside
                self._enqueue(self.static_in, self.static_out)
            self.graph = graph
        else:
            for k, v in inputs.items():
                self.static_in[k].copy_(v)
        self.graph.replay()
        return {k: v.clone() for k, v in self.static_out.items()}

    def close(self) -> None:
        self.graph = None
        self.context = None
        self.engine = None
        self.memory = None
