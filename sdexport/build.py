"""TensorRT engines from an export: one engine per component, profiles from the component specs.

The ONNX is built as exported: its precision is in the graph (FP16 mixed precision from
``export --dtype fp16``, INT8 Q/DQ from ``quantize``), so the network is strongly typed and
``--precision`` only says which export to build (and refuses one that does not match).
Optimization profiles come from the specs: ``ComponentSpec.profile()`` by default (dynamic
batch and resolution over the export's range), narrowed with --min/--opt/--max options, or one
static shape. Requests are in user terms (images, pixels) and each spec maps them to its axes,
exactly as the runtime does (two rows per image for the text encoder and the UNet).

Engines go to ``OUT/engines/<component>.<flavour>-<version>.<precision>.<profile>.<targets>.plan``,
written under a temporary name and renamed into place; ``manifest.engines[component]`` records
the TensorRT flavour and version, targets, precision, profile, the I/O read from the network, and
the sha256 of the ONNX it was built from. An engine whose inputs did not change is not rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import platform
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable

from .components import Geometry
from .errors import CannotRunHere, IntegrityError, SdexportError, ShapeError, UsageError
from . import interrupts
from .manifest import atomic_path, sha256_file, versions, writing
from .runtime import ExportDir

PRECISIONS = ("fp16", "fp32", "int8")
ENGINE_DIR = "engines"
# Builder flags every engine is built with, per flavour (part of the rebuild key; the manifest records them as
# TensorRT read them back). TF32 off: in a strongly typed graph an FP32 tensor is computed in FP32 (TensorRT
# enables TF32 by default on Ampere and newer; FP32 engines are judged at FP32 thresholds, and FP16/INT8 graphs
# keep FP32 islands). REQUIRE_USER_ALLOCATION (TensorRT-RTX 1.2+): no runtime allocation inside the engine, which
# TensorRT-RTX requires for CUDA stream capture (CUDA graphs).
BUILDER_FLAGS = {"tensorrt": {"TF32": False}, "rtx": {"TF32": False, "REQUIRE_USER_ALLOCATION": True}}


class BuildFailed(SdexportError):
    """TensorRT could not build an engine (its first error is quoted)."""

    exit_code = 9


# --- requests and profiles ------------------------------------------------------------

def profile_request(ranges, static: str | None = None, batch: int | None = None, opt_size: str | None = None,
                    opt_batch: int | None = None, min_size: str | None = None, max_size: str | None = None,
                    max_batch: int | None = None) -> tuple[str, dict[str, Geometry]]:
    """(kind, {min, opt, max} geometries) of the engines' profile, checked against the export's range."""
    from .limits import count, image_size

    for option, value in (("--batch", batch), ("--opt-batch", opt_batch), ("--max-batch", max_batch)):
        if value is not None:
            count(option, value, 1)
    if static is not None:
        if any(v is not None for v in (opt_size, opt_batch, min_size, max_size, max_batch)):
            raise UsageError("--static fixes one shape: leave out --min-size/--opt-size/--max-size/--opt-batch/"
                             "--max-batch")
        h, w = image_size("--static", static)
        geo = Geometry(batch or 1, h, w, guidance=True)
        ranges.check(geo)
        return "static", {"min": geo, "opt": geo, "max": geo}
    if batch is not None:
        raise UsageError("--batch goes with --static; a dynamic profile takes --opt-batch and --max-batch")
    lo = image_size("--min-size", min_size) if min_size is not None else (ranges.min_size, ranges.min_size)
    hi = image_size("--max-size", max_size) if max_size is not None else (ranges.max_size, ranges.max_size)
    opt = image_size("--opt-size", opt_size) if opt_size is not None else (min(max(ranges.opt_size, lo[0]), hi[0]),
                                                                           min(max(ranges.opt_size, lo[1]), hi[1]))
    request = {"min": Geometry(1, *lo, guidance=False),  # one image without guidance: one row
               "opt": Geometry(opt_batch or 1, *opt, guidance=True),
               "max": Geometry(max_batch or ranges.max_images, *hi, guidance=True)}
    for geo in request.values():
        ranges.check(geo)
    for field in ("images", "height", "width"):
        values = [getattr(request[k], field) for k in ("min", "opt", "max")]
        if values != sorted(values):
            raise ShapeError(f"profile {field} min/opt/max {values[0]}/{values[1]}/{values[2]}: "
                             "need min <= opt <= max")
    defaults = (lo == (ranges.min_size,) * 2 and hi == (ranges.max_size,) * 2 and opt == (ranges.opt_size,) * 2
                and opt_batch in (None, 1) and max_batch in (None, ranges.max_images))
    return ("dyn" if defaults else "custom"), request


def component_profile(spec, request: dict[str, Geometry]) -> tuple[dict[str, list], dict[str, list]]:
    """Per input [min, opt, max] shapes and per axis [min, opt, max] values of one component."""
    dims = {k: spec.dims_for(geo) for k, geo in request.items()}
    for d in dims.values():
        spec.check_dims(d)
    profile = {t.name: [list(t.shape(dims[k])) for k in ("min", "opt", "max")] for t in spec.inputs}
    axes = {a: [dims[k][a] for k in ("min", "opt", "max")] for a in spec.axes}
    return profile, axes


def profile_tag(kind: str, request: dict[str, Geometry]) -> str:
    if kind == "static":
        g = request["opt"]
        return f"static-b{g.images}-{g.height}x{g.width}"
    if kind == "dyn":
        return "dyn"
    blob = json.dumps({k: vars(v) for k, v in request.items()}, sort_keys=True).encode()
    return f"dyn-{hashlib.sha256(blob).hexdigest()[:8]}"


# --- targets ------------------------------------------------------------------------------

def parse_ccs(text: str | None) -> list[str] | None:
    """'8.0,8.6' / '80,86' / 'sm80,sm_86' -> ['8.0', '8.6']."""
    if text is None:
        return None
    out = []
    for item in str(text).replace(" ", "").split(","):
        raw = item.lower().removeprefix("sm").removeprefix("_")
        if "." in raw:
            major, _, minor = raw.partition(".")
        else:
            major, minor = raw[:-1], raw[-1:]
        if not (major.isdigit() and minor.isdigit()):
            raise UsageError(f"--compute-capability {item!r}: expected e.g. 8.0,8.6 (A100 is 8.0, T4 7.5)")
        cc = f"{int(major)}.{int(minor)}"
        if cc not in out:
            out.append(cc)
    if not out:
        raise UsageError("--compute-capability: give at least one, e.g. 8.6")
    return out


def resolve_targets(trt, flavour: str, requested: list[str] | None, gpu_cc) -> list[str]:
    from .backends.trt import RTX_DEFAULT_TARGETS, RTX_INSTALL, cc_text, rtx_targets, version_of

    if flavour == "tensorrt":
        if gpu_cc is None:
            raise CannotRunHere(f"TensorRT {version_of(trt)} builds engines for the GPU it runs on, and no CUDA GPU "
                                "is visible here; build on the target machine, or ahead of time with TensorRT-RTX "
                                f"({RTX_INSTALL}; --trt rtx)")
        here = cc_text(gpu_cc)
        if requested and requested != [here]:
            raise UsageError(f"--compute-capability {','.join(requested)}: TensorRT builds for this GPU ({here}) "
                             "only; other targets need TensorRT-RTX (--trt rtx)")
        return [here]
    supported = rtx_targets(trt)
    targets = requested or [cc for cc in RTX_DEFAULT_TARGETS if cc in supported]
    bad = [cc for cc in targets if cc not in supported]
    if bad:
        raise UsageError(f"--compute-capability {','.join(bad)}: TensorRT-RTX {version_of(trt)} cannot target it "
                         f"(it targets {', '.join(supported)})")
    return sorted(targets, key=lambda cc: tuple(int(x) for x in cc.split(".")))


def cc_tag(ccs: list[str]) -> str:
    return "sm" + "-".join(cc.replace(".", "") for cc in ccs)


# --- the TensorRT side ----------------------------------------------------------------------

class _Progress:
    """TensorRT's IProgressMonitor: once a build has run for a while, prints the builder's main phases;
    cancels the build when SIGINT arrives (the plan is then never written)."""

    def __init__(self, trt, say: Callable[[str], None], label: str, after_s: float = 3.0):
        trt.IProgressMonitor.__init__(self)
        self.say, self.label, self.after_s = say, label, after_s
        self.t0 = time.perf_counter()
        self.depth: dict[str, int] = {}
        self.cancelled = False

    def phase_start(self, phase_name, parent_phase, num_steps):
        depth = self.depth.get(parent_phase, -1) + 1 if parent_phase else 0
        self.depth[phase_name] = depth
        elapsed = time.perf_counter() - self.t0
        if 1 <= depth <= 2 and elapsed > self.after_s:
            self.say(f"{self.label}: {phase_name} ({elapsed:.0f} s)")

    def step_complete(self, phase_name, step):
        return not self.cancelled

    def phase_finish(self, phase_name):
        pass


def _progress_monitor(trt, say, label):
    if not hasattr(trt, "IProgressMonitor"):
        return None
    cls = type("Progress", (_Progress, trt.IProgressMonitor), {})
    return cls(trt, say, label)


def _network_io(network, trt) -> dict[str, list[dict[str, Any]]]:
    from .backends.trt import TRT_DTYPES

    def describe(t):
        return {"name": t.name, "dtype": TRT_DTYPES.get(t.dtype.name, t.dtype.name), "shape": list(t.shape)}

    return {"inputs": [describe(network.get_input(i)) for i in range(network.num_inputs)],
            "outputs": [describe(network.get_output(i)) for i in range(network.num_outputs)]}


def _check_io(io: dict, spec, where: str) -> None:
    """The network's I/O against the component spec: names, dtypes, ranks and static dims."""
    for kind, tensors in (("inputs", spec.inputs), ("outputs", spec.outputs)):
        got = [(t["name"], t["dtype"], [d if d >= 0 else "?" for d in t["shape"]]) for t in io[kind]]
        want = [(t.name, t.dtype, [d if isinstance(d, int) else "?" for d in t.dims]) for t in tensors]
        if [(n, d, len(s)) for n, d, s in got] != [(n, d, len(s)) for n, d, s in want] or any(
                g != "?" and w != "?" and g != w for (_, _, gs), (_, _, ws) in zip(got, want) for g, w in zip(gs, ws)):
            raise IntegrityError(f"{where}: TensorRT reads {kind} {got}, the component spec declares {want}")


