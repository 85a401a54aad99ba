# Is cuDNN's autotuner (torch.backends.cudnn.benchmark) a lever for the UNet step's convolutions?
# Every Conv2d call of one UNet step (shapes from the meta-device model, batch 2 rows), FP16 channels-last,
# timed with CUDA events: heuristic choice (benchmark off) / autotuned (on) / off again (drift check).
import json, os, sys, time, torch
import torch.nn.functional as F
out = os.environ.get("OUT", "/tmp/out"); os.makedirs(out, exist_ok=True)
dev = torch.device("cuda")
MODES = ("off", "on", "off2", "on2", "off3")
res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cudnn": torch.backends.cudnn.version(),
       "driver_note": os.popen("nvidia-smi --query-gpu=driver_version --format=csv,noheader").read().strip()}

def timeit(fn, iters=100):
    for _ in range(10): fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(iters): fn()
    e.record(); torch.cuda.synchronize()
    return s.elapsed_time(e) / iters

a = torch.randn(8192, 8192, device=dev, dtype=torch.float16); b = torch.randn(8192, 8192, device=dev, dtype=torch.float16)
ms = timeit(lambda: a @ b, 50)
res["dense_fp16_mm_tflops"] = round(2 * 8192**3 / ms / 1e9, 1)
del a, b
for model in ("sdxl", "sd15"):
    rows = json.load(open(f".dev/s14/{model}_convs.json"))
    for mode in MODES:
        torch.backends.cudnn.benchmark = mode.startswith("on")
        for r in rows:
            x = torch.randn(r["x"], device=dev, dtype=torch.float16).to(memory_format=torch.channels_last)
            w = (torch.randn(r["w"], device=dev, dtype=torch.float16) * 0.05).to(memory_format=torch.channels_last)
            bias = torch.randn(r["w"][0], device=dev, dtype=torch.float16) if r["bias"] else None
            r[mode + "_ms"] = timeit(lambda: F.conv2d(x, w, bias, r["stride"], r["padding"]))
            if mode == "off":
                ho = (r["x"][2] + 2 * r["padding"][0] - r["w"][2]) // r["stride"][0] + 1
                wo = (r["x"][3] + 2 * r["padding"][1] - r["w"][3]) // r["stride"][1] + 1
                r["tflop"] = 2 * r["x"][0] * r["w"][0] * r["w"][1] * r["w"][2] * r["w"][3] * ho * wo / 1e12
    step = {m: round(sum(r[m + "_ms"] * r["count"] for r in rows), 3) for m in MODES}
    tf = sum(r["tflop"] * r["count"] for r in rows)
    res[model] = {"conv_ms_per_step": step, "conv_tflop_per_step": round(tf, 3),
                  "conv_tflops_off": round(tf / min(step["off"], step["off2"], step["off3"]) * 1e3, 1), "conv_tflops_on": round(tf / min(step["on"], step["on2"]) * 1e3, 1),
                  "shapes": rows}
    print(model, step, res[model]["conv_tflops_off"], res[model]["conv_tflops_on"], flush=True)
print("dense", res["dense_fp16_mm_tflops"])
json.dump(res, open(f"{out}/cudnn_bench.json", "w"), indent=1)
