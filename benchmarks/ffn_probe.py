"""Would fusing GEGLU into its GEMM move the UNet step? (issue 14: SDXL's per-step target)

Session 13 measured GEGLU's ``gelu(gate) * hidden`` as 1.75 ms of SDXL's 32.2 ms step, a memory-bound Inductor
kernel between two cuBLAS GEMMs, and cuBLAS has no gated epilogue. Inductor's own Triton GEMM templates
(``max_autotune_gemm``) can take it as an epilogue (or as the next GEMM's prologue), if their GEMMs are as fast as
cuBLAS's. This probe answers that on the feed-forward blocks alone, before anything is built.

The feed-forward calls of one UNet step are read off diffusers' UNet on the meta device (forward hooks on every
``FeedForward``: its input's shape, its GEGLU projection's and output projection's sizes, how many per step).
Each distinct shape is then timed on the GPU in FP16 as the whole block, x -> GEGLU proj -> gelu(gate)*hidden ->
out proj, compiled five ways:
- ``default``: torch.compile's default, as sdexport's Inductor engine compiles it (cuBLAS GEMMs + a Triton
  pointwise kernel for the gate);
- ``no-gate``: the same two GEMMs with the gate replaced by a slice: the floor a perfect fusion could reach;
- ``autotune-triton``: ``max_autotune_gemm`` with Triton templates only, epilogue and prologue fusion on;
- ``autotune-triton-tma``: the same with the persistent TMA templates (Hopper);
- ``autotune-aten-triton``: the autotuner picks per GEMM between cuBLAS and Triton (with fusion benchmarked).

Each is 10 calls captured in one CUDA graph (speed_probe.graph_time), median over replays; error is rel-L2 against
the same block in FP32. The JSON gives per shape and variant microseconds per call, and per variant the step's
feed-forward time (sum of count x time) and its saving against ``default``.

usage: python benchmarks/ffn_probe.py [--model sd15|sdxl] [--out DIR] [--variants a,b] [--shapes-only]
Writes OUT/ffn_probe-<model>.json after every variant.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.attention_probe import open_result, save, step_totals  # noqa: E402
from benchmarks.speed_probe import SD15, SDXL, graph_time, inputs, log, tflops, wrap  # noqa: E402

CALLS_PER_GRAPH = 10
VARIANTS = {
    "default": {},
    "no-gate": {},
    "autotune-triton": {"max_autotune_gemm": True, "max_autotune_gemm_backends": "TRITON", "epilogue_fusion": True,
                        "prologue_fusion": True},
    "autotune-triton-tma": {"max_autotune_gemm": True, "max_autotune_gemm_backends": "TRITON",
                            "epilogue_fusion": True, "prologue_fusion": True,
                            "triton.enable_persistent_tma_matmul": True},
    "autotune-aten-triton": {"max_autotune_gemm": True, "max_autotune_gemm_backends": "ATEN,TRITON",
                             "epilogue_fusion": True, "prologue_fusion": True, "benchmark_epilogue_fusion": True},
}


def ffn_shapes(model: str) -> list[dict]:
    """Every distinct feed-forward call of one UNet step (rows, dim, GEGLU width, out width) and its count."""
    import torch
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention import FeedForward

    seen: Counter = Counter()
    with torch.device("meta"):
        unet = UNet2DConditionModel(**(SD15 if model == "sd15" else SDXL)).eval()
    for module in unet.modules():
        if isinstance(module, FeedForward):
            proj, out = module.net[0].proj, module.net[2]

            def hook(mod, args, proj=proj, out=out):
                x = args[0]
                rows = x.numel() // x.shape[-1]
                seen[(rows, proj.in_features, proj.out_features, out.out_features, type(mod.net[0]).__name__)] += 1

            module.register_forward_pre_hook(hook)
    feed = inputs(model, "meta", torch.float32)
    with torch.no_grad():
        wrap(unet)(**feed)
    return [{"rows": r, "dim": d, "proj_out": p, "out": o, "activation": a, "count": c,
             "gflop": round(2 * r * (d * p + (p // 2) * o) / 1e9, 3)}
            for (r, d, p, o, a), c in sorted(seen.items())]


def main() -> None:
    import torch
    import torch.nn.functional as F

    p = argparse.ArgumentParser()
    p.add_argument("--model", default="sdxl", choices=["sd15", "sdxl"])
    p.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results/raw"))
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--shapes-only", action="store_true")
    args = p.parse_args()
    shapes = ffn_shapes(args.model)
    if args.shapes_only:
        print(json.dumps(shapes, indent=1))
        return
    path, result = open_result(args, "ffn_probe", shapes, CALLS_PER_GRAPH, "variants")
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    data = []
    for s in shapes:
        x = torch.randn(s["rows"], s["dim"], device=dev, generator=g)
        w1 = torch.randn(s["proj_out"], s["dim"], device=dev, generator=g) / s["dim"] ** 0.5
        b1 = torch.randn(s["proj_out"], device=dev, generator=g) * 0.1
        w2 = torch.randn(s["out"], s["proj_out"] // 2, device=dev, generator=g) / (s["proj_out"] // 2) ** 0.5
        b2 = torch.randn(s["out"], device=dev, generator=g) * 0.1
        data.append((s, x, w1, b1, w2, b2))

    def block(x, w1, b1, w2, b2):  # diffusers' GEGLU: hidden, gate = proj(x).chunk(2); hidden * gelu(gate)
        hidden, gate = F.linear(x, w1, b1).chunk(2, dim=-1)
        return F.linear(hidden * F.gelu(gate), w2, b2)

    def no_gate(x, w1, b1, w2, b2):
        hidden, _ = F.linear(x, w1, b1).chunk(2, dim=-1)
        return F.linear(hidden, w2, b2)

    for name in args.variants.split(","):
        if name not in VARIANTS:
            raise SystemExit(f"--variants: unknown {name} (known: {', '.join(VARIANTS)})")
        rows = []
        t0 = time.perf_counter()
        for s, x, w1, b1, w2, b2 in data:
            torch._dynamo.reset()
            fn = no_gate if name == "no-gate" else block
            ref = fn(x, w1, b1, w2, b2)
            half = {"x": x.half(), "w1": w1.half(), "b1": b1.half(), "w2": w2.half(), "b2": b2.half()}
            try:
                with torch._inductor.config.patch(VARIANTS[name]):
                    compiled = torch.compile(fn)
                    median, p90, got = graph_time(lambda **kw: compiled(**kw), half, iters=50, calls=CALLS_PER_GRAPH)
                us = median * 1000 / CALLS_PER_GRAPH
                row = {"us": round(us, 2), "p90_us": round(p90 * 1000 / CALLS_PER_GRAPH, 2),
                       "tflops": tflops(s["gflop"], us),
                       "rel_l2_vs_fp32": float((got.float() - ref).norm() / ref.norm())}
            except Exception as exc:
                traceback.print_exc()
                row = {"error": f"{type(exc).__name__}: {exc}"[:800]}
            rows.append(row)
            log(f"{name} rows={s['rows']} dim={s['dim']} (x{s['count']}): {row}")
        result["variants"][name] = {"config": VARIANTS[name], "rows": rows,
                                    "build_and_time_s": round(time.perf_counter() - t0, 1)}
        step_totals(result, shapes, name, rows)
        save(path, result)
    log(json.dumps({"step_ms": result["step_ms"], "saving_vs_default_ms": result.get("saving_vs_default_ms")}))


if __name__ == "__main__":
    try:
        main()
    except Exception:
        traceback.print_exc()
        sys.exit(1)
