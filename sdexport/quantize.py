"""INT8 UNet: an explicit Q/DQ ONNX graph for TensorRT's strongly-typed builder.

``sdexport quantize OUT --calib calib.npz --precision int8`` turns the FP32 UNet of an
export (``OUT/unet/model.onnx``) into ``OUT/unet_int8/model.onnx``:

- symmetric INT8 (every zero-point is 0); weights per output channel (a DequantizeLinear
  on an INT8 initializer, ``axis`` = the output-channel axis: 0 for Conv and for Gemm with
  ``transB=1``, 1 for MatMul and Gemm without); activations per tensor (scalar scale);
- Q/DQ only on the inputs of Conv, MatMul and Gemm, the placement TensorRT fuses into INT8
  kernels; a DequantizeLinear feeds nothing else (``_confine_qdq`` rewires any other consumer,
  e.g. a Shape or a skip-connection Concat, back to the unquantized tensor);
- sensitive layers stay unquantized (``DEFAULT_EXCLUDES``, regexes searched in node names,
  extended with ``--exclude``, dropped with ``--no-default-excludes``);
- everything else FP16, with the FP32 islands of the FP16 export (normalizations, Softmax,
  Resize, the timestep embedding; components.FP32_OP_TYPES and the spec's patterns) and
  FP32 graph inputs/outputs, so the INT8 UNet has the FP32 UNet's interface; opset 19.

Quantizer: NVIDIA ModelOpt's ONNX PTQ (``modelopt.onnx.quantization.quantize``) first. It
knows TensorRT's placement rules (it drops Q/DQ where TensorRT would not fuse it: GEMV-shaped
MatMuls, Convs with channel counts TensorRT has no INT8 kernel for) and it writes INT8
weights with DQ only (``dq_only``). It is run with ``high_precision_dtype="fp32"``; the FP16
step is then ModelOpt's AutoCast with the FP16 export's settings (``_fp16``), because ModelOpt's
own FP16 pass blocks op *types* only and would put the timestep embedding's sin/cos(t x freq) in
FP16.
ModelOpt's INT8 calibration offers max and entropy only. ``percentile`` (and any run where
ModelOpt cannot import or fails here, with ``--quantizer auto``) goes to ONNX Runtime's
``quantize_static`` with the same contract set explicitly: QDQ format, per-channel
symmetric INT8 weights, symmetric activations, no output quantization, the same node list.
Without ModelOpt there is no AutoCast either, and the non-quantized part stays FP32
(recorded in the manifest; TensorRT builds it as FP32).

Input is the FP32 UNet only. An FP16 export is refused rather than re-exported behind the
user's back: INT8 scales must be computed on FP32 activations and weights, and the artifact
the manifest names as the source should be the one quantized (export FP32 with
``--components unet`` to get one).

``int8_report`` is the accuracy section ``sdexport validate`` adds for an export with an
INT8 UNet (see README "INT8").
"""

from __future__ import annotations

import contextlib
import gc
import logging
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .calibration import Calibration, load_calibration
from .errors import BackendUnavailable, IntegrityError, ShapeError, UsageError
from .export import check_io_against_spec, onnx_io
from .export import save_onnx as _save

COMPONENT = "unet_int8"
QUANTIZABLE_OPS = ("Conv", "MatMul", "Gemm")
METHODS = ("max", "entropy", "percentile")
QUANTIZERS = ("auto", "modelopt", "ort")
PERCENTILE = 99.999
# Samples (UNet input rows) a method needs. max tracks extremes; entropy (KL over a histogram)
# and percentile (a histogram tail) estimate distributions and need many more.
MIN_SAMPLES = {"max": 4, "entropy": 32, "percentile": 32}
# Rows per calibration batch fed to the quantizer; a UNet over 2 GB (SD 1.5 and up) gets one guidance
# pair per batch: the calibrator holds every calibrated activation of a batch at once.
BATCH_ROWS = 8
BATCH_ROWS_LARGE = 2
# ModelOpt's INT8 PTQ was killed for memory at 23.2 GiB (anon RSS) quantizing sd15-random's UNet, 3.2 GiB of FP32
# weights (2 CPU cores, 24 GiB, calibration at 256 px): it needs more than this many times the FP32 weights.
MODELOPT_MEMORY_AT_LEAST = 7.2
# ONNX Runtime's quantizer (--quantizer ort) on the same UNet and machine peaked at 5.2 times the FP32 weights
# (16.6 GiB) with calibration at its native 512 px, 3.6 times at 256 px: most of it is one calibration batch's
# activations (benchmarks/results/2026-11-27-cpu-int8-memory/).
ORT_QUANTIZE_MEMORY_PEAK = 5.2

# Layers kept out of INT8 by default: regexes searched (re.search) in ONNX node names.
DEFAULT_EXCLUDES: tuple[tuple[str, str], ...] = (
    (r"time_embedding", "timestep MLP: one row per image, carries all of the conditioning on t"),
    (r"time_emb_proj", "per-resnet projection of the time embedding: GEMV-shaped, nothing to gain"),
    (r"(^|/)conv_in/", "first conv: raw latents in, 4 channels"),
    (r"(^|/)conv_out/", "last conv: its output is the noise prediction itself"),
    (r"conv_shortcut", "1x1 residual-path convs: their error adds straight into the skip path"),
    (r"/attn\d*/MatMul(_\d+)?$", "attention score matmuls Q.K^T and softmax.V (activation x activation)"),
)

# INT8 validation (``int8_report``): fixed prompts and seeds, run through the FP32 and INT8 pipelines.
REPORT_CASES = (("a red fox in fresh snow, morning light, telephoto photograph", 11),
                ("watercolor of a lighthouse on a cliff above a stormy sea", 22))
REPORT_STEPS = 20
REPORT_TIMESTEPS = (950, 500, 50)  # fractions of num_train_timesteps when that is not 1000
REPORT_GUIDANCE = 7.5
REPORT_FP16 = True  # also compare an FP16 UNet (the export's, or one AutoCast makes for the report)
# Pass/fail of the INT8 report; documented in README "INT8".
INT8_REPORT_THRESHOLDS = {
    "unet_rel_l2": 0.15,           # maximum, every timestep: INT8 UNet vs FP32 PyTorch UNet
    "final_latent_rel_l2": 0.20,   # maximum, every prompt/seed, after the whole loop
    "image_psnr_db": 30.0,         # minimum, every prompt/seed
    "image_ssim": 0.95,            # minimum, every prompt/seed
}


