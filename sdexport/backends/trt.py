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
largest engine of the pipeline, and static-shape engines are replayed as CUDA graphs. Validation
runs engines through the same class (validate.py), so there is one way engines run. Polygraphy's
TensorRT backend is not used anywhere: which TensorRT module runs an engine is decided here, from
the manifest, and no libcudart has to be found by path.
"""

from __future__ import annotations

import os
import re
import struct
from pathlib import Path
from typing import Any

from ..errors import BackendUnavailable, CannotRunHere, IntegrityError, ShapeError, UsageError
from .base import Engine

RTX_INSTALL = "pip install tensorrt-rtx-cu13==1.7.1.116"
TRT_INSTALL = f"install TensorRT: '{RTX_INSTALL}' (TensorRT-RTX; builds without a GPU) or NVIDIA's 'tensorrt' 10.x/11.x"
FLAVOUR_NAMES = {"tensorrt": "TensorRT", "rtx": "TensorRT-RTX"}
MODULES = {"tensorrt": "tensorrt", "rtx": "tensorrt_rtx"}
# NVIDIA's TensorRT for GPUs that TensorRT-RTX cannot serve (Turing's FP32 GEMMs, Hopper); CUDA 13 like torch 2.13.
NVIDIA_TRT_INSTALL = "pip install tensorrt-cu13"
INSTALLS = {"tensorrt": NVIDIA_TRT_INSTALL, "rtx": RTX_INSTALL}
# Strongly typed networks (the precision is in the graph) arrived in TensorRT 10.0; 8.x would blame the ONNX.
MIN_TENSORRT = (10, 0)

# TensorRT-RTX 1.7 runs engines on these compute capabilities only (Hopper, 9.0, is not among them).
RTX_RUNNABLE_CC = ((7, 5), (8, 0), (8, 6), (8, 9), (12, 0), (12, 1))
# Default TensorRT-RTX targets: Ampere (A100 8.0, RTX 30xx 8.6), Ada (8.9), Blackwell (12.0).
# Turing (T4, 7.5) and GB10 (12.1) are opt-in with --compute-capability.
RTX_DEFAULT_TARGETS = ("8.0", "8.6", "8.9", "12.0")
# TensorRT-RTX runs on Turing but cannot compile FP32 matrix products for it, and every FP16 UNet keeps
# its timestep embedding in FP32: on these GPUs NVIDIA's tensorrt is what builds the whole pipeline.
RTX_NO_FP32_GEMM_CC = ((7, 5),)

# TensorRT-RTX 1.7 plan header, found by probing 1.7.1 plans (undocumented; a best-effort check):
# b"vtrt" at 0, uint64 LE plan size at 16, version bytes at 24..26, uint32 target bitmask at 32.
RTX_MAGIC = b"vtrt"
RTX_CC_BITS = {"7.5": 0, "8.0": 1, "8.6": 2, "8.9": 3, "12.0": 4, "12.1": 5}

TRT_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT8": "int8", "INT32": "int32",
              "INT64": "int64", "BOOL": "bool", "UINT8": "uint8", "FP8": "float8"}


# --- flavours -----------------------------------------------------------------------

def import_trt(flavour: str = "auto"):
    """Return (module, flavour) for ``tensorrt`` or ``tensorrt_rtx``; ``auto`` prefers ``tensorrt``. One flavour
    asked for and missing: the error says so, how to install it, and the other flavour where that one is here."""
    order = {"auto": ("tensorrt", "rtx"), "tensorrt": ("tensorrt",), "rtx": ("rtx",)}
    if flavour not in order:
        raise BackendUnavailable(f"unknown TensorRT flavour '{flavour}' (choose auto, tensorrt or rtx)")
    for name in order[flavour]:
        module = _importable(name)
        if module is None:
            continue
        if name == "tensorrt" and _version_tuple(version_of(module)) < MIN_TENSORRT:
            raise BackendUnavailable(f"TensorRT {version_of(module)} is installed; sdexport needs TensorRT 10 or newer "
                                     f"(strongly typed networks): {NVIDIA_TRT_INSTALL}, or TensorRT-RTX "
                                     f"({RTX_INSTALL})")
        return module, name
    if flavour == "auto":
        raise BackendUnavailable(f"no TensorRT found (tensorrt/tensorrt_rtx); {TRT_INSTALL}")
    other = "rtx" if flavour == "tensorrt" else "tensorrt"
    here = _importable(other)
    instead = (f"; {FLAVOUR_NAMES[other]} {version_of(here)} is installed here: --trt {other}" if here is not None
               else "")
    who = "NVIDIA's TensorRT" if flavour == "tensorrt" else "TensorRT-RTX"
    raise BackendUnavailable(f"{who} (the Python package '{MODULES[flavour]}') is not importable here; to install it: "
                             f"{INSTALLS[flavour]}{instead}")


def _importable(flavour: str):
    """The module of one flavour, or None where it does not import (or is the PyPI 'tensorrt' stub without
    libraries)."""
    import importlib

    try:
        module = importlib.import_module(MODULES[flavour])
    except ImportError:
        return None
    return module if getattr(module, "Builder", None) is not None else None


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


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split(".")[:2] if p.isdigit())


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
    return tuple(torch.cuda.get_device_capability(device_index(device)))


def device_index(device: str | None) -> int:
    """The CUDA device ``device`` names ('cuda:1' -> 1); 'cuda' or None: torch's current device."""
    import torch

    index = torch.device(device).index if device and device.startswith("cuda") else None
    return torch.cuda.current_device() if index is None else index