def set_builder_flags(trt, config, flavour: str) -> dict[str, bool]:
    """Apply BUILDER_FLAGS[flavour] where this TensorRT has the flag; return each as the config reads it back."""
    applied = {}
    for name, on in BUILDER_FLAGS[flavour].items():
        flag = getattr(trt.BuilderFlag, name, None)
        if flag is None:  # e.g. REQUIRE_USER_ALLOCATION before TensorRT-RTX 1.2
            continue
        (config.set_flag if on else config.clear_flag)(flag)
        applied[name] = bool(config.get_flag(flag))
    return applied


class _native_stderr_held:
    """TensorRT's own C++ writes to file descriptor 2 while it builds: TensorRT-RTX's compiler prints
    "Internal Error: MyelinCheckException ..." itself, a second stderr line before sdexport's one-line error, and
    the same failure reaches the logger that error quotes. So during the build, descriptor 2 goes to a temporary
    file: written back afterwards where the build succeeded (its warnings are the user's), dropped where it
    failed (``failed``; the error line says why). Python's own stderr (the progress lines) keeps its stream.
    Where descriptor 2 cannot be moved, nothing is held."""

    def __enter__(self):
        import os
        import sys
        import tempfile

        self.failed = False
        self.saved = self.python_stderr = None
        try:
            sys.stderr.flush()
            self.saved = os.dup(2)
            self.file = tempfile.TemporaryFile()
            if _fileno(sys.stderr) == 2:  # the process's own stderr: Python's writes keep going there
                self.python_stderr = sys.stderr
                encoding = getattr(sys.stderr, "encoding", None) or "utf-8"
                sys.stderr = open(os.dup(self.saved), "w", buffering=1, encoding=encoding, errors="surrogateescape")
            os.dup2(self.file.fileno(), 2)
        except (OSError, ValueError):  # nothing held: the streams stay as they were
            if self.python_stderr is not None:
                sys.stderr.close()
                sys.stderr = self.python_stderr
            if self.saved is not None:
                os.close(self.saved)
            self.saved = self.python_stderr = None
        return self

    def __exit__(self, *exc) -> None:
        import os
        import sys

        if self.saved is None:
            return
        os.dup2(self.saved, 2)
        os.close(self.saved)
        if self.python_stderr is not None:
            sys.stderr.close()
            sys.stderr = self.python_stderr
        self.file.seek(0)
        text = self.file.read()
        self.file.close()
        if text and not self.failed and exc[0] is None:
            sys.stderr.flush()
            os.write(2, text)


