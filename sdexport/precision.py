"""Precision lives in the ONNX graph: FP16 as a mixed-precision graph with FP32 islands.

TensorRT 11 (and TensorRT-RTX) build strongly-typed networks only, so there is no
"FP16 builder flag": the graph must already say which ops run in FP16.

Converter choice: NVIDIA ModelOpt's AutoCast (``modelopt.onnx.autocast``).
 - It is the converter NVIDIA maintains for strongly-typed TensorRT.
 - It keeps listed op types and node-name patterns in FP32 (ours come from the
   ComponentSpec), and additionally keeps any node whose activations, measured
   on a reference run with the spec's sample inputs, exceed the FP16-safe range:
   the overflow that gives black/NaN images in FP16 VAEs is caught from data.
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
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np

from .components import FP32_OP_TYPES, ComponentSpec
from .errors import BackendUnavailable

# tempfile.tempdir is the process's: one conversion at a time points it at its export's scratch
_TEMPDIR_LOCK = threading.Lock()
MODELOPT_INSTALL = "pip install nvidia-modelopt==0.47.0 (a dependency of sdexport: see README, Install)"


def _autocast():
    try:
        from modelopt.onnx.autocast import convert_to_mixed_precision
    except ImportError as exc:
        raise BackendUnavailable(f"FP16 export needs NVIDIA ModelOpt's AutoCast ({exc}); {MODELOPT_INSTALL}") from None
    for name in ("modelopt", "modelopt.onnx", "modelopt.onnx.autocast"):
        logging.getLogger(name).setLevel(logging.ERROR)
        logging.getLogger(name).propagate = False
    return convert_to_mixed_precision


def convert_fp16(onnx_path: Path, spec: ComponentSpec, feed: dict[str, Any], work_dir: Path | None = None):
    """Return an FP16 mixed-precision ModelProto for the FP32 model at ``onnx_path``.

    ``feed`` are the reference inputs AutoCast runs to find overflow-prone nodes. ``work_dir`` takes the
    temporary files, AutoCast's included: for a graph over 2 GB its reference run saves a copy of the whole
    FP32 model (10 GB for the SDXL UNet) in the temporary directory, which belongs in the export's scratch
    (counted by the disk check, removed with the transaction) rather than in /tmp.
    """
    convert = _autocast()
    with _TEMPDIR_LOCK:
        root = logging.getLogger()
        saved_level, saved_tempdir = root.level, tempfile.tempdir
        root.setLevel(logging.ERROR)  # AutoCast reports skipped ops through the root logger
        if work_dir is not None:
            tempfile.tempdir = str(work_dir)
        try:
            with tempfile.TemporaryDirectory() as tmp:
                calib = Path(tmp) / "calib.npz"
                np.savez(calib, **{k: v.cpu().numpy() for k, v in feed.items()})
                return convert(
                    onnx_path=str(onnx_path), low_precision_type="fp16", keep_io_types=True,
                    op_types_to_exclude=list(FP32_OP_TYPES), nodes_to_exclude=list(spec.fp32_node_patterns),
                    calibration_data=str(calib), providers=["cpu"],
                )
        finally:
            root.setLevel(saved_level)
            tempfile.tempdir = saved_tempdir


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
