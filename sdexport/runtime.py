"""An export directory as the runtime sees it: manifest, specs, tokenizers, scheduler config.

The component specs are rebuilt from the model configs and shape ranges that the manifest
recorded at export time, through the model's family, so engines, buffers and shape checks use
the very declaration the export was made from, without the source model.

Opening an export checks it before anything runs: the manifest's structure, every pipeline file
the runtime reads (scheduler config, tokenizers, model index) against its sha256, and, per
component a command loads, that it belongs to this export (same weights, ranges and dtype as the
manifest says; ``check_components``). The CLI holds the export's lock around a whole command
(``manifest.reading``/``writing``); opening finishes a transaction a killed writer committed.
"""

from __future__ import annotations

import dataclasses
import json
from functools import cached_property
from pathlib import Path
from typing import Any

from . import __version__
from .artifacts import VARIANT_OF
from .components import ComponentSpec, ShapeRanges
from .errors import IntegrityError, ModelError, UsageError
from .manifest import Manifest, recover_if_needed
from .models import ModelInfo

MANIFEST_VERSION = 2


@dataclasses.dataclass
class ExportDir:
    root: Path
    manifest: Manifest
    model_path: Path | None = None  # where the source model is, if not at its recorded path (--model)

    @classmethod
    def open(cls, root: str | Path, say=lambda msg: None, model: str | Path | None = None) -> "ExportDir":
        """Open and check an export (``model``: a moved copy of the source model, for torch references)."""
        from .paths import not_an_export_inside_one, symlink_loop

        root = Path(root)
        if symlink_loop(root):
            raise IntegrityError(f"{root}: a symbolic link loop (it never reaches a directory), not an export "
                                 "directory; give the export directory itself")
        if not (root / "manifest.json").is_file():  # a part of an export (OUT/unet): give OUT, not 'export -o OUT/unet'
            inside = not_an_export_inside_one(root)
            if inside:
                raise IntegrityError(inside)
        if not root.is_dir():
            if root.is_file():
                raise IntegrityError(f"{root}: a file, not an export directory")
            raise IntegrityError(f"{root}: no such export directory; run 'sdexport export MODEL -o {root}'")
        recover_if_needed(root, say)
        export = cls(root, Manifest.load(root), Path(model) if model else None)
        export._check_manifest()
        return export

    def _check_manifest(self) -> None:
        data = self.manifest.data
        where = self.root / "manifest.json"
        remedy = f"re-export: sdexport export MODEL -o {self.root} --force"
        if data.get("manifest_version") != MANIFEST_VERSION:
            raise IntegrityError(f"{where}: written by another sdexport (manifest version "
                                 f"{data.get('manifest_version')!r}, this one reads {MANIFEST_VERSION}); {remedy}")
        model, ranges = data.get("model"), data.get("ranges")
        if not isinstance(model, dict) or not isinstance(ranges, dict):
            raise IntegrityError(f"{where}: incomplete (no model or ranges); {remedy}")
        try:
            if not ShapeRanges.from_json(ranges).consistent():
                raise TypeError
            for key, kind in (("family", str), ("pipeline_class", str), ("weights_sha256", str), ("path", str),
                              ("configs", dict), ("tokenizer_max_lengths", dict)):
                if not isinstance(model.get(key), kind):
                    raise TypeError
            if not all(isinstance(v, dict) for v in model["configs"].values()) or "unet" not in model["configs"]:
                raise TypeError
        except TypeError:
            raise IntegrityError(f"{where}: its model or ranges section is malformed; {remedy}") from None
        if not data.get("files"):
            raise IntegrityError(f"{where}: lists no pipeline files (scheduler, tokenizer); {remedy}")
        self.manifest.verify_files(remedy)

    def verify_components(self) -> None:
        """Every file of every exported component against its sha256 in the manifest (Manifest.check_file: exit 5
        with the line the reading commands give), for a command that builds on the export or writes from it
        (build --backend ort/inductor, serve --write-repository): a damaged export gets nothing made from it."""
        for name in self.manifest.components:
            self.manifest.verified_path(self.manifest.component(name))

    # --- what the export is ---------------------------------------------------------------
    def _read_json(self, rel: str) -> dict[str, Any]:
        path = self.manifest.path(rel)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise IntegrityError(f"{path}: unreadable ({exc}); re-export") from None
        if not isinstance(data, dict):
            raise IntegrityError(f"{path}: not a JSON object; re-export")
        return data

    @cached_property
    def info(self) -> ModelInfo:
        model = self.manifest.data["model"]
        info = ModelInfo(
            root=self.root, pipeline_class=model["pipeline_class"], family_name=model["family"],
            configs=model["configs"], tokenizer_max_lengths={k: int(v) for k, v in model["tokenizer_max_lengths"].items()},
            scheduler_config=self._read_json("scheduler/scheduler_config.json"),
            index=self._read_json("model_index.json"), preset=model.get("preset"))
        try:
            info.check()
        except ModelError as exc:
            raise IntegrityError(f"{self.root}/manifest.json: {exc}") from None
        return info

    @property
    def family(self):
        return self.info.family

    @cached_property
    def ranges(self) -> ShapeRanges:
        return ShapeRanges.from_json(self.manifest.data["ranges"])

    @cached_property
    def specs(self) -> dict[str, ComponentSpec]:
        return self.family.specs(self.info, self.ranges)

    def spec(self, name: str) -> ComponentSpec:
        """The spec of a component of this export's family (exported to ONNX or not: engines that need its
        ONNX file check the manifest themselves), or of an artifact made from one (``unet_int8``)."""
        if name in VARIANT_OF:  # same interface as the component it was made from, under its own name
            self.manifest.component(name)  # raises if it was not made
            return dataclasses.replace(self.specs[VARIANT_OF[name]], name=name)
        if name not in self.specs:
            raise IntegrityError(f"{self.root}: component '{name}' is not part of a {self.family.description} export")
        return self.specs[name]

    def lora_applies(self, component: str) -> bool:
        """Whether a LoRA can change ``component`` (lora.lora_parts: the UNet and text encoders, not the VAE)."""
        from .lora import lora_parts

        return self.spec(component).source in lora_parts(self.info)

    def loras_of(self, component: str) -> list[dict[str, Any]]:
        """The LoRAs fused into ``component`` (as the manifest records them): the export's where a LoRA applies,
        none elsewhere. Part of the rebuild key of what is made from the source model (ORT CUDA variant, Inductor
        package), so another LoRA set rebuilds those of the UNet and text encoders only."""
        return self.manifest.data["model"].get("loras", []) if self.lora_applies(component) else []

    @property
    def dtype(self) -> str:
        """The precision the export was made in (``export --dtype``)."""
        return str(self.manifest.data.get("dtype", "?"))

    @property
    def pipeline_components(self) -> list[str]:
        """The exported components the sampler loop runs (text encoders, UNet, VAE decoder; and the VAE
        encoder for an inpainting model, which always starts from an image)."""
        return self.components_for(image=self.info.inpainting)

    def components_for(self, image: bool) -> list[str]:
        """The components a request runs: with an input image (image-to-image, inpainting) the VAE encoder too."""
        return [c for c in self.family.components(self.info) if image or c != "vae_encoder"]

    @staticmethod
    def check_requested(names, available) -> None:
        """A --components list naming one that is not among ``available`` (a typo, another family's, one
        never exported) is a bad option, exit 2: the export itself is intact."""
        unknown = [c for c in names if c not in available]
        if unknown:
            raise UsageError(f"unknown or not exported component(s) {', '.join(unknown)} "
                             f"(exported: {', '.join(available) or 'none'})")

    def check_components(self, names: list[str]) -> None:
        """The components a command loads belong together: made from the weights, ranges and dtype this
        manifest records, by this sdexport; a variant from the current file of its component. A mix
        (an interrupted or partial re-export by an older version, a hand-edited manifest) is exit 5."""
        model = self.manifest.data["model"]
        for name in names:
            entry = self.manifest.component(name)
            key = entry.get("key", {})
            remedy = f"re-export: sdexport export MODEL -o {self.root} --force"
            if name in VARIANT_OF:
                source = self.manifest.components.get(VARIANT_OF[name], {})
                if entry.get("source", {}).get("sha256") != source.get("sha256"):
                    raise IntegrityError(f"{self.root}: {name} was made from another {VARIANT_OF[name]} than the one "
                                         f"now in the export; re-run 'sdexport quantize {self.root} --force'")
                continue
            problems = []
            if key.get("weights_sha256") != model["weights_sha256"]:
                problems.append("source weights")
            if key.get("ranges") != self.manifest.data["ranges"]:
                problems.append(f"shape ranges ({_ranges_text(key.get('ranges'))} vs "
                                f"{_ranges_text(self.manifest.data['ranges'])})")
            if key.get("dtype") != self.manifest.data.get("dtype"):
                problems.append(f"dtype ({key.get('dtype')} vs {self.manifest.data.get('dtype')})")
            if "loras" in key and key["loras"] != model.get("loras", []):
                problems.append("fused LoRAs")
            if key.get("sdexport") != __version__:
                problems.append(f"sdexport version ({key.get('sdexport')} vs {__version__})")
            if problems:
                raise IntegrityError(f"{self.root}: {name} differs from the rest of the export in "
                                     f"{', '.join(problems)}; {remedy}")

    # --- the source model -------------------------------------------------------------
    def source_model(self) -> ModelInfo:
        """The diffusers model this export was made from (for the PyTorch reference): at its recorded
        path, or where ``--model`` says it moved; its weights must be the ones exported."""
        if getattr(self, "_source", None) is not None:  # hashed once per command (bench asks before timing)
            return self._source
        model = self.manifest.data["model"]
        path = self.model_path or Path(model["path"])
        try:
            from .models import resolve_model

            info = resolve_model(str(path)) if self.model_path else ModelInfo.open(path, preset=model.get("preset"))
        except ModelError as exc:
            if model.get("preset") and not self.model_path:
                from .models import resolve_model

                info = resolve_model(model["preset"], preset_only=True)  # rebuilt identically from its seed
            else:
                raise ModelError(f"the source model of {self.root} is not available ({exc}); point at a copy of it "
                                 "with --model DIR") from None
        if info.weights_sha256 != model["weights_sha256"]:
            raise IntegrityError(f"{info.root}: its weights are not the ones {self.root} was exported from "
                                 f"(sha256 {info.weights_sha256[:12]}… vs {model['weights_sha256'][:12]}…)")
        info.loras = self.fused_loras()
        self._source = info
        return info

    def fused_loras(self) -> list:
        """The LoRAs fused into this export (lora.LoraFile), each file checked against its recorded sha256:
        a PyTorch reference of the export needs them."""
        from .lora import LoraFile

        return [LoraFile.recorded(record, f"fused into {self.root}", "; the PyTorch reference of this export needs it")
                for record in self.manifest.data["model"].get("loras", [])]


def _ranges_text(ranges: Any) -> str:
    if not isinstance(ranges, dict):
        return "?"
    return (f"{ranges.get('min_size')}-{ranges.get('max_size')} px in steps of {ranges.get('pixel_multiple')}, "
            f"x{ranges.get('max_images')}")
