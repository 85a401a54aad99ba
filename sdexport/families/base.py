"""What every model family declares, and the pieces families share.

A ``Family`` is the one place that says, for one kind of diffusers pipeline:
 - which diffusers folders it needs and which pipeline classes it accepts (``parts``, ``pipeline_classes``);
 - which features of a model it cannot run yet (``check``: exit 3 naming the feature);
 - its exported components and each component's spec (``specs``), and the default shape ranges;
 - how prompts become the UNet's conditioning inputs (``encode``), and what guidance means (``guidance``);
 - which diffusers pipeline class is its reference (``reference_pipeline``), for parity and calibration.
Export, validation, engines, calibration/quantization, the runtime and the sampler loop ask the family
and never test for a family by name.

UNet features that cut across families live here too: the LCM guidance embedding (``timestep_cond``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any, Callable

from ..components import Axis, ComponentSpec, Geometry, ShapeRanges, TensorSpec
from ..errors import ModelError, UsageError

if TYPE_CHECKING:
    from ..models import ModelInfo


# Ops kept in FP32 by name in every UNet's FP16 graph: sinusoidal embeddings take sin/cos of values up
# to 1000 (timesteps) or 1024 (SDXL size conditioning); in FP16 the argument's rounding alone exceeds 0.1 rad.
UNET_FP32_PATTERNS = (r".*time_proj.*", r".*time_embedding.*")

# UNet configuration features no family runs yet: (config key, value test, the feature's name).
UNSUPPORTED_UNET_FEATURES: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("class_embed_type", lambda v: v is not None, "class embeddings (class_embed_type)"),
    ("encoder_hid_dim_type", lambda v: v is not None, "encoder hidden-state projections (encoder_hid_dim_type, "
                                                      "e.g. IP-Adapter image projections)"),
    ("num_class_embeds", lambda v: v is not None, "class-conditional UNet (num_class_embeds)"),
)


@dataclasses.dataclass(frozen=True)
class Guidance:
    """What a guidance scale means for one model: classifier-free guidance as a doubled batch, or (LCM)
    a guidance embedding fed as ``timestep_cond`` with a single batch."""

    scale: float
    cfg: bool  # two UNet rows per image: [negative, positive]
    embedding_dim: int | None = None  # LCM: width of the guidance-scale embedding


@dataclasses.dataclass(frozen=True)
class FamilyOption:
    """A request option only some models take (a CLI flag of ``infer``, a keyword of ``Pipeline.__call__``).

    ``kind``: "size" (two ints, height and width in pixels), "coords" (two ints, top and left in pixels) or
    "score" (one float). ``applies_to`` names the models that take it, for the error a model without it gives.
    """

    name: str
    help: str
    kind: str
    applies_to: str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def check(self, value: Any) -> Any:
        """The value as the conditioning uses it (a tuple of ints, or a float); out of bounds is exit 2."""
        lo, hi, unit = OPTION_BOUNDS[self.kind]
        values = tuple(value) if isinstance(value, (tuple, list)) else (value,)
        want = 1 if self.kind == "score" else 2
        if len(values) != want:
            raise UsageError(f"{self.flag}: expected {want} value(s), got {len(values)}")
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi \
                    or (self.kind != "score" and v != int(v)):
                what = "a number" if self.kind == "score" else "whole numbers"
                raise UsageError(f"{self.flag} {' '.join(map(str, values))}: must be {what} in [{lo}, {hi}]{unit}")
        return float(values[0]) if self.kind == "score" else tuple(int(v) for v in values)


# Sensible bounds of the micro-conditioning values. Sizes: SDXL's paper shows original sizes from 64 px up;
# beyond 4 x its native 1024 px nothing was trained. Aesthetic scores are LAION's 0-10 scale.
OPTION_BOUNDS = {"size": (64, 4096, " pixels"), "coords": (0, 4096, " pixels"), "score": (0.0, 10.0, "")}


def guidance_for(info: "ModelInfo", guidance_scale: float) -> Guidance:
    """diffusers' rule: guidance is on when the scale exceeds 1, unless the UNet takes a guidance
    embedding (``time_cond_proj_dim``, LCM-distilled), which replaces classifier-free guidance."""
    dim = info.unet_config.get("time_cond_proj_dim")
    if dim:
        return Guidance(guidance_scale, cfg=False, embedding_dim=int(dim))
    return Guidance(guidance_scale, cfg=guidance_scale > 1.0)


def unused_negative_prompt(guidance: Guidance) -> tuple[str, str] | None:
    """Why a negative prompt goes unused under ``guidance``, as (kind, warning text), or None where classifier-free
    guidance uses it. diffusers' pipelines drop it without a word in both cases: an LCM UNet (guidance embedding,
    no negative batch) and a scale of at most 1. One rule and one wording for infer/serve (``Pipeline``, once a
    pipeline per kind) and calibrate (which runs diffusers' pipeline itself)."""
    if guidance.embedding_dim:
        return "lcm-negative", ("the negative prompt is not used: an LCM UNet runs without classifier-free guidance "
                                "(diffusers' LCM pipelines take none)")
    if not guidance.cfg:
        return "cfg-negative", (f"the negative prompt is not used: guidance scale {guidance.scale:g} (at most 1) "
                                "runs without classifier-free guidance, as diffusers' pipelines do (a scale above 1 "
                                "uses it)")
    return None


def guidance_embedding(guidance_scale: float, rows: int, dim: int):
    """The LCM guidance-scale embedding, computed as diffusers' pipelines do (w = scale - 1, the Imagen
    CFG convention), so that an LCM UNet sees what it sees under diffusers."""
    import torch
    from diffusers import LatentConsistencyModelPipeline

    w = torch.tensor(guidance_scale - 1).repeat(rows)
    return LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)


