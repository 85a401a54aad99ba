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

import os
from typing import Any

import numpy as np

from ..errors import BackendUnavailable, IntegrityError, ShapeError, UsageError
from ..lora import tensor_view
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


def conv_algo_search(batch_varies: bool) -> dict[str, str]:
    """CUDA execution provider options for an engine that sees another batch size on many calls (serve's dynamic
    batching), where ONNX Runtime's default cuDNN search (EXHAUSTIVE) runs again at each change of shape, also
    for shapes seen before. Measured on an H100 (benchmarks/ort_shape_switch_probe.py,
    results/2026-11-27-h100-session7 and -session6), ms per image with the batch size repeated / changed:
    sd15 FP32 UNet EXHAUSTIVE 21.80 / 219.99, HEURISTIC 21.85 / 51.79; sd15 VAE decoder (FP16 variant)
    EXHAUSTIVE 8.59 / 153.65, HEURISTIC 8.52 / 24.48. HEURISTIC keeps the steady state and cuts the change
    4-6x; DEFAULT (no search) ran every Conv in cuDNN's fallback mode, 2.5x slower."""
    return {"cudnn_conv_algo_search": "HEURISTIC"} if batch_varies else {}


class OrtEngine(Engine):
    backend = "ort"

    def __init__(self, export, component: str, device: str = "cpu", session_options: Any = None,
                 providers: list | None = None, variant: str = "auto", cuda_graph: bool = False,
                 static=None, tf32: bool | None = None, cuda_options: dict[str, str] | None = None,
                 threads: int | None = None, batch_varies: bool = False):
        """``cuda_options``: extra CUDA execution provider options (e.g. ``{"fuse_conv_bias": "1"}``);
        ``threads``: ONNX Runtime's intra-op threads (bench sets them; the default is every physical core);
        ``batch_varies``: the batch size changes on many calls (serve): see conv_algo_search."""
        import onnxruntime as ort

        super().__init__(export.spec(component), device)
        self.export, self.component = export, component
        self.weight_map = None
        self.cuda = device.startswith("cuda")
        self.device_id = int(device.partition(":")[2] or 0) if self.cuda else 0
        self.variant = "plain"
        self.batch_varies = batch_varies
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
                options.update(conv_algo_search(batch_varies))
                providers = [cuda_provider(device, tf32, **options, **(cuda_options or {}))]
                self.run_options.add_run_config_entry("disable_synchronize_execution_providers", "1")
            else:
                providers = ["CPUExecutionProvider"]
        self.providers = providers
        self.path = path
        self.sessions_opened = 0
        self._changed: dict[str, Any] = {}  # initializers holding other values than the file's (a LoRA's)
        self._live: _LiveWeights | None = None
        # LoRA switches write into the session's weights (_LiveWeights) on CUDA; on the CPU they open new
        # sessions, because a session reading unpacked weights runs its steps slower (measured on sd15-random,
        # 2 cores: UNet step 2.20 s instead of 1.92 s, for a switch of 0.80 s instead of 2.70 s).
        # SDEXPORT_ORT_LIVE_WEIGHTS=1 or 0 chooses either way.
        # Not with ONNX Runtime's own CUDA graph: its replays read the buffers bound at capture, and the check's
        # probe runs would be captured instead.
        live = os.environ.get("SDEXPORT_ORT_LIVE_WEIGHTS", "")
        self._live_allowed = not cuda_graph and (live == "1" or (live != "0" and self.cuda))
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

    @property
    def fixed_batch_preferred(self) -> bool:
        """ONNX Runtime's CUDA convolutions keep the cuDNN choices of one input shape only: a call of another batch
        size chooses again, which costs several times a repeated call even with heuristics (measured in
        conv_algo_search's docstring)."""
        return self.cuda and not self.static_dims

    def _options(self):
        import onnxruntime as ort

        opts = self._user_options or ort.SessionOptions()
        # Session creation also logs through the default logger (CUDA EP device lookup, Memcpy insertion):
        # warnings a user cannot act on; errors still print.
        ort.set_default_logger_severity(3)
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

    def _open(self, initializers: dict[str, Any], live: bool = False):
        """A session over the engine's file, with ``initializers`` (name -> array) replacing the file's values
        at session creation (``SessionOptions.add_initializer``: no graph rewrite). ``live``: the supplied
        values are buffers of ours that ONNX Runtime reads in place (no prepacking), so that later switches
        write into them (_LiveWeights). ONNX Runtime 1.31's
        layout-level optimizations (level ALL: NchwcTransformer and the FP16-initializer fusions on the CPU)
        read weights from the file and ignored the replacements (measured: a replaced Conv weight of an FP32
        graph, and any replaced weight of an FP16 graph, left the output unchanged), so such sessions run at
        level EXTENDED, where every replacement took effect."""
        import onnxruntime as ort

        opts = self._options()
        if live:  # kernels read the supplied buffers at run time instead of packed copies made at creation
            opts.add_session_config_entry("session.disable_prepacking", "1")
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
                tensor = arr if isinstance(arr, torch.Tensor) else \
                    tensor_view(np.ascontiguousarray(arr)).to(f"cuda:{self.device_id}")
                keep.append(tensor)
                values[name] = ort.OrtValue(C.OrtValue.from_dlpack(tensor.__dlpack__(), False))
            torch.cuda.synchronize(self.device_id)  # copied on torch's stream; ONNX Runtime reads them on its own
        else:
            keep = list(initializers.values())
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
        self._overrides = (values, keep)  # ONNX Runtime reads them during the session's life
        self.sessions_opened += 1
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
        """A switch writes the new values into the buffers the session reads, where that was seen to work for
        these weights (_LiveWeights); otherwise it opens a new session with them (ONNX Runtime has no call that
        changes a weight of an open session)."""
        initializers = self._weight_map().initializers(params)
        if not initializers and not self._changed:  # the file's own weights, as the session has them
            return
        if self._live is not None:
            if self._live.write(initializers):
                self._changed = initializers
                return
            self._live, self._live_allowed = None, False  # the writes did not reach the results: new sessions
        self._bound.clear()  # bindings belong to the old session
        self.session = self._overrides = None  # the old values go before the new session holds its own
        if self._live_allowed and initializers:
            self._live = _LiveWeights.open(self, initializers)
        else:
            self.session = self._open(initializers)
        self._changed = initializers

    def _probe_feed(self):
        """Inputs of the cheapest shape the engine takes (its static one, or the export's smallest image)."""
        import torch

        from ..components import Geometry

        r = self.export.ranges
        dims = self.static_dims or self.spec.dims_for(Geometry(1, r.min_size, r.min_size, guidance=True))
        return {k: v.detach().to(getattr(torch, self.input_dtypes[k])).numpy()
                for k, v in self.spec.sample_inputs(dims, seed=7).items()}

    def _probe(self, session, feed) -> list:
        import onnxruntime as ort

        return session.run(self.output_names, feed, ort.RunOptions())  # synchronised: outputs on the host

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
        self._live = self._overrides = None
        self.session = self.weight_map = None  # the weights map's memory-mapped file goes with it


