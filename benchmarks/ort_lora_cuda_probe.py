"""Which ways of replacing initializers does ONNX Runtime's CUDA EP honour? (issue 11, LoRA switching)

    python benchmarks/ort_lora_cuda_probe.py EXPORT LORA.safetensors[:SCALE] --out DIR

For each component a LoRA touches: the initializers a switch supplies (Pipeline.set_loras on the CPU, the
reference), then CUDA sessions (FP32, TF32 off) opened with them through SessionOptions.add_initializer at
each graph optimization level (values on the CPU, and on the GPU), and through SessionOptions.add_external_initializers; each output is compared
with the CPU session with the same replacements and with the CUDA session without any (a replacement that was
ignored shows as "equals base"). Writes ort_lora_cuda_probe.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def main() -> None:
    import onnxruntime as ort
    import torch

    from sdexport.backends import load_engines
    from sdexport.pipeline import Pipeline
    from sdexport.runtime import ExportDir

    ap = argparse.ArgumentParser()
    ap.add_argument("export")
    ap.add_argument("lora")
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    export = ExportDir.open(Path(args.export))
    cpu = Pipeline(load_engines(export, "ort"), export)
    cpu.set_loras([args.lora])
    levels = {"DISABLE_ALL": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
              "BASIC": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "EXTENDED": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "ALL": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    cuda_ep = [("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"]
    rows = []
    for name, engine in cpu.engines.items():
        inits = getattr(engine, "_overrides", ({}, {}))[0]
        if not inits:
            continue
        feed = {k: v.numpy() for k, v in engine.spec.sample_inputs(engine.spec.opt_dims()).items()}
        feed = {i.name: feed[i.name].astype(i.dtype) for i in engine.spec.inputs}
        ref = engine.session.run(None, feed)[0]
        base_cpu = ort.InferenceSession(str(engine.path), providers=["CPUExecutionProvider"]).run(None, feed)[0]

        def run(how: str, level: str):
            opts = ort.SessionOptions()
            opts.graph_optimization_level = levels[level]
            if how == "add_initializer_gpu":  # torch CUDA tensors through DLPack (memory the caller owns)
                from onnxruntime.capi import _pybind_state as C

                keep = {n: torch.from_numpy(np.ascontiguousarray(a)).cuda() for n, a in inits.items()}
                values = {n: ort.OrtValue(C.OrtValue.from_dlpack(t.__dlpack__(), False)) for n, t in keep.items()}
            else:
                values = {n: ort.OrtValue.ortvalue_from_numpy(a) for n, a in inits.items()}
            if how in ("add_initializer", "add_initializer_gpu"):
                for n, v in values.items():
                    opts.add_initializer(n, v)
            elif how == "add_external_initializers":
                opts.add_external_initializers(list(values), list(values.values()))
            try:
                out = ort.InferenceSession(str(engine.path), opts, providers=cuda_ep).run(None, feed)[0]
            except Exception as exc:  # report it, go on with the next way
                return {"error": str(exc).splitlines()[0][:300]}
            return {"max_abs_vs_cpu_switched": float(np.abs(out - ref).max()),
                    "max_abs_vs_cpu_base": float(np.abs(out - base_cpu).max())}

        lora_effect = float(np.abs(ref - base_cpu).max())
        for how in ("none", "add_initializer", "add_initializer_gpu", "add_external_initializers"):
            for level in levels:
                if how == "none" and level != "ALL":
                    continue
                row = {"component": name, "how": how, "level": level, "replaced": len(inits),
                       "lora_effect_cpu": lora_effect, **run(how, level)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ort_lora_cuda_probe.json").write_text(json.dumps(
        {"onnxruntime": ort.__version__, "torch": torch.__version__,
         "device": torch.cuda.get_device_name() if torch.cuda.is_available() else None, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
