"""The ONNX Runtime CUDA engine variant: ORT's own fusions, FP16, optionally static shapes.

ONNX Runtime's transformer optimizer (``onnxruntime.transformers``, the one its
Stable Diffusion demo uses) rewrites the graph into ORT contrib ops: fused
multi-head attention (flash / memory-efficient kernels), NHWC convolution,
GroupNorm, SkipGroupNorm, BiasSplitGelu, SkipLayerNorm. Those ops exist only in
ONNX Runtime, so this variant lives beside the portable export (``OUT/ort_cuda/``),
never in the graphs TensorRT builds from.

Differences from the portable export, and why:
 - attention is exported with diffusers' classic ``AttnProcessor`` (and CLIP with
   eager attention): the optimizer recognises that pattern; it does not recognise
   the decomposed scaled-dot-product pattern (measured: 0 of 32 attentions fused);
 - opened with free-dimension overrides (one geometry), every shape computation
   folds to constants at session creation, so no node falls back to the CPU and
   ONNX Runtime can capture the whole run as a CUDA graph.
FP16 conversion is the optimizer's own (``convert_float_to_float16`` on the fused
graph, I/O kept FP32, Resize kept FP32; see FP32_OPS).

One fusion is completed here: the optimizer's BiasSplitGelu pattern expects the
GEGLU split of older exporters (Slice starts computed from Shape/Gather/Div); our
cleaned export has constant Slice bounds, so it never fired, and neither did the
BiasAdd fusion that follows it (measured on the H200: the GEGLU's bias Add, two
Slices, Gelu and Mul ran as separate kernels, about 1 ms of a 7.6 ms UNet step).
``_fuse_geglu`` matches the constant form and then runs ORT's own FusionBiasAdd.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from .errors import BackendUnavailable, IntegrityError, UsageError
from .manifest import sha256_file, versions
from .runtime import ExportDir

VARIANT = "ort_cuda"  # its manifest section and folder
MODEL_TYPES = {"text_encoder": "clip", "text_encoder_2": "clip", "unet": "unet", "vae_decoder": "vae"}
# Only Resize is blocked: ORT's fused normalization kernels (GroupNorm, SkipGroupNorm, LayerNorm,
# SkipLayerNorm) and its attention kernels accumulate in FP32 internally, and blocking the
# normalization ops makes the optimizer's converter assign one tensor twice (an invalid model).
FP32_OPS = ["Resize"]
# Part of the up-to-date key: bump when the recipe (export, fusions, conversion) changes.
RECIPE = 3  # 2: BiasSplitGelu + BiasAdd on constant-bound GEGLU; 3: the spec's FP32 node patterns kept FP32


def _fused_counts(path: Path) -> dict[str, int]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    counts: dict[str, int] = {}
    for node in model.graph.node:
        if node.domain == "com.microsoft":
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def _load_module(info, spec):
    if spec.source.startswith("text_encoder"):
        return info.load_torch(spec.source, attn_implementation="eager")
    from diffusers.models.attention_processor import AttnProcessor

    module = info.load_torch(spec.source)
    module.set_attn_processor(AttnProcessor())
    return module


def _unique_node_names(path: Path) -> None:
    """The optimizer's FP16 conversion can emit two Cast nodes with one name (ONNX Runtime then
    refuses the model as invalid); names are labels only, so make them unique."""
    import onnx

    from .export import save_onnx

    model = onnx.load(str(path))
    seen: set[str] = set()
    changed = False
    for i, node in enumerate(model.graph.node):
        if node.name in seen:
            node.name = f"{node.name}__{i}"
            changed = True
        seen.add(node.name)
    if changed:
        for extra in path.parent.glob("*.onnx_data"):
            extra.unlink()
        save_onnx(model, path)


# BiasSplitGelu's CUDA kernel takes only these widths (the GEGLU projections of SD 1.x/2.x/XL);
# other widths (e.g. the tiny preset) are left unfused rather than produce a graph that fails at run time.
SPLIT_GELU_WIDTHS = (2560, 5120, 10240)


def _fuse_geglu(model) -> dict[str, int]:
    """Fuse ``Add(bias) -> Slice[:D/2], Slice[D/2:] -> Gelu -> Mul`` into com.microsoft BiasSplitGelu
    (constant Slice bounds, as our export writes them), then run ONNX Runtime's FusionBiasAdd, which
    needs BiasSplitGelu in place. ``model`` is the optimizer's OnnxModel; returns the fused counts."""
    import numpy as np
    from onnx import helper
    from onnxruntime.transformers.fusion_bias_add import FusionBiasAdd
    from onnxruntime.transformers.fusion_base import Fusion

    def const(name):
        value = model.get_constant_value(name) if name else None
        return None if value is None else np.asarray(value).reshape(-1)

    def bounds(node):
        """(start, end, axis) of a one-axis, step-1 Slice with constant bounds, else None."""
        if node is None or node.op_type != "Slice" or len(node.input) < 4:
            return None
        starts, ends, axes = const(node.input[1]), const(node.input[2]), const(node.input[3])
        steps = const(node.input[4]) if len(node.input) > 4 and node.input[4] else np.ones(1)
        if any(v is None or v.size != 1 for v in (starts, ends, axes, steps)) or steps[0] != 1:
            return None
        return int(starts[0]), int(ends[0]), int(axes[0])

    class ConstSplitGelu(Fusion):
        def __init__(self):
            super().__init__(model, "BiasSplitGelu", "Gelu", "constant-bound GEGLU")

        def fuse(self, gelu, input_name_to_nodes, output_name_to_node):
            users = input_name_to_nodes.get(gelu.output[0], [])
            if len(users) != 1 or users[0].op_type != "Mul":
                return
            mul = users[0]
            right = output_name_to_node.get(gelu.input[0])
            other = mul.input[1] if mul.input[0] == gelu.output[0] else mul.input[0]
            left = output_name_to_node.get(other)
            rb, lb = bounds(right), bounds(left)
            if rb is None or lb is None or right.input[0] != left.input[0]:
                return
            add = output_name_to_node.get(right.input[0])
            if add is None or add.op_type != "Add":
                return
            bias_index, bias = model.get_constant_input(add)
            if not isinstance(bias_index, int) or np.asarray(bias).ndim != 1:
                return
            width = int(np.asarray(bias).shape[0])
            half = width // 2
            if width not in SPLIT_GELU_WIDTHS or lb[2] not in (-1, 2) or rb[2] != lb[2]:
                return
            if lb[:2] != (0, half) or rb[0] != half or rb[1] < width:
                return
            nodes = [add, left, right, gelu, mul]
            if not model.is_safe_to_fuse_nodes(nodes, [mul.output[0]], input_name_to_nodes, output_name_to_node):
                return
            self.nodes_to_remove.extend(nodes)
            name = model.create_node_name("BiasSplitGelu", name_prefix="BiasSplitGelu")
            node = helper.make_node("BiasSplitGelu", [add.input[1 - bias_index], add.input[bias_index]],
                                    [mul.output[0]], name=name, domain="com.microsoft")
            self.nodes_to_add.append(node)
            self.node_name_to_graph_name[name] = self.this_graph_name

    counts = {}
    for fusion in (ConstSplitGelu(), FusionBiasAdd(model)):
        fusion.apply()
        counts[fusion.fused_op_type] = sum(n.op_type == fusion.fused_op_type for n in fusion.nodes_to_add)
    model.prune_graph()
    return counts