def _fileno(stream) -> int | None:
    try:
        return stream.fileno()
    except (OSError, ValueError, AttributeError):
        return None


def _clip(text: str, limit: int = 160) -> str:
    """TensorRT's message shortened for a one-line error: cut at a space, never inside a token, and marked."""
    if len(text) <= limit:
        return text
    cut = text[:limit].rsplit(" ", 1)[0].rstrip() if " " in text[:limit].strip() else ""
    cut = cut or text[:limit]  # no space to cut at
    return cut.rstrip(" ,;:") + " ..."


def mark_refittable(trt, network, names: list[str]) -> str:
    """Make the weights ``names`` (ONNX initializer names: the parser names TensorRT weights after them)
    refittable: individually where the flavour can (REFIT_INDIVIDUAL, so TensorRT still optimizes every
    other weight as a constant), else all weights (REFIT). Returns the flag to set."""
    if hasattr(trt.BuilderFlag, "REFIT_INDIVIDUAL") and hasattr(network, "mark_weights_refittable"):
        refused = [n for n in names if not network.mark_weights_refittable(n)]
        if refused:
            raise IntegrityError(f"TensorRT does not know {refused[0]} (and {len(refused) - 1} more) as weights of "
                                 "the network; the weights map does not match this ONNX: re-export")
        return "REFIT_INDIVIDUAL"
    return "REFIT"