def on_device(device: str | None):
    """Make ``device`` the current CUDA device (TensorRT deserializes, allocates and enqueues on the current
    device); a no-op for the CPU."""
    import contextlib

    if not device or not device.startswith("cuda"):
        return contextlib.nullcontext()
    import torch

    return torch.cuda.device(device_index(device))


def cc_text(cc: tuple[int, int]) -> str:
    return f"{cc[0]}.{cc[1]}"


def gpu_advice(flavour: str, cc: tuple[int, int], root: Any = "OUT") -> str | None:
    """Why engines of ``flavour`` cannot serve a GPU of compute capability ``cc`` whatever their targets, and what
    does (None: they can, given the GPU is among their targets). The one place this advice is written."""
    cc = tuple(cc)
    use_nvidia = (f"install NVIDIA's TensorRT ({NVIDIA_TRT_INSTALL}) and build with it: "
                  f"sdexport build {root} --trt tensorrt")
    if flavour == "rtx" and cc not in RTX_RUNNABLE_CC:
        return (f"TensorRT-RTX cannot run on compute capability {cc_text(cc)} (it runs on "
                f"{', '.join(cc_text(c) for c in RTX_RUNNABLE_CC)}): {use_nvidia}")
    if flavour == "rtx" and cc in RTX_NO_FP32_GEMM_CC:
        return (f"TensorRT-RTX cannot build the FP16 UNet for compute capability {cc_text(cc)} (no FP32 matrix "
                f"products for Turing; the UNet's timestep embedding is FP32): {use_nvidia}")
    return None


def rebuild_advice(flavour: str, cc: tuple[int, int], root: Any) -> str:
    """The command that gives engines for this GPU."""
    return gpu_advice(flavour, cc, root) or (
        f"rebuild with 'sdexport build {root} --compute-capability {cc_text(cc)}'" if flavour == "rtx"
        else f"rebuild with 'sdexport build {root} --force' on this machine")


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
                             f"(TensorRT-RTX builds without one: {RTX_INSTALL})")
        else:
            status["why"] = "no CUDA GPU visible; engines can be built (ahead of time) but not run here"
    elif gpu_advice(flavour, gpu_cc) is not None:
        status["why"] = gpu_advice(flavour, gpu_cc)
    else:
        status["can_run"] = True
    return status


# --- logging ------------------------------------------------------------------------

_LOGGERS: dict[str, Any] = {}
# Builder messages below WARNING that sdexport records (build.py): the activation memory TensorRT plans for the
# profile's largest shape, and each node it assigns to a fused self-attention kernel (TensorRT-RTX 1.7 says so).
BUILD_FACTS = {"activation_memory": re.compile(r"Total Activation Memory: (\d+) bytes"),
               "attention_node": re.compile(r"Found (.+) to be part of self-attention pattern")}