class _LiveWeights:
    """LoRA switching without new sessions: the session reads every weight the weights map covers from buffers
    of ours (torch CUDA tensors handed over by DLPack, or numpy arrays; no prepacking), so a switch writes the
    new values into them (and the file's values back where the previous switch changed others).

    ONNX Runtime does not promise that a session reads a supplied initializer in place: a graph optimization
    may have folded it into a new constant, or a kernel may have packed a copy. So the first write to any
    weight is checked: the engine's outputs on a probe input must match a new session opened with the same
    values (what a switch did before), and differ from the outputs before the write. Once a weight passed, later
    writes to it are trusted; where the check fails the engine goes back to new sessions for good."""

    def __init__(self, engine: OrtEngine, buffers: dict[str, Any]):
        self.engine, self.buffers = engine, buffers
        self.changed: set[str] = set()
        self.verified: set[str] = set()

    @classmethod
    def open(cls, engine: OrtEngine, initializers: dict[str, Any]) -> "_LiveWeights":
        """A session over buffers holding every mapped weight (the file's values, ``initializers`` where given)."""
        wmap = engine._weight_map()
        names = sorted({e["initializer"] for entries in wmap.params.values() for e in entries})
        values = {n: initializers[n] if n in initializers else wmap.base_initializer(n) for n in names}
        if engine.cuda:  # the copy on the GPU is the buffer
            values = {n: tensor_view(np.ascontiguousarray(v)).to(f"cuda:{engine.device_id}")
                      for n, v in values.items()}
        else:  # a copy of ours: the weights map keeps the file's values for restoring
            values = {n: np.array(v, copy=True) for n, v in values.items()}
        engine.session = engine._open(values, live=True)
        live = cls(engine, values)
        live.changed = set(initializers)
        return live

    def _copy(self, name: str, value) -> None:
        buf = self.buffers[name]
        if self.engine.cuda:
            buf.copy_(tensor_view(np.ascontiguousarray(value)))
        else:
            np.copyto(buf, value)

    def write(self, initializers: dict[str, Any]) -> bool:
        """Write a switch's values; False where the check says the session does not read them in place (the
        buffers then hold the new values, and the caller opens a new session with them)."""
        engine = self.engine
        if any(n not in self.buffers for n in initializers):
            return False
        restore = self.changed - set(initializers)
        unchecked = (restore | set(initializers)) - self.verified
        feed = before = None
        if unchecked:
            feed = engine._probe_feed()
            before = engine._probe(engine.session, feed)
        wmap = engine._weight_map()
        self.changed = self.changed | set(initializers)  # a copy that fails half way is restored next time
        for name in restore:
            self._copy(name, wmap.base_initializer(name))
        for name, value in initializers.items():
            self._copy(name, value)
        if engine.cuda:
            import torch

            torch.cuda.synchronize(engine.device_id)
        self.changed = set(initializers)
        if not unchecked:
            return True
        keep = engine._overrides
        try:
            got = engine._probe(engine.session, feed)
            fresh = engine._open(initializers, live=True)  # the same kernels (no prepacking), weights from creation
            want = engine._probe(fresh, feed)
            del fresh
        except Exception:  # noqa: BLE001 -- e.g. no memory for a second session: not checked, so not trusted
            return False
        finally:
            engine._overrides = keep
        verdict = _same_results(got, want, before)
        if verdict is False:
            return False
        if verdict is True:  # the writes reached the results ("unchanged" shows nothing: checked again next time)
            self.verified |= unchecked
        return True


def _same_results(got: list, want: list, before: list) -> bool | str:
    """True: ``got`` equals ``want`` up to kernel-selection noise, far closer than ``before`` was (the writes
    reached the results). "unchanged": the switch gave this component the values it had (``before``, ``got``
    and ``want`` equal), which shows nothing about the writes. False otherwise."""
    moved = max(float(np.max(np.abs(w.astype(np.float64) - b))) for w, b in zip(want, before))
    off = max(float(np.max(np.abs(w.astype(np.float64) - g))) for w, g in zip(want, got))
    if moved == 0:
        return "unchanged" if off == 0 else False
    return off <= 1e-3 * moved
