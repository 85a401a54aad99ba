"""Which ONNX Runtime-fused FP16 component moves the image away from FP32 eager, and by how much.

Run 3 on the H200 measured the fused ORT pipeline's 50-step image at ~26 dB PSNR against FP32 eager,
where PyTorch FP16 reaches ~70 dB. This probe swaps one component at a time (the rest PyTorch FP32,
TF32 off) and reports the image PSNR, plus each component's output error on the inputs the FP32
pipeline actually produced (UNet: at early/middle/late steps).

usage: python benchmarks/ort_fused_diag.py [--work /tmp/sdx] [--out DIR]   (after gpu_bench.py prepare)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    import torch

    from gpu_bench import header  # beside this script
    from gpu_bench import rel_error as rel

    from sdexport.backends import load_engines
    from sdexport.backends.ort import OrtEngine
    from sdexport.pipeline import Pipeline
    from sdexport.quantize import psnr
    from sdexport.runtime import ExportDir

    parser = argparse.ArgumentParser()
    parser.add_argument("--work", default="/tmp/sdx")
    parser.add_argument("--out", default="benchmarks/results/raw")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    root = Path(args.work) / "e32"
    export = ExportDir.open(root)
    names = ["text_encoder", "unet", "vae_decoder"]
    fp32 = load_engines(root, "torch", components=names, device="cuda", dtype="fp32")
    fused = {n: OrtEngine(export, n, device="cuda", variant="ort_cuda") for n in names}
    settings = dict(prompt="a photograph of an astronaut riding a horse", steps=50, guidance_scale=7.5, seed=0,
                    height=512, width=512, scheduler="euler")
    result = {**header(), "settings": settings}

    recorded = []

    class Recorder:
        spec = fp32["unet"].spec

        def __call__(self, feed):
            recorded.append({k: v.clone() for k, v in feed.items()})
            return fp32["unet"](feed)

    ref = Pipeline({**fp32, "unet": Recorder()}, export, device="cuda")(**settings)
    images = {}
    for swap in names + ["all"]:
        engines = dict(fused) if swap == "all" else {**fp32, swap: fused[swap]}
        images[swap] = Pipeline(engines, export, device="cuda")(**settings)
        result.setdefault("image_psnr_db_vs_fp32", {})[f"ORT-fused FP16 {swap}"] = round(
            psnr(images[swap].images, ref.images), 2)
        result.setdefault("final_latent_vs_fp32", {})[f"ORT-fused FP16 {swap}"] = rel(images[swap].latents, ref.latents)
        print(swap, result["image_psnr_db_vs_fp32"][f"ORT-fused FP16 {swap}"], flush=True)

    ids, _ = Pipeline(fp32, export, device="cuda").tokenize(["", settings["prompt"]])
    feed = {"input_ids": ids.cuda()}
    with torch.inference_mode():
        result["text_encoder_vs_fp32"] = rel(fused["text_encoder"](feed)["last_hidden_state"],
                                             fp32["text_encoder"](feed)["last_hidden_state"])
        latents = {"latent_sample": ref.latents / export.info.vae_scaling_factor}
        result["vae_decoder_vs_fp32"] = rel(fused["vae_decoder"](latents)["sample"], fp32["vae_decoder"](latents)["sample"])
        result["unet_vs_fp32"] = {}
        for step in (0, 1, 10, 25, 40, 49):
            f = recorded[step]
            result["unet_vs_fp32"][f"step {step} (t={f['timestep'][0].item():.0f})"] = rel(
                fused["unet"](f)["out_sample"], fp32["unet"](f)["out_sample"])
    print(json.dumps({k: v for k, v in result.items() if k not in ("machine", "versions", "command")}, indent=1))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ort_fused_diag.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
