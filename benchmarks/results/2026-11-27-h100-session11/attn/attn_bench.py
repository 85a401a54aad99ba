# SDXL's attention calls per UNet step (1024 px): which SDPA backend is fastest, and at what rate?
# Self-attention: 10 layers at 4096 tokens (10 heads), 60 at 1024 tokens (20 heads); cross-attention to 77
# tokens in each. Head dim 64, FP16. Rows 2 (one image with guidance) and 16 (batch 8).
import json, os, torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
out = os.environ.get("OUT", "/tmp/out"); os.makedirs(out, exist_ok=True)
dev = "cuda"
def timeit(fn, iters=20, replays=10):
    """CUDA-graph replay of ``iters`` calls: launch overhead out, as in sdexport's step graphs."""
    for _ in range(3): fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(iters): fn()
    g.replay(); torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(replays): g.replay()
    e.record(); torch.cuda.synchronize()
    return s.elapsed_time(e) / (iters * replays)
def kernel_of(fn):
    from torch.profiler import profile, ProfilerActivity
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        fn(); torch.cuda.synchronize()
    names = [e.key for e in p.key_averages() if e.device_type.name == "CUDA"]
    return [n[:70] for n in names][:2]
res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cudnn": torch.backends.cudnn.version(), "rows": {}}
layers = [(10, 4096, 4096, 10), (10, 4096, 77, 10), (20, 1024, 1024, 60), (20, 1024, 77, 60)]
backends = {"default": None, "cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}
for rows in (2, 16):
    table = {}
    for heads, q_len, kv_len, count in layers:
        q = torch.randn(rows, heads, q_len, 64, device=dev, dtype=torch.float16)
        k = torch.randn(rows, heads, kv_len, 64, device=dev, dtype=torch.float16)
        v = torch.randn_like(k)
        ref = F.scaled_dot_product_attention(q, k, v)
        flop = 4 * rows * heads * q_len * kv_len * 64
        entry = {"count": count, "tflop_each": flop / 1e12}
        for name, b in backends.items():
            try:
                if b is None:
                    ms = timeit(lambda: F.scaled_dot_product_attention(q, k, v))
                    entry["default_kernel"] = kernel_of(lambda: F.scaled_dot_product_attention(q, k, v))
                else:
                    with sdpa_kernel(b):
                        o = F.scaled_dot_product_attention(q, k, v)
                        err = float((o - ref).float().norm() / ref.float().norm())
                        ms = timeit(lambda: F.scaled_dot_product_attention(q, k, v))
                    entry[name + "_rel_err"] = err
                entry[name + "_ms"] = ms
                entry[name + "_tflops"] = round(flop / ms / 1e9, 1)
            except Exception as exc:
                entry[name + "_error"] = str(exc)[:200]
        table[f"h{heads} q{q_len} kv{kv_len}"] = entry
    per_step = {n: round(sum(e.get(n + "_ms", float("nan")) * e["count"] for e in table.values()), 3) for n in backends}
    res["rows"][rows] = {"layers": table, "ms_per_step": per_step}
    print(rows, "rows, attention ms/step by backend:", per_step, flush=True)
    for k, e in table.items():
        print("  ", k, {n: e.get(n + "_tflops", e.get(n + "_error", "")[:40]) for n in backends}, e.get("default_kernel"), flush=True)
json.dump(res, open(f"{out}/attn_bench.json", "w"), indent=1)
