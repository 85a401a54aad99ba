"""An export directory as the runtime sees it: manifest, specs, tokenizer, scheduler config.

The component specs are rebuilt from the model configs and shape ranges that the
manifest recorded at export time, so engines, buffers and shape checks use the
very declaration the export was made from, without the source model.
"""

from __future__ import annotations

import dataclasses
import json
from functools import cached_property
from pathlib import Path

from .components import ComponentSpec, ShapeRanges, component_specs
from .errors import IntegrityError, ModelError
from .manifest import Manifest
from .models import ModelInfo

# Artifacts made from an exported component that keep its interface: name -> the component.
VARIANTS = {"unet_int8": "unet"}  # sdexport quantize (quantize.py)


@dataclasses.dataclass
class ExportDir:
    root: Path
    manifest: Manifest

    @classmethod
    def open(cls, root: str | Path) -> "ExportDir":
        root = Path(root)
        if not root.is_dir():
            raise IntegrityError(f"{root}: no such export directory; run 'sdexport export MODEL -o {root}'")
        manifest = Manifest.load(root)
        if "model" not in manifest.data or "ranges" not in manifest.data:
            raise IntegrityError(f"{root}/manifest.json: incomplete (no model or ranges); re-export")
        return cls(root, manifest)

    @cached_property
    def info(self) -> ModelInfo:
        model = self.manifest.data["model"]
        configs = model["configs"]
        scheduler_path = self.root / "scheduler" / "scheduler_config.json"
        return ModelInfo(
            root=self.root, pipeline_class=model["pipeline_class"], unet_config=configs["unet"],
            vae_config=configs["vae"], text_encoder_config=configs["text_encoder"],
            tokenizer_max_length=model["tokenizer_max_length"],
            scheduler_config=json.loads(scheduler_path.read_text()), preset=model.get("preset"))

    @cached_property
    def ranges(self) -> ShapeRanges:
        return ShapeRanges.from_json(self.manifest.data["ranges"])

    @cached_property
    def specs(self) -> dict[str, ComponentSpec]:
        return component_specs(self.info, self.ranges)

    def spec(self, name: str) -> ComponentSpec:
        self.manifest.component(name)  # raises if it was not exported
        if name in VARIANTS:  # same interface as the component it was made from, under its own name
            return dataclasses.replace(self.specs[VARIANTS[name]], name=name)
        return self.specs[name]

    @property
    def dtype(self) -> str:
        dtypes = {c["precision"]["dtype"] for name, c in self.manifest.components.items() if name not in VARIANTS}
        return dtypes.pop() if len(dtypes) == 1 else "mixed"

    def source_model(self) -> ModelInfo:
        """The diffusers model this export was made from (for the PyTorch reference)."""
        model = self.manifest.data["model"]
        try:
            info = ModelInfo.open(model["path"], preset=model.get("preset"))
        except ModelError as exc:
            raise ModelError(f"the source model of {self.root} is not available: {exc}") from None
        if info.weights_sha256 != model["weights_sha256"]:
            raise IntegrityError(f"{model['path']}: weights changed since {self.root} was exported; re-export")
        return info