@contextlib.contextmanager
def _no_progress_bars():
    """ONNX Runtime's UNet/VAE optimizer (onnx_model_unet.UnetOnnxModel.optimize) draws a tqdm bar ("fusion",
    18 steps) between sdexport's own progress lines: its bars are created disabled while it runs. Only the
    bars: its log records, warnings and exceptions come through as before."""
    try:
        import tqdm
    except ImportError:  # the optimizer then runs without a bar by itself
        yield
        return
    bar = tqdm.tqdm

    class Disabled(bar):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "disable": True})

    tqdm.tqdm = Disabled
    try:
        yield
    finally:
        tqdm.tqdm = bar


def _optimize(fp32_path: Path, out_path: Path, model_type: str, fp32_node_patterns: tuple[str, ...] = ()) -> None:
    """ONNX Runtime's optimizer fusions, then its FP16 conversion (what its SD demo's
    OrtStableDiffusionOptimizer does, minus its size check, which raises on >2 GB protos). Nodes matching the
    spec's FP32 patterns (the sinusoidal timestep and SDXL size embeddings and their MLPs: sin/cos of values up
    to ~1000, where FP16 rounding of the argument alone is up to 0.25 rad) stay FP32, as in the FP16 export."""
    import re

    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    from .export import TWO_GB

    with _no_progress_bars():
        model = optimize_model(str(fp32_path), model_type=model_type, num_heads=0, hidden_size=0, opt_level=0,
                               optimization_options=FusionOptions(model_type), use_gpu=True)
    if model_type == "unet":
        _fuse_geglu(model)
    keep = [n.name for n in model.model.graph.node if any(re.match(p, n.name) for p in fp32_node_patterns)]
    model.convert_float_to_float16(keep_io_types=True, op_block_list=FP32_OPS, node_block_list=keep)
    large = sum(len(t.raw_data) for t in model.model.graph.initializer) > TWO_GB - 64 * 2**20
    model.save_model_to_file(str(out_path), use_external_data_format=large)