# --- node selection ---------------------------------------------------------------------
def exclude_patterns(exclude: tuple[str, ...] | list[str] = (), default_excludes: bool = True,
                     family_excludes: tuple[tuple[str, str], ...] = ()) -> list[str]:
    """The default exclusions (those every UNet has, then the model family's own: ``Family.int8_excludes``),
    then the user's."""
    patterns = [p for p, _ in DEFAULT_EXCLUDES + tuple(family_excludes)] if default_excludes else []
    for p in exclude:
        try:
            re.compile(p)
        except re.error as exc:
            raise UsageError(f"--exclude {p!r}: not a regular expression ({exc})") from None
        if p not in patterns:
            patterns.append(p)
    return patterns


def select_nodes(model, patterns: list[str], user_patterns: tuple[str, ...] | list[str] = ()) -> tuple[
        list[str], dict[str, str]]:
    """(compute nodes to quantize, {excluded node: the pattern that excluded it})."""
    compute = [n.name for n in model.graph.node if n.op_type in QUANTIZABLE_OPS]
    excluded: dict[str, str] = {}
    for name in compute:
        for p in patterns:
            if re.search(p, name):
                excluded[name] = p
                break
    for p in user_patterns:
        if not any(re.search(p, name) for name in compute):
            raise UsageError(f"--exclude {p!r} matches no Conv/MatMul/Gemm node of the UNet graph")
    return [n for n in compute if n not in excluded], excluded


# --- calibration file against the export --------------------------------------------------
def _unlike(names: list[str], spec) -> tuple[list[str], list[str]]:
    """A calibration file's UNet input ``names`` against the export's UNet: (the inputs it lacks, the names it
    has beyond them)."""
    return [n for n in spec.input_names if n not in names], [n for n in names if n not in spec.input_names]


def _described(model: dict) -> str:
    """'sdxl model /models/x (weights 0123456789ab…)' from a calibration file's or a manifest's model record."""
    family = model.get("family") or "?"
    return f"{family} model {model.get('preset') or model.get('path')} (weights {str(model['weights_sha256'])[:12]}…)"


def check_source(path: Path, meta: dict, headers: dict, spec, export) -> None:
    """Refuse, from its meta record and .npy headers alone, a calibration file captured from another model than
    the export's: one line naming both models and, where their UNets differ, the first input that does
    (names the file lacks or has beyond the export's UNet, then a fixed size). Either direction between
    families, and any other model of one family, are the same refusal."""
    from .calibration import INDEX_ARRAYS

    want = export.manifest.data["model"]
    got = meta["model"]
    if got["weights_sha256"] == want["weights_sha256"]:
        return
    missing, extra = _unlike([k for k in headers if k != "meta" and k not in INDEX_ARRAYS], spec)
    differs = ""
    if missing:
        differs = f"; it has no {', '.join(missing)}"
    elif extra:
        differs = f"; it has {', '.join(extra)}, which the export's UNet does not take"
    else:
        for t in spec.inputs:
            shape = headers[t.name][0][1:]
            if len(shape) != len(t.dims) - 1 or any(isinstance(d, int) and d != s for s, d in zip(shape, t.dims[1:])):
                differs = f"; its '{t.name}' is {tuple(shape)} a sample, the export's UNet takes {list(t.dims)}"
                break
    source = dict(got, family=meta.get("family"))
    raise IntegrityError(f"{path} was captured from {_described(source)}, not from the model of {export.root} "
                         f"({_described(want)}){differs}; run 'sdexport calibrate' on that model")


def check_calibration(calib: Calibration, spec, export) -> None:
    """Refuse a calibration file at shapes the export lacks (``check_source`` has refused those of another model)."""
    where = calib.path
    missing, extra = _unlike(calib.input_names, spec)
    if missing or extra:
        raise IntegrityError(f"{where}: has {'no ' + ', '.join(missing) if missing else ', '.join(extra)}, unlike "
                             f"the UNet of {export.root} ({spec.input_names}); run 'sdexport calibrate' on that model")
    for t in spec.inputs:
        arr = calib.arrays[t.name]
        if arr.dtype != np.dtype(t.dtype):
            raise IntegrityError(f"{where}: '{t.name}' is {arr.dtype}; the UNet takes {t.dtype} "
                                 "(re-run 'sdexport calibrate')")
        if arr.ndim != len(t.dims):
            raise ShapeError(f"{where}: '{t.name}' has rank {arr.ndim - 1} per sample (shape {tuple(arr.shape)}); "
                             f"the UNet takes {t.dims}")
        dims: dict[str, int] = {}
        for axis, (size, dim) in enumerate(zip(arr.shape[1:], t.dims[1:]), 1):
            if isinstance(dim, int) and size != dim:
                what = f"{size} channels" if t.name == "sample" and axis == 1 else f"size {size} in dimension {axis}"
                raise ShapeError(f"{where}: '{t.name}' has {what} (per-sample shape {tuple(arr.shape[1:])}); "
                                 f"the UNet of {export.root} takes {dim} ({list(t.dims)})")
            if isinstance(dim, str):
                dims[dim] = size
        for name, size in dims.items():
            spec.axes[name].check(size, f"{where}: '{t.name}'")
    if len(calib.arrays["sample"]) == 0:
        raise UsageError(f"{where}: holds no samples")


# --- graph edits and checks ---------------------------------------------------------------
def _confine_qdq(model, excluded: set[str]) -> int:
    """Leave activation Q/DQ only where a quantized Conv/MatMul/Gemm reads it.

    Quantizers share one Q/DQ pair among all readers of a tensor, so a Shape, a Concat or an
    excluded Conv reading the same tensor would read the quantized value. Those readers are
    pointed back at the unquantized tensor; Q/DQ nodes left without readers are removed.
    Returns the number of rewired inputs.
    """
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    outputs = {o.name for o in graph.output}
    rewired = 0
    for dq in [n for n in graph.node if n.op_type == "DequantizeLinear"]:
        q = producer.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear":
            continue
        for node in graph.node:
            if node.op_type in QUANTIZABLE_OPS and node.name not in excluded:
                continue
            for i, name in enumerate(node.input):
                if name == dq.output[0]:
                    node.input[i] = q.input[0]
                    rewired += 1
    while True:  # drop Q/DQ nodes nobody reads
        read = {i for n in graph.node for i in n.input} | outputs
        dead = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                and not any(o in read for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    used = {i for n in graph.node for i in n.input}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)
    return rewired