# Request defaults where the user gives none: diffusers' own per pipeline (StableDiffusionPipeline 7.5 with our
# historical 30 steps; LatentConsistencyModelPipeline 4 steps at 8.5; a family may set its own guidance).
DEFAULT_STEPS = 30
LCM_DEFAULTS = {"steps": 4, "guidance_scale": 8.5}


# --- torch wrappers: module -> nn.Module taking a spec's inputs in order, returning its outputs ----------

def unet_wrapper(input_names: tuple[str, ...]):
    """UNet2DConditionModel with the spec's inputs as positional arguments (how torch.onnx.export calls it)."""
    added = {"text_embeds", "time_ids"}

    def wrap(module):
        import torch

        class UNet(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.unet = module

            def forward(self, *args):
                kw = dict(zip(input_names, args))
                cond = {k: kw.pop(k) for k in list(kw) if k in added}
                return self.unet(kw.pop("sample"), kw.pop("timestep"), kw.pop("encoder_hidden_states"),
                                 added_cond_kwargs=cond or None, return_dict=False, **kw)[0]

        return UNet()

    return wrap


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


# --- the Family interface ------------------------------------------------------------------------------

class Family:
    name: str = "?"
    description: str = ""
    pipeline_classes: tuple[str, ...] = ()
    reference_pipeline: str = ""  # diffusers pipeline class: parity tests, calibration
    lora_loader: str = "StableDiffusionLoraLoaderMixin"  # diffusers' LoRA loader mixin (diffusers.loaders)
    parts: tuple[str, ...] = ()  # diffusers folders the model directory must have
    weight_parts: tuple[str, ...] = ()  # folders whose weights an export is made from (hashed)
    tokenizer_parts: tuple[str, ...] = ()
    # Request options (CLI flags of infer) only this family takes; ``options_for`` picks a model's.
    options: tuple[FamilyOption, ...] = ()
    default_guidance_scale: float = 7.5
    # Strength when a request with an image gives none: diffusers' default of the family's image-to-image and
    # inpainting pipelines (StableDiffusionImg2ImgPipeline 0.8, StableDiffusionInpaintPipeline 1.0).
    default_strength: dict[str, float] = {"image-to-image": 0.8, "inpainting": 1.0}
    # UNet layers this family keeps out of INT8 besides quantize.DEFAULT_EXCLUDES: (regex, why)
    int8_excludes: tuple[tuple[str, str], ...] = ()
    # Presets of this family: the transformers class of each text encoder and each tokenizer's pad token,
    # and the keyword arguments its reference pipeline class is built with (models.write_preset).
    preset_text_classes: dict[str, str] = {}
    preset_pad_tokens: dict[str, str] = {}
    preset_pipeline_kwargs: dict[str, Any] = {}
    # model_index.json entries an export sets (no safety checker or image processor: Optimum's loader and the
    # family's diffusers pipeline then build without them)
    export_index: dict[str, Any] = {"feature_extractor": [None, None]}

    def __repr__(self) -> str:
        return f"<family {self.name}>"

    # --- the model directory ------------------------------------------------------------
    def parts_of(self, index: dict[str, Any]) -> tuple[str, ...]:
        """The folders this model uses (a family may leave optional ones out, e.g. SDXL's refiner)."""
        return self.parts

    def check(self, info: "ModelInfo") -> None:
        """Refuse, with the feature's name (exit 3), what the exported graphs or the loop would get wrong."""
        unet = info.unet_config
        for key, test, feature in UNSUPPORTED_UNET_FEATURES:
            if test(unet.get(key)):
                raise ModelError(f"{info.root}: the UNet uses {feature}; sdexport does not support it yet")
        latent = info.latent_channels
        if info.unet_in_channels != latent and not info.inpainting:
            raise ModelError(f"{info.root}: VAE latent_channels {latent} differs from UNet in_channels "
                             f"{info.unet_in_channels} (and is not an inpainting UNet's {2 * latent + 1})")
        out = info.unet_out_channels
        if out != latent:
            raise ModelError(f"{info.root}: UNet out_channels {out} differs from VAE latent_channels {latent}")

    # --- components and specs -----------------------------------------------------------
    def components(self, info: "ModelInfo") -> tuple[str, ...]:
        raise NotImplementedError

    def specs(self, info: "ModelInfo", ranges: ShapeRanges) -> dict[str, ComponentSpec]:
        raise NotImplementedError

    def default_size_range(self, info: "ModelInfo") -> tuple[int, int]:
        """Default (min, max) image side in pixels: half to twice the native size."""
        mult, native = info.pixel_multiple, info.image_size
        return max(mult, (native // 2) // mult * mult), native * 2

    # --- conditioning -------------------------------------------------------------------
    def guidance(self, info: "ModelInfo", guidance_scale: float) -> Guidance:
        return guidance_for(info, guidance_scale)

    def options_for(self, info: "ModelInfo") -> tuple[FamilyOption, ...]:
        """The request options this model takes (a family may take some only for some of its models)."""
        return self.options

    def describe(self, info: "ModelInfo") -> str:
        return f"a {self.description} model"

    def request_defaults(self, info: "ModelInfo") -> dict[str, Any]:
        """Steps and guidance scale when the request gives none."""
        if info.unet_config.get("time_cond_proj_dim"):
            return dict(LCM_DEFAULTS)
        return {"steps": DEFAULT_STEPS, "guidance_scale": self.default_guidance_scale}

    def request_settings(self, info: "ModelInfo", steps: int | None, guidance_scale: float | None
                         ) -> tuple[int, float]:
        """A request's steps and guidance scale, each ``request_defaults``' where not given: the one rule of
        infer, bench, calibrate and the pipeline (so each times, calibrates or runs the model as it is run)."""
        defaults = self.request_defaults(info)
        return (defaults["steps"] if steps is None else steps,
                defaults["guidance_scale"] if guidance_scale is None else guidance_scale)

    def guidance_note(self, info: "ModelInfo", guidance_scale: float) -> str | None:
        """What an explicitly given guidance scale does where it is not classifier-free guidance (LCM)."""
        guidance = self.guidance(info, guidance_scale)
        if guidance.embedding_dim:
            return (f"--guidance-scale {guidance_scale:g}: this UNet is LCM-distilled (time_cond_proj_dim "
                    f"{guidance.embedding_dim}): the scale is fed as its guidance embedding (timestep_cond, "
                    f"w = scale - 1, as diffusers' LCM pipelines do), with one UNet row per image and no "
                    "negative prompt, not as classifier-free guidance")
        return None

    def check_text_to_image(self, info: "ModelInfo") -> None:
        """Refuse (exit 3) models that cannot generate from text alone (e.g. an SDXL refiner)."""

    def check_options(self, info: "ModelInfo", options: dict[str, Any]) -> dict[str, Any]:
        """Refuse request options this model does not take or values out of bounds (exit 2), before any
        work; returns the given ones, checked and normalized (tuples of ints, floats)."""
        from . import FAMILIES

        mine = {o.name: o for o in self.options_for(info)}
        given = {k: v for k, v in options.items() if v is not None}
        for name in given:
            if name not in mine:
                known = [o for f in FAMILIES.values() for o in f.options if o.name == name]
                if not known:
                    raise UsageError(f"unknown request option '{name}'")
                raise UsageError(f"{known[0].flag}: only for {known[0].applies_to}; {info.root} is "
                                 f"{self.describe(info)}")
        return {k: mine[k].check(v) for k, v in given.items()}

    def encode(self, pipe, prompts: list[str], negatives: list[str | None], guidance: Guidance,
               geo: Geometry, options: dict[str, Any]) -> dict[str, Any]:
        """The UNet's conditioning inputs for a batch (rows [negatives..., prompts...] under CFG), as torch
        tensors on the pipeline's device, keyed by UNet input name. ``pipe`` gives tokenizers and engines."""
        raise NotImplementedError

    # --- shared spec pieces -------------------------------------------------------------
    @staticmethod
    def axes(info: "ModelInfo", ranges: ShapeRanges) -> dict[str, Axis]:
        f = info.vae_scale_factor
        lat_h = Axis("latent_height", ranges.min_size // f, ranges.opt_size // f, ranges.max_size // f,
                     info.unet_latent_multiple)
        img_h = Axis("image_height", ranges.min_size, ranges.opt_size, ranges.max_size, ranges.pixel_multiple)
        return {
            "rows": Axis("batch", 1, 2, 2 * ranges.max_images),  # two rows per image under guidance
            "images": Axis("batch", 1, 1, ranges.max_images),
            "latent_height": lat_h, "latent_width": dataclasses.replace(lat_h, name="latent_width"),
            "image_height": img_h, "image_width": dataclasses.replace(img_h, name="image_width"),
        }

    def unet_spec(self, info: "ModelInfo", ranges: ShapeRanges, seq: int, context_dim: int,
                  added: tuple[TensorSpec, ...] = (), fp32_patterns: tuple[str, ...] = UNET_FP32_PATTERNS
                  ) -> ComponentSpec:
        """The UNet: sample, timestep, encoder_hidden_states, the family's added conditioning, and
        ``timestep_cond`` for UNets with a guidance embedding (LCM), in Optimum's names and order."""
        ax = self.axes(info, ranges)
        f = info.vae_scale_factor
        inputs = [TensorSpec("sample", "float32", ("batch", info.unet_in_channels, "latent_height", "latent_width")),
                  TensorSpec("timestep", "float32", ("batch",), values="timestep"),
                  TensorSpec("encoder_hidden_states", "float32", ("batch", seq, context_dim)), *added]
        if info.unet_config.get("time_cond_proj_dim"):
            inputs.append(TensorSpec("timestep_cond", "float32", ("batch", int(info.unet_config["time_cond_proj_dim"])),
                                     values="guidance_embedding"))
        names = tuple(t.name for t in inputs)
        return ComponentSpec(
            name="unet", source="unet", config_source="unet", inputs=tuple(inputs),
            outputs=(TensorSpec("out_sample", "float32",
                                ("batch", info.unet_out_channels, "latent_height", "latent_width")),),
            axes={"batch": ax["rows"], "latent_height": ax["latent_height"], "latent_width": ax["latent_width"]},
            dims_for=lambda g: {"batch": g.rows, "latent_height": g.height // f, "latent_width": g.width // f},
            wrap=unet_wrapper(names), fp32_node_patterns=fp32_patterns,
        )

    # Whether this family's reference pipeline runs a VAE whose config says ``force_upcast`` in FP32
    # (diffusers' SDXL pipelines do; StableDiffusionPipeline ignores the flag).
    honours_force_upcast = False

    def vae_specs(self, info: "ModelInfo", ranges: ShapeRanges) -> list[ComponentSpec]:
        """VAE decoder and encoder. Where the family honours ``force_upcast`` (the SDXL VAE overflows in
        FP16; diffusers' default for the flag is true), the VAE stays FP32 in FP16 exports."""
        ax = self.axes(info, ranges)
        f = info.vae_scale_factor
        c_lat = info.latent_channels
        keep = ("the VAE config sets force_upcast (it overflows in FP16; diffusers runs it in FP32)"
                if self.honours_force_upcast and info.vae_config.get("force_upcast", True) else None)
        return [
            ComponentSpec(
                name="vae_decoder", source="vae", config_source="vae",
                inputs=(TensorSpec("latent_sample", "float32", ("batch", c_lat, "latent_height", "latent_width")),),
                outputs=(TensorSpec("sample", "float32", ("batch", info.image_channels, f"latent_height * {f}",
                                                          f"latent_width * {f}")),),
                axes={"batch": ax["images"], "latent_height": ax["latent_height"], "latent_width": ax["latent_width"]},
                dims_for=lambda g: {"batch": g.images, "latent_height": g.height // f, "latent_width": g.width // f},
                wrap=_vae_decoder_wrapper, keep_fp32=keep,
            ),
            ComponentSpec(
                name="vae_encoder", source="vae", config_source="vae",
                inputs=(TensorSpec("sample", "float32", ("batch", info.image_channels, "image_height", "image_width"),
                                   values="image"),),
                outputs=(TensorSpec("latent_parameters", "float32",
                                    ("batch", 2 * c_lat, f"image_height / {f}", f"image_width / {f}")),),
                axes={"batch": ax["images"], "image_height": ax["image_height"], "image_width": ax["image_width"]},
                dims_for=lambda g: {"batch": g.images, "image_height": g.height, "image_width": g.width},
                wrap=_vae_encoder_wrapper, keep_fp32=keep,
            ),
        ]