def _gpu_here() -> tuple[int, int] | None:
    """The compute capability of the GPU this process builds on (None without one)."""
    from .backends.trt import gpu_capability

    return gpu_capability(None)


def build_engine(trt, flavour: str, onnx_path: Path, plan_path: Path, spec, profile: dict[str, list],
                 targets: list[str], opt_level: int, workspace_mib: int | None,
                 timing_cache: tuple[Path, Path] | None, say: Callable[[str], None], label: str,
                 refit_weights: list[str] | None = None) -> dict[str, Any]:
    """Parse, configure and build one engine; the plan is written atomically to ``plan_path``.
    ``timing_cache``: (file to read it from, file to write it to), or None. ``refit_weights``: initializers
    to keep refittable (LoRA switching), stripped from the plan where the flavour can (STRIP_PLAN): the
    runtime refits them from the ONNX file when it loads the engine."""
    from .backends.trt import capture_logger

    log = capture_logger(trt)
    log.clear()
    builder = trt.Builder(log)
    typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    # 10.x: strongly typed on request; 11.x and TensorRT-RTX: always (the flag is accepted and ignored).
    network = builder.create_network(1 << int(typed) if typed is not None else 0)
    parser = trt.OnnxParser(network, log)
    if not parser.parse_from_file(str(onnx_path)) or network.num_inputs == 0:
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)] or [log.summary("no inputs")]
        raise IntegrityError(f"{onnx_path}: the TensorRT ONNX parser refused it: {' '.join(errors[0].split())[:300]}")
    io = _network_io(network, trt)
    _check_io(io, spec, str(onnx_path))

    config = builder.create_builder_config()
    opt_profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile.items():
        opt_profile.set_shape(name, lo, opt, hi)
    if config.add_optimization_profile(opt_profile) < 0:
        raise ShapeError(f"{spec.name}: TensorRT refused the profile {profile} ({log.summary()})")
    accepted = {name: [list(s) for s in opt_profile.get_shape(name)] for name in profile}
    if accepted != profile:
        raise ShapeError(f"{spec.name}: TensorRT recorded the profile {accepted}, sdexport asked {profile}")
    if flavour == "rtx":
        config.num_compute_capabilities = len(targets)
        for i, cc in enumerate(targets):
            config.set_compute_capability(getattr(trt.ComputeCapability, "SM" + cc.replace(".", "")), i)
    flags = set_builder_flags(trt, config, flavour)
    refit: dict[str, Any] = {}
    if refit_weights is not None:
        flag = mark_refittable(trt, network, refit_weights)
        config.set_flag(getattr(trt.BuilderFlag, flag))
        stripped = hasattr(trt.BuilderFlag, "STRIP_PLAN")
        if stripped:
            config.set_flag(trt.BuilderFlag.STRIP_PLAN)
        refit = {"refit_flag": flag, "refittable_weights": len(refit_weights), "weights_stripped": stripped}
    if hasattr(config, "builder_optimization_level"):
        config.builder_optimization_level = opt_level
    if workspace_mib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib * 2**20)
    cache = None
    if timing_cache is not None:
        cache_in, cache_out = timing_cache
        data = cache_in.read_bytes() if cache_in.is_file() else b""
        try:
            cache = config.create_timing_cache(data)
        except Exception:  # an unreadable cache (another version, truncated): start a new one
            cache = None
        if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
            say(f"{label}: timing cache {cache_in} is unreadable or from another GPU; starting a new one")
            cache = config.create_timing_cache(b"")
            config.set_timing_cache(cache, ignore_mismatch=False)
    monitor = _progress_monitor(trt, say, label)
    if monitor is not None:
        config.progress_monitor = monitor

    # While TensorRT builds (C++), a signal only sets a flag that the progress monitor turns into a cancel;
    # the interrupt is raised when the builder returns (interrupts.check).
    previous: dict[int, Any] = {}
    if monitor is not None and threading.current_thread() is threading.main_thread():
        def cancel(signum, frame):
            interrupts.record(signum)
            monitor.cancelled = True
        previous = {sig: signal.signal(sig, cancel) for sig in (signal.SIGINT, signal.SIGTERM)}
    t0 = time.perf_counter()
    try:
        with atomic_path(plan_path) as tmp:
            with _native_stderr_held() as held:
                plan = builder.build_serialized_network(network, config)
                held.failed = plan is None
            interrupts.check()
            if plan is None:
                # A refittable TensorRT-RTX build fails where its compiler cannot load the target's code here
                # (no GPU, or a GPU of another compute capability); anything else is TensorRT's own message.
                here = _gpu_here() if refit and flavour == "rtx" else ()
                if here is None:  # whatever its compiler logged first: under load it was once not the CUDA check
                    # (graph_jit.cpp:179 "CHECK(status == myelinSuccess)" instead of :278 "CUDA_SUCCESS")
                    raise CannotRunHere(
                        f"{spec.name}: TensorRT-RTX {trt.__version__} builds refittable engines only where CUDA "
                        f"runs (its Myelin compiler failed without it: {_clip(log.summary())}); "
                        "build --refittable on a machine with an NVIDIA GPU and driver (the targets stay the same)")
                if here and "CUDA" in log.summary() and f"{here[0]}.{here[1]}" not in targets:
                    # Measured on an H100 for target 8.0: "CUDA error 222 loading a module" (Myelin loads the
                    # target's code on the GPU it builds on), benchmarks/results/2026-11-26-h100-session5.
                    raise CannotRunHere(
                        f"{spec.name}: TensorRT-RTX {trt.__version__} builds a refittable engine only on a GPU that "
                        f"can load its target's code (this GPU: compute capability {here[0]}.{here[1]}, target "
                        f"{', '.join(targets)}: {_clip(log.summary())}); build --refittable on a GPU of compute "
                        f"capability {', '.join(targets)}, e.g. the one that will run it")
                raise BuildFailed(f"{spec.name}: TensorRT could not build the engine for {', '.join(targets)}: "
                                  f"{log.summary()}")
            with open(tmp, "wb") as f:
                f.write(memoryview(plan))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
    seconds = time.perf_counter() - t0
    if cache is not None:
        with atomic_path(cache_out) as tmp:
            tmp.write_bytes(bytes(memoryview(config.get_timing_cache().serialize())))
    memory = log.facts["activation_memory"]
    return {"io": io, "profile": accepted, "seconds": seconds, "builder_flags": flags, "refit": refit,
            "activation_memory_bytes": int(memory[-1]) if memory else None,
            "attention_nodes": list(log.facts["attention_node"])}