def _weight_axis(node) -> int:
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    return 1  # MatMul: B is [K, N]


def qdq_summary(model, excluded: set[str] | dict[str, str] = ()) -> dict[str, Any]:
    """Counts of the Q/DQ structure, and every violation of the INT8 contract (module docstring)."""
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    readers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    problems: list[str] = []
    FP16, INT8 = onnx.TensorProto.FLOAT16, onnx.TensorProto.INT8

    def const(name):
        return numpy_helper.to_array(inits[name]) if name in inits else None

    counts = {"QuantizeLinear": 0, "DequantizeLinear": 0, "weight_dq": 0, "activation_dq": 0}
    quantized = {op: 0 for op in QUANTIZABLE_OPS}
    for n in graph.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        counts[n.op_type] += 1
        scale = inits.get(n.input[1])
        zp = const(n.input[2]) if len(n.input) > 2 else None
        if scale is None:
            problems.append(f"{n.name}: scale is not an initializer")
            continue
        if scale.data_type != FP16:
            problems.append(f"{n.name}: scale is not FP16")
        if zp is None or inits[n.input[2]].data_type != INT8 or np.any(zp != 0):
            problems.append(f"{n.name}: zero-point is not an INT8 zero")
        if n.op_type == "QuantizeLinear":
            if len(scale.dims) != 0:
                problems.append(f"{n.name}: activation scale is not a scalar")
            continue
        users = readers.get(n.output[0], [])
        for u in users:
            if u.op_type not in QUANTIZABLE_OPS or u.name in excluded:
                problems.append(f"{n.name}: feeds {u.op_type} {u.name}")
        if n.input[0] in inits:
            counts["weight_dq"] += 1
            w = inits[n.input[0]]
            if w.data_type != INT8:
                problems.append(f"{n.name}: weight is not INT8")
            axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
            for u in users:
                want = _weight_axis(u)
                if axis != want or list(scale.dims) != [w.dims[want]]:
                    problems.append(f"{n.name}: weight scale {list(scale.dims)} on axis {axis}; "
                                    f"{u.op_type} needs per-channel scales on axis {want} ({w.dims[want]})")
        else:
            counts["activation_dq"] += 1
            src = producer.get(n.input[0])
            if src is None or src.op_type != "QuantizeLinear":
                problems.append(f"{n.name}: activation DQ not fed by a QuantizeLinear")
            if len(scale.dims) != 0:
                problems.append(f"{n.name}: activation scale is not a scalar")
    for n in graph.node:
        if n.op_type not in QUANTIZABLE_OPS:
            continue
        fed = [producer.get(i) is not None and producer[i].op_type == "DequantizeLinear" for i in n.input[:2]]
        if any(fed):
            quantized[n.op_type] += 1
            if not all(fed):
                problems.append(f"{n.name}: only some of its inputs are quantized")
            if n.name in excluded:
                problems.append(f"{n.name}: excluded but quantized")
    opset = max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if opset < 19:
        problems.append(f"opset {opset} < 19")
    return {"qdq_nodes": {"QuantizeLinear": counts["QuantizeLinear"], "DequantizeLinear": counts["DequantizeLinear"]},
            "weight_dq": counts["weight_dq"], "activation_dq": counts["activation_dq"],
            "quantized_nodes": quantized, "opset": opset, "problems": problems}


# --- quantizer backends ---------------------------------------------------------------------
class _Reader:
    """A calibration data reader over in-memory batches (ONNX Runtime's and ModelOpt's protocol)."""

    def __init__(self, batches: list[dict[str, np.ndarray]]):
        self.batches = batches
        self.it = iter(batches)

    def get_next(self):
        return next(self.it, None)

    def get_first(self):
        return self.batches[0]

    def rewind(self):
        self.it = iter(self.batches)

    def __len__(self):
        return len(self.batches)


@contextlib.contextmanager
def _quiet():
    """ModelOpt and ONNX Runtime's quantizer log through the root logger and print; keep the CLI output ours."""
    import io
    import warnings

    names = ("", "modelopt", "modelopt.onnx")
    levels = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):  # their tqdm bars and prints
            warnings.simplefilter("ignore")
            yield
    finally:
        for n, level in levels.items():
            logging.getLogger(n).setLevel(level)


def _modelopt():
    try:
        from modelopt.onnx.quantization import quantize as mo_quantize
    except Exception as exc:  # ImportError, or a dependency that fails at import
        raise BackendUnavailable(f"NVIDIA ModelOpt's ONNX quantizer cannot be imported ({str(exc)[:160]}); "
                                 "pip install nvidia-modelopt==0.47.0 (a dependency of sdexport: see README, Install)") from None
    return mo_quantize


@contextlib.contextmanager
def _contain_ort_patches():
    """ModelOpt monkey-patches ONNX Runtime's calibrators and quantizer classes when it runs (ort_patching.py)
    and leaves them patched; afterwards ORT's own quantize_static no longer calibrates anything in this
    process. Snapshot those classes and put them back when ModelOpt returns."""
    from onnxruntime.quantization import base_quantizer, calibrate, qdq_quantizer

    owners = [calibrate.CalibraterBase, calibrate.MinMaxCalibrater, calibrate.HistogramCalibrater,
              calibrate.HistogramCollector, qdq_quantizer.QDQQuantizer, base_quantizer.BaseQuantizer]
    saved = [(owner, dict(vars(owner))) for owner in owners]
    create_calibrator = calibrate.create_calibrator
    try:
        yield
    finally:
        for owner, attrs in saved:
            for name in set(vars(owner)) - set(attrs):
                delattr(owner, name)
            for name, value in attrs.items():
                if vars(owner).get(name) is not value and name not in ("__dict__", "__weakref__", "__doc__"):
                    setattr(owner, name, value)
        calibrate.create_calibrator = create_calibrator


def _run_modelopt(src: Path, out: Path, batches, method: str, excluded: dict[str, str], large: bool) -> None:
    import onnxruntime as ort

    mo_quantize = _modelopt()
    # Calibration runs the FP32 graph over every batch: on a GPU host (onnxruntime-gpu) that is ModelOpt's
    # CUDA EP, minutes faster for SD 1.5; the ranges it observes are the same activations.
    eps = ["cuda:0", "cpu"] if "CUDAExecutionProvider" in ort.get_available_providers() else ["cpu"]
    if len(eps) > 1 and hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    with _quiet(), _contain_ort_patches():
        mo_quantize(
            onnx_path=str(src), quantize_mode="int8", calibration_method=method,
            calibration_data_reader=_Reader(batches), calibration_eps=eps,
            op_types_to_quantize=list(QUANTIZABLE_OPS),
            nodes_to_exclude=[re.escape(n) + "$" for n in excluded],
            high_precision_dtype="fp32", dq_only=True, use_external_data_format=large,
            output_path=str(out), log_level="CRITICAL")


