# FLOPs of the SDXL UNet step (batch 2 rows, 128x128 latent, 77 tokens) by op kind, on the meta device.
import sys, json, torch
from collections import defaultdict
from torch.utils.flop_counter import FlopCounterMode
from diffusers import UNet2DConditionModel
path = sys.argv[1]
cfg = UNet2DConditionModel.load_config(path)
with torch.device("meta"):
    unet = UNet2DConditionModel.from_config(cfg).half()
B = 2
L = int(sys.argv[2]) if len(sys.argv) > 2 else 128
x = torch.empty(B, 4, L, L, device="meta", dtype=torch.float16)
t = torch.empty(B, device="meta", dtype=torch.float16)
C = int(sys.argv[3]) if len(sys.argv) > 3 else 2048
ehs = torch.empty(B, 77, C, device="meta", dtype=torch.float16)
added = None if cfg.get("addition_embed_type") != "text_time" else {"text_embeds": torch.empty(B, 1280, device="meta", dtype=torch.float16),
         "time_ids": torch.empty(B, 6, device="meta", dtype=torch.float16)}
with FlopCounterMode(display=False) as fc:
    unet(x, t, ehs, added_cond_kwargs=added or {})
tot = defaultdict(int)
for op, n in fc.get_flop_counts()["Global"].items():
    tot[str(op)] += n
out = {k: v / 1e12 for k, v in sorted(tot.items(), key=lambda kv: -kv[1])}
out["total"] = sum(tot.values()) / 1e12
print(json.dumps(out, indent=1))
