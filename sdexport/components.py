"""ComponentSpec: the one declaration per exported component.

A spec says, once, what a component's tensors are called, their dtypes, which
axes are dynamic and over what range, how to make sample inputs, which torch
module to export and which ops must stay FP32 in the mixed-precision graph.
Export (``torch.onnx.export`` arguments), validation (shapes and inputs), engine
profiles (min/opt/max), runtime buffers and the manifest are all derived from it.

Names follow Hugging Face Optimum's ONNX layout for Stable Diffusion, so the
export directory loads in ``ORTStableDiffusionPipeline``.

Shapes are requested in the user's terms, a ``Geometry`` (images, height and
width in pixels, guidance on or off), and each spec maps it to its own axes:
the text encoder and UNet see two rows per image with classifier-free guidance,
the VAE one.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from .errors import ShapeError
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
    def for_model(cls, info: ModelInfo, max_images: int = 4, min_size: int | None = None,
                  max_size: int | None = None) -> "ShapeRanges":
        mult = info.pixel_multiple
        native = info.image_size
        lo = min_size if min_size is not None else max(mult, (native // 2) // mult * mult)
        hi = max_size if max_size is not None else native * 2
        if lo % mult or hi % mult or lo > hi or lo <= 0:
            raise ShapeError(f"image size range [{lo}, {hi}] must be positive multiples of {mult} with min <= max")
        if max_images < 1:
            raise ShapeError("--max-batch must be at least 1")
        opt = min(max(native, lo), hi)
        return cls(max_images=max_images, min_size=lo, max_size=hi, opt_size=opt, pixel_multiple=mult)

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
    # text encoder only: (vocab size, bos id, eos id), so sample token ids look like tokenizer output
    token_ids: tuple[int, int, int] | None = None

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

    def sample_inputs(self, dims: dict[str, int], seed: int = 0, device: str = "cpu") -> dict[str, Any]:
        """Deterministic inputs of the right shapes, dtypes and value ranges."""
        import torch

        gen = torch.Generator("cpu").manual_seed(seed)
        feed = {}
        for t in self.inputs:
            shape = t.shape(dims)
            if t.name == "input_ids":
                vocab, bos, eos = self.token_ids
                ids = torch.randint(1, vocab - 2, shape, generator=gen)
                ids[:, 0] = bos
                ends = torch.randint(2, shape[1], (shape[0],), generator=gen)
                for row, end in enumerate(ends.tolist()):
                    ids[row, end:] = eos
                value = ids
            elif t.name == "timestep":
                value = torch.randint(1, 1000, shape, generator=gen).float()
            elif t.name == "sample" and self.name == "vae_encoder":
                value = torch.rand(shape, generator=gen) * 2 - 1  # images live in [-1, 1]
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


def _text_encoder_wrapper(module):
    import torch

    class TextEncoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.text_encoder = module

        def forward(self, input_ids):
            out = self.text_encoder(input_ids, return_dict=True)
            return out.last_hidden_state, out.pooler_output

    return TextEncoder()


def _unet_wrapper(module):
    import torch

    class UNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.unet = module

        def forward(self, sample, timestep, encoder_hidden_states):
            return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]

    return UNet()


def _vae_decoder_wrapper(module):
    import torch

    class VaeDecoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vae = module

        def forward(self, latent_sample):
            return self.vae.decode(latent_sample, return_dict=False)[0]

    return VaeDecoder()


def _vae_encoder_wrapper(module):
    import torch

    class VaeEncoder(torch.nn.Module):
        """Image -> latent distribution parameters (mean and log-variance), as Optimum exports it."""

        def __init__(self):
            super().__init__()
            self.vae = module

        def forward(self, sample):
            moments = self.vae.encoder(sample)
            if getattr(self.vae, "quant_conv", None) is not None:
                moments = self.vae.quant_conv(moments)
            return moments

    return VaeEncoder()


COMPONENTS = ("text_encoder", "unet", "vae_decoder", "vae_encoder")


def component_specs(info: ModelInfo, ranges: ShapeRanges) -> dict[str, ComponentSpec]:
    """The four components of an SD 1.x/2.x pipeline, for this model and these ranges."""
    f = info.vae_scale_factor
    rows = Axis("batch", 1, 2, 2 * ranges.max_images)
    images = Axis("batch", 1, 1, ranges.max_images)
    lat_mult = info.unet_latent_multiple
    lat_h = Axis("latent_height", ranges.min_size // f, ranges.opt_size // f, ranges.max_size // f, lat_mult)
    lat_w = dataclasses.replace(lat_h, name="latent_width")
    img_h = Axis("image_height", ranges.min_size, ranges.opt_size, ranges.max_size, ranges.pixel_multiple)
    img_w = dataclasses.replace(img_h, name="image_width")
    seq = info.tokenizer_max_length
    c_lat = info.latent_channels

    def latent_dims(batch_of):
        return lambda g: {"batch": batch_of(g), "latent_height": g.height // f, "latent_width": g.width // f}

    specs = [
        ComponentSpec(
            name="text_encoder", source="text_encoder", config_source="text_encoder",
            inputs=(TensorSpec("input_ids", "int32", ("batch", seq)),),
            outputs=(TensorSpec("last_hidden_state", "float32", ("batch", seq, info.text_hidden_size)),
                     TensorSpec("pooler_output", "float32", ("batch", info.text_hidden_size))),
            axes={"batch": rows}, dims_for=lambda g: {"batch": g.rows}, wrap=_text_encoder_wrapper,
            # CLIP's vocabulary ends with <|startoftext|>, <|endoftext|>
            token_ids=(info.vocab_size, info.vocab_size - 2, info.vocab_size - 1),
        ),
        ComponentSpec(
            name="unet", source="unet", config_source="unet",
            inputs=(TensorSpec("sample", "float32", ("batch", c_lat, "latent_height", "latent_width")),
                    TensorSpec("timestep", "float32", ("batch",)),
                    TensorSpec("encoder_hidden_states", "float32", ("batch", seq, info.cross_attention_dim))),
            outputs=(TensorSpec("out_sample", "float32",
                                ("batch", info.unet_out_channels, "latent_height", "latent_width")),),
            axes={"batch": rows, "latent_height": lat_h, "latent_width": lat_w},
            dims_for=latent_dims(lambda g: g.rows), wrap=_unet_wrapper,
            # The sinusoidal timestep embedding takes sin/cos of t * freq with t up to 1000:
            # in FP16 the argument's rounding error alone exceeds 0.1 rad.
            fp32_node_patterns=(r".*time_proj.*", r".*time_embedding.*"),
        ),
        ComponentSpec(
            name="vae_decoder", source="vae", config_source="vae",
            inputs=(TensorSpec("latent_sample", "float32", ("batch", c_lat, "latent_height", "latent_width")),),
            outputs=(TensorSpec("sample", "float32",
                                ("batch", info.image_channels, f"latent_height * {f}", f"latent_width * {f}")),),
            axes={"batch": images, "latent_height": lat_h, "latent_width": lat_w},
            dims_for=lambda g: {"batch": g.images, "latent_height": g.height // f, "latent_width": g.width // f},
            wrap=_vae_decoder_wrapper,
        ),
        ComponentSpec(
            name="vae_encoder", source="vae", config_source="vae",
            inputs=(TensorSpec("sample", "float32", ("batch", info.image_channels, "image_height", "image_width")),),
            outputs=(TensorSpec("latent_parameters", "float32",
                                ("batch", 2 * c_lat, f"image_height / {f}", f"image_width / {f}")),),
            axes={"batch": images, "image_height": img_h, "image_width": img_w},
            dims_for=lambda g: {"batch": g.images, "image_height": g.height, "image_width": g.width},
            wrap=_vae_encoder_wrapper,
        ),
    ]
    return {s.name: s for s in specs}


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