def _calibrated_ranges(src: Path, work: Path, batches, method, large: bool,
                       tensors: set[str] | None = None) -> dict[str, tuple[float, float]]:
    """Activation ranges from ONNX Runtime's calibrator (MinMax, entropy or percentile), one batch at a time.

    ``quantize_static`` would hand its calibrator the whole reader: the histogram calibrators keep every
    calibrated activation of every batch in memory before building histograms (13.8 GB peak for the tiny
    UNet and 512 samples), and MinMax's only bound on memory, ``CalibMaxIntermediateOutputs``, drops the
    batches it holds without folding them into the ranges in ONNX Runtime 1.31 (every 4th batch clears
    the rest; a multiple of 4 batches ends in "No data is collected"). Here each batch is folded into the
    ranges (MinMax: ``compute_data`` merges; histograms: ``collect_data`` folds) and dropped, so memory
    stays at one batch and every batch counts.

    ``tensors``: calibrate only these (the activation inputs of the nodes to quantize). ONNX Runtime's
    calibrator otherwise takes the inputs and outputs of every Conv/MatMul/Gemm, the excluded attention
    score matmuls' among them: for sd15-random's UNet and one 512 px batch of 2 rows, 670 tensors and a
    19.6 GiB peak, against 198 tensors and 9.7 GiB (ONNX Runtime alone runs that batch in 4.5 GiB)."""
    from onnxruntime.quantization.calibrate import (CalibrationMethod, EntropyCalibrater, MinMaxCalibrater,
                                                    PercentileCalibrater)

    common = {"op_types_to_calibrate": list(QUANTIZABLE_OPS), "augmented_model_path": str(work / "augmented.onnx"),
              "use_external_data_format": large, "symmetric": True}
    calibrator = {CalibrationMethod.MinMax: lambda: MinMaxCalibrater(str(src), **common),
                  CalibrationMethod.Entropy: lambda: EntropyCalibrater(str(src), **common),
                  CalibrationMethod.Percentile: lambda: PercentileCalibrater(str(src), **common,
                                                                             percentile=PERCENTILE)}[method]()
    if tensors is not None:
        select = calibrator.select_tensors_to_calibrate  # ONNX Runtime's choice (float, not a weight), narrowed

        def narrowed(model):
            chosen, value_infos = select(model)
            return chosen & tensors, value_infos

        calibrator.select_tensors_to_calibrate = narrowed
    calibrator.augment_graph()
    calibrator.execution_providers = ["CPUExecutionProvider"]
    calibrator.create_inference_session()
    for batch in batches:
        calibrator.collect_data(_Reader([batch]))
        if method == CalibrationMethod.MinMax:
            calibrator.compute_data()
            calibrator.clear_collected_data()
    ranges = calibrator.compute_data()
    return {name: (float(np.asarray(r.range_value[0]).min()), float(np.asarray(r.range_value[1]).max()))
            for name, r in ranges.items()}


def _ort_qdq_settings(to_quantize: list[str], excluded: dict[str, str], large: bool) -> dict[str, Any]:
    """``quantize_static``'s arguments for sdexport's Q/DQ contract, all but the model, the data and the ranges:
    symmetric INT8 (weights per channel), no output quantization, the given node list."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType

    return {"quant_format": QuantFormat.QDQ, "op_types_to_quantize": list(QUANTIZABLE_OPS),
            "nodes_to_quantize": to_quantize, "nodes_to_exclude": list(excluded), "per_channel": True,
            "activation_type": QuantType.QInt8, "weight_type": QuantType.QInt8,
            "calibrate_method": CalibrationMethod.MinMax, "use_external_data_format": large,
            "extra_options": {"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False,
                              "DedicatedQDQPair": False, "OpTypesToExcludeOutputQuantization": list(QUANTIZABLE_OPS),
                              "CalibTensorRangeSymmetric": True, "QDQOpTypePerChannelSupportToAxis": {"Conv": 0}}}


def _run_ort(src: Path, out: Path, batches, method: str, to_quantize: list[str], excluded: dict[str, str],
             large: bool, small_feed: dict[str, np.ndarray]) -> None:
    """ONNX Runtime's ``quantize_static`` with sdexport's ranges as per-tensor overrides. Its own calibration
    pass, which cannot be skipped, sees ``small_feed`` (one image at the smallest size: memory) where every
    range it would measure is overridden, and the first calibration batch where one is not."""
    from onnxruntime.quantization import CalibrationMethod, quantize_static

    settings = _ort_qdq_settings(to_quantize, excluded, large)
    with _quiet():
        import onnx

        graph = onnx.load(str(src), load_external_data=False).graph
        weights = {i.name for i in graph.initializer}
        chosen = set(to_quantize)
        wanted = {i for n in graph.node if n.name in chosen for i in n.input[:2] if i and i not in weights}
        # Every method's ranges are computed batch by batch, for the wanted tensors only, and handed to
        # quantize_static as per-tensor overrides.
        calibration = {"max": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                       "percentile": CalibrationMethod.Percentile}[method]
        ranges = _calibrated_ranges(src, out.parent, batches, calibration, large, tensors=wanted)
        settings["extra_options"]["TensorQuantOverrides"] = {
            name: [{"rmin": np.float32(lo), "rmax": np.float32(hi)}] for name, (lo, hi) in ranges.items()}
        own_pass = [small_feed] if wanted <= set(ranges) else batches[:1]
        quantize_static(str(src), str(out), _Reader(own_pass), **settings)


def _quantizer_name(which: str) -> str:
    from importlib import metadata

    if which == "modelopt":
        return f"modelopt.onnx.quantization {metadata.version('nvidia-modelopt')}"
    return f"onnxruntime.quantization.quantize_static {metadata.version('onnxruntime')}"


# --- the command ----------------------------------------------------------------------------
def quantize(export_dir: str | Path, calib: str | Path, precision: str = "int8", method: str = "max",
             quantizer: str = "auto", exclude: tuple[str, ...] | list[str] = (), default_excludes: bool = True,
             force: bool = False, say: Callable[[str], None] = lambda msg: None) -> dict[str, Any]:
    """Write ``OUT/unet_int8`` from the export's FP32 UNet and a calibration file; returns its manifest entry."""
    from .manifest import writing
    from .runtime import ExportDir

    if precision != "int8":
        raise UsageError(f"--precision {precision}: only int8 is supported")
    if method not in METHODS:
        raise UsageError(f"--calibration-method {method}: choose {', '.join(METHODS)}")
    if quantizer not in QUANTIZERS:
        raise UsageError(f"--quantizer {quantizer}: choose {', '.join(QUANTIZERS)}")
    if quantizer == "modelopt" and method == "percentile":
        raise UsageError("--calibration-method percentile: ModelOpt's INT8 calibration has max and entropy only; "
                         "use --quantizer ort (or auto) for percentile")
    from .paths import check_quantize_outputs

    check_quantize_outputs(export_dir, calib)
    with writing(export_dir, "quantize", say, create=False) as txn:
        export = ExportDir.open(export_dir)
        export.manifest = txn.manifest
        entry = _quantize(export, txn, calib, method, quantizer, exclude, default_excludes, force, say)
        if not entry.get("up_to_date"):
            txn.commit()
        return entry