# The text encoder is left out by default: on an H200 (ONNX Runtime 1.31.1, CUDA EP) the fused FP16 CLIP's
# output was rel-L2 1.15 from FP32 (the same graph on the CPU EP: 1.2e-3), which took the 50-step image to
# 25.8 dB PSNR against FP32 eager (UNet alone fused: 71.6 dB; VAE alone: 72.1 dB);
# benchmarks/results/2026-11-22-h200-run3/ort_fused_diag.json. It runs once per image, so the plain FP32
# export costs ~1 ms there. `sdexport validate --device cuda` checks every prepared variant.
DEFAULT_COMPONENTS = ("unet", "vae_decoder")


def _drop_variant(txn, variants: dict[str, Any], name: str) -> None:
    from .manifest import Manifest

    for rel, _ in Manifest.entry_files(variants.pop(name)):
        if txn.root.joinpath(rel).exists():
            txn.remove(rel)


def _up_to_date(export: ExportDir, entry: dict[str, Any] | None, key: dict[str, Any]) -> bool:
    return bool(entry) and entry.get("key") == key and export.manifest.intact(entry)


def _check_space(export: ExportDir, info, names: list[str]) -> None:
    """Before the work: the disk at its peak, in the order the components are made: the FP16 files made before
    (2 bytes a parameter) and the component's two FP32 graphs in the scratch (the traced one and the cleaned
    one: 20 GB for the SDXL UNet), which it holds before its own FP16 file is written; its scratch is gone
    after it."""
    from . import limits
    from .schema import check_loadable

    if not names:
        return
    params = check_loadable(info, tuple(dict.fromkeys(export.spec(n).source for n in names)))
    fp32 = {n: 4 * params[export.spec(n).source] for n in names}
    made, need = 0.0, 0.0
    for b in fp32.values():
        need = max(need, made + 2 * b)
        made += b / 2
    limits.check_disk(export.root, max(need, made), f"build --backend ort ({', '.join(names)})")


def _key(export: ExportDir, opset: int, component: str) -> dict[str, Any]:
    """What a prepared component is made from (its rebuild key): the source model is exported with the LoRAs
    fused into the export (ExportDir.source_model), so they are part of it as the weights are, for the components
    a LoRA applies to (ExportDir.loras_of: not the VAE)."""
    model = export.manifest.data["model"]
    return json.loads(json.dumps({"weights_sha256": model["weights_sha256"], "loras": export.loras_of(component),
                                  "opset": opset, "recipe": RECIPE, "ranges": export.ranges.to_json(),
                                  "versions": versions()}))


def check_variant(export: ExportDir, component: str) -> dict[str, Any] | None:
    """The prepared entry of ``component`` (None: the variant leaves it out), refused (exit 5) when it was made
    from other weights or other fused LoRAs than the export's: it would run them with exit 0."""
    entry = export.manifest.data.get(VARIANT, {}).get(component)
    if entry:
        model, key = export.manifest.data["model"], entry.get("key", {})
        remedy = f"rebuild: sdexport build {export.root} --backend ort"
        if key.get("weights_sha256") != model["weights_sha256"]:
            raise IntegrityError(f"{export.root / entry['file']}: made from other weights than the export's; {remedy}")
        if export.lora_applies(component) and key.get("loras", []) != model.get("loras", []):
            raise IntegrityError(f"{export.root / entry['file']}: made with other fused LoRAs than the export's "
                                 f"(sdexport export --lora); {remedy}")
    return entry


