"""The Engine interface and the loader that picks a backend.

An Engine runs one component. It takes and returns torch tensors on its
``device``, keyed by the component spec's tensor names, and checks shapes
against the spec's ranges (ShapeError names the range). Torch owns the device
and the stream: backends run on ``torch.cuda.current_stream()``.
"""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Any

from ..components import ComponentSpec
from ..errors import UsageError

BACKENDS = ("ort", "torch", "trt")


class Engine(abc.ABC):
    backend: str = "?"

    def __init__(self, spec: ComponentSpec, device: str):
        self.spec = spec
        self.device = device

    def dims(self, feed: dict[str, Any]) -> dict[str, int]:
        """Axis values implied by the inputs' shapes; raises ShapeError outside the ranges."""
        from ..errors import ShapeError

        dims: dict[str, int] = {}
        for t in self.spec.inputs:
            if t.name not in feed:
                raise UsageError(f"{self.spec.name}: input '{t.name}' missing")
            shape = tuple(feed[t.name].shape)
            if len(shape) != len(t.dims):
                raise ShapeError(f"{self.spec.name}: input '{t.name}' has rank {len(shape)}, expected {len(t.dims)}")
            for size, dim in zip(shape, t.dims):
                if isinstance(dim, int) and size != dim:
                    raise ShapeError(f"{self.spec.name}: input '{t.name}' has shape {shape}; "
                                     f"expected {tuple(t.dims)}")
                if isinstance(dim, str):
                    if dims.setdefault(dim, size) != size:
                        raise ShapeError(f"{self.spec.name}: inputs disagree on {dim} ({dims[dim]} vs {size})")
        self.spec.check_dims(dims)
        return dims

    @abc.abstractmethod
    def __call__(self, feed: dict[str, Any]) -> dict[str, Any]:
        """Run the component; inputs and outputs are torch tensors on ``self.device``."""

    def close(self) -> None:
        pass


def load_engines(export_dir: str | Path, backend: str, components: list[str] | None = None,
                 device: str = "cpu", dtype: str | None = None, **options) -> dict[str, Engine]:
    """Engines for ``components`` of an export directory, on ``backend``."""
    from ..runtime import ExportDir

    if backend not in BACKENDS:
        raise UsageError(f"unknown backend '{backend}' (choose from {', '.join(BACKENDS)})")
    export = ExportDir.open(export_dir)
    components = components or ["text_encoder", "unet", "vae_decoder"]
    if backend == "ort":
        from .ort import OrtEngine

        return {c: OrtEngine(export, c, device=device, **options) for c in components}
    if backend == "torch":
        from .torch import TorchEngine

        return TorchEngine.load_all(export, components, device=device, dtype=dtype or "fp32")
    from .trt import TrtEngine

    return TrtEngine.load_all(export, components, device=device, **options)