def _quantize(export, txn, calib, method, quantizer, exclude, default_excludes, force, say) -> dict[str, Any]:
    import onnx

    from . import __version__
    from .manifest import sha256_file, versions

    out = export.root
    source = export.manifest.component("unet")
    dtype = source["precision"]["dtype"]
    if dtype != "fp32":
        raise UsageError(f"{out}/unet is a {dtype} export; INT8 quantization starts from the FP32 UNet: export it "
                         f"with --dtype fp32 (e.g. 'sdexport export MODEL -o OUT32 --components unet') and quantize that")
    # auto: ModelOpt, but ONNX Runtime for percentile (ModelOpt's INT8 calibration has none)
    planned = "ort" if quantizer == "auto" and method == "percentile" else quantizer
    spec = export.spec("unet")
    # the file's source model first, from its meta record and headers: before any array or the UNet is read
    calibration = load_calibration(calib, lambda meta, headers: check_source(Path(calib), meta, headers, spec, export))
    check_calibration(calibration, spec, export)
    src = export.manifest.verified_path(source)
    need = MIN_SAMPLES[method]
    if calibration.samples < need:
        raise UsageError(f"--calibration-method {method} needs at least {need} samples; {calibration.path} has "
                         f"{calibration.samples} (re-run calibrate with more prompts or steps, or use "
                         f"{'max' if method != 'max' else 'more prompts'})")
    header = onnx.load(str(src), load_external_data=False)
    qdq = sum(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in header.graph.node)
    if qdq:
        raise IntegrityError(f"{src}: already quantized ({qdq} QuantizeLinear/DequantizeLinear nodes); quantize "
                             "takes the FP32 UNet of an FP32 export")
    patterns = exclude_patterns(exclude, default_excludes, export.family.int8_excludes)
    to_quantize, excluded = select_nodes(header, patterns, exclude)
    if not to_quantize:
        raise UsageError("the exclude patterns leave no Conv/MatMul/Gemm node to quantize")

    key = {"source_sha256": source["sha256"], "calib_sha256": calibration.sha256, "method": method,
           "quantizer": quantizer, "excludes": patterns, "sdexport": __version__}
    old = export.manifest.components.get(COMPONENT)
    if not force and old and old.get("key") == key:
        with contextlib.suppress(IntegrityError):
            export.manifest.verified_path(old)
            say(f"{COMPONENT}: up to date ({old['file']}), not re-quantized")
            return {**old, "up_to_date": True}

    large = bool(source.get("external_data"))
    from .limits import check_disk, check_memory, human_bytes

    size = source.get("size_bytes", 0)
    if planned in ("auto", "modelopt"):  # after the up-to-date test: a quantize with nothing to do is not refused
        check_memory(f"quantizing {out}/unet with ModelOpt ({human_bytes(size)} of FP32 weights)",
                     MODELOPT_MEMORY_AT_LEAST * size, "it was killed for memory at 7.2 times the weights: quantize "
                     f"on a machine with more memory, or try --quantizer ort, which peaked at "
                     f"{ORT_QUANTIZE_MEMORY_PEAK:g} times", share=1.0, at_least=True)
    else:
        check_memory(f"quantizing {out}/unet with ONNX Runtime ({human_bytes(size)} of FP32 weights)",
                     ORT_QUANTIZE_MEMORY_PEAK * size, f"its peak was {ORT_QUANTIZE_MEMORY_PEAK:g} times the weights "
                     "for SD 1.5 calibrated at 512 px: quantize on a machine with more memory", share=1.0)

    # The work copy of the FP32 UNet, the quantizer's FP32 Q/DQ graph (weights INT8 or FP32) and the result.
    check_disk(out, 2.5 * source.get("size_bytes", src.stat().st_size), f"quantizing {src}")
    batches = calibration.batches(BATCH_ROWS_LARGE if large else BATCH_ROWS)
    t0 = time.perf_counter()
    final_dir = out / COMPONENT
    tmp = txn.stage(COMPONENT, folder=True)
    work = txn.scratch("int8-work")  # inside the export (same disk as the artifacts), gone with the transaction
    if True:
        # The quantizers write intermediate files beside their input: give them a copy, not the export.
        # A copy, not a link: onnx refuses external data behind a symbolic link or with several hard links.
        linked = work / "unet.onnx"
        shutil.copyfile(src, linked)
        for extra in source.get("external_data", []):
            shutil.copyfile(out / extra["file"], work / Path(extra["file"]).name)
        raw = work / "qdq_fp32.onnx"
        used, fallback_reason = "modelopt" if planned == "auto" else planned, None
        if quantizer == "auto" and planned == "ort":
            fallback_reason = "ModelOpt's INT8 calibration has no percentile method"
        # One count for both quantizers' lines: every Conv/MatMul/Gemm of the graph, split as select_nodes split it
        # (the result line's "N excluded" is the same len(excluded); its INT8 counts are what the quantizer did).
        counts = (f"{len(to_quantize) + len(excluded)} Conv/MatMul/Gemm nodes, {len(to_quantize)} to quantize, "
                  f"{len(excluded)} excluded")
        if used == "modelopt":
            say(f"{COMPONENT}: ModelOpt INT8 PTQ ({method} calibration, {calibration.samples} samples, {counts})")
            try:
                _run_modelopt(linked, raw, batches, method, excluded, large)
            except Exception as exc:
                if quantizer != "auto" and isinstance(exc, BackendUnavailable):
                    raise
                if quantizer != "auto":
                    reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
                    raise BackendUnavailable(f"ModelOpt's INT8 quantizer failed here ({reason}); try --quantizer ort")\
                        from None
                fallback_reason = f"ModelOpt failed here ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})" \
                    if str(exc) else f"ModelOpt failed here ({type(exc).__name__})"
                say(f"warning: {fallback_reason}; falling back to ONNX Runtime's quantize_static")
                used = "ort"
        if used == "ort":
            say(f"{COMPONENT}: ONNX Runtime quantize_static ({method} calibration, {calibration.samples} samples, "
                f"{counts})")
            small = {k: v.numpy() for k, v in spec.sample_inputs(spec.min_dims(), seed=0).items()}
            _run_ort(linked, raw, batches, method, to_quantize, excluded, large, small)
        model = onnx.load(str(raw))
        rewired = _confine_qdq(model, set(excluded))
        confined = work / "qdq_confined.onnx"
        _save(model, confined)  # external data past 2 GB, like every other artifact
        del model
        gc.collect()  # the quantizer's sessions and the FP32 graph: give the memory back before AutoCast
        high = "fp16"
        try:
            say(f"{COMPONENT}: FP16 for everything else (ModelOpt AutoCast; FP32 islands as in the FP16 export)")
            model = _fp16(confined, spec, work_dir=work, say=say, graph=QDQ_GRAPH)
        except BackendUnavailable as exc:
            high = "fp32"
            say(f"warning: {exc}; the non-quantized part of the INT8 UNet stays FP32")
            model = _upgrade_opset(onnx.load(str(confined)))
        final_path = tmp / "model.onnx"
        external = _save(model, final_path)
        onnx.checker.check_model(str(final_path), full_check=True)
        model = onnx.load(str(final_path))
        summary = qdq_summary(model, excluded)
        if high == "fp32":
            summary["problems"] = [p for p in summary["problems"] if "not FP16" not in p]
        if summary["problems"]:
            raise IntegrityError(f"{COMPONENT}: the quantized graph breaks the Q/DQ contract: "
                                 f"{'; '.join(summary['problems'][:3])}")
        io = onnx_io(model)
        check_io_against_spec(io, spec, str(final_dir / "model.onnx"))
        _smoke_run(final_path, batches[0])
        shutil.copy(out / "unet" / "config.json", tmp / "config.json")
        config_entry = {"file": f"{COMPONENT}/config.json", "sha256": sha256_file(tmp / "config.json")}
        from .precision import precision_summary

        dq_outputs = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
        quantized_names = {n.name for n in model.graph.node
                           if n.op_type in QUANTIZABLE_OPS and any(i in dq_outputs for i in n.input[:2])}
        left_out = [n for n in to_quantize if n not in quantized_names]
        entry = {
            "file": f"{COMPONENT}/model.onnx",
            "sha256": sha256_file(final_path),
            "external_data": [{"file": f"{COMPONENT}/{n}", "sha256": sha256_file(tmp / n)} for n in external],
            "files": [config_entry],
            "size_bytes": final_path.stat().st_size + sum((tmp / n).stat().st_size for n in external),
            "opset": summary["opset"],
            "nodes": len(model.graph.node),
            "precision": {
                "dtype": "int8", "quantizer": _quantizer_name(used), "requested_quantizer": quantizer,
                **({"fallback_reason": fallback_reason} if fallback_reason else {}),
                "calibration_method": method, **({"percentile": PERCENTILE} if method == "percentile" else {}),
                "weights": "int8 symmetric, per output channel", "activations": "int8 symmetric, per tensor",
                "qdq_on_inputs_of": list(QUANTIZABLE_OPS), "high_precision_dtype": high,
                "excluded_patterns": patterns, "excluded_nodes": sorted(excluded),
                "left_out_by_quantizer": left_out, "quantized_nodes": summary["quantized_nodes"],
                "qdq_nodes": summary["qdq_nodes"], "weight_dq": summary["weight_dq"],
                "activation_dq": summary["activation_dq"], "rewired_non_compute_readers": rewired,
                **({k: v for k, v in precision_summary(model).items()} if high == "fp16" else {}),
            },
            **io,
            **{k: v for k, v in spec.to_json().items() if k not in ("inputs", "outputs")},
            "variant_of": "unet",
            "calibration": {"file": str(calibration.path.resolve()), "sha256": calibration.sha256,
                            "samples": calibration.samples, "rows_seen": calibration.meta.get("rows_seen"),
                            "settings": calibration.meta.get("settings", {})},
        }
    entry["key"] = key
    entry["source"] = {"component": "unet", "file": source["file"], "sha256": source["sha256"],
                       **{k: v for k, v in source.get("source", {}).items()}}
    entry["versions"] = versions()
    entry["quantize_seconds"] = round(time.perf_counter() - t0, 2)
    export.manifest.components[COMPONENT] = entry
    export.manifest.engines.pop(COMPONENT, None)
    q = summary["quantized_nodes"]
    say(f"{COMPONENT}: wrote {entry['file']} ({entry['size_bytes'] / 2**20:.1f} MiB, {entry['quantize_seconds']} s): "
        f"INT8 Conv {q['Conv']}, MatMul {q['MatMul']}, Gemm {q['Gemm']}; {len(excluded)} excluded, "
        f"{len(left_out)} left out by {used}")
    return entry


