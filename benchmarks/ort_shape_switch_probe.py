"""What does a change of batch size cost an ONNX Runtime CUDA session? (issue 12: serve on the H100)

The serve load test of 2026-11-27 showed the sd15 VAE decoder on ONNX Runtime CUDA taking 700-1400 ms for a
call whose batch size differed from the previous call's, and 27-67 ms when it repeated it (the UNet, on
Inductor, scaled with the batch as bench does). Dynamic batching makes every call a different size, so this
decides serve's throughput. This probe opens the VAE decoder of an export in several ways and times a fixed
sequence of batch sizes (each size run once before timing, as serve's warm-up does):

  dynamic/<algo>   one session for every batch size, cudnn_conv_algo_search = EXHAUSTIVE (ONNX Runtime's
                   default), HEURISTIC or DEFAULT
  per-size         one static session per batch size (free-dimension overrides), default algo search

For each: ms per call for a repeated size and for a changed size, and the output's largest difference from
the dynamic/EXHAUSTIVE session's. Variants: the plain FP32 export and the ort_cuda FP16 variant where built.

usage: python benchmarks/ort_shape_switch_probe.py EXPORT [--component vae_decoder|unet|...] [--size 512] [--out DIR]
(the UNet and text encoders get each batch size's rows as the pipeline gives them: two per image with guidance)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SEQUENCE = [1, 3, 5, 3, 5, 8, 8, 8, 1, 3, 3, 5, 8, 2, 2, 6, 4, 7]


def main() -> None:
    import torch

    from benchmarks.gpu_bench import header
    from sdexport.backends.ort import OrtEngine
    from sdexport.components import Geometry
    from sdexport.runtime import ExportDir

    p = argparse.ArgumentParser()
    p.add_argument("export")
    p.add_argument("--component", default="vae_decoder")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results/raw"))
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    export = ExportDir.open(args.export)
    component = args.component
    spec = export.spec(component)
    feeds = {n: spec.sample_inputs(spec.dims_for(Geometry(n, args.size, args.size)), seed=n, device="cuda")
             for n in sorted(set(SEQUENCE))}
    result = {**header(), "component": component, "sequence": SEQUENCE, "size": args.size, "runs": {}}
    variants = ["plain"] + (["ort_cuda"] if component in export.manifest.data.get("ort_cuda", {}) else [])
    reference: dict[tuple[str, int], torch.Tensor] = {}

    def timed(call, n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        y = next(iter(call(feeds[n]).values()))
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) * 1e3, y

    for variant in variants:
        configs = [(f"dynamic/{a}", {"cudnn_conv_algo_search": a}) for a in ("EXHAUSTIVE", "HEURISTIC", "DEFAULT")]
        configs.append(("per-size", None))
        for name, cuda_options in configs:
            label = f"{variant} {name}"
            try:
                t0 = time.perf_counter()
                if cuda_options is not None:
                    engine = OrtEngine(export, component, device="cuda", variant=variant, cuda_options=cuda_options)
                    engines = {n: engine for n in feeds}
                else:
                    engines = {n: OrtEngine(export, component, device="cuda", variant=variant,
                                            static=Geometry(n, args.size, args.size)) for n in feeds}
                opened = (time.perf_counter() - t0) * 1e3
                for n in feeds:  # warm-up: each size once
                    timed(engines[n], n)
                calls, diffs = [], {}
                prev = list(feeds)[-1]  # the warm-up's last size: the first timed call may change it
                for n in SEQUENCE:
                    ms, y = timed(engines[n], n)
                    calls.append({"n": n, "ms": round(ms, 2), "changed": n != prev})
                    prev = n
                    key = (variant, n)
                    if key not in reference:
                        reference[key] = y.float().cpu()
                    diffs[n] = float((y.float().cpu() - reference[key]).abs().max())
                same = [c["ms"] / c["n"] for c in calls if not c["changed"]]
                changed = [c["ms"] / c["n"] for c in calls if c["changed"]]
                run = {"open_ms": round(opened, 1), "calls": calls,
                       "ms_per_image_repeated_median": round(statistics.median(same), 2) if same else None,
                       "ms_per_image_changed_median": round(statistics.median(changed), 2) if changed else None,
                       "total_ms": round(sum(c["ms"] for c in calls), 1),
                       "max_abs_diff_vs_first_config": max(diffs.values())}
                for e in {id(e): e for e in engines.values()}.values():
                    e.close()
            except Exception as exc:  # noqa: BLE001 -- recorded, next configuration
                run = {"error": f"{type(exc).__name__}: {exc}"[:800]}
            result["runs"][label] = run
            print(label, {k: v for k, v in run.items() if k != "calls"}, flush=True)
            (out / f"ort_shape_switch_probe-{component}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
