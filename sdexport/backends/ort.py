"""ONNX Runtime engine: CPU (numpy views of the torch tensors) or CUDA (I/O binding on torch buffers).

On CUDA: inputs are copied into buffers the session keeps bound (one set per shape),
outputs are written into bound torch buffers (returned; valid until the next call of
the same shape), and ONNX Runtime computes on a torch stream of the engine's own
(``user_compute_stream``) without synchronising at the end of a run
(``disable_synchronize_execution_providers``). That stream is ordered with the
caller's by events (``wait_stream`` both ways), never by a host sync: a denoising step
has no host sync and, after the first call of a shape, no allocation. With
``cuda_graph`` ONNX Runtime captures the whole run as a CUDA graph (static shapes only).

Why a stream of its own: ONNX Runtime treats a ``user_compute_stream`` of 0 (torch's
legacy default stream) as "none" and computes on a non-blocking stream of its own; with
its end-of-run sync disabled, torch then read the outputs before they were written
(measured on an H200: 10 of 10 calls, benchmarks/results/2026-11-22-h200-ort-stream-probe).

On CUDA the engine prefers the ONNX Runtime-fused variant (``OUT/ort_cuda``, see
ort_cuda.py) when one was prepared; ``variant="plain"`` forces the portable export.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import BackendUnavailable, IntegrityError, ShapeError, UsageError
from .base import Engine

NP = {"float32": np.float32, "float16": np.float16, "int32": np.int32, "int64": np.int64}


def cuda_provider(device: str, tf32: bool | None = None, **options) -> tuple[str, dict[str, str]]:
    """The CUDA execution provider entry for ``device`` (``cuda`` or ``cuda:N``), with cuDNN/cuBLAS loaded
    from the nvidia-* wheels torch already uses. ``tf32``: None keeps ONNX Runtime's default (on: FP32
    MatMul/Conv run in TF32), False computes FP32 in FP32."""
    import onnxruntime as ort
    import torch

    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    options = {"device_id": str(torch.device(device).index or 0), **options}
    if tf32 is not None:
        options["use_tf32"] = "1" if tf32 else "0"
    return "CUDAExecutionProvider", options


class OrtEngine(Engine):
    backend = "ort"

    def __init__(self, export, component: str, device: str = "cpu", session_options: Any = None,
                 providers: list | None = None, variant: str = "auto", cuda_graph: bool = False,
                 static=None, tf32: bool | None = None, cuda_options: dict[str, str] | None = None,
                 threads: int | None = None):
        """``cuda_options``: extra CUDA execution provider options (e.g. ``{"fuse_conv_bias": "1"}``);
        ``threads``: ONNX Runtime's intra-op threads (bench sets them; the default is every physical core)."""
        import onnxruntime as ort

        super().__init__(export.spec(component), device)
        self.export, self.component = export, component
        self.weight_map = None
        self.cuda = device.startswith("cuda")
        self.device_id = int(device.partition(":")[2] or 0) if self.cuda else 0
        self.variant = "plain"
        path = export.manifest.verified_path(export.manifest.component(component))
        if variant == "auto":
            variant = "ort_cuda" if self.cuda and component in export.manifest.data.get("ort_cuda", {}) else "plain"
        if variant != "plain":
            section = export.manifest.data.get(variant)
            if not section:
                raise IntegrityError(f"{export.root}: no {variant} variant; run 'sdexport build "
                                     f"{export.root} --backend ort'")
            from ..ort_cuda import check_variant

            prepared = check_variant(export, component)
            if prepared:  # a component the variant leaves out (e.g. the text encoder) runs the plain export
                path = export.manifest.verified_path(prepared)
                self.variant = variant
        self.static_dims = self.spec.dims_for(static) if static is not None else None
        if cuda_graph and not self.static_dims:
            raise UsageError(f"{component}: CUDA graphs need a static shape (pass static=Geometry)")
        self._user_options = session_options
        self._threads = threads
        self.run_options = ort.RunOptions()
        if providers is None:
            if self.cuda:
                if "CUDAExecutionProvider" not in ort.get_available_providers():
                    raise BackendUnavailable(
                        "ONNX Runtime here has no CUDAExecutionProvider: pip install onnxruntime-gpu==1.31.1 "
                        "(and uninstall the CPU onnxruntime)")
                import torch

                self.stream = torch.cuda.Stream(device=self.device_id)  # never 0: see the module docstring
                options = {"user_compute_stream": str(self.stream.cuda_stream),
                           "arena_extend_strategy": "kSameAsRequested"}
                if cuda_graph:
                    options["enable_cuda_graph"] = "1"
                providers = [cuda_provider(device, tf32, **options, **(cuda_options or {}))]
                self.run_options.add_run_config_entry("disable_synchronize_execution_providers", "1")
            else:
                providers = ["CPUExecutionProvider"]
        self.providers = providers
        self.path = path
        self.session = self._open({})
        self.captures_own_graph = cuda_graph
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.input_dtypes = {i.name: i.dtype for i in self.spec.inputs}
        self._bound: dict[tuple, tuple] = {}

    def __call__(self, feed: dict[str, Any]) -> dict[str, Any]:
        import torch

        dims = self.dims(feed)
        rows = None
        if self.static_dims:
            feed, dims, rows = self.fit_static_batch(feed, dims, self.static_dims)
            if dims != {k: v for k, v in self.static_dims.items() if k in dims}:
                raise ShapeError(f"{self.spec.name}: this engine was opened for the static shape "
                                 f"{self.static_dims}; got {dims}")
        if not self.cuda:
            arrays = {k: feed[k].detach().to(getattr(torch, self.input_dtypes[k])).contiguous().numpy()
                      for k in self.input_dtypes}
            outs = self.session.run(self.output_names, arrays, self.run_options)
            return self.keep_rows({name: torch.from_numpy(np.ascontiguousarray(v))
                                   for name, v in zip(self.output_names, outs)}, rows)
        key = tuple(sorted(dims.items()))
        slot = self._bound.get(key)
        if slot is None:
            slot = self._bind(dims)
            self._bound[key] = slot
        binding, inputs, outputs = slot
        caller = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(caller)  # inputs written, previous outputs consumed
        with torch.cuda.stream(self.stream):
            for name, buf in inputs.items():
                src = feed[name]
                buf.copy_(src)
                if src.is_cuda:  # made on the caller's stream, read on ours: keep it alive until then
                    src.record_stream(self.stream)
        self.session.run_with_iobinding(binding, self.run_options)
        caller.wait_stream(self.stream)  # the caller sees the outputs only after ONNX Runtime wrote them
        return self.keep_rows(outputs, rows)

    def _options(self):
        import onnxruntime as ort

        opts = self._user_options or ort.SessionOptions()
        for axis, value in (self.static_dims or {}).items():
            # One geometry: every shape computation folds at session creation (no CPU fallback),
            # which is what lets ONNX Runtime capture the run as a CUDA graph.
            opts.add_free_dimension_override_by_name(axis, value)
        opts.log_severity_level = 3
        if self._threads:  # bench sets it explicitly (ONNX Runtime's default is every physical core)
            opts.intra_op_num_threads = self._threads
            opts.inter_op_num_threads = 1
        if not self.cuda:
            # ONNX Runtime's idle threads spin by default; between engine calls they would steal
            # the cores the sampler loop (and any torch work in the same process) needs.
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return opts

    def _open(self, initializers: dict[str, Any]):
        """A session over the engine's file, with ``initializers`` (name -> array) replacing the file's values
        at session creation (``SessionOptions.add_initializer``: no graph rewrite). ONNX Runtime 1.31's
        layout-level optimizations (level ALL: NchwcTransformer and the FP16-initializer fusions on the CPU)
        read weights from the file and ignored the replacements (measured: a replaced Conv weight of an FP32
        graph, and any replaced weight of an FP16 graph, left the output unchanged), so such sessions run at
        level EXTENDED, where every replacement took effect."""
        import onnxruntime as ort

        opts = self._options()
        # On CUDA the values must already live on the session's GPU, in memory the caller owns: ONNX Runtime
        # 1.31 skips a supplied initializer whose memory is not where its plan puts it (measured on an H100:
        # every CPU-side replacement of a CUDA session was ignored at every optimization level, with only a
        # log warning; benchmarks/ort_lora_cuda_probe.py) and refuses a GPU OrtValue it allocated itself
        # ("must be owned by the user"). So the GPU copies are torch tensors, handed over through DLPack and
        # kept alive with the session.
        keep: list[Any] = []
        if self.cuda and initializers:
            import torch
            from onnxruntime.capi import _pybind_state as C

            values = {}
            for name, arr in initializers.items():
                tensor = torch.from_numpy(np.ascontiguousarray(arr)).to(f"cuda:{self.device_id}")
                keep.append(tensor)
                values[name] = ort.OrtValue(C.OrtValue.from_dlpack(tensor.__dlpack__(), False))
        else:
            values = {name: ort.OrtValue.ortvalue_from_numpy(arr) for name, arr in initializers.items()}
        for name, value in values.items():
            opts.add_initializer(name, value)
        if values:
            opts.graph_optimization_level = min(opts.graph_optimization_level,
                                                ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                                                key=lambda level: int(level))
        try:
            session = ort.InferenceSession(str(self.path), opts, providers=self.providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise IntegrityError(f"{self.path}: ONNX Runtime cannot load it "
                                 f"({str(exc).splitlines()[0][:200]})") from None
        self._overrides = (initializers, values, keep)  # ONNX Runtime reads them during the session's life
        return session

    def _weight_map(self):
        if self.weight_map is None:
            from ..lora import WeightMap

            if self.variant != "plain":
                raise UsageError(f"{self.spec.name}: LoRA switching runs on the plain export, not the {self.variant} "
                                 "variant (its weights were rewritten by ONNX Runtime's fusions)")
            self.weight_map = WeightMap(self.export, self.component)
        return self.weight_map

    def base_param(self, name: str):
        return self._weight_map().base_param(name)

    def set_weights(self, params: dict[str, Any]) -> None:
        initializers = self._weight_map().initializers(params)
        if not initializers and not self._overrides[0]:  # the file's own weights, as the session has them
            return
        self._bound.clear()  # bindings belong to the old session
        self.session = None
        self.session = self._open(initializers)

    def _bind(self, dims: dict[str, int]):
        import torch

        binding = self.session.io_binding()
        inputs, outputs = {}, {}
        for t in self.spec.inputs:
            buf = torch.empty(t.shape(dims), dtype=getattr(torch, t.dtype), device=self.device)
            inputs[t.name] = buf
            binding.bind_input(t.name, "cuda", self.device_id, NP[t.dtype], tuple(buf.shape), buf.data_ptr())
        for t in self.spec.outputs:
            buf = torch.empty(t.shape(dims), dtype=getattr(torch, t.dtype), device=self.device)
            outputs[t.name] = buf
            binding.bind_output(t.name, "cuda", self.device_id, NP[t.dtype], tuple(buf.shape), buf.data_ptr())
        return binding, inputs, outputs

    def close(self) -> None:
        self._bound.clear()
        self.session = None
