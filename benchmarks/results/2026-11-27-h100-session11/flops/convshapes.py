# Every Conv2d call of a UNet step (batch 2 rows) on the meta device: shapes, stride, padding, count.
import sys, json, torch
from collections import Counter
from diffusers import UNet2DConditionModel
path, latent, ctx, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
cfg = UNet2DConditionModel.load_config(path)
with torch.device("meta"):
    unet = UNet2DConditionModel.from_config(cfg).half()
calls = Counter()
def hook(m, args, _out):
    x = args[0]
    calls[(tuple(x.shape), tuple(m.weight.shape), m.stride, m.padding, m.bias is not None)] += 1
for m in unet.modules():
    if isinstance(m, torch.nn.Conv2d):
        m.register_forward_hook(hook)
B = 2
kw = {}
if cfg.get("addition_embed_type") == "text_time":
    kw["added_cond_kwargs"] = {"text_embeds": torch.empty(B, 1280, device="meta", dtype=torch.float16),
                               "time_ids": torch.empty(B, 6, device="meta", dtype=torch.float16)}
unet(torch.empty(B, 4, latent, latent, device="meta", dtype=torch.float16), torch.empty(B, device="meta"),
     torch.empty(B, 77, ctx, device="meta", dtype=torch.float16), **kw)
rows = [{"x": list(k[0]), "w": list(k[1]), "stride": list(k[2]), "padding": list(k[3]), "bias": k[4], "count": n}
        for k, n in calls.items()]
json.dump(rows, open(out, "w"), indent=0)
print(len(rows), "shapes", sum(r["count"] for r in rows), "calls")
