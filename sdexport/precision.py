"""Precision lives in the ONNX graph: FP16 as a mixed-precision graph with FP32 islands.

TensorRT 11 (and TensorRT-RTX) build strongly-typed networks only, so there is no
"FP16 builder flag": the graph must already say which ops run in FP16.

Converter choice: NVIDIA ModelOpt's AutoCast (``modelopt.onnx.autocast``).
 - It is the converter NVIDIA maintains for strongly-typed TensorRT.
 - It keeps listed op types and node-name patterns in FP32 (ours come from the
   ComponentSpec), and additionally keeps any node whose inputs or outputs, measured
   on a reference run with the spec's sample inputs, exceed the FP16-safe range
   (AutoCast's ``data_max``): the overflow that gives black/NaN images in FP16 VAEs
   is caught from data.
 - That reference run is sdexport's own (``out_of_range_nodes``), fed to AutoCast as
   node names to keep: AutoCast's runner deep-copies the weighted model, runs ONNX
   Runtime's symbolic shape inference over the copy and marks every tensor an output
   at the export's optimal shape. Measured: more than 24 GiB for SD 1.5's 3.4 GB UNet
   (the kernel killed the export on a 24 GiB machine) and more than 200 GiB for the
   SDXL UNet (killed twice on a 256 GiB host). Ours opens one session over the FP32
   file (weights read once) at one image of the range's smallest size; AutoCast itself
   then peaks at about five times the FP32 weights (16.5 GiB for SD 1.5; the whole FP16
   export of that UNet at 21.4 GiB, where it was killed at 24 GiB before).
 - ONNX Runtime's ``float16.convert_float_to_float16`` and onnxconverter-common's
   were tried first on the diffusers UNet graph and produced invalid models
   (duplicate node names, tensors assigned twice, wrong Cast types); AutoCast's
   output passes ``onnx.checker`` with full checking.
I/O stays FP32 (``keep_io_types``) so that FP32 and FP16 exports share one
interface, and the timestep, which the sampler produces as a float, reaches the
FP32 time embedding without rounding.
"""

from __future__ import annotations

import logging
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from .components import FP32_OP_TYPES, ComponentSpec
from .errors import BackendUnavailable

# tempfile.tempdir is the process's: one conversion at a time points it at its export's scratch
_TEMPDIR_LOCK = threading.Lock()
MODELOPT_INSTALL = "pip install nvidia-modelopt==0.47.0 (a dependency of sdexport: see README, Install)"
DATA_MAX = 512.0  # AutoCast's default data_max: a node with |values| above it on the reference run stays FP32
# Exporting a component in FP16 peaks at about this many times its FP32 weights: the torch module, the reference
# run and AutoCast's copies (AutoCast alone: 5.2x). Measured on sd15-random's UNet (3.2 GiB of FP32 weights):
# peak RSS 21.4 GiB for `sdexport export --dtype fp16 --components unet` (ModelOpt 0.47, 2 CPU cores).
FP16_EXPORT_MEMORY_FACTOR = 6.7
# AutoCast says nothing while it works: 212 s for SD 1.5's UNet on 2 cores, 713 s for SDXL's on a 32-core host
# (ModelOpt 0.47; mostly protobuf serialization and shape inference of the whole weighted graph, repeated)
PROGRESS_EVERY_S = 60.0


def _autocast():
    try:
        from modelopt.onnx.autocast import convert_to_mixed_precision
    except ImportError as exc:
        raise BackendUnavailable(f"FP16 export needs NVIDIA ModelOpt's AutoCast ({exc}); {MODELOPT_INSTALL}") from None
    for name in ("modelopt", "modelopt.onnx", "modelopt.onnx.autocast"):
        logging.getLogger(name).setLevel(logging.ERROR)
        logging.getLogger(name).propagate = False
    return convert_to_mixed_precision