def capture_logger(trt):
    """One logger per process and flavour (TensorRT keeps the first one registered): it keeps the
    warnings and errors of the current operation so that a failure can be told in one line, and the
    BUILD_FACTS of the current build."""
    if trt.__name__ in _LOGGERS:
        return _LOGGERS[trt.__name__]

    class CaptureLogger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.messages: list[tuple[int, str]] = []
            self.facts: dict[str, list[str]] = {k: [] for k in BUILD_FACTS}

        def log(self, severity, msg):
            msg = str(msg)
            if int(severity) <= int(trt.ILogger.Severity.WARNING):
                self.messages.append((int(severity), msg))
                return
            for key, pattern in BUILD_FACTS.items():
                found = pattern.search(msg)
                if found:
                    self.facts[key].append(found.group(1))

        def clear(self):
            self.messages = []
            self.facts = {k: [] for k in BUILD_FACTS}

        def summary(self, default: str = "no message from TensorRT") -> str:
            errors = [m for s, m in self.messages if s <= int(trt.ILogger.Severity.ERROR)]
            # The first error is the cause; "catchCudaError" lines only echo that CUDA is unusable.
            first = next((m for m in errors if "catchCudaError" not in m), errors[0] if errors else default)
            return " ".join(first.split())[:400]

    _LOGGERS[trt.__name__] = CaptureLogger()
    return _LOGGERS[trt.__name__]


# --- engine checks ------------------------------------------------------------------

def build_command(export) -> str:
    """The build that makes engines of this export: `--precision` must match the graphs' dtype."""
    precision = export.dtype if export.dtype in ("fp16", "fp32") else "fp16"
    return f"'sdexport build {export.root} --precision {precision}'"


def engine_components(export) -> list[str]:
    """Components with an engine, in pipeline order."""
    engines = export.manifest.engines
    if not engines:
        raise IntegrityError(f"{export.root}: no TensorRT engines; run {build_command(export)}")
    order = export.family.components(export.info)
    return [c for c in order if c in engines] + [c for c in engines if c not in order]