# How the FP16 conversion's lines name the two graphs it converts for INT8: they are not the same graph (the
# quantizer's pre-processing drops no-op nodes such as SDXL's float-to-float Cast of time_ids), so the count of
# nodes kept FP32 on the same reference inputs may differ by such a node.
QDQ_GRAPH = f"{COMPONENT} (the Q/DQ graph)"
FP16_COMPARISON_GRAPH = "unet (the export's FP32 UNet, made FP16 for the comparison)"


def _fp16(path: Path, spec, work_dir: Path | None = None, say=lambda msg: None, graph: str | None = None):
    """The FP16 export's conversion (precision.convert_fp16: AutoCast with the same FP32 op types and node
    patterns, FP32 I/O, and nodes whose values leave the FP16-safe range on sdexport's reference run, one image
    at the smallest size of the range, kept FP32) applied to ``path``: the Q/DQ graph, or an FP32 UNet. The
    reference run reads the weights once, so it runs for a UNet of any size (ModelOpt's own held several
    copies of the weights and every activation: it was killed at 24 GB on SD 1.5, and was therefore off for a
    UNet over 2 GB)."""
    import sys
    import threading

    from . import precision

    stderr, lock = sys.stderr, threading.Lock()

    def through(msg: str) -> None:  # progress reaches the terminal that _quiet hides AutoCast's output from
        with lock, contextlib.redirect_stderr(stderr):
            say(msg)

    with _quiet():
        return precision.convert_fp16(path, spec, work_dir=work_dir, say=through, graph=graph)