# --- the command ----------------------------------------------------------------------------

def _onnx_component(export, component: str, precision: str) -> str:
    """Which exported ONNX an engine of ``precision`` is built from (the rule shared with quantize)."""
    if precision == "int8" and component == "unet":
        if "unet_int8" not in export.manifest.components:
            raise UsageError(f"--precision int8: {export.root} has no quantized UNet (unet_int8); "
                             f"run sdexport quantize {export.root} first")
        return "unet_int8"
    return component


def _engine_precision(export, onnx_key: str, precision: str, say: Callable[[str], None]) -> str:
    """The precision of the engine built from ``onnx_key``: that of its graph, which must match ``precision``.
    With int8, the UNet comes from ``unet_int8`` and the other components are built as exported
    (fp16 preferably: quantize starts from an FP32 export, so they may be fp32)."""
    entry_precision = export.manifest.components[onnx_key]["precision"]
    dtype = entry_precision["dtype"]
    if precision in ("fp16", "int8") and dtype == "fp32" and entry_precision.get("kept_fp32"):
        # the FP16 export keeps it FP32 on purpose (e.g. an SDXL VAE under force_upcast)
        say(f"note: {onnx_key} stays fp32 in this export ({entry_precision['kept_fp32']}): its engine is fp32")
        return dtype
    if precision == "int8" and onnx_key != "unet_int8":
        if dtype not in ("fp16", "fp32"):
            raise UsageError(f"--precision int8: {onnx_key} in {export.root} is an {dtype} export; re-export it")
        if dtype == "fp32":
            say(f"note: {onnx_key} is an fp32 export: its engine is fp32 (export with --dtype fp16 for fp16)")
        return dtype
    if dtype != precision:
        fix = (f"export with --dtype fp16 (sdexport export MODEL -o {export.root} --dtype fp16)" if precision == "fp16"
               else f"export with --dtype {precision}" if precision == "fp32" else f"run sdexport quantize {export.root}")
        other = f" or build with --precision {dtype}" if dtype in ("fp16", "fp32") and precision != "int8" else ""
        raise UsageError(f"--precision {precision}: {onnx_key} in {export.root} is an {dtype} export and an engine "
                         f"keeps the precision of its graph: {fix}{other}")
    return precision


