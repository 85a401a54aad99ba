"""torch -> ONNX for every component, in Hugging Face Optimum's directory layout.

For each ComponentSpec: trace the torch wrapper with the TorchScript exporter
(``dynamo=False``: the path Optimum and demoDiffusion use for SD, stable for the
diffusers UNet with dynamic batch and spatial axes), run shape inference, fold
constants and drop dead nodes (onnx-graphsurgeon), optionally convert to FP16
mixed precision (precision.py), check with ``onnx.checker`` (full check, on the
file so models over 2 GB work), and move the component directory into place.
Models over 2 GB keep their weights in one ``model.onnx_data`` file beside them.

An unchanged input (same weights hash, dtype, opset, ranges, sdexport version)
is not exported again.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from . import __version__
from .components import COMPONENTS, ComponentSpec, ShapeRanges, component_specs
from .errors import IntegrityError, UsageError
from .manifest import Manifest, atomic_dir, sha256_file, versions, write_json
from .models import ModelInfo, resolve_model

TWO_GB = 2**31
ONNX_DTYPES = {1: "float32", 10: "float16", 6: "int32", 7: "int64", 11: "float64", 3: "int8", 16: "bfloat16"}


def _export_key(info: ModelInfo, dtype: str, opset: int, ranges: ShapeRanges, spec: ComponentSpec) -> dict:
    key = {"weights_sha256": info.weights_sha256, "dtype": dtype, "opset": opset,
           "ranges": ranges.to_json(), "spec": spec.to_json(), "sdexport": __version__}
    return json.loads(json.dumps(key))  # as it reads back from manifest.json


def onnx_io(model) -> dict[str, list[dict[str, Any]]]:
    """Names, dtypes and dims (symbolic names or ints) of a model's graph inputs and outputs."""
    def describe(values):
        out = []
        for v in values:
            tt = v.type.tensor_type
            dims = [d.dim_param if d.dim_param else d.dim_value for d in tt.shape.dim]
            out.append({"name": v.name, "dtype": ONNX_DTYPES.get(tt.elem_type, str(tt.elem_type)), "dims": dims})
        return out

    return {"inputs": describe(model.graph.input), "outputs": describe(model.graph.output)}


def check_io_against_spec(io: dict, spec: ComponentSpec, where: str) -> None:
    want = spec.to_json()
    for kind in ("inputs", "outputs"):
        got = [(t["name"], t["dtype"], t["dims"]) for t in io[kind]]
        exp = [(t["name"], t["dtype"], t["dims"]) for t in want[kind]]
        if got != exp:
            raise IntegrityError(f"{where}: {kind} {got} do not match the component spec {exp}")


def _torch_export(spec: ComponentSpec, module, feed: dict, path: Path, opset: int) -> None:
    import warnings

    import torch

    wrapper = spec.wrap(module).eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper, tuple(feed[n] for n in spec.input_names), str(path), dynamo=False,
            opset_version=opset, input_names=spec.input_names, output_names=spec.output_names,
            dynamic_axes=spec.dynamic_axes(), do_constant_folding=True)


def _cleanup(path: Path):
    """Shape inference + constant folding + dead-node removal; returns a ModelProto."""
    import onnx
    import onnx_graphsurgeon as gs
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)
    onnx.shape_inference.infer_shapes_path(str(path), str(path))
    model = onnx.load(str(path))
    graph = gs.import_onnx(model)
    # ONNX Runtime-based folding is fine for < 2 GB; above that, fold what numpy can.
    graph.fold_constants(size_threshold=64 * 2**20).cleanup().toposort()
    return gs.export_onnx(graph)


def _save(model, path: Path) -> list[str]:
    """Save with shape inference; weights go to one ``model.onnx_data`` when over 2 GB."""
    import onnx

    large = sum(len(t.raw_data) for t in model.graph.initializer) > TWO_GB - 64 * 2**20
    if large:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + "_data", size_threshold=1024)
        onnx.shape_inference.infer_shapes_path(str(path), str(path))
        return [path.name + "_data"]
    model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    onnx.save_model(model, str(path))
    return []


