"""Would a faster attention kernel move the UNet step? (issue 14: SDXL's attention runs at 46% of the H100's rate)

The attention calls of one UNet step are read off the real diffusers UNet (the speed probe's SD 1.5 or SDXL
architecture, batch 2 = one image with guidance), run once on PyTorch's meta device with
``F.scaled_dot_product_attention`` recorded: every call's query and key/value shapes, and how many times per
step each shape comes. Nothing is assumed about the architecture.

On a CUDA GPU each distinct shape is then timed per SDPA backend:
- torch's default choice;
- cuDNN attention, FlashAttention-2 (torch's own flash kernels) and memory-efficient attention, each pinned;
- FlashAttention-4 (the CuTe DSL kernels of the ``flash-attn-4`` package, which run on compute capability 9.0
  and 10.0): called directly (``flash_attn.cute.flash_attn_func`` on the (batch, tokens, heads, head_dim)
  tensors, "FA4-direct"), and as SDPA's flash kernels where this torch can register it
  (``torch.nn.attention.activate_flash_attention_impl("FA4")``, "FA4": what a compiled UNet would call).

Each is timed as 20 calls captured in one CUDA graph, by CUDA events over the replays, with random FP16
inputs in diffusers' layout: (batch, tokens, heads * head_dim) viewed as (batch, heads, tokens, head_dim).
Each output's error is measured against FP32 math attention on the same inputs. The JSON gives:
- per shape and backend: microseconds per call, TFLOP/s, rel-L2 against FP32;
- per backend, the step's attention time (the sum over shapes of count x time per call);
- the saving per step against torch's default. That saving is the most a different attention kernel could take
  off the UNet step.

usage: python benchmarks/attention_probe.py [--model sd15|sdxl] [--out DIR] [--shapes-only]
       (--shapes-only: print the recorded shape table and exit; runs on a CPU)
Writes OUT/attention_probe-<model>.json after every shape (a crash keeps what was measured).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.speed_probe import SD15, SDXL, graph_time, inputs, log, tflops, wrap  # noqa: E402  (one home for the architectures)

BACKENDS = ("default", "CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "FA4-direct", "FA4")
CALLS_PER_GRAPH = 20
DEVICE = "cuda"  # a smoke test of the code path sets "cpu" (and replaces graph_us)


def attention_shapes(model: str) -> list[dict]:
    """Every distinct SDPA call of one UNet step of ``model``: (batch, heads, q_len, kv_len, head_dim) and its
    count, recorded from diffusers' own UNet run on the meta device (no weights, no memory)."""
    import torch
    import torch.nn.functional as F
    from diffusers import UNet2DConditionModel

    seen: Counter = Counter()
    real = F.scaled_dot_product_attention

    def record(q, k, v, *args, **kwargs):
        seen[(tuple(q.shape), tuple(k.shape), tuple(v.shape))] += 1
        return real(q, k, v, *args, **kwargs)

    with torch.device("meta"):
        unet = UNet2DConditionModel(**(SD15 if model == "sd15" else SDXL)).eval()
    feed = inputs(model, "meta", torch.float32)
    F.scaled_dot_product_attention = record
    try:
        with torch.no_grad():
            wrap(unet)(**feed)
    finally:
        F.scaled_dot_product_attention = real
    shapes = []
    for (q, k, v), count in sorted(seen.items(), key=lambda item: (-item[0][0][2], item[0][1][2])):
        batch, heads, q_len, head_dim = q
        shapes.append({"batch": batch, "heads": heads, "q_len": q_len, "kv_len": k[2], "head_dim": head_dim,
                       "count": count, "kind": "self" if k[2] == q_len else "cross",
                       # two matrix products of q_len x kv_len x head_dim per head (QK^T and PV)
                       "gflop": round(4 * batch * heads * q_len * k[2] * head_dim / 1e9, 4)})
    return shapes


def graph_us(fn, iters=50) -> float:
    """Microseconds per call: CALLS_PER_GRAPH calls captured as one CUDA graph (speed_probe.graph_time), median
    over its replays."""
    median_ms, _, _ = graph_time(lambda: fn(), {}, iters, calls=CALLS_PER_GRAPH)
    return median_ms * 1000 / CALLS_PER_GRAPH


def fa4_status() -> str | None:
    """None where FA4 can be activated in this torch (then it is, for FLASH_ATTENTION), else why not."""
    import torch.nn.attention as attention

    if not hasattr(attention, "activate_flash_attention_impl"):
        return f"torch {__import__('torch').__version__} has no activate_flash_attention_impl"
    try:
        attention.activate_flash_attention_impl("FA4")
    except Exception as exc:  # not installed (flash-attn-4), or the registry refused it
        return f"{type(exc).__name__}: {exc}"[:500]
    return None


