"""ComponentSpec: the one declaration per exported component.

A spec says, once, what a component's tensors are called, their dtypes, which
axes are dynamic and over what range, how to make sample inputs, which torch
module to export and which ops must stay FP32 in the mixed-precision graph.
Export (``torch.onnx.export`` arguments), validation (shapes and inputs), engine
profiles (min/opt/max), runtime buffers and the manifest are all derived from it.

Names follow Hugging Face Optimum's ONNX layout for Stable Diffusion, so the
export directory loads in Optimum's ORT pipelines. The specs themselves are declared by
each model family (``sdexport/families``); this module is the vocabulary they use.

Shapes are requested in the user's terms, a ``Geometry`` (images, height and
width in pixels, guidance on or off), and each spec maps it to its own axes:
the text encoder and UNet see two rows per image with classifier-free guidance,
the VAE one.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable

from .errors import ShapeError

if TYPE_CHECKING:
    from .models import ModelInfo

# Ops kept in FP32 in every FP16 graph, and why:
#  - InstanceNormalization / GroupNormalization / LayerNormalization: mean and variance
#    over thousands of FP16 values lose precision and the variance can overflow.
#  - Softmax: its exp/sum accumulation; FP16 softmax over 4096 keys drifts visibly.
#  - Resize: its scales input must stay FP32 (an FP16 scales tensor is invalid ONNX).
FP32_OP_TYPES = ("InstanceNormalization", "GroupNormalization", "LayerNormalization", "Softmax", "Resize")


@dataclasses.dataclass(frozen=True)
class Axis:
    """A named dynamic axis and the range an export supports."""

    name: str
    min: int
    opt: int
    max: int
    multiple: int = 1

    def check(self, value: int, what: str) -> None:
        if not (self.min <= value <= self.max) or value % self.multiple:
            step = f", multiple of {self.multiple}" if self.multiple > 1 else ""
            raise ShapeError(f"{what}: {self.name}={value} is outside the exported range "
                             f"[{self.min}, {self.max}]{step}")

    def to_json(self) -> dict[str, int]:
        return {"min": self.min, "opt": self.opt, "max": self.max, "multiple": self.multiple}


def axis_size(dim: str | int, dims: dict[str, int]) -> int:
    """Size of a dim: an int, an axis name, or an expression of axis names ("latent_height * 8").

    Output axes that no input carries are written as expressions of input axes, the
    convention Optimum's ORT pipeline evaluates to size its I/O-binding buffers.
    """
    if isinstance(dim, int):
        return dim
    if dim in dims:
        return dims[dim]
    return int(eval(dim, {"__builtins__": {}}, dict(dims)))  # names and arithmetic only; specs are ours


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name
    dims: tuple[str | int, ...]  # axis names (dynamic) or ints (static)
    # What sample values look like (``ComponentSpec.sample_inputs``): normal, timestep, token_ids, image,
    # time_ids (SDXL size conditioning), guidance_embedding (LCM).
    values: str = "normal"

    def shape(self, dims: dict[str, int]) -> tuple[int, ...]:
        return tuple(axis_size(d, dims) for d in self.dims)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "dims": list(self.dims)}


@dataclasses.dataclass(frozen=True)
class Geometry:
    """A request in user terms: images per call, image size in pixels, guidance on/off."""

    images: int
    height: int
    width: int
    guidance: bool = True

    @property
    def rows(self) -> int:
        """Rows the text encoder and UNet see: two per image under classifier-free guidance."""
        return self.images * (2 if self.guidance else 1)


@dataclasses.dataclass(frozen=True)
class ShapeRanges:
    """What an export supports: images per call and image sides in pixels."""

    max_images: int
    min_size: int
    max_size: int
    opt_size: int
    pixel_multiple: int

    @classmethod
    def for_model(cls, info: "ModelInfo", max_images: int = 4, min_size: int | None = None,
                  max_size: int | None = None) -> "ShapeRanges":
        mult = info.pixel_multiple
        native = info.image_size
        default_lo, default_hi = info.family.default_size_range(info)
        lo = min_size if min_size is not None else default_lo
        hi = max_size if max_size is not None else default_hi
        if lo % mult or hi % mult or lo > hi or lo <= 0:
            raise ShapeError(f"image size range [{lo}, {hi}] must be positive multiples of {mult} with min <= max")
        if max_images < 1:
            raise ShapeError("--max-batch must be at least 1")
        opt = min(max(native, lo), hi)
        return cls(max_images=max_images, min_size=lo, max_size=hi, opt_size=opt, pixel_multiple=mult)

    def consistent(self) -> bool:
        """What ``for_model`` makes: sides and counts positive, min and max multiples of the pixel multiple,
        min <= opt <= max (a manifest's ranges that are not were edited or damaged)."""
        values = dataclasses.astuple(self)
        return (all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values)
                and not self.min_size % self.pixel_multiple and not self.max_size % self.pixel_multiple
                and self.min_size <= self.opt_size <= self.max_size)

    def to_json(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, int]) -> "ShapeRanges":
        return cls(**data)

    def check(self, geo: Geometry) -> None:
        for side, value in (("height", geo.height), ("width", geo.width)):
            if value % self.pixel_multiple:
                raise ShapeError(f"{side} {value} is not a multiple of {self.pixel_multiple} "
                                 f"(VAE scale factor x UNet downsampling)")
            if not self.min_size <= value <= self.max_size:
                raise ShapeError(f"{side} {value} is outside the exported range "
                                 f"[{self.min_size}, {self.max_size}] pixels")
        if not 1 <= geo.images <= self.max_images:
            raise ShapeError(f"batch size {geo.images} is outside the exported range [1, {self.max_images}]")


