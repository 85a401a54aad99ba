"""torch -> ONNX for every component, in Hugging Face Optimum's directory layout.

For each ComponentSpec: trace the torch wrapper with the TorchScript exporter
(``dynamo=False``: the path Optimum and demoDiffusion use for SD, stable for the
diffusers UNet with dynamic batch and spatial axes), run shape inference, fold
constants and drop dead nodes (onnx-graphsurgeon), optionally convert to FP16
mixed precision (precision.py), check with ``onnx.checker`` (full check, on the
file so models over 2 GB work), and move the component directory into place.
Models over 2 GB keep their weights in one ``model.onnx_data`` file beside them.

An unchanged input (same weights hash, dtype, opset, ranges, sdexport version)
is not exported again; a changed one that would drop what was built or quantized
from a component (BUILT_SECTIONS, VARIANT_OF) is refused without ``--force``,
whichever input changed (one rule, in ``export``). Everything one export command writes is one transaction
(manifest.Transaction): an interrupted export leaves the previous export whole.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from . import __version__, limits
from .artifacts import BUILT_SECTIONS, VARIANT_OF
from .components import ComponentSpec, ShapeRanges
from .errors import IntegrityError, UsageError
from .manifest import Manifest, Transaction, sha256_file, versions, writing
from .models import ModelInfo, resolve_model, vocab_and_merges_from_tokenizer_json

TWO_GB = 2**31
ONNX_DTYPES = {1: "float32", 10: "float16", 6: "int32", 7: "int64", 11: "float64", 3: "int8", 16: "bfloat16"}


def _export_key(info: ModelInfo, dtype: str, opset: int, ranges: ShapeRanges, spec: ComponentSpec,
                loras: list[dict[str, Any]] | None = None) -> dict:
    """What an exported component is made from; the fused LoRAs (file, sha256, scale) are part of it for the
    components a LoRA changes."""
    key = {"weights_sha256": info.weights_sha256, "dtype": dtype, "opset": opset,
           "ranges": ranges.to_json(), "spec": spec.to_json(), "family": info.family_name, "sdexport": __version__}
    if loras is not None:
        key["loras"] = loras
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


def torch_export(spec: ComponentSpec, module, feed: dict, path: Path, opset: int) -> None:
    import warnings

    import torch

    wrapper = spec.wrap(module).eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper, tuple(feed[n] for n in spec.input_names), str(path), dynamo=False,
            opset_version=opset, input_names=spec.input_names, output_names=spec.output_names,
            dynamic_axes=spec.dynamic_axes(), do_constant_folding=True)


def clean_graph(path: Path):
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


def save_onnx(model, path: Path) -> list[str]:
    """Save with shape inference; weights go to one ``model.onnx_data`` when over 2 GB.
    Returns the names of the external data files written beside ``path``."""
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


def export_component(info: ModelInfo, spec: ComponentSpec, module, folder: Path, scratch: Path, dtype: str,
                     opset: int, say: Callable[[str], None], weights_map: bool = False) -> dict[str, Any]:
    """Export one component into ``folder`` (a staged, empty directory); returns its manifest entry,
    with paths relative to the export root (``<component>/...``). ``weights_map``: also record which
    initializers hold each torch parameter (lora.WEIGHTS_MAP, for switching LoRAs on the engines)."""
    import onnx

    feed = spec.sample_inputs(spec.opt_dims(), seed=0)
    t0 = time.perf_counter()
    raw = scratch / "raw" / "model.onnx"
    raw.parent.mkdir(parents=True)
    say(f"{spec.name}: tracing with torch.onnx.export (opset {opset})")
    torch_export(spec, module, feed, raw, opset)
    say(f"{spec.name}: shape inference and constant folding")
    model = clean_graph(raw)
    fp32_path = scratch / "fp32" / "model.onnx"
    fp32_path.parent.mkdir()
    save_onnx(model, fp32_path)  # note: saving with external data empties the in-memory tensors
    del model
    shutil.rmtree(raw.parent)
    final_path = folder / "model.onnx"
    effective = "fp32" if dtype == "fp16" and spec.keep_fp32 else dtype
    precision: dict[str, Any] = {"dtype": effective}
    if effective != dtype:
        precision["kept_fp32"] = spec.keep_fp32
        say(f"{spec.name}: kept in FP32: {spec.keep_fp32}")
    if effective == "fp16":
        from .components import FP32_OP_TYPES
        from .precision import convert_fp16, precision_summary

        say(f"{spec.name}: FP16 mixed precision (ModelOpt AutoCast; FP32 kept for "
            f"{', '.join(FP32_OP_TYPES)}{' and ' + ', '.join(spec.fp32_node_patterns) if spec.fp32_node_patterns else ''})")
        model16 = convert_fp16(fp32_path, spec, work_dir=scratch, say=say)
        precision.update(converter="modelopt.onnx.autocast", fp32_op_types=list(FP32_OP_TYPES),
                         fp32_node_patterns=list(spec.fp32_node_patterns), **precision_summary(model16))
        external = save_onnx(model16, final_path)
        del model16
    else:
        external = [f.name for f in fp32_path.parent.iterdir() if f.name != fp32_path.name]
        for f in fp32_path.parent.iterdir():
            os.replace(f, folder / f.name)
    shutil.rmtree(fp32_path.parent)
    say(f"{spec.name}: onnx.checker (full)")
    onnx.checker.check_model(str(final_path), full_check=True)
    header = onnx.load(str(final_path), load_external_data=False)
    io = onnx_io(header)
    check_io_against_spec(io, spec, f"{spec.name}/model.onnx")
    shutil.copy(info.root / spec.config_source / "config.json", folder / "config.json")
    name = spec.name
    extra_files = ["config.json"]
    if weights_map:
        from .lora import WEIGHTS_MAP, build_weight_map

        say(f"{spec.name}: mapping torch parameters to ONNX initializers ({WEIGHTS_MAP})")
        wmap = build_weight_map(module, final_path)
        (folder / WEIGHTS_MAP).write_text(json.dumps(wmap, indent=1) + "\n")
        extra_files.append(WEIGHTS_MAP)
    return {
        "file": f"{name}/model.onnx",
        "sha256": sha256_file(final_path),
        "external_data": [{"file": f"{name}/{n}", "sha256": sha256_file(folder / n)} for n in external],
        "files": [{"file": f"{name}/{n}", "sha256": sha256_file(folder / n)} for n in extra_files],
        "size_bytes": final_path.stat().st_size + sum((folder / n).stat().st_size for n in external),
        "opset": max(o.version for o in header.opset_import if o.domain in ("", "ai.onnx")),
        "nodes": len(header.graph.node),
        "precision": precision,
        **io,
        **{k: v for k, v in spec.to_json().items() if k not in ("inputs", "outputs")},
        "export_seconds": round(time.perf_counter() - t0, 2),
    }


# Keys Optimum's loader and diffusers' pipelines read from model_index.json that an ONNX export does not have.
_INDEX_DROP = ("image_encoder", "safety_checker", "feature_extractor")


def stage_pipeline_files(info: ModelInfo, txn: Transaction, components: list[str]) -> None:
    """model_index.json, scheduler/ and tokenizer folders as Optimum's ORT pipelines read them; each file is
    hashed into the manifest (the runtime reads them: a changed scheduler config changes the image)."""
    files: dict[str, str] = {}
    for part in ["scheduler", *info.family.tokenizer_parts]:
        if not (info.root / part).is_dir():
            continue
        folder = txn.stage(part, folder=True)
        for f in sorted((info.root / part).iterdir()):
            if f.is_file():
                shutil.copyfile(f, folder / f.name)
                files[f"{part}/{f.name}"] = sha256_file(folder / f.name)
        for name, text in vocab_and_merges_from_tokenizer_json(info.root / part).items():
            (folder / name).write_text(text, encoding="utf-8")
            files[f"{part}/{name}"] = sha256_file(folder / name)
    index = dict(info.index)
    for key in _INDEX_DROP:
        index.pop(key, None)
    index.update(info.family.export_index)
    path = txn.stage("model_index.json")
    path.write_text(json.dumps(index, indent=2, allow_nan=False) + "\n")
    files["model_index.json"] = sha256_file(path)
    txn.manifest.data["files"] = files


def _describe(model: dict[str, Any], ranges: dict[str, Any], dtype: str | None) -> str:
    loras = ", ".join(f"{Path(str(lora.get('file'))).name}:{lora.get('scale'):g}" for lora in model.get("loras") or [])
    return (f"{model.get('preset') or model.get('path')} ({dtype or '?'}, images "
            f"{ranges.get('min_size')}-{ranges.get('max_size')} px, up to {ranges.get('max_images')} per call"
            f"{', LoRA ' + loras if loras else ''})")


def check_export_output(model: str, out: Path, max_images: int) -> None:
    """Before any work: ``-o`` is neither the model directory, inside it, nor around it; it is new, empty or
    an earlier export (anything else it holds would be replaced); it can be written."""
    from .models import model_path
    from .paths import Guarded, check_new_or_empty_dir, check_output, is_export_dir

    limits.count("--max-batch", max_images, 1, limits.MAX_EXPORT_IMAGES)
    source = model_path(model)
    guard = Guarded().tree(source, f"the model directory {source}") if source is not None else None
    check_output("-o", out, guard, kind="dir")
    check_new_or_empty_dir("-o", out, "an sdexport export (no manifest.json)", ok=is_export_dir(out))


def check_export_space(info: ModelInfo, specs: dict[str, ComponentSpec], components: list[str], dtype: str,
                       out: Path, manifest: Manifest, keys: dict[str, dict]) -> None:
    """Before any work: the weights fit this machine's memory (the configs are built on the meta device), so
    does an FP16 conversion (the largest converted component's measured peak), and the export fits the disk at
    its peak: the ONNX files of the components to export (4 bytes a parameter
    in FP32, 2 in FP16), plus the largest component's scratch beside its result (an FP32 export holds the
    traced graph and the cleaned one; an FP16 one the cleaned FP32 graph and AutoCast's copy of it for its
    reference run, both in the export's scratch), and the scheduler and tokenizer files."""
    from .schema import check_loadable

    todo = [c for c in components if (manifest.components.get(c) or {}).get("key") != keys[c]]
    sources = tuple(dict.fromkeys(specs[c].source for c in todo))
    params = check_loadable(info, sources)
    share = {"vae_decoder": 0.6, "vae_encoder": 0.4}  # of the VAE's parameters, roughly (SD 1.5: 0.59 / 0.41)
    fp32 = {c: 4 * params[specs[c].source] * share.get(c, 1.0) for c in todo}
    pipeline_files = sum(p.stat().st_size for part in info.root.iterdir() if part.is_dir()
                         and part.name.startswith(("scheduler", "tokenizer")) for p in part.rglob("*")
                         if p.is_file()) + (info.root / "model_index.json").stat().st_size
    pipeline_files += sum(len(text.encode()) for part in info.family.tokenizer_parts
                          for text in vocab_and_merges_from_tokenizer_json(info.root / part).values())
    converts = {c: dtype == "fp16" and not specs[c].keep_fp32 for c in todo}
    results = sum(b * (0.5 if converts[c] else 1.0) for c, b in fp32.items())
    # peak while exporting c: the others' results, c's two FP32 copies and no result of c's yet
    peak_extra = max((b * (1.5 if converts[c] else 1.0) for c, b in fp32.items()), default=0)
    need = pipeline_files + results + peak_extra
    limits.check_disk(out, need, f"exporting {', '.join(todo) or 'the pipeline files'} ({dtype})")
    converted = [c for c in todo if converts[c]]
    if converted:  # FP16: AutoCast holds several copies of a graph's weights (precision.FP16_EXPORT_MEMORY_FACTOR)
        from .precision import FP16_EXPORT_MEMORY_FACTOR

        largest = max(converted, key=lambda c: fp32[c])
        limits.check_memory(
            f"exporting {largest} in FP16 ({limits.human_bytes(fp32[largest])} of FP32 weights; ModelOpt AutoCast "
            f"holds several copies of them)", FP16_EXPORT_MEMORY_FACTOR * fp32[largest],
            "export --dtype fp32 here, or in FP16 on a machine with more memory", share=1.0)


def export(model: str, out: str | Path, dtype: str = "fp32", opset: int = 17,
           components: Iterable[str] | None = None, max_images: int = 4, min_size: int | None = None,
           max_size: int | None = None, force: bool = False, loras: list | None = None,
           say: Callable[[str], None] = lambda msg: None) -> Manifest:
    """``loras``: ``FILE[:SCALE]`` strings (or lora.LoraFile) fused into the exported weights with diffusers'
    loader, in order; recorded in the manifest and in the export key of the components they change."""
    from .lora import check_loras_fit, describe, fuse_loras, lora_parts, open_loras

    if dtype not in ("fp32", "fp16"):
        raise UsageError(f"--dtype {dtype}: choose fp32 or fp16")
    if not 14 <= opset <= 21:
        raise UsageError(f"--opset {opset}: supported opsets are 14 to 21")
    out = Path(out)
    check_export_output(model, out, max_images)
    lora_files = open_loras(loras)
    info = resolve_model(model, progress=say)
    check_loras_fit(info, lora_files)  # before the output folder is made: a LoRA that does not fit writes nothing
    parts = lora_parts(info)
    lora_record = [lora.to_json() for lora in lora_files]
    family = info.family
    known = family.components(info)
    components = list(dict.fromkeys(components or known))
    unknown = [c for c in components if c not in known]
    if unknown:
        raise UsageError(f"unknown component(s) {', '.join(unknown)} (a {family.description} model has "
                         f"{', '.join(known)})")
    for option, value in (("--min-size", min_size), ("--max-size", max_size)):
        if value is not None:
            limits.check_side(option, value, info.image_size)
    ranges = ShapeRanges.for_model(info, max_images=max_images, min_size=min_size, max_size=max_size)
    specs = family.specs(info, ranges)
    for part in family.tokenizer_parts:  # an empty or foreign tokenizer would give every prompt the same image
        if part in info.tokenizer_max_lengths:
            info.load_tokenizer(part)
    keys = {name: _export_key(info, dtype, opset, ranges, specs[name],
                              lora_record if specs[name].source in parts else None) for name in components}
    check_export_space(info, specs, components, dtype, out, Manifest.load_or_new(out) if out.is_dir() else Manifest(out),
                       keys)
    model_record = {"path": str(info.root), "preset": info.preset, "weights_sha256": info.weights_sha256,
                    "family": info.family_name, "pipeline_class": info.pipeline_class,
                    "vae_scale_factor": info.vae_scale_factor, "vae_scaling_factor": info.vae_scaling_factor,
                    "latent_channels": info.latent_channels, "tokenizer_max_lengths": info.tokenizer_max_lengths,
                    "configs": info.configs, "loras": lora_record}
    with writing(out, "export", say) as txn:
        manifest = txn.manifest
        previous = manifest.data.get("model")
        same = (previous and previous.get("weights_sha256") == info.weights_sha256
                and manifest.data.get("ranges") == ranges.to_json() and manifest.data.get("dtype") == dtype
                and previous.get("family") == info.family_name)
        # Another LoRA set is another input of the components a LoRA applies to (UNet, text encoders) only: those
        # are replaced (their export keys hold the LoRAs), the VAE and what was built from it stay.
        other_loras = previous and previous.get("loras", []) != lora_record

        def replaced(name: str) -> bool:
            spec = specs.get(VARIANT_OF.get(name, name))
            return not same or spec is None or spec.source in parts

        others = [c for c in manifest.components if c not in components and replaced(c)]
        # components of this model that --components leaves out (one the model lacks cannot be named)
        left_out = [c for c in others if c in known]
        mixed = bool(previous and (not same or other_loras))
        # what this command writes anew: every component it names with --force, else those whose inputs changed
        # (another opset or sdexport too, not only another model, dtype, range or LoRA set) or whose files no
        # longer match the manifest
        stale = {} if force else {c: _why_stale(manifest.components.get(c), keys[c], manifest) for c in components}
        todo = [c for c in components if force or stale[c]]
        # the old components that go: those another export replaces, and those written anew
        going = {c for c in manifest.components if (mixed and replaced(c)) or c in todo}
        going |= {v for v, of in VARIANT_OF.items() if of in going and v in manifest.components}
        # what was built or quantized from them goes with them: never without --force
        built = [f"{section}/{name}" for section in BUILT_SECTIONS for name in manifest.data.get(section, {})
                 if name in going]
        variants = [v for v, of in VARIANT_OF.items()  # (a mixed export names them among the others)
                    if of in going and v in manifest.components and not (mixed and v in others)]
        if mixed:
            if force and left_out:  # --force replaces what it is asked to, never a component it was not given
                raise UsageError(
                    f"{out} holds an export of {_describe(previous, manifest.data.get('ranges', {}), manifest.data.get('dtype'))}"
                    f"; replacing it with {_describe(model_record, ranges.to_json(), dtype)} would delete "
                    f"{', '.join(left_out)}, which --components leaves out: name them too "
                    f"(--components {','.join(list(components) + left_out)}), or choose another -o")
            if not force and (others or built or variants):
                way_out = "re-export every component with --force to replace it"
                if same:  # only the LoRA set differs: --force on every component would also re-export the VAE
                    # and delete what was built from it, which the new LoRAs leave as it is
                    applies = [c for c in known if specs[c].source in parts
                               and (c in components or c in manifest.components)]
                    way_out = (f"re-export what the LoRAs apply to with --force (--components {','.join(applies)} "
                               "--force; the VAE and what was built from it stay)")
                raise UsageError(
                    f"{out} holds an export of {_describe(previous, manifest.data.get('ranges', {}), manifest.data.get('dtype'))}"
                    f"; exporting {_describe(model_record, ranges.to_json(), dtype)} into it would mix the two "
                    f"({', '.join(others + variants + built)} would stay from the old one): {way_out}, or choose "
                    "another -o")
            for name in list(manifest.components):  # a different export: nothing of what it replaces is reusable
                if replaced(name):
                    _drop_component(txn, name)
            for section in BUILT_SECTIONS:
                for name in list(manifest.data.get(section, {})):
                    if replaced(name):
                        _drop_artifact(txn, section, name)
        elif not force and (built or variants):
            # the same export, but some components are written anew: what was built from them would go unasked
            made = variants + [d.split("/", 1)[1] for d in built]  # the components they were made from
            names = [c for c in todo if any(m == c or VARIANT_OF.get(m) == c for m in made)]
            reasons = list(dict.fromkeys(stale[c] for c in names))
            old_opsets = {(manifest.components[c].get("key") or {}).get("opset") for c in names}
            keep = (f", keep --opset {old_opsets.pop()}" if len(old_opsets) == 1 and None not in old_opsets
                    and any(r.startswith("opset ") for r in reasons) else "")
            raise UsageError(
                f"{out}: re-exporting {', '.join(names)} ({'; '.join(reasons)}) would drop "
                f"{', '.join(variants + built)}, made from the current one{'s' if len(names) > 1 else ''}: "
                f"re-export with --force to replace and drop them{keep}, or choose another -o")
        manifest.data["manifest_version"] = 2
        manifest.data["model"] = model_record
        manifest.data["ranges"] = ranges.to_json()
        manifest.data["dtype"] = dtype
        loaded: dict[str, Any] = {}
        for i, name in enumerate(components, 1):
            spec = specs[name]
            key = keys[name]
            old = manifest.components.get(name)
            label = f"[{i}/{len(components)}]"
            if name not in todo and old is not None:
                say(f"{label} {name}: up to date ({old['file']}), not re-exported")
                continue
            say(f"{label} {name}: exporting {dtype}")
            if lora_files and spec.source in parts and spec.source not in loaded:
                say(f"{label} fusing LoRA {describe(lora_files)} into {', '.join(parts)} (diffusers' loader)")
                modules = {p: info.load_torch(p) for p in parts}
                fuse_loras(info, modules, lora_files)
                loaded.update(modules)
            if spec.source not in loaded:
                loaded[spec.source] = info.load_torch(spec.source)
            folder = txn.stage(name, folder=True)
            entry = export_component(info, spec, loaded[spec.source], folder, txn.scratch(name), dtype, opset,
                                     lambda msg, label=label: say(f"{label} {msg}"), weights_map=spec.source in parts)
            entry["key"] = key
            entry["source"] = {"path": str(info.root), "weights_sha256": info.weights_sha256, "preset": info.preset}
            entry["versions"] = versions()
            for variant, of in VARIANT_OF.items():
                if of == name and variant in manifest.components:
                    say(f"{label} {variant}: removed (made from the previous {name}; re-run 'sdexport quantize')")
                    _drop_component(txn, variant)
            for built_from in [name] + [v for v, of in VARIANT_OF.items() if of == name]:
                for section in BUILT_SECTIONS:  # built from the component this replaces
                    if built_from in manifest.data.get(section, {}):
                        say(f"{label} {section}/{built_from}: removed (built from the previous {name}; "
                            "build it again)")
                        _drop_artifact(txn, section, built_from)
            manifest.components[name] = entry
            say(f"{label} {name}: wrote {entry['file']} ({entry['size_bytes'] / 2**20:.1f} MiB, "
                f"{entry['export_seconds']} s)")
        stage_pipeline_files(info, txn, components)
        txn.commit()
    return txn.manifest


def _why_stale(old: dict[str, Any] | None, key: dict[str, Any], manifest: Manifest) -> str | None:
    """Why the exported component ``old`` is not the one ``key`` describes (None: it is, up to date): what
    differs, in words, for the line that refuses to drop what was built from it."""
    if not old:
        return "new"
    was = old.get("key")
    if not was:
        return "no export key (an older sdexport)"
    if was != key:
        said = {"opset": "opset", "sdexport": "sdexport", "dtype": "dtype", "family": "model family"}
        words = [f"{said[k]} {was.get(k)} -> {key.get(k)}" for k in said if was.get(k) != key.get(k)]
        words += [{"weights_sha256": "other weights", "ranges": "other shape ranges", "loras": "other LoRAs",
                   "spec": "another component declaration"}[k]
                  for k in ("weights_sha256", "ranges", "loras", "spec") if was.get(k) != key.get(k)]
        return ", ".join(words) or "another export key"
    if not manifest.intact(old):
        return "its files differ from the manifest"
    return None


def _drop_component(txn: Transaction, name: str) -> None:
    txn.remove(name)
    txn.manifest.components.pop(name, None)


def _drop_artifact(txn: Transaction, section: str, name: str) -> None:
    entry = txn.manifest.data.get(section, {}).pop(name, None)
    if entry:
        for rel, _ in Manifest.entry_files(entry):
            if txn.root.joinpath(rel).exists():
                txn.remove(rel)
