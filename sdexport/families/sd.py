"""Stable Diffusion 1.x/2.x: one CLIP text encoder, its last hidden state as the UNet's context.

Reference: diffusers' ``StableDiffusionPipeline`` (prompt -> CLIP ``last_hidden_state``; under
classifier-free guidance the batch is [negative prompts..., prompts...]; an absent negative prompt
is the empty string). LCM-distilled SD UNets (``time_cond_proj_dim``) take the guidance embedding
instead of a doubled batch (base.guidance_for), as ``LatentConsistencyModelPipeline`` does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..components import ComponentSpec, Geometry, ShapeRanges, TensorSpec
from ..errors import ModelError
from .base import Family, Guidance

if TYPE_CHECKING:
    from ..models import ModelInfo


def text_encoder_wrapper(module):
    import torch

    class TextEncoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.text_encoder = module

        def forward(self, input_ids):
            out = self.text_encoder(input_ids, return_dict=True)
            return out.last_hidden_state, out.pooler_output

    return TextEncoder()


def clip_token_ids(config: dict[str, Any]) -> tuple[int, int, int]:
    """(vocab size, bos, eos) for sample token ids: CLIP's vocabulary ends with <|startoftext|>, <|endoftext|>."""
    vocab = int(config.get("vocab_size", 49408))
    return vocab, vocab - 2, vocab - 1


class StableDiffusion(Family):
    name = "sd"
    description = "Stable Diffusion 1.x/2.x"
    pipeline_classes = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline",
                        "StableDiffusionInpaintPipeline", "LatentConsistencyModelPipeline",
                        "LatentConsistencyModelImg2ImgPipeline")
    reference_pipeline = "StableDiffusionPipeline"
    parts = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
    weight_parts = ("unet", "vae", "text_encoder")
    tokenizer_parts = ("tokenizer",)
    preset_text_classes = {"text_encoder": "CLIPTextModel"}
    preset_pad_tokens = {"tokenizer": "<|endoftext|>"}
    preset_pipeline_kwargs = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    export_index = {"safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False}

    def check(self, info: "ModelInfo") -> None:
        super().check(info)
        if info.unet_config.get("addition_embed_type"):
            raise ModelError(f"{info.root}: the UNet uses addition_embed_type="
                             f"'{info.unet_config['addition_embed_type']}', which a "
                             f"{info.pipeline_class} does not feed; not supported")
        if info.cross_attention_dim != info.text_hidden_size:
            raise ModelError(f"{info.root}: UNet cross_attention_dim {info.cross_attention_dim} differs from the "
                             f"text encoder hidden size {info.text_hidden_size}")

    def components(self, info: "ModelInfo") -> tuple[str, ...]:
        return ("text_encoder", "unet", "vae_decoder", "vae_encoder")

    def specs(self, info: "ModelInfo", ranges: ShapeRanges) -> dict[str, ComponentSpec]:
        ax = self.axes(info, ranges)
        seq = info.tokenizer_max_length
        hidden = info.text_hidden_size
        text = ComponentSpec(
            name="text_encoder", source="text_encoder", config_source="text_encoder",
            inputs=(TensorSpec("input_ids", "int32", ("batch", seq), values="token_ids"),),
            outputs=(TensorSpec("last_hidden_state", "float32", ("batch", seq, hidden)),
                     TensorSpec("pooler_output", "float32", ("batch", hidden))),
            axes={"batch": ax["rows"]}, dims_for=lambda g: {"batch": g.rows}, wrap=text_encoder_wrapper,
            token_ids=clip_token_ids(info.text_encoder_config),
        )
        specs = [text, self.unet_spec(info, ranges, seq, info.cross_attention_dim), *self.vae_specs(info, ranges)]
        return {s.name: s for s in specs}

    def encode(self, pipe, prompts: list[str], negatives: list[str | None], guidance: Guidance,
               geo: Geometry, options: dict[str, Any]) -> dict[str, Any]:
        texts = ([n or "" for n in negatives] + prompts) if guidance.cfg else prompts
        ids = pipe.tokenize("tokenizer", texts, n_negative=len(negatives) if guidance.cfg else 0)
        hidden = pipe.encode_text("text_encoder", ids)["last_hidden_state"]
        return {"encoder_hidden_states": hidden}


FAMILY = StableDiffusion()