def prepare(export_dir: str | Path, components=DEFAULT_COMPONENTS, opset: int = 17,
            say: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """Write the ORT CUDA variant of ``components`` under ``OUT/ort_cuda``; returns the components built and
    up to date, and the variants the export holds (``variants``: their manifest entries; ``held``: their names).

    The graphs keep the export's named dynamic axes; a static engine (for CUDA graphs) is
    the same file opened with ONNX Runtime's free-dimension overrides (backends/ort.py).
    """
    try:
        importlib.import_module("onnxruntime.transformers.optimizer")
    except ImportError as exc:
        raise BackendUnavailable(f"ONNX Runtime's transformer optimizer is missing ({exc})") from None
    from .export import clean_graph, save_onnx, torch_export
    from .manifest import writing
    from .paths import check_export_writable

    # an export (not a missing path, nor a model directory that would get a lock file) that takes new files
    export = ExportDir.open(export_dir)
    export.verify_components()  # nothing is built on (nor written into) a damaged export
    check_export_writable(export, "build --backend ort writes ort_cuda/ there")
    with writing(export_dir, "build --backend ort", say, create=False) as txn:
        export = ExportDir.open(export_dir)
        export.manifest = txn.manifest
        info = export.source_model()
        vkey = VARIANT
        variants = export.manifest.data.setdefault(vkey, {})
        for name in components:
            if name not in MODEL_TYPES:
                raise UsageError(f"ort-cuda variant: unsupported component {name} (choose {', '.join(MODEL_TYPES)})")
        keys = {n: _key(export, opset, n) for n in components}
        # the up-to-date test hashes the variant's files (5 GB for the SDXL UNet): once, for the disk check and
        # the loop
        stale = [n for n in components if not export.spec(n).keep_fp32
                 and not _up_to_date(export, variants.get(n), keys[n])]
        _check_space(export, info, stale)
        changed = False
        built, current = [], []
        for name in components:
            spec = export.spec(name)
            if spec.keep_fp32:  # this variant is FP16 throughout; such a component runs the plain FP32 export
                say(f"{vkey} {name}: left out, it stays FP32 ({spec.keep_fp32}); the plain export runs it")
                if name in variants:
                    _drop_variant(txn, variants, name)
                    changed = True
                continue
            if name not in stale:
                say(f"{vkey} {name}: up to date")
                current.append(name)
                continue
            t0 = time.perf_counter()
            feed = spec.sample_inputs(spec.opt_dims())
            module = _load_module(info, spec)
            out = txn.stage(f"{vkey}/{name}", folder=True)
            scratch = txn.scratch(f"{vkey}-{name}")
            raw = scratch / "raw" / "model.onnx"
            raw.parent.mkdir()
            say(f"ort-cuda {name}: export (classic attention)")
            torch_export(spec, module, feed, raw, opset)
            fp32 = scratch / "fp32" / "model.onnx"
            fp32.parent.mkdir()
            save_onnx(clean_graph(raw), fp32)
            shutil.rmtree(raw.parent)  # a UNet over 2 GB: one copy less on disk while ONNX Runtime optimizes
            say(f"ort-cuda {name}: ONNX Runtime fusions + FP16")
            _optimize(fp32, out / "model.onnx", MODEL_TYPES[name], spec.fp32_node_patterns)
            _unique_node_names(out / "model.onnx")
            shutil.rmtree(scratch)  # the next component's peak is not on top of this one's FP32 graph
            extra = [p.name for p in out.iterdir() if p.name != "model.onnx"]
            entry = {"file": f"{vkey}/{name}/model.onnx", "sha256": sha256_file(out / "model.onnx"),
                     "external_data": [{"file": f"{vkey}/{name}/{n}", "sha256": sha256_file(out / n)} for n in extra],
                     "fused_ops": _fused_counts(out / "model.onnx"),
                     "seconds": round(time.perf_counter() - t0, 1), "key": keys[name]}
            variants[name] = entry
            changed = True
            built.append(name)
            say(f"ort-cuda {name}: {entry['fused_ops']} ({entry['seconds']} s)")
        if changed:
            txn.commit()
        return {"built": built, "up_to_date": current, "variants": variants, "held": sorted(variants)}
