"""Which lever moves the SD UNet step on this GPU? (issue 14, a probe before building an engine path on it)

One UNet (sd15-random or sdxl-random architecture, random weights, FP16, batch 2 = one image with
guidance), each variant captured as one CUDA graph and timed by CUDA events over many replays
(median), with its output's relative L2 error against an FP32 eager reference on the same inputs:

  eager+graph        FP16 eager, CUDA graph
  compile+graph      torch.compile (default mode) + CUDA graph: the peer to beat
  compile+qkv+cl     the same with fused QKV projections and channels-last
  compile+qkv+cl+cudnn-attn / +flash-attn   the same with attention pinned to cuDNN's / flash attention
                     (not in the default list; for SDXL, the next lever to measure: issue 14's SDXL target)
  autotune           torch.compile max-autotune (no Inductor cudagraphs; ours) + fused QKV + channels-last,
                     Inductor's conv 1x1-as-matmul and coordinate-descent tuning
  aoti               the autotune variant compiled ahead of time (AOTInductor package), loaded and graphed

usage: python benchmarks/speed_probe.py [--model sd15|sdxl] [--variants a,b,...] [--out DIR]
Writes OUT/speed_probe-<model>.json after every variant (a crash keeps what was measured).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SD15 = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)
SDXL = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D",
                                                                   "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816, norm_num_groups=32)


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def inputs(model: str, device, dtype, seed=0):
    import torch

    g = torch.Generator("cpu").manual_seed(seed)
    if model == "sd15":
        feed = {"sample": torch.randn(2, 4, 64, 64, generator=g), "timestep": torch.tensor([500.0, 500.0]),
                "encoder_hidden_states": torch.randn(2, 77, 768, generator=g)}
    else:
        feed = {"sample": torch.randn(2, 4, 128, 128, generator=g), "timestep": torch.tensor([500.0, 500.0]),
                "encoder_hidden_states": torch.randn(2, 77, 2048, generator=g),
                "text_embeds": torch.randn(2, 1280, generator=g),
                "time_ids": torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * 2)}
    return {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in feed.items()}


def wrap(unet):
    import torch

    class Step(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.unet = unet

        def forward(self, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None):
            added = {"text_embeds": text_embeds, "time_ids": time_ids} if text_embeds is not None else None
            return self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=added, return_dict=False)[0]

    return Step().eval()


def graph_time(fn, feed, iters=100):
    """Warm up on a side stream, capture fn(feed) as one CUDA graph, time its replays by events (median ms)."""
    import torch

    static = {k: v.clone() for k, v in feed.items()}
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.inference_mode():
        for _ in range(3):
            fn(**static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.inference_mode():
        out = fn(**static)
    for _ in range(10):
        graph.replay()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    for k, v in feed.items():
        static[k].copy_(v)
    graph.replay()
    torch.cuda.synchronize()
    return statistics.median(times), sorted(times)[int(0.9 * len(times))], out.clone()


def rel_l2(got, want) -> float:
    got, want = got.double().cpu(), want.double().cpu()
    return float((got - want).norm() / want.norm())


def main() -> None:
    import torch
    from diffusers import UNet2DConditionModel

    p = argparse.ArgumentParser()
    p.add_argument("--model", default="sd15", choices=["sd15", "sdxl"])
    p.add_argument("--variants", default="eager+graph,compile+graph,compile+qkv+cl,autotune,aoti")
    p.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results/raw"))
    p.add_argument("--iters", type=int, default=100)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from benchmarks.gpu_bench import header

    result = {**header(), "model": args.model, "batch_rows": 2, "variants": {}}
    path = out / f"speed_probe-{args.model}.json"

    def save():
        path.write_text(json.dumps(result, indent=2))

    dev = torch.device("cuda")
    torch.manual_seed(0)
    cfg = SD15 if args.model == "sd15" else SDXL
    unet32 = UNet2DConditionModel(**cfg).eval().requires_grad_(False)
    log(f"{args.model} UNet: {sum(p.numel() for p in unet32.parameters()) / 1e9:.2f} B parameters")
    # FP32 reference on the GPU with TF32 off
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    feed32 = inputs(args.model, dev, torch.float32)
    with torch.inference_mode():
        ref = wrap(unet32.to(dev))(**feed32).float().cpu()
    unet32.cpu()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    feed = inputs(args.model, dev, torch.float16)

    def fresh(qkv=False, channels_last=False):
        import copy

        unet = copy.deepcopy(unet32).to(dev, torch.float16)
        if qkv:
            unet.fuse_qkv_projections()
        if channels_last:
            unet = unet.to(memory_format=torch.channels_last)
        return wrap(unet)

    def run(name, build):
        if name not in args.variants.split(","):
            return
        import torch._dynamo

        torch._dynamo.reset()
        log(f"{name}: building")
        t0 = time.perf_counter()
        try:
            fn, extra = build()
            median, p90, got = graph_time(fn, feed, args.iters)
            result["variants"][name] = {"ms": round(median, 4), "p90_ms": round(p90, 4),
                                        "rel_l2_vs_fp32": rel_l2(got, ref), "build_s": round(time.perf_counter() - t0, 1),
                                        **extra}
        except Exception as exc:
            traceback.print_exc()
            result["variants"][name] = {"error": f"{type(exc).__name__}: {exc}"[:1500],
                                        "build_s": round(time.perf_counter() - t0, 1)}
        log(f"{name}: {result['variants'][name]}")
        save()

    def autotune_config():
        import torch._inductor.config as ic

        ic.conv_1x1_as_mm = True
        ic.coordinate_descent_tuning = True
        ic.epilogue_fusion = False
        ic.coordinate_descent_check_all_directions = True

    run("eager+graph", lambda: (fresh(), {}))
    run("compile+graph", lambda: (torch.compile(fresh()), {"mode": "default"}))
    run("compile+qkv+cl", lambda: (torch.compile(fresh(qkv=True, channels_last=True)), {"mode": "default"}))

    def with_attention(backend_name):
        """compile+qkv+cl with scaled-dot-product attention pinned to one backend (traced and run inside
        torch.nn.attention.sdpa_kernel): for SDXL at 1024 px, attention over 4096 tokens is a large share."""
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, backend_name)
        compiled = torch.compile(fresh(qkv=True, channels_last=True))

        def fn(**kw):
            with sdpa_kernel(backend):
                return compiled(**kw)

        return fn, {"mode": "default", "sdpa_backend": backend_name}

    run("compile+qkv+cl+cudnn-attn", lambda: with_attention("CUDNN_ATTENTION"))
    run("compile+qkv+cl+flash-attn", lambda: with_attention("FLASH_ATTENTION"))

    def autotune():
        autotune_config()
        return torch.compile(fresh(qkv=True, channels_last=True), mode="max-autotune-no-cudagraphs"), {
            "mode": "max-autotune-no-cudagraphs", "inductor": "conv_1x1_as_mm, coordinate_descent_tuning"}

    run("autotune", autotune)

    def aoti():
        autotune_config()
        module = fresh(qkv=True, channels_last=True)
        names = list(feed)
        ep = torch.export.export(module, (), {k: feed[k] for k in names})
        pkg = torch._inductor.aoti_compile_and_package(
            ep, package_path=f"/tmp/probe-{args.model}.pt2",
            inductor_configs={"max_autotune": True, "max_autotune_pointwise": True, "conv_1x1_as_mm": True,
                              "coordinate_descent_tuning": True, "epilogue_fusion": False})
        loaded = torch._inductor.aoti_load_package(pkg)
        size = os.path.getsize(pkg)
        return (lambda **kw: loaded(**kw)), {"package_mib": round(size / 2**20, 1)}

    run("aoti", aoti)
    for name in ("compile+qkv+cl", "autotune", "aoti"):
        v = result["variants"].get(name, {})
        base = result["variants"].get("compile+graph", {}).get("ms")
        if "ms" in v and base:
            v["speedup_vs_compile"] = round(base / v["ms"], 3)
    save()
    log(json.dumps({k: {kk: vv for kk, vv in v.items() if kk in ("ms", "rel_l2_vs_fp32", "speedup_vs_compile")}
                    for k, v in result["variants"].items()}, indent=1))


if __name__ == "__main__":
    main()