def build(export_dir: str | Path, precision: str = "fp16", flavour: str = "auto", components: list[str] | None = None,
          static: str | None = None, batch: int | None = None, opt_size: str | None = None,
          opt_batch: int | None = None, min_size: str | None = None, max_size: str | None = None,
          max_batch: int | None = None, compute_capabilities: str | list[str] | None = None, opt_level: int = 3,
          workspace_mib: int | None = None, timing_cache: str | Path | None = None, force: bool = False,
          device: str | None = None, refittable: bool = False,
          say: Callable[[str], None] = lambda msg: None) -> dict[str, Any]:
    """Build the engines; ``device`` ('cuda:N') is the GPU NVIDIA's tensorrt builds for and whose compute
    capability is checked against the targets (default: torch's current CUDA device). ``refittable``: engines
    of the components a LoRA changes keep those weights refittable (and, where the flavour can, stripped from
    the plan), so that ``infer --lora`` refits them instead of rebuilding."""
    if precision not in PRECISIONS:
        raise UsageError(f"--precision {precision}: choose {', '.join(PRECISIONS)}")
    if flavour not in ("auto", "tensorrt", "rtx"):
        raise UsageError(f"--trt {flavour}: choose auto, tensorrt or rtx")
    if not 0 <= opt_level <= 5:
        raise UsageError(f"--opt-level {opt_level}: TensorRT's builder optimization levels are 0 to 5")
    if workspace_mib is not None and workspace_mib <= 0:
        raise UsageError(f"--workspace {workspace_mib}: give MiB > 0")
    from .paths import check_build_outputs

    check_build_outputs(ExportDir.open(export_dir), timing_cache)
    with writing(export_dir, "build", say, create=False) as txn:
        export = ExportDir.open(export_dir)
        export.manifest = txn.manifest
        return _build(export, txn, precision, flavour, components, static, batch, opt_size, opt_batch, min_size,
                      max_size, max_batch, compute_capabilities, opt_level, workspace_mib, timing_cache, force, device,
                      say, refittable)


def _refit_weights(export, onnx_key: str) -> list[str] | None:
    """The initializers an engine of ``onnx_key`` keeps refittable under --refittable: those the weights map
    says hold torch parameters (None: a component no LoRA changes, built as usual)."""
    from .lora import WeightMap, lora_parts

    if export.spec(onnx_key).source not in lora_parts(export.info):
        return None
    if onnx_key != export.spec(onnx_key).source and onnx_key not in export.specs:
        raise UsageError(f"--refittable: {onnx_key} is not a plain export (its weights are quantized); "
                         "LoRA switching runs on --precision fp16/fp32 engines")
    wmap = WeightMap(export, onnx_key)
    return sorted({e["initializer"] for entries in wmap.params.values() for e in entries})