def main() -> None:
    import torch

    p = argparse.ArgumentParser()
    p.add_argument("--model", default="sdxl", choices=["sd15", "sdxl"])
    p.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results/raw"))
    p.add_argument("--shapes-only", action="store_true", help="print the step's attention shapes and exit")
    args = p.parse_args()
    shapes = attention_shapes(args.model)
    if args.shapes_only:
        print(json.dumps(shapes, indent=1))
        return
    path, result = open_result(args, "attention_probe", shapes, CALLS_PER_GRAPH, "backends")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dev = torch.device(DEVICE)
    g = torch.Generator(device=dev).manual_seed(0)

    def tensors(s):
        """diffusers' layout: (batch, tokens, heads*head_dim) viewed as (batch, heads, tokens, head_dim)."""
        def one(tokens):
            flat = torch.randn(s["batch"], tokens, s["heads"] * s["head_dim"], device=dev, generator=g)
            return flat.view(s["batch"], tokens, s["heads"], s["head_dim"]).transpose(1, 2)
        return one(s["q_len"]), one(s["kv_len"]), one(s["kv_len"])

    def measure(backend: str, s, q, k, v, ref) -> dict:
        if backend == "FA4-direct":
            from flash_attn.cute import flash_attn_func

            qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # (batch, tokens, heads, head_dim), contiguous

            def direct():
                res = flash_attn_func(qt, kt, vt)
                return (res[0] if isinstance(res, tuple) else res).transpose(1, 2)

            return timed(direct, s, ref)
        pin = None if backend == "default" else (
            SDPBackend.FLASH_ATTENTION if backend == "FA4" else getattr(SDPBackend, backend))

        def call():
            if pin is None:
                return torch.nn.functional.scaled_dot_product_attention(q, k, v)
            with sdpa_kernel(pin):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v)

        return timed(call, s, ref)

    def timed(call, s, ref) -> dict:
        try:
            got = call().float()
            err = float((got - ref).norm() / ref.norm())
            us = graph_us(call)
            return {"us": round(us, 2), "tflops": tflops(s["gflop"], us), "rel_l2_vs_fp32": err}
        except Exception as exc:
            return {"error": f"{type(exc).__name__}: {exc}"[:400]}

    inputs16 = []
    for s in shapes:
        q, k, v = tensors(s)
        with sdpa_kernel(SDPBackend.MATH):  # FP32 math on the FP32 inputs
            ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        inputs16.append((s, q.half(), k.half(), v.half(), ref))
    # torch's own kernels first; FA4 replaces the FLASH_ATTENTION kernels once activated
    for backend in BACKENDS:
        if backend == "FA4-direct":
            try:
                import flash_attn.cute  # noqa: F401
            except Exception as exc:
                result["backends"][backend] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
                log(f"{backend}: {result['backends'][backend]['error']}")
                continue
        if backend == "FA4":
            why = fa4_status()
            if why:
                result["backends"]["FA4"] = {"error": why}
                log(f"FA4: {why}")
                save(path, result)
                continue
        rows = []
        for s, q, k, v, ref in inputs16:
            row = measure(backend, s, q, k, v, ref)
            rows.append(row)
            log(f"{backend} {s['kind']} {s['batch']}x{s['heads']}x{s['q_len']}x{s['kv_len']}x{s['head_dim']} "
                f"(x{s['count']}): {row}")
        result["backends"][backend] = rows
        step_totals(result, shapes, backend, rows)
        save(path, result)
    log(json.dumps({"step_ms": result["step_ms"], "saving_vs_default_ms": result.get("saving_vs_default_ms")}))


def open_result(args, probe: str, shapes: list[dict], calls_per_graph: int, rows_key: str) -> tuple[Path, dict]:
    """OUT/<probe>-<model>.json's path (OUT made) and the result it starts as: the machine, versions, commit and
    command (gpu_bench.header), the model, the shapes, and empty ``rows_key`` and step_ms (ffn_probe.py's too)."""
    from benchmarks.gpu_bench import header

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {**header(), "model": args.model, "calls_per_graph": calls_per_graph, "shapes": shapes,
              rows_key: {}, "step_ms": {}}
    return out / f"{probe}-{args.model}.json", result


def step_totals(result: dict, shapes: list[dict], name: str, rows: list[dict]) -> None:
    """The step's time of one variant (sum over shapes of count x microseconds per call) into result["step_ms"],
    where every shape was measured, and each variant's saving against "default" (ffn_probe.py uses it too)."""
    if all("us" in r for r in rows):
        result["step_ms"][name] = round(sum(s["count"] * r["us"] for s, r in zip(shapes, rows)) / 1000, 3)
    base = result["step_ms"].get("default")
    if base:
        result["saving_vs_default_ms"] = {b: round(base - ms, 3) for b, ms in result["step_ms"].items()}


def save(path: Path, result: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, path)


if __name__ == "__main__":
    try:
        main()
    except Exception:
        traceback.print_exc()
        sys.exit(1)
