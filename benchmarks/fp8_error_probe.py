"""How far from FP32 does FP8 put the UNet's output? (issue 14: FP8 is the one lever left for SDXL's GEMMs, and the
target keeps every engine within the FP16 tolerance of FP32 eager: validate's rel-L2 1e-2.)

Runs on the CPU, where torch._scaled_mm also runs: the sd15 and sdxl UNet architectures of speed_probe.py (random
weights, seed 0), FP32 eager against the same module with the transformer blocks' nn.Linear layers replaced by
speed_probe's FP8 matrix products (e4m3 weights with a scale per output channel, activations quantized per token).
Everything else stays FP32, so the error is FP8's alone. A small latent (32x32, 256 px) keeps it to CPU minutes;
speed_probe's FP16 UNet on the GPU (1024 px SDXL) has rel-L2 1.2e-3 against FP32 for comparison.

usage: python benchmarks/fp8_error_probe.py [--out DIR]   (writes DIR/fp8_error_probe.json)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    import torch
    from diffusers import UNet2DConditionModel

    from benchmarks.gpu_bench import header
    from benchmarks.speed_probe import SD15, SDXL, fp8_linears, inputs, rel_l2, wrap

    p = argparse.ArgumentParser()
    p.add_argument("--out", default="benchmarks/results/raw")
    p.add_argument("--latent", type=int, default=32)
    args = p.parse_args()
    result = {**header(), "latent": args.latent, "fp16_threshold_rel_l2": 1e-2, "models": {}}
    for name, cfg in (("sd15", SD15), ("sdxl", SDXL)):
        t0 = time.perf_counter()
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**cfg).eval().requires_grad_(False)
        feed = inputs(name, torch.device("cpu"), torch.float32)
        feed["sample"] = feed["sample"][..., :args.latent, :args.latent].contiguous()
        with torch.no_grad():
            ref = wrap(unet)(**feed).float()
            replaced = fp8_linears(unet)
            got = wrap(unet)(**feed).float()
        result["models"][name] = {"fp8_linears": replaced, "rel_l2_vs_fp32": rel_l2(got, ref),
                                  "seconds": round(time.perf_counter() - t0, 1)}
        print(name, result["models"][name], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fp8_error_probe.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