@dataclasses.dataclass(frozen=True)
class ComponentSpec:
    """Everything about one component that export, validation, engines and the runtime share."""

    name: str  # Optimum folder name
    source: str  # diffusers subfolder holding the torch weights
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    axes: dict[str, Axis]
    dims_for: Callable[[Geometry], dict[str, int]]
    wrap: Callable[[Any], Any]  # torch module of ``source`` -> nn.Module taking ``inputs`` in order
    fp32_node_patterns: tuple[str, ...] = ()
    config_source: str = ""
    # text encoders only: (vocab size, bos id, eos id), so sample token ids look like tokenizer output
    token_ids: tuple[int, int, int] | None = None
    # Why this component stays FP32 in an FP16 export (None: it is converted); e.g. an SDXL VAE (force_upcast).
    keep_fp32: str | None = None

    # --- derived views -------------------------------------------------------------
    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """``torch.onnx.export``'s dynamic_axes, named after the spec's axes."""
        return {t.name: {i: d for i, d in enumerate(t.dims) if isinstance(d, str)}
                for t in self.inputs + self.outputs}

    def check_dims(self, dims: dict[str, int]) -> None:
        for axis in self.axes.values():
            axis.check(dims[axis.name], self.name)

    def shapes(self, dims: dict[str, int]) -> dict[str, tuple[int, ...]]:
        return {t.name: t.shape(dims) for t in self.inputs + self.outputs}

    def profile(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """min/opt/max shape per input: what a TensorRT optimization profile needs."""
        pick = {k: {a.name: getattr(a, k) for a in self.axes.values()} for k in ("min", "opt", "max")}
        return {t.name: (t.shape(pick["min"]), t.shape(pick["opt"]), t.shape(pick["max"])) for t in self.inputs}

    def opt_dims(self) -> dict[str, int]:
        return {a.name: a.opt for a in self.axes.values()}

    def min_dims(self) -> dict[str, int]:
        """The smallest shape of the range: the FP16 conversion's reference run uses it (precision.convert_fp16)."""
        return {a.name: a.min for a in self.axes.values()}

    def sample_inputs(self, dims: dict[str, int], seed: int = 0, device: str = "cpu") -> dict[str, Any]:
        """Deterministic inputs of the right shapes, dtypes and value ranges (``TensorSpec.values``)."""
        import torch

        gen = torch.Generator("cpu").manual_seed(seed)
        feed = {}
        for t in self.inputs:
            shape = t.shape(dims)
            if t.values == "token_ids":
                vocab, bos, eos = self.token_ids
                ids = torch.randint(1, vocab - 2, shape, generator=gen)
                ids[:, 0] = bos
                ends = torch.randint(2, shape[1], (shape[0],), generator=gen)
                for row, end in enumerate(ends.tolist()):
                    ids[row, end:] = eos
                value = ids
            elif t.values == "timestep":
                value = torch.randint(1, 1000, shape, generator=gen).float()
            elif t.values == "image":
                value = torch.rand(shape, generator=gen) * 2 - 1  # images live in [-1, 1]
            elif t.values == "time_ids":  # sizes in pixels, crop offsets, (refiner) an aesthetic score
                value = torch.randint(0, 1024, shape, generator=gen).float()
            elif t.values == "guidance_embedding":
                from .families.base import guidance_embedding

                scales = torch.rand(shape[0], generator=gen) * 14 + 1
                value = torch.cat([guidance_embedding(float(s), 1, shape[1]) for s in scales])
            else:
                value = torch.randn(shape, generator=gen)
            feed[t.name] = value.to(getattr(torch, t.dtype)).to(device)
        return feed

    def to_json(self) -> dict[str, Any]:
        return {
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
            "dynamic_axes": self.dynamic_axes(),
            "axes": {name: axis.to_json() for name, axis in self.axes.items()},
            "profile": {k: [list(s) for s in v] for k, v in self.profile().items()},
        }


def validation_geometries(ranges: ShapeRanges) -> list[Geometry]:
    """Shapes spread over the dynamic range: smallest, a batch other than the export's,
    a non-square size, and the largest. The export itself uses the opt shape (1 image)."""
    lo, hi, opt, m = ranges.min_size, ranges.max_size, ranges.opt_size, ranges.pixel_multiple
    mid = max(lo, min(hi, (lo + hi) // 2 // m * m))
    shapes = [
        Geometry(1, lo, lo, guidance=False),
        Geometry(min(2, ranges.max_images), opt, opt),
        Geometry(1, lo, mid if mid != lo else hi),
        Geometry(min(3, ranges.max_images), hi, lo),
    ]
    seen, unique = set(), []
    for g in shapes:
        if g not in seen:
            seen.add(g)
            unique.append(g)
    return unique
