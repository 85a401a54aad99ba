"""ONNX Runtime engine: CPU (numpy views of the torch tensors) or CUDA (I/O binding on torch buffers).

On CUDA, inputs and outputs stay torch tensors: they are bound by pointer, and
ONNX Runtime is told to compute on torch's current stream (``user_compute_stream``),
so no copy and no second stream appear inside a denoising step.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import BackendUnavailable, IntegrityError
from .base import Engine

NP = {"float32": np.float32, "float16": np.float16, "int32": np.int32, "int64": np.int64}


class OrtEngine(Engine):
    backend = "ort"

    def __init__(self, export, component: str, device: str = "cpu", session_options: Any = None,
                 providers: list | None = None):
        import onnxruntime as ort

        super().__init__(export.spec(component), device)
        path = export.manifest.verified_path(export.manifest.component(component))
        self.entry = export.manifest.component(component)
        opts = session_options or ort.SessionOptions()
        opts.log_severity_level = 3
        self.cuda = device.startswith("cuda")
        if not self.cuda:
            # ONNX Runtime's idle threads spin by default; between engine calls they would steal
            # the cores the sampler loop (and any torch work in the same process) needs.
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if providers is None:
            if self.cuda:
                if "CUDAExecutionProvider" not in ort.get_available_providers():
                    raise BackendUnavailable(
                        "ONNX Runtime here has no CUDAExecutionProvider: pip install onnxruntime-gpu==1.31.1 "
                        "(and uninstall the CPU onnxruntime)")
                import torch

                stream = torch.cuda.current_stream().cuda_stream
                providers = [("CUDAExecutionProvider", {"device_id": torch.device(device).index or 0,
                                                        "user_compute_stream": str(stream)})]
            else:
                providers = ["CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise IntegrityError(f"{path}: ONNX Runtime cannot load it ({str(exc).splitlines()[0][:200]})") from None
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.output_dtypes = {o.name: o.dtype for o in self.spec.outputs}
        self.input_dtypes = {i.name: i.dtype for i in self.spec.inputs}

    def __call__(self, feed: dict[str, Any]) -> dict[str, Any]:
        import torch

        dims = self.dims(feed)
        if not self.cuda:
            arrays = {k: feed[k].detach().to(getattr(torch, self.input_dtypes[k])).contiguous().numpy()
                      for k in self.input_dtypes}
            outs = self.session.run(self.output_names, arrays)
            return {name: torch.from_numpy(np.ascontiguousarray(v)) for name, v in zip(self.output_names, outs)}
        binding = self.session.io_binding()
        device_id = torch.device(self.device).index or 0
        keep = []
        for name, dtype in self.input_dtypes.items():
            t = feed[name].to(getattr(torch, dtype)).contiguous()
            keep.append(t)
            binding.bind_input(name, "cuda", device_id, NP[dtype], tuple(t.shape), t.data_ptr())
        outs = {}
        for spec in self.spec.outputs:
            t = torch.empty(spec.shape(dims), dtype=getattr(torch, spec.dtype), device=self.device)
            outs[spec.name] = t
            binding.bind_output(spec.name, "cuda", device_id, NP[spec.dtype], tuple(t.shape), t.data_ptr())
        self.session.run_with_iobinding(binding)
        return outs