@contextmanager
def _ticking(say: Callable[[str], None], what: str, every_s: float) -> Iterator[None]:
    """Say ``what (N s)`` every ``every_s`` seconds while the block runs: progress for one long library call."""
    done = threading.Event()
    t0 = time.perf_counter()

    def tick():
        while not done.wait(every_s):
            say(f"{what} ({time.perf_counter() - t0:.0f} s)")

    thread = threading.Thread(target=tick, name="sdexport-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def reference_absmax(onnx_path: Path, feed: dict[str, Any], header=None) -> dict[str, float]:
    """The largest magnitude of every tensor of the FP32 graph at ``onnx_path`` on ``feed`` (inputs included),
    from one ONNX Runtime session on the CPU: what AutoCast's reference runner measures, at a fraction of its
    memory (module docstring). Nothing is written: ONNX Runtime gets the graph's structure, every tensor made an
    output, from memory and reads the weights from their file beside ``onnx_path``. ``header``: the graph
    loaded without external data, if the caller has it (its outputs are extended in place)."""
    import onnx
    import onnxruntime as ort

    if header is None:
        header = onnx.load(str(onnx_path), load_external_data=False)
    # AutoCast runs its reference on the graph with the IR version lowered to what ONNX Runtime reads (another
    # tool's IR 11+ graph would otherwise stop ONNX Runtime here); ops and values are unchanged by it
    header.ir_version = min(header.ir_version, _ort_max_ir_version())
    typed = onnx.shape_inference.infer_shapes(header)
    elem = {v.name: v.type.tensor_type.elem_type for v in list(typed.graph.value_info) + list(typed.graph.output)}
    del typed
    outputs = {o.name for o in header.graph.output}
    for node in header.graph.node:
        for name in node.output:
            if name and name not in outputs and elem.get(name):
                header.graph.output.append(onnx.helper.make_tensor_value_info(name, elem[name], None))
                outputs.add(name)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # external data locations are relative to the graph's folder (a graph under 2 GB has none)
    opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(onnx_path.parent))
    session = ort.InferenceSession(header.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    arrays = {k: v.detach().cpu().numpy() for k, v in feed.items()}
    names = [o.name for o in session.get_outputs()]
    found = {k: _absmax(v) for k, v in arrays.items()}
    for name, value in zip(names, session.run(names, arrays)):
        found[name] = _absmax(np.asarray(value))
    return found


def _ort_max_ir_version() -> int:
    """The IR version AutoCast lowers graphs to before its own ONNX Runtime run (ModelOpt 0.47: 10)."""
    try:
        from modelopt.onnx.autocast.convert import LATEST_IR_VERSION_SUPPORTED_BY_ORT
    except ImportError:
        return 10
    return int(LATEST_IR_VERSION_SUPPORTED_BY_ORT)


def _absmax(value: np.ndarray) -> float:
    return float(np.max(np.abs(value.astype(np.float64, copy=False)))) if value.size else 0.0


def out_of_range_nodes(onnx_path: Path, feed: dict[str, Any], data_max: float = DATA_MAX) -> list[str]:
    """Nodes AutoCast's data_max rule keeps in FP32: any input or output above ``data_max`` on a reference run
    over ``feed`` (Constant nodes never; tensors without a measurement, such as initializers, do not count)."""
    import onnx

    header = onnx.load(str(onnx_path), load_external_data=False)
    nodes = [(node.name, [*node.input, *node.output]) for node in header.graph.node if node.op_type != "Constant"]
    absmax = reference_absmax(Path(onnx_path), feed, header)
    return [name for name, tensors in nodes if any(absmax.get(t, 0.0) > data_max for t in tensors)]


def convert_fp16(onnx_path: Path, spec: ComponentSpec, feed: dict[str, Any] | None = None,
                 work_dir: Path | None = None, say: Callable[[str], None] = lambda msg: None,
                 graph: str | None = None):
    """Return an FP16 mixed-precision ModelProto for the FP32 model at ``onnx_path``.

    ``feed`` are the reference inputs run to find overflow-prone nodes; by default one image at the smallest
    size of the spec's range (the FP16 export's and INT8's rule): a layer's typical magnitudes do not grow with
    the image, the memory of a reference run does. The largest value seen does grow with the number of values,
    so a node just above data_max only at larger sizes is converted: on the tiny export with inputs scaled x300
    the VAE encoder kept 0 nodes at its smallest size and 8 at its optimal one. ``validate`` measures the result
    either way. ``work_dir`` takes the temporary files: AutoCast saves a copy of a graph over 2 GB to check it,
    which belongs in the export's scratch (counted by the disk check, removed with the transaction) rather
    than in /tmp. ``say`` gets the reference run's result and, while AutoCast converts, a line every
    ``PROGRESS_EVERY_S``. ``graph``: what is converted, as the lines name it (default: the component's name);
    quantize and validate convert other graphs of one component, whose counts may differ.
    """
    convert = _autocast()
    if feed is None:
        feed = spec.sample_inputs(spec.min_dims(), seed=0)
    keep = out_of_range_nodes(Path(onnx_path), feed)
    shapes = ", ".join(f"{k} {'x'.join(map(str, v.shape))}" for k, v in feed.items())
    say(f"{graph or spec.name}: reference run ({shapes}): {len(keep)} node(s) above |{DATA_MAX:g}| kept FP32; "
        "converting (AutoCast)")
    # one anchored alternation: AutoCast tries every pattern on every node (re.match)
    patterns = list(spec.fp32_node_patterns) + ([f"^(?:{'|'.join(re.escape(n) for n in keep)})$"] if keep else [])
    # AutoCast names unnamed nodes before it matches names: one of them to keep can only be kept by its own run
    # (sdexport's graphs name every node; the fallback is for other callers' graphs)
    own_run = "" in keep
    with _TEMPDIR_LOCK:
        root = logging.getLogger()
        saved_level, saved_tempdir = root.level, tempfile.tempdir
        root.setLevel(logging.ERROR)  # AutoCast reports skipped ops through the root logger
        if work_dir is not None:
            tempfile.tempdir = str(work_dir)
        try:
            with tempfile.TemporaryDirectory() as tmp:
                if own_run:
                    calib = Path(tmp) / "calib.npz"
                    np.savez(calib, **{k: v.cpu().numpy() for k, v in feed.items()})
                    options: dict[str, Any] = {"calibration_data": str(calib),
                                               "nodes_to_exclude": list(spec.fp32_node_patterns)}
                else:  # data_max=inf: AutoCast skips its own reference run; the nodes it would keep are in patterns
                    options = {"data_max": np.inf, "nodes_to_exclude": patterns}
                with _ticking(say, f"{graph or spec.name}: still converting", PROGRESS_EVERY_S):
                    model = convert(onnx_path=str(onnx_path), low_precision_type="fp16", keep_io_types=True,
                                    op_types_to_exclude=list(FP32_OP_TYPES), providers=["cpu"], **options)
                return canonical_input_casts(model)
        finally:
            root.setLevel(saved_level)
            tempfile.tempdir = saved_tempdir


def canonical_input_casts(model):
    """The same FP16 graph from every process: AutoCast (ModelOpt 0.47) inserts the Casts of the graph's
    inputs in the order of a Python set of tensor names, which follows the process's string hash seed, so two
    exports of one model differed in that order and in their hashes. Those Casts read graph inputs only, so
    they may come first in any order: first, by name (the rest keeps its order); their outputs' value_info
    entries take the slots those entries had, by name. In place; returns ``model``."""
    graph = model.graph
    inputs = {i.name for i in graph.input}

    def reads_inputs_only(node) -> bool:
        return node.op_type == "Cast" and bool(node.input) and all(i in inputs for i in node.input)

    casts, rest = [], []
    for node in graph.node:
        (casts if reads_inputs_only(node) else rest).append(node)
    if not casts:
        return model
    casts.sort(key=lambda n: (n.name, list(n.output)))
    _reorder(graph.node, casts + rest)
    outputs = {o for n in casts for o in n.output}
    slots = [i for i, v in enumerate(graph.value_info) if v.name in outputs]
    by_slot = dict(zip(slots, sorted((graph.value_info[i] for i in slots), key=lambda v: v.name)))
    _reorder(graph.value_info, [by_slot.get(i, v) for i, v in enumerate(graph.value_info)])
    return model


def _reorder(field, items) -> None:
    """Set a repeated protobuf field to ``items`` (messages now in it, in a new order)."""
    copies = []
    for item in items:
        copy = type(item)()
        copy.CopyFrom(item)
        copies.append(copy)
    del field[:]
    field.extend(copies)


def precision_summary(model) -> dict[str, Any]:
    """How much of a graph computes in FP16: counts of float ops by their output type."""
    import onnx

    value_types = {v.name: v.type.tensor_type.elem_type for v in
                   list(model.graph.value_info) + list(model.graph.output) + list(model.graph.input)}
    compute_ops = {"Conv", "MatMul", "Gemm", "ConvTranspose"}
    fp16 = fp32 = 0
    fp32_kept: dict[str, int] = {}
    for node in model.graph.node:
        if not node.output:
            continue
        elem = value_types.get(node.output[0])
        if elem == onnx.TensorProto.FLOAT16:
            fp16 += node.op_type in compute_ops
        elif elem == onnx.TensorProto.FLOAT:
            fp32 += node.op_type in compute_ops
            if node.op_type in FP32_OP_TYPES or node.op_type in compute_ops:
                fp32_kept[node.op_type] = fp32_kept.get(node.op_type, 0) + 1
    return {"conv_matmul_fp16": fp16, "conv_matmul_fp32": fp32, "fp32_ops_by_type": fp32_kept}