def _upgrade_opset(model):
    """Without AutoCast (which sets opset 19), bring the Q/DQ graph to opset 19 ourselves."""
    from onnx import version_converter

    opset = max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if opset >= 19:
        return model
    try:
        return version_converter.convert_version(model, 19)
    except Exception as exc:  # the converter raises plain RuntimeErrors
        raise BackendUnavailable(f"cannot bring the Q/DQ graph to opset 19 without ModelOpt ({exc}); "
                                 "pip install nvidia-modelopt==0.47.0") from None


def _smoke_run(path: Path, feed: dict[str, np.ndarray]) -> None:
    """Run the written graph once in ONNX Runtime (CPU) on calibration inputs: it must load and be finite."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        out = session.run(None, {k: v[:2] for k, v in feed.items()})[0]
    except Exception as exc:
        raise IntegrityError(f"{path}: ONNX Runtime cannot run the INT8 UNet ({str(exc).splitlines()[0][:200]})") \
            from None
    if not np.isfinite(out).all():
        raise IntegrityError(f"{path}: the INT8 UNet produces NaN/Inf on calibration inputs")


# --- accuracy report (sdexport validate) ------------------------------------------------------
def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(data_range ** 2 / mse))


def _gaussian_filter_valid(x: np.ndarray, window: np.ndarray) -> np.ndarray:
    """Separable 'valid' filtering of the first two axes of ``x`` with the 1-D ``window``."""
    k = len(window)
    h, w = x.shape[:2]
    rows = sum(window[i] * x[i:h - k + 1 + i] for i in range(k))
    return sum(window[i] * rows[:, i:w - k + 1 + i] for i in range(k))


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 1.0, sigma: float = 1.5, radius: int = 5,
         k1: float = 0.01, k2: float = 0.03) -> float:
    """Structural similarity (Wang et al. 2004): Gaussian window (sigma 1.5, 11 x 11), K1 0.01, K2 0.03,
    population statistics, mean of the SSIM map over the valid region and over channels.

    ``a``, ``b``: (H, W) or (H, W, C) images with values spanning ``data_range``.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"ssim: shapes differ {a.shape} vs {b.shape}")
    if min(a.shape[:2]) < 2 * radius + 1:
        raise ValueError(f"ssim: images must be at least {2 * radius + 1} px on each side")
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    window = np.exp(-(x ** 2) / (2 * sigma ** 2))
    window /= window.sum()
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    mu_a, mu_b = _gaussian_filter_valid(a, window), _gaussian_filter_valid(b, window)
    var_a = _gaussian_filter_valid(a * a, window) - mu_a ** 2
    var_b = _gaussian_filter_valid(b * b, window) - mu_b ** 2
    cov = _gaussian_filter_valid(a * b, window) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return float(ssim_map.mean())


def _onnx_unet(spec, path: Path, device: str = "cpu"):
    """An Engine over an ONNX UNet that is not in the manifest (the FP16 reference made for the report)."""
    import onnxruntime as ort
    import torch

    from .backends.base import Engine

    class OnnxUNet(Engine):
        backend = "ort"

        def __init__(self):
            super().__init__(spec, device)
            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            providers = ["CPUExecutionProvider"]
            if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
                providers.insert(0, "CUDAExecutionProvider")
            self.session = ort.InferenceSession(str(path), opts, providers=providers)

        def __call__(self, feed):
            self.dims(feed)
            arrays = {t.name: feed[t.name].detach().float().cpu().contiguous().numpy() for t in spec.inputs}
            out = self.session.run(None, arrays)[0]
            return {spec.outputs[0].name: torch.from_numpy(out).to(device)}

    return OnnxUNet()


def _unet_metrics(got: np.ndarray, want: np.ndarray) -> dict[str, float]:
    from .validate import error_metrics

    m = error_metrics(got, want)
    return {"rel_l2_err": m["rel_l2_err"], "max_abs_err": m["max_abs_err"], "max_abs_ref": m["max_abs_ref"],
            "finite": m["finite"]}