def engine_entry(export, component: str) -> dict[str, Any]:
    entry = export.manifest.engines.get(component)
    if not entry:
        raise IntegrityError(f"{export.root}: no TensorRT engine for {component}; run {build_command(export)}")
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
        raise CannotRunHere(f"the {component} engine was built with {built}, but {FLAVOUR_NAMES[entry['flavour']]} "
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
    gpu = torch.cuda.get_device_name(device_index(device))
    runnable = entry["flavour"] != "rtx" or tuple(cc) in RTX_RUNNABLE_CC
    if cc_text(cc) not in entry["compute_capabilities"] or not runnable:
        raise CannotRunHere(f"the {component} engine ({name} {entry['version']}) targets compute capability "
                            f"{targets}, this GPU ({gpu}) is {cc_text(cc)}: "
                            f"{rebuild_advice(entry['flavour'], cc, root)}")


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


# Why TensorRT refuses a plan: TensorRT-RTX 1.7's Runtime.get_engine_validity diagnostics (bit flags), else the
# first error TensorRT logged. (flag, pattern in TensorRT's message, exception, cause, remedy); first match wins.
PLAN_REFUSALS = (
    ("OLD_CUDA_DRIVER", r"driver version is insufficient|driver is too old|CUDA driver version", CannotRunHere,
     "the NVIDIA driver is older than the CUDA this TensorRT was built for",
     "update the NVIDIA driver (nvidia-smi shows the CUDA version it supports; TensorRT-RTX cu13 needs CUDA 13)"),
    ("OLD_CUDA_RUNTIME", r"CUDA runtime .*(old|insufficient)", CannotRunHere,
     "the CUDA runtime is older than this TensorRT needs", "install the CUDA runtime its wheel names"),
    ("UNSUPPORTED_CC", r"incompatible device|compute capability|not supported on this (GPU|device)", CannotRunHere,
     "the plan was built for another compute capability",
     "rebuild it for this GPU: sdexport build {root} --force (TensorRT-RTX: with this GPU in --compute-capability)"),
    ("VERSION_MISMATCH", r"[Vv]ersion tag does not match|not compatible with this version|version mismatch",
     CannotRunHere, "the plan was built by another TensorRT version",
     "rebuild it with the TensorRT installed here: sdexport build {root} --force"),
    ("INSUFFICIENT_GPU_MEMORY", r"out of memory|OutOfMemory|insufficient (GPU|device) memory", CannotRunHere,
     "not enough free GPU memory for the engine's weights", "free GPU memory, or build smaller engines"),
    ("CUDA_ERROR", r"cudaError|CUDA initialization failure|no CUDA-capable device", CannotRunHere,
     "CUDA is not usable here (driver or runtime installation)", "check nvidia-smi and the CUDA driver"),
    ("MALFORMED_ENGINE", r"Serialization|magic|corrupt|malformed", IntegrityError,
     "the file is not a plan TensorRT can read", "rebuild it: sdexport build {root} --force"),
)


def plan_refusal(trt, path: Path, component: str, diagnostics: int, logged: str) -> Exception:
    """The one-line error for a plan TensorRT will not load: every cause TensorRT names, the first message it
    logged, and what to do (CannotRunHere unless the file itself is bad)."""
    flags = getattr(trt, "EngineInvalidityDiagnostics", None)
    found = [row for row in PLAN_REFUSALS
             if flags is not None and hasattr(flags, row[0]) and int(diagnostics) & int(getattr(flags, row[0]))]
    if not found and logged:
        found = [row for row in PLAN_REFUSALS if re.search(row[1], logged)][:1]
    root = path.parent.parent
    if not found:
        return IntegrityError(f"{path}: TensorRT could not deserialize the {component} engine ({logged or 'no message'}); "
                              f"rebuild: sdexport build {root} --force")
    cls = CannotRunHere if any(row[2] is CannotRunHere for row in found) else IntegrityError
    causes = "; ".join(row[3] for row in found)
    remedies = "; ".join(dict.fromkeys(row[4].format(root=root) for row in found))
    quoted = f" (TensorRT: {logged})" if logged else ""
    return cls(f"{path}: TensorRT cannot load the {component} engine: {causes}{quoted}; {remedies}")


def deserialize(trt, runtime, path: Path, component: str, warn=None):
    """The engine in ``path``, deserialized on the current CUDA device; where TensorRT can say why a plan is
    refused before loading it (TensorRT-RTX: ``Runtime.get_engine_validity``), that reason is the error."""
    log = capture_logger(trt)
    blob = path.read_bytes()
    check = getattr(runtime, "get_engine_validity", None)
    if check is not None:
        log.clear()
        validity, diagnostics = check(blob)
        if validity == trt.EngineValidity.INVALID:
            raise plan_refusal(trt, path, component, diagnostics, log.summary(""))
        if validity == trt.EngineValidity.SUBOPTIMAL and warn is not None:
            warn(f"{path.name}: TensorRT says the {component} engine may run slower here than where it was built "
                 f"(diagnostics {int(diagnostics)})")
    log.clear()
    engine = runtime.deserialize_cuda_engine(blob)
    if engine is None:
        raise plan_refusal(trt, path, component, 0, log.summary(""))
    return engine


def check_engine_io(trt, engine, spec, path: Path) -> None:
    """The deserialized engine's I/O tensors (names, input/output, dtypes) against the component spec."""
    io = {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        mode = "input" if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else "output"
        dtype = engine.get_tensor_dtype(name)
        io[name] = (mode, TRT_DTYPES.get(getattr(dtype, "name", str(dtype)), str(dtype)))
    want = {**{t.name: ("input", t.dtype) for t in spec.inputs}, **{t.name: ("output", t.dtype) for t in spec.outputs}}
    if io != want:
        raise IntegrityError(f"{path}: the engine's tensors are {io}, the {spec.name} spec declares {want}; "
                             f"rebuild: sdexport build {path.parent.parent} --force")


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


# --- runtime ------------------------------------------------------------------------

def _create_context(trt, engine):
    """An execution context without its own device memory (the pipeline's engines share one buffer)."""
    strategy = getattr(trt, "ExecutionContextAllocationStrategy", None)
    if strategy is not None:
        return engine.create_execution_context(strategy.USER_MANAGED)  # TensorRT 10+, TensorRT-RTX
    return engine.create_execution_context_without_device_memory()


def _device_memory_size(engine) -> int:
    if hasattr(engine, "device_memory_size_v2"):  # TensorRT 10.1+ (the only one in 11.x), TensorRT-RTX
        return int(engine.device_memory_size_v2)
    return int(engine.device_memory_size)


def _warn_stderr(msg: str) -> None:
    import sys

    print(f"warning: {msg}", file=sys.stderr)


class NotCapturable(RuntimeError):
    """TensorRT says this execution context cannot be captured into a CUDA graph on this stream."""


class TrtEngine(Engine):
    """One TensorRT engine behind the Engine interface.

    ``captures_own_graph``: a static-shape engine captures its call as a CUDA graph on first use and replays it
    (``cuda_graph=False`` turns that off, as ``--step-graph`` does, whose step graphs capture the engine instead).
    Inside a caller's capture the engine enqueues into the caller's graph; only static-shape engines allow that
    (``graph_capture_refusal``), so a context is never captured at more than one input shape."""

    backend = "trt"

    def __init__(self, export, component: str, device: str, trt, runtime, path: Path, entry: dict[str, Any],
                 cuda_graph: bool | str = "auto", warn=None):
        super().__init__(export.spec(component), device)
        self.trt, self.path, self.entry = trt, path, entry
        self.warn = warn or _warn_stderr
        self.axes = {a: tuple(v) for a, v in entry["axes"].items()}
        self.static = all(lo == hi for lo, _, hi in self.axes.values())
        with on_device(device):  # the engine lives on the device its buffers and stream are on
            self.engine = deserialize(trt, runtime, path, component, warn=self.warn)
            check_engine_io(trt, self.engine, self.spec, path)
            self.context = _create_context(trt, self.engine)
        if self.context is None:
            raise CannotRunHere(f"{path}: TensorRT could not create an execution context "
                                f"({capture_logger(trt).summary()})")
        self.use_graph = self.static if cuda_graph == "auto" else bool(cuda_graph) and self.static
        self.graph = None
        self.memory = None
        self.export, self.weight_map, self._refitted = export, None, set()
        if entry.get("weights_stripped"):  # a weight-stripped plan gets its weights from the ONNX it was built from
            with on_device(device):
                self._refit_from_onnx(export.manifest.path(entry["onnx"]["file"]))

    # --- refit (LoRA switching; engines built with --refittable) ------------------------------------------
    def _refitter(self):
        if not self.entry.get("refittable"):
            raise UsageError(f"{self.spec.name}: the TensorRT engine {self.entry['file']} was built without "
                             f"--refittable; rebuild it to switch LoRAs: sdexport build {self.export.root} "
                             "--refittable --force")
        return self.trt.Refitter(self.engine, capture_logger(self.trt))

    def _refit(self, refitter, what: str) -> None:
        missing = refitter.get_missing_weights()
        if missing or not refitter.refit_cuda_engine():
            raise IntegrityError(f"{self.path}: TensorRT could not refit {what} ("
                                 f"{f'missing weights: {missing[:3]}' if missing else capture_logger(self.trt).summary()})")
        self.graph = None  # captured with the old weights

    def _refit_from_onnx(self, onnx_path: Path) -> None:
        trt = self.trt
        log = capture_logger(trt)
        log.clear()
        refitter = self._refitter()
        parser = trt.OnnxParserRefitter(refitter, log)
        if not parser.refit_from_file(str(onnx_path)):
            raise IntegrityError(f"{self.path}: TensorRT could not read the weights of this weight-stripped engine "
                                 f"from {onnx_path} ({log.summary()}); rebuild: sdexport build {self.export.root} "
                                 "--refittable --force")
        self._refit(refitter, f"the weights from {onnx_path.name}")

    def _weight_map(self):
        if self.weight_map is None:
            from ..lora import WeightMap

            self.weight_map = WeightMap(self.export, self.entry["onnx"]["component"])
        return self.weight_map

    def base_param(self, name: str):
        return self._weight_map().base_param(name)

    def set_weights(self, params: dict[str, Any]) -> None:
        """Refit the initializers ``params`` map to, and the exported values of those the last call changed
        and this one does not (an absolute state: A -> B -> A is A's weights, never a blend)."""
        import numpy as np

        refitter = self._refitter()
        wmap = self._weight_map()
        values = wmap.initializers(params)
        changed = set(values)
        for name in self._refitted - changed:
            values[name] = np.ascontiguousarray(wmap.base_initializer(name))
        refittable = set(refitter.get_all_weights())
        keep = []  # TensorRT reads the arrays during refit_cuda_engine
        for name, arr in values.items():
            if name not in refittable:
                raise IntegrityError(f"{self.path}: {name} is not a refittable weight of this engine; rebuild: "
                                     f"sdexport build {self.export.root} --refittable --force")
            keep.append(np.ascontiguousarray(arr))
            if not refitter.set_named_weights(name, self.trt.Weights(keep[-1])):
                raise IntegrityError(f"{self.path}: TensorRT refused new values for {name} "
                                     f"({capture_logger(self.trt).summary()})")
        with on_device(self.device):
            self._refit(refitter, "the LoRA weights")
        self._refitted = changed

    @property
    def captures_own_graph(self) -> bool:
        return self.use_graph

    def graph_capture_refusal(self) -> str | None:
        if self.use_graph:
            return super().graph_capture_refusal()
        if not self.static:
            return (f"the {self.spec.name} TensorRT engine has a dynamic-shape profile; capturing one context at "
                    f"several shapes is not something TensorRT promises to keep valid: build it with --static HxW")
        return None

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
                 warn=None, **options):
        import torch

        if os.environ.get("SDEXPORT_TRT_CUDA_GRAPH") == "0":
            cuda_graph = False
        graph_parts = options.get("cuda_graph_components") or components
        checked = preflight(export, components, device)  # every check before any load
        runtimes: dict[str, Any] = {}
        engines = {}
        with on_device(device):
            for c, (trt, path, entry) in checked.items():
                if trt.__name__ not in runtimes:
                    runtimes[trt.__name__] = trt.Runtime(capture_logger(trt))
                engines[c] = cls(export, c, device, trt, runtimes[trt.__name__], path, entry,
                                 cuda_graph=cuda_graph if c in graph_parts else False, warn=warn)
            size = max([e.device_memory_size for e in engines.values()] + [256])
            if device.startswith("cuda"):
                check_memory_fits(engines, size, device)
            shared = torch.empty(size, dtype=torch.uint8, device=device)  # torch blocks are 512-byte aligned
        for e in engines.values():
            e.bind_memory(shared)
        return engines

    def check_profile(self, dims: dict[str, int]) -> None:
        for axis, (lo, _, hi) in self.axes.items():
            if not lo <= dims[axis] <= hi:
                raise ShapeError(f"{self.spec.name}: {axis}={dims[axis]} is outside the engine's profile "
                                 f"[{lo}, {hi}] ({self.entry['file']}); rebuild with a profile that covers it")

    def _bind(self, inputs: dict[str, Any], dims: dict[str, int]) -> dict[str, Any]:
        """Set the input shapes and addresses, check the output shapes TensorRT computes against the spec,
        and return output buffers bound to the context."""
        import torch

        ctx = self.context
        for name, t in inputs.items():
            if not ctx.set_input_shape(name, tuple(t.shape)):
                raise ShapeError(f"{self.spec.name}: TensorRT refused the shape {tuple(t.shape)} for '{name}' "
                                 f"({capture_logger(self.trt).summary()})")
        outputs = {}
        for t in self.spec.outputs:
            want = tuple(t.shape(dims))
            got = tuple(ctx.get_tensor_shape(t.name))
            if got != want:
                raise IntegrityError(f"{self.spec.name}: the engine computes '{t.name}' as {got} for inputs "
                                     f"{ {k: tuple(v.shape) for k, v in inputs.items()} }, the spec says {want} "
                                     f"({self.entry['file']}); rebuild: sdexport build {self.path.parent.parent} "
                                     "--force")
            outputs[t.name] = torch.empty(want, dtype=getattr(torch, t.dtype), device=self.device)
        for name, t in {**inputs, **outputs}.items():
            if not ctx.set_tensor_address(name, t.data_ptr()):
                raise RuntimeError(f"{self.spec.name}: TensorRT refused the address of '{name}' "
                                   f"({capture_logger(self.trt).summary()})")
        return outputs

    def _execute(self, stream) -> None:
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"{self.spec.name}: TensorRT could not enqueue the engine "
                               f"({capture_logger(self.trt).summary()})")

    def _capturable(self, stream) -> bool:
        """TensorRT-RTX (1.2+) says whether this context can be captured on ``stream`` (its engine needs
        user-allocated memory, which sdexport's RTX builds require); TensorRT 10/11 has no such query."""
        check = getattr(self.context, "is_stream_capturable", None)
        return True if check is None else bool(check(stream.cuda_stream))

    def __call__(self, feed: dict[str, Any]) -> dict[str, Any]:
        dims = self.dims(feed)
        rows = None
        if self.static:  # fewer rows than the static profile (SDXL's text encoders): padded, then sliced
            feed, dims, rows = self.fit_static_batch(feed, dims, {a: lo for a, (lo, _, _) in self.axes.items()})
        return self.keep_rows(self._run(feed, dims), rows)

    def _run(self, feed: dict[str, Any], dims: dict[str, int]) -> dict[str, Any]:
        import torch

        self.check_profile(dims)
        inputs = {t.name: feed[t.name].to(device=self.device, dtype=getattr(torch, t.dtype)).contiguous()
                  for t in self.spec.inputs}
        with on_device(self.device):
            stream = torch.cuda.current_stream(self.device)
            if torch.cuda.is_current_stream_capturing():  # inside a caller's graph (a step graph)
                if not self._capturable(stream):
                    raise NotCapturable(f"TensorRT says the {self.spec.name} context cannot be captured on this "
                                        "stream")
                outputs = self._bind(inputs, dims)
                self._execute(stream)
                return outputs
            if not self.use_graph:
                outputs = self._bind(inputs, dims)
                self._execute(stream)
                return outputs
            if self.graph is None:
                return self._capture(inputs, dims, stream)
            for k, v in inputs.items():
                self.static_in[k].copy_(v)
            self.graph.replay()
            return {k: v.clone() for k, v in self.static_out.items()}

    def _capture(self, inputs, dims, stream):
        """First call of a graphed engine: run it once (shapes set, lazy work done), then capture the same
        call on a side stream; where TensorRT says the context cannot be captured, run eagerly from now on."""
        import torch

        self.static_in = {k: v.clone() for k, v in inputs.items()}
        self.static_out = self._bind(self.static_in, dims)
        self._execute(stream)
        side = torch.cuda.Stream(device=self.device)
        if not self._capturable(side):
            self.use_graph = False
            self.warn(f"{self.spec.name}: TensorRT says this engine cannot be captured as a CUDA graph; "
                      "running it without one")
            return {k: v.clone() for k, v in self.static_out.items()}
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side):  # torch's current stream inside is ``side``
            self._execute(side)
        self.graph = graph
        return {k: v.clone() for k, v in self.static_out.items()}

    def close(self) -> None:
        self.graph = None
        self.context = None
        self.engine = None
        self.memory = None


def check_memory_fits(engines: dict[str, "TrtEngine"], size: int, device: str) -> None:
    """The shared scratch buffer (the largest engine's ``device_memory_size_v2``: its profile's largest shape)
    must fit in the free device memory, else a one-line error instead of an allocator traceback."""
    import torch

    free, _ = torch.cuda.mem_get_info(device_index(device))
    if size > free:
        worst = max(engines, key=lambda c: engines[c].device_memory_size)
        raise CannotRunHere(f"the {worst} engine needs {size / 2**30:.2f} GiB of device memory at its profile's "
                            f"largest shape and {free / 2**30:.2f} GiB is free on {device}: rebuild it with a "
                            "smaller profile (--max-size/--max-batch, or --static HxW)")


def memory_report(engines: dict[str, "TrtEngine"]) -> dict[str, int]:
    """Each engine's device memory (``device_memory_size_v2``, bytes): what its context needs at the largest
    shape of its profile; the pipeline's engines share one buffer of the largest."""
    return {c: e.device_memory_size for c, e in engines.items()}
