"""Which lever moves the SD UNet step on this GPU? (issue 14, a probe before building an engine path on it)

One UNet (sd15-random or sdxl-random architecture, random weights, FP16, batch 2 = one image with
guidance), each variant captured as one CUDA graph and timed by CUDA events over many replays
(median), with its output's relative L2 error against an FP32 eager reference on the same inputs:

  eager+graph        FP16 eager, CUDA graph
  compile+graph      torch.compile (default mode) + CUDA graph: the peer to beat
  compile+qkv+cl     the same with fused QKV projections and channels-last
  compile+qkv+cl+cudnn-attn / +flash-attn   the same with attention pinned to cuDNN's / flash attention
                     (not in the default list; for SDXL, the next lever to measure: issue 14's SDXL target)
  compile+qkv+cl+fa4 the same with torch's flash kernels replaced by FlashAttention-4 (the flash-attn-4
                     package; torch.nn.attention.activate_flash_attention_impl("FA4"), process-wide: name it
                     last). benchmarks/attention_probe.py times the kernels alone first.
  autotune           torch.compile max-autotune (no Inductor cudagraphs; ours) + fused QKV + channels-last,
                     Inductor's conv 1x1-as-matmul and coordinate-descent tuning
  aoti               the autotune variant compiled ahead of time (AOTInductor package), loaded and graphed
  engine             what `sdexport build --backend inductor` compiles (AOTInductor, fused QKV, channels-last,
                     freezing, 1x1 convolutions as matrix products; no max-autotune)
  engine+cudnn-attn  the same, traced with attention pinned to cuDNN's fused attention
  compile+qkv+cl+fp8 compile+qkv+cl with every nn.Linear quantized to FP8 (e4m3, dynamic per-tensor activation and
                     weight scales, torchao's Float8DynamicActivationFloat8WeightConfig; Hopper). Never finished
                     compiling (sessions 7 and 8: over 9 minutes, one CPU thread busy).
  compile+qkv+cl+fp8mm  the same lever without torchao: the transformer blocks' nn.Linear layers replaced by plain
                     torch._scaled_mm (e4m3 weights with one scale per output channel, activations quantized per
                     token at run time, bfloat16 out), which Inductor compiles like any op. Its rel_l2_vs_fp32
                     says whether FP8 can stay within the FP16 tolerance (validate: 1e-2) at all.

--profile adds, per variant, the GPU kernel time of one step summed by kernel and by kind (convolution, matrix
product, attention, normalisation, other) from torch.profiler over 5 calls without a CUDA graph (replays hide
kernels from the profiler): where the step's time goes, and what a lever moved.

usage: python benchmarks/speed_probe.py [--model sd15|sdxl] [--variants a,b,...] [--profile] [--out DIR]
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


def tflops(gflop: float, us: float) -> float:
    """TFLOP/s of a call doing ``gflop`` GFLOP in ``us`` microseconds (GFLOP per microsecond is PFLOP/s). The
    probes of session 16 first wrote gflop / us * 1e-3, a millionth of this: their JSON was mended from "us"."""
    return round(gflop / us * 1e3, 1)


def graph_time(fn, feed, iters=100, calls=1):
    """Warm up on a side stream, capture fn(feed) (``calls`` times in a row) as one CUDA graph, time its replays
    by events: (median ms, p90 ms, the output). attention_probe.py times 20 short calls a replay this way."""
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
        for _ in range(calls):
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


KINDS = (("attention", ("flash", "fmha", "attn", "sdpa", "softmax")),
         ("convolution", ("conv", "fprop", "implicit", "dgrad", "wgrad", "nchw", "nhwc")),
         ("matrix product", ("gemm", "nvjet", "cutlass", "xmma", "_mm", "matmul", "scaled_mm", "f8f8")),
         ("normalisation", ("group_norm", "layer_norm", "native_layer", "groupnorm", "layernorm", "_red_fused",
                            "_per_fused")))


def kernel_kind(name: str) -> str:
    low = name.lower()
    for kind, marks in KINDS:
        if any(m in low for m in marks):
            return kind
    return "other"


def kernel_profile(fn, feed, calls=5) -> dict:
    """GPU kernel time of one call, by kernel (top 15) and by kind, from torch.profiler (no CUDA graph)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        for _ in range(2):
            fn(**feed)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                fn(**feed)
            torch.cuda.synchronize()
    rows = []
    for evt in prof.key_averages():
        dev_us = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0)
        if dev_us > 0 and evt.count:
            rows.append((evt.key, dev_us / calls / 1e3, evt.count // calls))
    rows.sort(key=lambda r: -r[1])
    total = sum(r[1] for r in rows) or 1.0
    kinds: dict[str, float] = {}
    for name, ms, _ in rows:
        kinds[kernel_kind(name)] = kinds.get(kernel_kind(name), 0.0) + ms
    return {"kernel_ms_per_step": round(total, 3), "kernels_per_step": sum(r[2] for r in rows),
            "by_kind": {k: {"ms": round(v, 3), "share_pct": round(100 * v / total, 1)}
                        for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
            "top": [{"kernel": k[:160], "kind": kernel_kind(k), "ms_per_step": round(ms, 3),
                     "share_pct": round(100 * ms / total, 1), "calls_per_step": n} for k, ms, n in rows[:15]]}


def fp8_linears(module, where=("transformer_blocks", "proj_in", "proj_out")) -> int:
    """Replace the nn.Linear layers whose names contain one of ``where`` with FP8 matrix products
    (torch._scaled_mm): e4m3 weights with a scale per output channel, activations quantized per token at run
    time. Returns how many were replaced. Runs on the CPU too (for a check of the error before a lease)."""
    import torch

    class FP8Linear(torch.nn.Module):
        def __init__(self, linear):
            super().__init__()
            w = linear.weight.detach().float()
            scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 448.0
            self.register_buffer("w8", (w / scale).to(torch.float8_e4m3fn).t())  # (in, out), column-major
            self.register_buffer("w_scale", scale.t().contiguous())  # (1, out)
            self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach(), requires_grad=False)

        def forward(self, x):
            rows = x.reshape(-1, x.shape[-1])
            x_scale = rows.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / 448.0
            x8 = (rows.float() / x_scale).to(torch.float8_e4m3fn)
            y = torch._scaled_mm(x8, self.w8, scale_a=x_scale, scale_b=self.w_scale, out_dtype=torch.bfloat16)
            y = y.to(x.dtype)
            if self.bias is not None:
                y = y + self.bias
            return y.reshape(*x.shape[:-1], y.shape[-1])

    targets = [(name, m) for name, m in module.named_modules()
               if isinstance(m, torch.nn.Linear) and any(w in name for w in where)
               and m.in_features % 16 == 0 and m.out_features % 16 == 0]
    for name, linear in targets:
        parent = module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module
        setattr(parent, name.rsplit(".", 1)[-1], FP8Linear(linear))
    return len(targets)


def rel_l2(got, want) -> float:
    got, want = got.double().cpu(), want.double().cpu()
    return float((got - want).norm() / want.norm())


def main() -> None:
    from sdexport.backends.inductor import _import_onnxruntime_first

    _import_onnxruntime_first()  # before any AOTInductor package is loaded (benchmarks/aoti_load_probe.py)
    import torch
    from diffusers import UNet2DConditionModel

    p = argparse.ArgumentParser()
    p.add_argument("--model", default="sd15", choices=["sd15", "sdxl"])
    p.add_argument("--variants", default="eager+graph,compile+graph,compile+qkv+cl,autotune,aoti")
    p.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results/raw"))
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--profile", action="store_true", help="also record each variant's kernel profile")
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

    builders = {}

    def run(name, build):  # registered here, run below in the order --variants names them
        builders[name] = build

    def measure(name, build):
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
            if args.profile:
                try:
                    result["variants"][name]["profile"] = kernel_profile(fn, feed)
                except Exception as exc:  # the timing stands without it
                    result["variants"][name]["profile"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
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

    def fa4():
        """compile+qkv+cl with SDPA's flash kernels replaced by FlashAttention-4 (flash-attn-4's CuTe DSL kernels,
        compute capability 9.0/10.0) through torch's registry. Activation is process-wide: name it last."""
        from benchmarks.attention_probe import fa4_status

        why = fa4_status()
        if why:
            raise RuntimeError(f"FA4 cannot be activated here: {why}")
        fn, extra = with_attention("FLASH_ATTENTION")
        return fn, {**extra, "sdpa_backend": "FA4 (flash-attn-4 through activate_flash_attention_impl)"}

    run("compile+qkv+cl+fa4", fa4)

    def fp8():
        """nn.Linear layers in FP8 on Hopper (torchao): the transformer blocks' projections and feed-forward."""
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerTensor, quantize_

        module = fresh(qkv=True, channels_last=True)
        # per-tensor scales: torchao's per-row scaling takes bfloat16 weights only, and the probe is FP16
        quantize_(module, Float8DynamicActivationFloat8WeightConfig(granularity=PerTensor()))
        import torchao

        return torch.compile(module), {"mode": "default", "torchao": torchao.__version__,
                                       "fp8": "e4m3, dynamic per-tensor scales for activations and weights, nn.Linear only"}

    run("compile+qkv+cl+fp8", fp8)

    def fp8mm():
        module = fresh(qkv=True, channels_last=True)
        replaced = fp8_linears(module)
        return torch.compile(module), {"mode": "default", "fp8_linears": replaced,
                                       "fp8": "e4m3 torch._scaled_mm, rowwise weight scales, per-token activation "
                                              "scales, bfloat16 out; transformer blocks' nn.Linear only"}

    run("compile+qkv+cl+fp8mm", fp8mm)

    def engine(attention=None):
        """What sdexport's Inductor backend compiles (sdexport/inductor.py's configs), optionally traced with
        attention pinned to one SDPA backend (the choice is baked into the exported graph)."""
        import contextlib

        from torch.nn.attention import SDPBackend, sdpa_kernel

        from sdexport.inductor import INDUCTOR_CONFIGS

        module = fresh(qkv=True, channels_last=True)
        names = list(feed)
        pinned = sdpa_kernel(getattr(SDPBackend, attention)) if attention else contextlib.nullcontext()
        with pinned, torch.no_grad():
            ep = torch.export.export(module, (), {k: feed[k] for k in names})
            pkg = torch._inductor.aoti_compile_and_package(
                ep, package_path=f"/tmp/probe-{args.model}-engine-{attention or 'default'}.pt2",
                inductor_configs=dict(INDUCTOR_CONFIGS))
        loaded = torch._inductor.aoti_load_package(pkg, run_single_threaded=True)
        return (lambda **kw: loaded(**kw)), {"inductor_configs": dict(INDUCTOR_CONFIGS),
                                             "sdpa_backend": attention or "default"}

    run("engine", lambda: engine())
    run("engine+cudnn-attn", lambda: engine("CUDNN_ATTENTION"))

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
    unknown = [n for n in args.variants.split(",") if n not in builders]
    if unknown:
        raise SystemExit(f"--variants: unknown {', '.join(unknown)} (known: {', '.join(builders)})")
    for name in args.variants.split(","):
        measure(name, builders[name])
    for name in [n for n in result["variants"] if n not in ("eager+graph", "compile+graph")]:
        v = result["variants"].get(name, {})
        base = result["variants"].get("compile+graph", {}).get("ms")
        if "ms" in v and base:
            v["speedup_vs_compile"] = round(base / v["ms"], 3)
    save()
    log(json.dumps({k: {kk: vv for kk, vv in v.items() if kk in ("ms", "rel_l2_vs_fp32", "speedup_vs_compile")}
                    for k, v in result["variants"].items()}, indent=1))


if __name__ == "__main__":
    main()