def int8_report(export, device: str = "cpu", fp16: bool | None = None, say: Callable[[str], None] = lambda msg: None,
                cases: tuple[tuple[str, int], ...] | None = None, steps: int | None = None) -> dict[str, Any]:
    """INT8 UNet against FP32 (and FP16): UNet outputs at early/middle/late timesteps on inputs the
    FP32 pipeline produced, and whole-pipeline agreement (final latents, image PSNR/SSIM)."""
    import torch

    fp16 = REPORT_FP16 if fp16 is None else fp16
    cases = cases or REPORT_CASES
    steps = steps or REPORT_STEPS

    from .backends import load_engines
    from .backends.ort import OrtEngine
    from .pipeline import Pipeline
    from .validate import show_check

    t0 = time.perf_counter()
    spec = export.spec("unet")
    entry = export.manifest.component(COMPONENT)
    height = width = export.ranges.opt_size
    reference = load_engines(export, "torch", device=device)
    variants: dict[str, Any] = {"int8": OrtEngine(export, COMPONENT, device=device)}
    fp16_how = None
    if fp16:
        unet_entry = export.manifest.component("unet")
        if unet_entry["precision"]["dtype"] == "fp16":
            variants["fp16"] = OrtEngine(export, "unet", device=device, variant="plain")
            fp16_how = "the export's FP16 UNet"
        elif device.startswith("cuda") and "unet" in export.manifest.data.get("ort_cuda", {}):
            variants["fp16"] = OrtEngine(export, "unet", device=device, variant="ort_cuda")
            fp16_how = "the ONNX Runtime-fused FP16 UNet of the export ('sdexport build --backend ort')"
        else:
            variants["fp16"] = _fp16_unet(export, spec, device, say)
            fp16_how = "AutoCast FP16 of the export's FP32 UNet, made for this report"

    # FP32 pipeline runs; record what the UNet sees at every step (the calibration distribution).
    recorded: list[list[tuple[float, dict[str, np.ndarray]]]] = []
    ref_unet = reference["unet"]

    class Recorder:
        spec = ref_unet.spec

        def __call__(self, feed):
            recorded[-1].append((float(feed["timestep"].reshape(-1)[0]),
                                 {k: v.detach().cpu().numpy().copy() for k, v in feed.items()}))
            return ref_unet(feed)

    settings = dict(steps=steps, guidance_scale=REPORT_GUIDANCE, height=height, width=width, batch_size=1)
    ref_pipe = Pipeline({**reference, "unet": Recorder()}, export, device=device, warn=lambda m: None)
    ref_results = []
    for prompt, seed in cases:
        recorded.append([])
        ref_results.append(ref_pipe(prompt, seed=seed, **settings))

    train_steps = int(export.info.scheduler_config.get("num_train_timesteps", 1000))
    targets = [round(t * train_steps / 1000) for t in REPORT_TIMESTEPS]
    unet_rows = []
    for target in targets:
        picks = [min(calls, key=lambda c: abs(c[0] - target)) for calls in recorded]
        feed = {k: np.concatenate([p[1][k] for p in picks]) for k in spec.input_names}
        tensors = {k: torch.from_numpy(v).to(device) for k, v in feed.items()}
        with torch.inference_mode():
            want = ref_unet(tensors)["out_sample"].float().cpu().numpy()
        row = {"target_timestep": target, "timesteps": sorted({p[0] for p in picks}),
               "input_shapes": {k: list(v.shape) for k, v in feed.items()}}
        for name, engine in variants.items():
            got = engine(tensors)["out_sample"].float().cpu().numpy()
            row[name] = _unet_metrics(got, want)
        row["pass"] = bool(row["int8"]["finite"] and row["int8"]["rel_l2_err"] <= INT8_REPORT_THRESHOLDS["unet_rel_l2"])
        unet_rows.append(row)
        extra = f", fp16 rel_l2 {row['fp16']['rel_l2_err']:.2e}" if "fp16" in row else ""
        say(f"{'PASS' if row['pass'] else 'FAIL'} int8 unet   t~{target:<4} {spec.outputs[0].name}: "
            + ("non-finite, " if not row["int8"]["finite"] else "")
            + show_check("rel_l2", row["int8"]["rel_l2_err"], INT8_REPORT_THRESHOLDS["unet_rel_l2"])
            + f"  (max_abs {row['int8']['max_abs_err']:.2e}{extra})")

    pipe_rows = []
    for (prompt, seed), ref in zip(cases, ref_results):
        row = {"prompt": prompt, "seed": seed}
        for name, engine in variants.items():
            pipe = Pipeline({**reference, "unet": engine}, export, device=device, warn=lambda m: None)
            res = pipe(prompt, seed=seed, **settings)
            lat = _unet_metrics(res.latents.float().cpu().numpy(), ref.latents.float().cpu().numpy())
            row[name] = {"final_latent": lat, "image_psnr_db": psnr(res.images[0], ref.images[0]),
                         "image_ssim": ssim(res.images[0], ref.images[0])}
        m = row["int8"]
        th = INT8_REPORT_THRESHOLDS
        row["pass"] = bool(m["final_latent"]["finite"] and m["final_latent"]["rel_l2_err"] <= th["final_latent_rel_l2"]
                           and m["image_psnr_db"] >= th["image_psnr_db"] and m["image_ssim"] >= th["image_ssim"])
        pipe_rows.append(row)
        extra = (f"; fp16 latent rel_l2 {row['fp16']['final_latent']['rel_l2_err']:.2e}, "
                 f"PSNR {row['fp16']['image_psnr_db']:.1f} dB") if "fp16" in row else ""
        say(f"{'PASS' if row['pass'] else 'FAIL'} int8 image  seed {seed:<4} "
            + ("non-finite latent, " if not m["final_latent"]["finite"] else "")
            + ", ".join([show_check("latent rel_l2", m["final_latent"]["rel_l2_err"], th["final_latent_rel_l2"]),
                         show_check("PSNR", m["image_psnr_db"], th["image_psnr_db"], minimum=True, fmt=".1f",
                                    unit=" dB"),
                         show_check("SSIM", m["image_ssim"], th["image_ssim"], minimum=True, fmt=".3f")])
            + extra)
    for engine in list(variants.values()) + list(reference.values()):
        engine.close()
    model = export.manifest.data["model"]
    from .models import PRESETS

    # Presets have seeded random weights; write_preset marks its directories with SDEXPORT_PRESET.txt.
    random_weights = model.get("preset") in PRESETS or (Path(model["path"]) / "SDEXPORT_PRESET.txt").is_file()
    measures = ("agreement between INT8 and FP32 pipelines on random-weight models; not image quality"
                if random_weights else
                "agreement between the INT8 and FP32 pipelines (same prompts, seeds, scheduler); PSNR/SSIM of the "
                "INT8 image against the FP32 image, not image quality on its own")
    passed = all(r["pass"] for r in unet_rows + pipe_rows)
    say(f"      int8: {'PASSED' if passed else 'FAILED'} ({measures}) in {time.perf_counter() - t0:.1f} s")
    return {
        "measures": measures, "random_weights": random_weights, "component": COMPONENT,
        "reference": "PyTorch eager FP32 on the source model (text encoder and VAE are the same FP32 modules in "
                     "every pipeline, so only the UNet differs)",
        "fp16_reference": fp16_how, "quantizer": entry["precision"].get("quantizer"),
        "calibration_method": entry["precision"].get("calibration_method"),
        "settings": {**settings, "scheduler": export.info.scheduler_config.get("_class_name"),
                     "cases": [{"prompt": p, "seed": s} for p, s in cases]},
        "thresholds": INT8_REPORT_THRESHOLDS, "unet": unet_rows, "pipeline": pipe_rows, "passed": passed,
        "seconds": round(time.perf_counter() - t0, 2),
    }


def _fp16_unet(export, spec, device: str, say):
    """An FP16 UNet made from the export's FP32 UNet with the FP16 export's own converter (temp file)."""
    entry = export.manifest.component("unet")
    path = export.manifest.verified_path(entry)
    say("      int8: making an FP16 UNet for comparison (AutoCast, as 'export --dtype fp16' does)")
    model = _fp16(path, spec, say=say, graph=FP16_COMPARISON_GRAPH)
    tmp = Path(tempfile.mkdtemp(prefix="sdexport-fp16-"))
    try:
        _save(model, tmp / "model.onnx")
        return _onnx_unet(spec, tmp / "model.onnx", device)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
