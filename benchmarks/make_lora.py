"""Write a random LoRA (diffusers/PEFT format) for any SD model directory, for timing LoRA switches.

    python benchmarks/make_lora.py MODEL_DIR OUT.safetensors [--rank 16] [--seed 0]

Targets the attention projections of the UNet and the text encoder (what most published LoRAs train);
PEFT's lora_B starts at zero, so both matrices are drawn at random (scaled so the LoRA changes the image
without wrecking it).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main() -> None:
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig, get_peft_model_state_dict
    from transformers import CLIPTextModel

    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    unet = UNet2DConditionModel.from_pretrained(args.model, subfolder="unet")
    unet_cfg = LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                          target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    unet.add_adapter(unet_cfg)
    te = CLIPTextModel.from_pretrained(args.model, subfolder="text_encoder")
    te_cfg = LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                        target_modules=["q_proj", "k_proj", "v_proj", "out_proj"])
    te.add_adapter(te_cfg)
    with torch.no_grad():
        for module in (unet, te):
            for name, param in module.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.01)
    out = Path(args.out)
    StableDiffusionPipeline.save_lora_weights(
        out.parent, weight_name=out.name, unet_lora_layers=get_peft_model_state_dict(unet),
        text_encoder_lora_layers=get_peft_model_state_dict(te), unet_lora_adapter_metadata=unet_cfg.to_dict(),
        text_encoder_lora_adapter_metadata=te_cfg.to_dict())
    print(out)


if __name__ == "__main__":
    main()
