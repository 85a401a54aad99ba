"""Stable Diffusion XL: two CLIP text encoders, pooled text embeddings and size micro-conditioning.

Reference: diffusers' ``StableDiffusionXLPipeline`` (``encode_prompt``, ``_get_add_time_ids``), and for the
refiner ``StableDiffusionXLImg2ImgPipeline`` (aesthetic-score conditioning, ``requires_aesthetics_score``):
 - each prompt goes through every text encoder (``prompt_2 = prompt``); the UNet's context is the
   penultimate hidden states of the encoders (transformers' ``hidden_states[-2]``, exported as
   ``hidden_states.{N-1}``) concatenated along the width;
 - the pooled ``text_embeds`` come from the first encoder with a projection (CLIPTextModelWithProjection,
   SDXL's ``text_encoder_2``), as diffusers takes the first 2-D output it meets;
 - under classifier-free guidance with no negative prompt and ``force_zeros_for_empty_prompt`` (model_index.json,
   default true) the negative context and pooled embeddings are zeros; otherwise the negative prompt (or "")
   is encoded by every encoder;
 - ``time_ids`` per row: original size + crop top-left + target size (6 values; the negative rows use the
   negative sizes when both are given), or for the refiner original size + crop + aesthetic score (5 values).
Rows are [negatives..., prompts...] for every input. diffusers repeats the [negative, positive] time-id pair
per image, which interleaves them and misaligns rows in a batch when negative sizes differ from the positive
ones; sdexport keeps the rows aligned. Both agree whenever the negative time ids equal the positive ones
(the default) or the batch is one image.

Export layout: what Optimum's ``ORTStableDiffusionXLPipeline`` loads (its ORTTextEncoder reads
``hidden_states.0`` .. ``hidden_states.{N-1}`` and appends ``last_hidden_state``; the pooled output must be the
second encoder's first output). LCM-distilled SDXL UNets add ``timestep_cond`` (base.unet_spec); SDXL-Turbo is
this architecture run with guidance 0 and its own scheduler config.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..components import ComponentSpec, Geometry, ShapeRanges, TensorSpec
from ..errors import ModelError, UsageError
from .base import UNET_FP32_PATTERNS, Family, FamilyOption, Guidance
from .sd import clip_token_ids

if TYPE_CHECKING:
    from ..models import ModelInfo

# The added-conditioning embedding (sinusoidal ``add_time_proj`` of sizes up to thousands of pixels, matched by
# UNET_FP32_PATTERNS' time_proj, and the ``add_embedding`` MLP it feeds) stays FP32 in FP16 graphs, as the
# timestep embedding does.
SDXL_UNET_FP32_PATTERNS = UNET_FP32_PATTERNS + (r".*add_embedding.*",)

BASE = "SDXL base models (StableDiffusionXLPipeline)"
REFINER = "SDXL refiners (aesthetic-score conditioning)"
SIZE_OPTIONS = (
    FamilyOption("original_size", "SDXL micro-conditioning: the original image size H W (default: the "
                 "requested size).", "size", BASE + " and " + REFINER),
    FamilyOption("crops_coords_top_left", "SDXL micro-conditioning: crop top-left TOP LEFT (default 0 0).",
                 "coords", BASE + " and " + REFINER),
    FamilyOption("target_size", "SDXL micro-conditioning: the target size H W (default: the requested size).",
                 "size", BASE),
    FamilyOption("negative_original_size", "SDXL: original size H W for the negative rows (with "
                 "--negative-target-size).", "size", BASE + " and " + REFINER),
    FamilyOption("negative_crops_coords_top_left", "SDXL: crop top-left TOP LEFT for the negative rows (with "
                 "the negative sizes).", "coords", BASE + " and " + REFINER),
    FamilyOption("negative_target_size", "SDXL: target size H W for the negative rows (with "
                 "--negative-original-size).", "size", BASE),
)
AESTHETIC_OPTIONS = (
    FamilyOption("aesthetic_score", "SDXL refiner: aesthetic score of the positive rows (default 6.0).",
                 "score", REFINER),
    FamilyOption("negative_aesthetic_score", "SDXL refiner: aesthetic score of the negative rows (default 2.5).",
                 "score", REFINER),
)
# diffusers' StableDiffusionXLImg2ImgPipeline defaults
AESTHETIC_DEFAULTS = (6.0, 2.5)


def _text_wrapper(projection: bool, layers: int):
    """CLIP text encoder -> Optimum's outputs: (text_embeds | last_hidden_state, last_hidden_state |
    pooler_output, hidden_states.0 .. hidden_states.{layers-1})."""

    def wrap(module):
        import torch

        class TextEncoder(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.text_encoder = module

            def forward(self, input_ids):
                out = self.text_encoder(input_ids, output_hidden_states=True, return_dict=True)
                head = (out.text_embeds, out.last_hidden_state) if projection else \
                    (out.last_hidden_state, out.pooler_output)
                return (*head, *out.hidden_states[:layers])

        return TextEncoder()

    return wrap


class StableDiffusionXL(Family):
    name = "sdxl"
    description = "Stable Diffusion XL"
    pipeline_classes = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline",
                        "StableDiffusionXLInpaintPipeline")
    reference_pipeline = "StableDiffusionXLPipeline"
    lora_loader = "StableDiffusionXLLoraLoaderMixin"  # unet, text_encoder, text_encoder_2; kohya's SGM block names
    parts = ("unet", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler")
    optional_parts = ("text_encoder", "tokenizer")  # a refiner has only the second encoder
    weight_parts = ("unet", "vae", "text_encoder", "text_encoder_2")
    tokenizer_parts = ("tokenizer", "tokenizer_2")
    options = SIZE_OPTIONS + AESTHETIC_OPTIONS
    default_guidance_scale = 5.0  # StableDiffusionXLPipeline's
    # StableDiffusionXLImg2ImgPipeline's 0.3 (the refiner's use) and StableDiffusionXLInpaintPipeline's 0.9999
    default_strength = {"image-to-image": 0.3, "inpainting": 0.9999}
    honours_force_upcast = True
    int8_excludes = ((r"add_embedding", "SDXL's added-conditioning MLP (pooled text + size embeddings): GEMV-shaped, "
                                        "carries that conditioning"),)
    preset_text_classes = {"text_encoder": "CLIPTextModel", "text_encoder_2": "CLIPTextModelWithProjection"}
    preset_pad_tokens = {"tokenizer": "<|endoftext|>", "tokenizer_2": "!"}  # SDXL's tokenizer_2 pads with "!" (id 0)
    preset_pipeline_kwargs = {"force_zeros_for_empty_prompt": True, "add_watermarker": False}

    # --- the model directory ------------------------------------------------------------
    def parts_of(self, index: dict[str, Any]) -> tuple[str, ...]:
        def declared(part):
            entry = index.get(part)
            return isinstance(entry, list) and len(entry) == 2 and entry[1] is not None

        return tuple(p for p in self.parts if p not in self.optional_parts or declared(p))

    @staticmethod
    def text_parts(info: "ModelInfo") -> list[tuple[str, str]]:
        """(tokenizer, text encoder) pairs in diffusers' order."""
        return [(tok, enc) for tok, enc in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))
                if enc in info.configs]

    @staticmethod
    def has_projection(info: "ModelInfo", part: str) -> bool:
        entry = info.index.get(part)
        if isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], str):
            return entry[1] == "CLIPTextModelWithProjection"
        return part == "text_encoder_2"

    def pooled_part(self, info: "ModelInfo") -> str:
        for _, part in self.text_parts(info):
            if self.has_projection(info, part):
                return part
        raise ModelError(f"{info.root}: no text encoder with a projection (CLIPTextModelWithProjection): SDXL takes "
                         "its pooled text embeddings from one")

    def pooled_dim(self, info: "ModelInfo") -> int:
        config = info.configs[self.pooled_part(info)]
        return int(config.get("projection_dim", config.get("hidden_size", 768)))

    @staticmethod
    def aesthetic(info: "ModelInfo") -> bool:
        return bool(info.index.get("requires_aesthetics_score", False))

    @staticmethod
    def force_zeros(info: "ModelInfo") -> bool:
        return bool(info.index.get("force_zeros_for_empty_prompt", True))

    def time_id_count(self, info: "ModelInfo") -> int:
        return 5 if self.aesthetic(info) else 6

    def describe(self, info: "ModelInfo") -> str:
        return "an SDXL refiner" if self.is_refiner(info) else "an SDXL base model"

    def is_refiner(self, info: "ModelInfo") -> bool:
        return self.aesthetic(info) or "text_encoder" not in info.configs

    def check(self, info: "ModelInfo") -> None:
        super().check(info)
        unet, root = info.unet_config, info.root
        kind = unet.get("addition_embed_type")
        if kind != "text_time":
            raise ModelError(f"{root}: an SDXL UNet takes addition_embed_type 'text_time' (pooled text and size "
                             f"conditioning); this one has {kind!r}, which sdexport does not support")
        for key in ("addition_time_embed_dim", "projection_class_embeddings_input_dim"):
            value = unet.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ModelError(f"{root}/unet/config.json: {key} = {value!r} is not a positive integer")
        widths = {part: int(info.configs[part].get("hidden_size", 768)) for _, part in self.text_parts(info)}
        if sum(widths.values()) != info.cross_attention_dim:
            raise ModelError(f"{root}: UNet cross_attention_dim {info.cross_attention_dim} differs from the text "
                             f"encoders' widths concatenated ({' + '.join(map(str, widths.values()))})")
        lengths = {info.tokenizer_max_lengths[tok] for tok, _ in self.text_parts(info)}
        if len(lengths) != 1:
            raise ModelError(f"{root}: the tokenizers have different lengths {sorted(lengths)}; SDXL concatenates "
                             "the encoders' hidden states position by position")
        passed = self.pooled_dim(info) + self.time_id_count(info) * unet["addition_time_embed_dim"]
        if passed != unet["projection_class_embeddings_input_dim"]:
            what = ("5 time ids (sizes, crop, aesthetic score: requires_aesthetics_score)" if self.aesthetic(info)
                    else "6 time ids (original size, crop, target size)")
            raise ModelError(f"{root}: the UNet's added embedding takes {unet['projection_class_embeddings_input_dim']}"
                             f" values, but pooled text ({self.pooled_dim(info)}) and {what} x "
                             f"{unet['addition_time_embed_dim']} give {passed}: check requires_aesthetics_score in "
                             "model_index.json and the text encoder's projection_dim")

    def check_text_to_image(self, info: "ModelInfo") -> None:
        if self.is_refiner(info):
            why = "aesthetic-score conditioning" if self.aesthetic(info) else "no first text encoder"
            raise ModelError(f"{info.root}: an SDXL refiner ({why}) refines images (image-to-image) and cannot "
                             "generate from text: give it --image (e.g. an SDXL base model's output), and run "
                             "text-to-image on the base model")

    # --- components and specs -----------------------------------------------------------
    def components(self, info: "ModelInfo") -> tuple[str, ...]:
        return (*(part for _, part in self.text_parts(info)), "unet", "vae_decoder", "vae_encoder")

    def default_size_range(self, info: "ModelInfo") -> tuple[int, int]:
        """Half to 1.5 x the native size: 512-1536 px for SDXL, which covers its recommended resolutions
        (1024x1024 down to 1536x640 and 640x1536) without a profile twice the native size."""
        mult, native = info.pixel_multiple, info.image_size
        return max(mult, (native // 2) // mult * mult), max(mult, (native * 3 // 2) // mult * mult)

    def text_spec(self, info: "ModelInfo", ranges: ShapeRanges, part: str) -> ComponentSpec:
        ax = self.axes(info, ranges)
        config = info.configs[part]
        seq, hidden = info.tokenizer_max_length, int(config.get("hidden_size", 768))
        layers = int(config.get("num_hidden_layers", 12))
        projection = self.has_projection(info, part)
        states = TensorSpec("last_hidden_state", "float32", ("batch", seq, hidden))
        head = ((TensorSpec("text_embeds", "float32", ("batch", int(config.get("projection_dim", hidden)))), states)
                if projection else (states, TensorSpec("pooler_output", "float32", ("batch", hidden))))
        hidden_states = tuple(TensorSpec(f"hidden_states.{i}", "float32", ("batch", seq, hidden)) for i in range(layers))
        return ComponentSpec(
            name=part, source=part, config_source=part,
            inputs=(TensorSpec("input_ids", "int32", ("batch", seq), values="token_ids"),),
            outputs=head + hidden_states, axes={"batch": ax["rows"]}, dims_for=lambda g: {"batch": g.rows},
            wrap=_text_wrapper(projection, layers), token_ids=clip_token_ids(config))

    def specs(self, info: "ModelInfo", ranges: ShapeRanges) -> dict[str, ComponentSpec]:
        added = (TensorSpec("text_embeds", "float32", ("batch", self.pooled_dim(info))),
                 TensorSpec("time_ids", "float32", ("batch", self.time_id_count(info)), values="time_ids"))
        specs = [*(self.text_spec(info, ranges, part) for _, part in self.text_parts(info)),
                 self.unet_spec(info, ranges, info.tokenizer_max_length, info.cross_attention_dim, added,
                                SDXL_UNET_FP32_PATTERNS),
                 *self.vae_specs(info, ranges)]
        return {s.name: s for s in specs}

    # --- conditioning -------------------------------------------------------------------
    def options_for(self, info: "ModelInfo") -> tuple[FamilyOption, ...]:
        if self.aesthetic(info):
            return tuple(o for o in self.options if REFINER in o.applies_to)
        return SIZE_OPTIONS

    def check_options(self, info: "ModelInfo", options: dict[str, Any]) -> dict[str, Any]:
        checked = super().check_options(info, options)
        if not self.aesthetic(info):  # StableDiffusionXLPipeline uses the negative sizes only as a pair
            pair = [k in checked for k in ("negative_original_size", "negative_target_size")]
            if any(pair) and not all(pair):
                raise UsageError("--negative-original-size and --negative-target-size: give both (diffusers uses the "
                                 "negative sizes only as a pair)")
            if "negative_crops_coords_top_left" in checked and not all(pair):
                raise UsageError("--negative-crops-coords-top-left: takes effect only with --negative-original-size "
                                 "and --negative-target-size")
        return checked

    def time_ids(self, info: "ModelInfo", geo: Geometry, options: dict[str, Any]) -> tuple[list[float], list[float]]:
        """(positive, negative) time ids of one image, as diffusers' pipelines compute them."""
        size = (geo.height, geo.width)
        original = options.get("original_size") or size
        crop = options.get("crops_coords_top_left") or (0, 0)
        neg_crop = options.get("negative_crops_coords_top_left") or (0, 0)
        if self.aesthetic(info):  # StableDiffusionXLImg2ImgPipeline with requires_aesthetics_score
            score = options.get("aesthetic_score", AESTHETIC_DEFAULTS[0])
            neg_score = options.get("negative_aesthetic_score", AESTHETIC_DEFAULTS[1])
            neg_original = options.get("negative_original_size") or original
            return [*original, *crop, score], [*neg_original, *neg_crop, neg_score]
        target = options.get("target_size") or size
        positive = [*original, *crop, *target]
        if options.get("negative_original_size") and options.get("negative_target_size"):
            return positive, [*options["negative_original_size"], *neg_crop, *options["negative_target_size"]]
        return positive, positive

    def encode(self, pipe, prompts: list[str], negatives: list[str | None], guidance: Guidance,
               geo: Geometry, options: dict[str, Any]) -> dict[str, Any]:
        import torch

        info = pipe.info
        n = len(prompts)
        zeroed = [guidance.cfg and neg is None and self.force_zeros(info) for neg in negatives]
        encoded_negatives = [neg or "" for neg, zero in zip(negatives, zeroed) if guidance.cfg and not zero]
        texts = encoded_negatives + prompts
        hidden, pooled = [], None
        for tok, part in self.text_parts(info):
            ids = pipe.tokenize(tok, texts, n_negative=len(encoded_negatives))
            out = pipe.encode_text(part, ids)
            layers = int(info.configs[part].get("num_hidden_layers", 12))
            hidden.append(out[f"hidden_states.{layers - 1}"])
            if pooled is None and "text_embeds" in out:
                pooled = out["text_embeds"]
        hidden = torch.cat(hidden, dim=-1)
        pooled = pooled.clone()  # an engine may reuse its output buffer on the next call
        positive_ids, negative_ids = self.time_ids(info, geo, options)
        rows_hidden, rows_pooled = [hidden[len(encoded_negatives):]], [pooled[len(encoded_negatives):]]
        time_rows = [positive_ids] * n
        if guidance.cfg:
            neg_hidden, neg_pooled, k = [], [], 0
            for zero in zeroed:
                if zero:
                    neg_hidden.append(torch.zeros_like(hidden[:1]))
                    neg_pooled.append(torch.zeros_like(pooled[:1]))
                else:
                    neg_hidden.append(hidden[k:k + 1])
                    neg_pooled.append(pooled[k:k + 1])
                    k += 1
            rows_hidden.insert(0, torch.cat(neg_hidden))
            rows_pooled.insert(0, torch.cat(neg_pooled))
            time_rows = [negative_ids] * n + time_rows
        return {"encoder_hidden_states": torch.cat(rows_hidden), "text_embeds": torch.cat(rows_pooled),
                "time_ids": torch.tensor(time_rows, dtype=torch.float32, device=hidden.device)}


FAMILY = StableDiffusionXL()