def _build(export, txn, precision, flavour, components, static, batch, opt_size, opt_batch, min_size, max_size,
           max_batch, compute_capabilities, opt_level, workspace_mib, timing_cache, force, device, say,
           refittable=False) -> dict[str, Any]:
    from .backends.trt import FLAVOUR_NAMES, gpu_capability, on_device, select_flavour, version_of

    manifest = export.manifest
    exported = [c for c in export.family.components(export.info) if c in manifest.components]
    components = list(dict.fromkeys(components or exported))
    export.check_requested(components, exported)
    onnx_keys = {c: _onnx_component(export, c, precision) for c in components}
    precisions = {c: _engine_precision(export, key, precision, say) for c, key in onnx_keys.items()}
    kind, request = profile_request(export.ranges, static=static, batch=batch, opt_size=opt_size,
                                    opt_batch=opt_batch, min_size=min_size, max_size=max_size, max_batch=max_batch)
    if device is not None and not str(device).startswith("cuda"):
        raise UsageError(f"--device {device}: give the CUDA device to build for (cuda or cuda:N)")
    gpu_cc = gpu_capability(device)
    if device is not None and gpu_cc is None:
        raise CannotRunHere(f"--device {device}: no CUDA GPU visible here")
    trt, flavour = select_flavour(flavour, gpu_cc)
    version = version_of(trt)
    if isinstance(compute_capabilities, str):
        compute_capabilities = parse_ccs(compute_capabilities)
    if refittable and flavour == "rtx" and not compute_capabilities and gpu_cc is not None:
        compute_capabilities = [f"{gpu_cc[0]}.{gpu_cc[1]}"]  # refittable RTX engines have one target (below)
    targets = resolve_targets(trt, flavour, compute_capabilities, gpu_cc)
    if refittable and flavour == "rtx" and len(targets) > 1:
        raise UsageError(f"--refittable: TensorRT-RTX {version} builds a refittable engine for one compute "
                         f"capability (its compiler stops with 'CHECK(sm_vers_.size() == 1)' for {', '.join(targets)}): "
                         "pass one, e.g. --compute-capability 8.6")
    name = FLAVOUR_NAMES[flavour]
    short = {"tensorrt": "trt", "rtx": "rtx"}[flavour] + "-" + ".".join(version.split(".")[:3])
    cache_paths = None
    if flavour == "rtx":
        cache_note = ("not used: TensorRT-RTX's timing cache is a no-op (kernels are compiled at build time and on "
                      "first run)")
        say(f"{name} {version}: timing cache {cache_note}")
    else:
        if timing_cache:
            cache_paths = (Path(timing_cache), Path(timing_cache))
        else:  # inside the export: written through the transaction like the plans
            rel = f"{ENGINE_DIR}/timing.{short}.cache"
            cache_paths = (export.root / rel, txn.stage(rel))
        cache_note = str(cache_paths[0])
        say(f"{name} {version}: timing cache {cache_paths[0]} ({'reused' if cache_paths[0].is_file() else 'new'})")
    if gpu_cc is not None and flavour == "rtx":
        _warn_about_this_gpu(gpu_cc, targets, device, export.root, say)

    built, current, attention = [], [], {}
    for i, component in enumerate(components, 1):
        label = f"[{i}/{len(components)}] {component}"
        spec = export.specs[component]
        onnx_key = onnx_keys[component]
        onnx_entry = manifest.components[onnx_key]
        onnx_path = manifest.verified_path(onnx_entry)
        profile, axes = component_profile(spec, request)
        refit_weights = _refit_weights(export, onnx_key) if refittable else None
        key = {"onnx_sha256": onnx_entry["sha256"], "flavour": flavour, "version": version,
               "compute_capabilities": targets, "precision": precisions[component], "profile": profile,
               "opt_level": opt_level, "workspace_mib": workspace_mib, "builder_flags": BUILDER_FLAGS[flavour]}
        if refit_weights is not None:
            key["refittable"] = True
        old = manifest.engines.get(component)
        if not force and old and old.get("key") == key and export.manifest.intact(old):
            say(f"{label}: up to date ({old['file']}), not rebuilt")
            current.append(component)
            continue
        rel = (f"{ENGINE_DIR}/{component}.{short}.{precisions[component]}.{profile_tag(kind, request)}."
               f"{cc_tag(targets)}{'.refit' if refit_weights is not None else ''}.plan")
        say(f"{label}: building {name} {version} {precisions[component]} {kind} profile for compute capability "
            f"{', '.join(targets)} (opt level {opt_level})")
        plan = txn.stage(rel)
        try:
            with on_device(device if flavour == "tensorrt" else None):  # NVIDIA's tensorrt builds on the current GPU
                result = build_engine(trt, flavour, onnx_path, plan, spec, profile, targets, opt_level,
                                      workspace_mib, cache_paths, say, label, refit_weights=refit_weights)
        except BuildFailed as exc:
            raise BuildFailed(f"{exc}{_known_failure(export, component, flavour, precisions[component], targets, exc)}"
                              ) from None
        entry = {
            "file": rel, "sha256": sha256_file(plan), "size_bytes": plan.stat().st_size,
            "flavour": flavour, "flavour_name": name, "version": version, "compute_capabilities": targets,
            "precision": precisions[component], "strongly_typed": True,
            "refittable": refit_weights is not None, **result["refit"],
            "onnx": {"component": onnx_key, "file": onnx_entry["file"], "sha256": onnx_entry["sha256"]},
            "profile_kind": kind, "profile": result["profile"], "axes": axes,
            "request": {k: vars(g) for k, g in request.items()},
            "opt_level": opt_level, "workspace_mib": workspace_mib, "timing_cache": cache_note,
            "builder_flags": result["builder_flags"], "activation_memory_bytes": result["activation_memory_bytes"],
            "fused_attention_nodes": len(result["attention_nodes"]),
            **result["io"],
            "build_seconds": round(result["seconds"], 2),
            "built_on": {"host": platform.node(), "gpu_compute_capability":
                         f"{gpu_cc[0]}.{gpu_cc[1]}" if gpu_cc else None},
            "key": key, "versions": {**versions(), name: version},
        }
        attention[component] = result["attention_nodes"]
        manifest.engines[component] = entry
        _remove_stale(export, txn, component, keep=rel)
        built.append(component)
        memory = (f", {entry['activation_memory_bytes'] / 2**20:.0f} MiB activation memory at the profile's largest "
                  "shape" if entry["activation_memory_bytes"] is not None else "")
        say(f"{label}: wrote {rel} ({entry['size_bytes'] / 2**20:.1f} MiB, {entry['build_seconds']} s{memory})")
    if built:
        txn.commit()
    else:
        say(f"nothing to build: {len(current)} engine(s) up to date")
    return {"built": built, "up_to_date": current, "flavour": name, "version": version, "targets": targets,
            "engines": {c: manifest.engines[c] for c in components}, "held": sorted(manifest.engines),
            "attention_nodes": attention}