def export_component(info: ModelInfo, spec: ComponentSpec, module, out: Path, dtype: str, opset: int,
                     say: Callable[[str], None]) -> dict[str, Any]:
    import onnx

    feed = spec.sample_inputs(spec.opt_dims(), seed=0)
    final_dir = out / spec.name
    t0 = time.perf_counter()
    with atomic_dir(final_dir) as tmp:
        raw = tmp / "raw" / "model.onnx"
        raw.parent.mkdir()
        say(f"{spec.name}: tracing with torch.onnx.export (opset {opset})")
        _torch_export(spec, module, feed, raw, opset)
        say(f"{spec.name}: shape inference and constant folding")
        model = _cleanup(raw)
        fp32_path = tmp / "fp32" / "model.onnx"
        fp32_path.parent.mkdir()
        _save(model, fp32_path)  # note: saving with external data empties the in-memory tensors
        del model
        shutil.rmtree(raw.parent)
        final_path = tmp / "model.onnx"
        precision: dict[str, Any] = {"dtype": dtype}
        if dtype == "fp16":
            from .components import FP32_OP_TYPES
            from .precision import convert_fp16, precision_summary

            say(f"{spec.name}: FP16 mixed precision (ModelOpt AutoCast; FP32 kept for "
                f"{', '.join(FP32_OP_TYPES)}{' and ' + ', '.join(spec.fp32_node_patterns) if spec.fp32_node_patterns else ''})")
            model16 = convert_fp16(fp32_path, spec, feed)
            precision.update(converter="modelopt.onnx.autocast", fp32_op_types=list(FP32_OP_TYPES),
                             fp32_node_patterns=list(spec.fp32_node_patterns), **precision_summary(model16))
            external = _save(model16, final_path)
            del model16
        else:
            external = [f.name for f in fp32_path.parent.iterdir() if f.name != fp32_path.name]
            for f in fp32_path.parent.iterdir():
                os.replace(f, tmp / f.name)
        shutil.rmtree(fp32_path.parent)
        say(f"{spec.name}: onnx.checker (full)")
        onnx.checker.check_model(str(final_path), full_check=True)
        header = onnx.load(str(final_path), load_external_data=False)
        io = onnx_io(header)
        check_io_against_spec(io, spec, str(final_dir / "model.onnx"))
        shutil.copy(info.root / spec.config_source / "config.json", tmp / "config.json")
        entry = {
            "file": f"{spec.name}/model.onnx",
            "sha256": sha256_file(final_path),
            "external_data": [{"file": f"{spec.name}/{name}", "sha256": sha256_file(tmp / name)} for name in external],
            "size_bytes": final_path.stat().st_size + sum((tmp / n).stat().st_size for n in external),
            "opset": max(o.version for o in header.opset_import if o.domain in ("", "ai.onnx")),
            "nodes": len(header.graph.node),
            "precision": precision,
            **io,
            **{k: v for k, v in spec.to_json().items() if k not in ("inputs", "outputs")},
        }
    entry["export_seconds"] = round(time.perf_counter() - t0, 2)
    return entry


def _write_pipeline_files(info: ModelInfo, out: Path) -> None:
    """model_index.json, scheduler/ and tokenizer/ as Optimum's ORT pipeline reads them."""
    for part in ("scheduler", "tokenizer"):
        with atomic_dir(out / part) as tmp:
            for f in (info.root / part).iterdir():
                if f.is_file():
                    shutil.copy(f, tmp / f.name)
    # Optimum reads the component classes from the diffusers index; keep it, minus what we do not export.
    index = json.loads((info.root / "model_index.json").read_text())
    index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    index.pop("image_encoder", None)
    write_json(out / "model_index.json", index)


def export(model: str, out: str | Path, dtype: str = "fp32", opset: int = 17,
           components: Iterable[str] = COMPONENTS, max_images: int = 4, min_size: int | None = None,
           max_size: int | None = None, force: bool = False,
           say: Callable[[str], None] = lambda msg: None) -> Manifest:
    if dtype not in ("fp32", "fp16"):
        raise UsageError(f"--dtype {dtype}: choose fp32 or fp16")
    components = list(dict.fromkeys(components))
    unknown = [c for c in components if c not in COMPONENTS]
    if unknown:
        raise UsageError(f"unknown component(s) {', '.join(unknown)} (choose from {', '.join(COMPONENTS)})")
    if not 14 <= opset <= 21:
        raise UsageError(f"--opset {opset}: supported opsets are 14 to 21")
    info = resolve_model(model, progress=say)
    ranges = ShapeRanges.for_model(info, max_images=max_images, min_size=min_size, max_size=max_size)
    specs = component_specs(info, ranges)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = Manifest.load_or_new(out)
    previous = manifest.data.get("model", {})
    if previous and previous.get("weights_sha256") != info.weights_sha256:
        manifest.components.clear()  # a different model: nothing of the old export is reusable
        manifest.engines.clear()
    manifest.data["model"] = {"path": str(info.root), "preset": info.preset, "weights_sha256": info.weights_sha256,
                              "pipeline_class": info.pipeline_class, "vae_scale_factor": info.vae_scale_factor,
                              "vae_scaling_factor": info.vae_scaling_factor,
                              "latent_channels": info.latent_channels,
                              "tokenizer_max_length": info.tokenizer_max_length,
                              "configs": {"unet": info.unet_config, "vae": info.vae_config,
                                          "text_encoder": info.text_encoder_config}}
    manifest.data["ranges"] = ranges.to_json()
    loaded: dict[str, Any] = {}
    for i, name in enumerate(components, 1):
        spec = specs[name]
        key = _export_key(info, dtype, opset, ranges, spec)
        old = manifest.components.get(name)
        if not force and old and old.get("key") == key and manifest.intact(old):
            say(f"[{i}/{len(components)}] {name}: up to date ({old['file']}), not re-exported")
            continue
        say(f"[{i}/{len(components)}] {name}: exporting {dtype}")
        if spec.source not in loaded:
            loaded[spec.source] = info.load_torch(spec.source)
        entry = export_component(info, spec, loaded[spec.source], out, dtype, opset,
                                 lambda msg, i=i: say(f"[{i}/{len(components)}] {msg}"))
        entry["key"] = key
        entry["source"] = {"path": str(info.root), "weights_sha256": info.weights_sha256, "preset": info.preset}
        entry["versions"] = versions()
        manifest.components[name] = entry
        manifest.engines.pop(name, None)
        manifest.save()
        say(f"[{i}/{len(components)}] {name}: wrote {entry['file']} "
            f"({entry['size_bytes'] / 2**20:.1f} MiB, {entry['export_seconds']} s)")
    _write_pipeline_files(info, out)
    manifest.save()
    return manifest

