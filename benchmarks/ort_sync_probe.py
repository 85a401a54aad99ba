"""Does ONNX Runtime's CUDA EP return from run_with_iobinding before the GPU is done?

A synthetic FP16 MatMul chain (~10 ms of GPU work) runs through the same session setup as
sdexport's OrtEngine (torch's stream as user_compute_stream, I/O binding on torch buffers,
disable_synchronize_execution_providers), with and without ONNX Runtime's CUDA graph. Right after
the call returns, ``torch.cuda.current_stream().query()`` tells whether work is still pending:
pending means the call was asynchronous; done, together with a host time close to the GPU time,
means ONNX Runtime waited for the GPU (which exposes the sampler loop's CPU work as idle GPU time).

usage: python benchmarks/ort_sync_probe.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def model_path(tmp: str, n: int = 24, size: int = 4096) -> str:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits, prev = [], [], "x"
    for i in range(n):
        w = (rng.standard_normal((size, size)) / np.sqrt(size)).astype(np.float16)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"h{i}"]))
        prev = f"h{i}"
    nodes.append(helper.make_node("Identity", [prev], ["y"]))
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [size, size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [size, size])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = os.path.join(tmp, "chain.onnx")
    onnx.save(model, path)
    return path


def probe(path: str, cuda_graph: bool, disable_sync: bool, side_stream: bool = False) -> dict:
    import onnxruntime as ort
    import torch

    ort.preload_dlls() if hasattr(ort, "preload_dlls") else None
    if side_stream:
        torch.cuda.set_stream(torch.cuda.Stream())
    stream = torch.cuda.current_stream()
    options = {"device_id": 0, "user_compute_stream": str(stream.cuda_stream)}
    if cuda_graph:
        options["enable_cuda_graph"] = "1"
    sess = ort.InferenceSession(path, providers=[("CUDAExecutionProvider", options)])
    run_options = ort.RunOptions()
    if disable_sync:
        run_options.add_run_config_entry("disable_synchronize_execution_providers", "1")
    x = torch.randn(4096, 4096, device="cuda", dtype=torch.float16)
    y = torch.empty_like(x)
    binding = sess.io_binding()
    binding.bind_input("x", "cuda", 0, np.float16, tuple(x.shape), x.data_ptr())
    binding.bind_output("y", "cuda", 0, np.float16, tuple(y.shape), y.data_ptr())
    for _ in range(3):
        sess.run_with_iobinding(binding, run_options)
    torch.cuda.synchronize()
    host_ms, pending = [], 0
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    sess.run_with_iobinding(binding, run_options)
    torch.cuda.synchronize()
    want = y.float().sum().item()
    races = 0
    for _ in range(10):
        torch.cuda.synchronize()
        y.zero_()
        start.record()
        t0 = time.perf_counter()
        sess.run_with_iobinding(binding, run_options)
        host_ms.append((time.perf_counter() - t0) * 1e3)
        pending += not stream.query()
        got = y.float().sum()  # on torch's stream, right after the call: ordered only if ORT used it
        end.record()
        torch.cuda.synchronize()
        races += abs(got.item() - want) > 1e-3 * abs(want) + 1e-3
    torch.cuda.set_stream(torch.cuda.default_stream())
    return {"cuda_graph": cuda_graph, "disable_synchronize_execution_providers": disable_sync,
            "torch_stream": "side stream" if side_stream else "default (legacy) stream",
            "torch_reads_before_ort_finished": f"{races}/10",
            "host_ms_per_call": round(float(np.median(host_ms)), 3), "gpu_ms_per_call": round(start.elapsed_time(end), 3),
            "calls_returning_with_gpu_work_pending": f"{pending}/10"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    import onnxruntime as ort
    import torch

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = model_path(tmp)
        for side in (False, True):
            for graph in (False, True):
                for disable in (False, True):
                    try:
                        rows.append(probe(path, graph, disable, side))
                    except Exception as exc:  # record and go on
                        rows.append({"cuda_graph": graph, "disable_synchronize_execution_providers": disable,
                                     "side_stream": side, "error": f"{type(exc).__name__}: {exc}"[:500]})
                print(rows[-1], flush=True)
    result = {"onnxruntime": ort.__version__, "torch": torch.__version__, "gpu": torch.cuda.get_device_name(0),
              "rows": rows}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "ort_sync_probe.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