def _warn_about_this_gpu(gpu_cc, targets: list[str], device: str | None, root, say) -> None:
    """TensorRT-RTX builds ahead of time for its targets: say so when they exclude the GPU in this machine."""
    import torch

    from .backends.trt import cc_text, device_index, gpu_advice, rebuild_advice

    if cc_text(gpu_cc) in targets and gpu_advice("rtx", gpu_cc) is None:
        return
    gpu = torch.cuda.get_device_name(device_index(device))
    if cc_text(gpu_cc) in targets:
        say(f"warning: this GPU ({gpu}, compute capability {cc_text(gpu_cc)}) is among the targets, but "
            f"{gpu_advice('rtx', gpu_cc, root)}")
    else:
        say(f"warning: the engines will not run on this GPU ({gpu}, compute capability {cc_text(gpu_cc)}; targets "
            f"{', '.join(targets)}): {rebuild_advice('rtx', gpu_cc, root)}")


def _known_failure(export, component: str, flavour: str, precision: str, targets: list[str], exc) -> str:
    """What is known about a failed build beyond TensorRT's message ('' if nothing)."""
    from .backends.trt import RTX_NO_FP32_GEMM_CC, cc_text, gpu_advice

    if flavour != "rtx":
        return ""
    text = export.info.configs.get(component, {}) if component.startswith("text_encoder") else {}
    head_dim = text.get("hidden_size", 0) // max(1, text.get("num_attention_heads", 1))
    if text and precision == "fp16" and "Myelin" in str(exc) and head_dim > 8 and head_dim % 8:
        # Measured with TensorRT-RTX 1.7.1 (README, TensorRT engines): head dims 9-12, 14, 18, 20 fail; 4-8, 16, 24 build.
        # An export holds one dtype: an FP32 re-export of one component into it is refused (it would delete the rest).
        return (f"; TensorRT-RTX 1.7.1 cannot build an FP16 text encoder whose attention head dimension ({head_dim}) "
                f"is above 8 and not a multiple of 8 (SD 1.x/2.x: 64). Its FP32 graph builds: export the model in "
                f"FP32 into another directory and build that (sdexport export MODEL -o {export.root}-fp32; "
                f"sdexport build {export.root}-fp32 --precision fp32), or run this export with --backend ort")
    turing = [cc for cc in RTX_NO_FP32_GEMM_CC if cc_text(cc) in targets]
    if turing:
        return f"; {gpu_advice('rtx', turing[0], export.root)}"
    return ""


def _remove_stale(export, txn, component: str, keep: str) -> None:
    """Plans of ``component`` that the manifest no longer lists (replaced by the one just built)."""
    folder = export.root / ENGINE_DIR
    for path in folder.glob(f"{component}.*.plan"):
        if f"{ENGINE_DIR}/{path.name}" != keep:
            txn.remove(f"{ENGINE_DIR}/{path.name}")
