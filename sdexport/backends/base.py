"""The Engine interface and the loader that picks a backend.

An Engine runs one component. It takes and returns torch tensors on its
``device``, keyed by the component spec's tensor names, and checks shapes
against the spec's ranges (ShapeError names the range). Torch owns the device
and the stream: backends run on ``torch.cuda.current_stream()``.
"""

from __future__ import annotations

import abc
import contextlib
import contextvars
from typing import Any

from ..components import ComponentSpec, Geometry
from ..errors import UsageError

BACKENDS = ("ort", "torch", "trt", "inductor")

# The request (images per call, pixels, guidance on/off) the engine calls in progress serve, set by the pipeline
# for the length of a request: an engine sees only rows, and how many rows an image takes depends on the request
# (two through the text encoders and UNet under classifier-free guidance, one without), so an error that speaks
# of images per call reads them here (InductorEngine.mismatch). None outside a request (an engine called alone).
_REQUEST: contextvars.ContextVar[Geometry | None] = contextvars.ContextVar("sdexport_request", default=None)


@contextlib.contextmanager
def serving(geo: Geometry):
    """Engine calls inside are for the request ``geo`` (``current_request``)."""
    token = _REQUEST.set(geo)
    try:
        yield
    finally:
        _REQUEST.reset(token)


def current_request() -> Geometry | None:
    return _REQUEST.get()


class Engine(abc.ABC):
    backend: str = "?"
    # True when __call__ replays a CUDA graph of the engine's own: such a call cannot be captured inside a
    # caller's graph (the pipeline's step graphs read this, through graph_capture_refusal).
    captures_own_graph: bool = False
    # True when a call whose batch size differs from the previous call's costs far more than a repeated one
    # (OrtEngine on CUDA with dynamic shapes); a caller whose batch sizes vary (serve) then keeps them fixed.
    fixed_batch_preferred: bool = False

    def __init__(self, spec: ComponentSpec, device: str):
        self.spec = spec
        self.device = device

    def dims(self, feed: dict[str, Any]) -> dict[str, int]:
        """Axis values implied by the inputs' shapes; raises ShapeError outside the ranges."""
        from ..errors import ShapeError

        dims: dict[str, int] = {}
        for t in self.spec.inputs:
            if t.name not in feed:
                raise UsageError(f"{self.spec.name}: input '{t.name}' missing")
            shape = tuple(feed[t.name].shape)
            if len(shape) != len(t.dims):
                raise ShapeError(f"{self.spec.name}: input '{t.name}' has rank {len(shape)}, expected {len(t.dims)}")
            for size, dim in zip(shape, t.dims):
                if isinstance(dim, int) and size != dim:
                    raise ShapeError(f"{self.spec.name}: input '{t.name}' has shape {shape}; "
                                     f"expected {tuple(t.dims)}")
                if isinstance(dim, str):
                    if dims.setdefault(dim, size) != size:
                        raise ShapeError(f"{self.spec.name}: inputs disagree on {dim} ({dims[dim]} vs {size})")
        self.spec.check_dims(dims)
        return dims

    @abc.abstractmethod
    def __call__(self, feed: dict[str, Any]) -> dict[str, Any]:
        """Run the component; inputs and outputs are torch tensors on ``self.device``."""

    def fit_static_batch(self, feed: dict[str, Any], dims: dict[str, int], static: dict[str, int]):
        """(feed, dims, rows): a call with fewer rows than an engine opened or built for one static shape takes
        is padded up to its batch by repeating the last row, and ``rows`` says how many output rows are the
        caller's (None: no padding). Rows never mix in these components, so the caller's rows are exact. It
        happens where the rows a component gets depend on the request, not on the geometry the engine was made
        for: SDXL's text encoders get only the prompts when the negative prompt is zeros (diffusers'
        force_zeros_for_empty_prompt), where the static geometry counts two rows per image."""
        import torch

        want = static.get("batch")
        n = dims.get("batch")
        if want is None or n is None or n >= want or any(dims.get(k, v) != v for k, v in static.items() if k != "batch"):
            return feed, dims, None
        padded = dict(feed)
        for t in self.spec.inputs:
            if t.dims and t.dims[0] == "batch":
                x = feed[t.name]
                padded[t.name] = torch.cat([x, x[-1:].expand(want - n, *x.shape[1:])])
        return padded, {**dims, "batch": want}, n

    def keep_rows(self, outputs: dict[str, Any], rows: int | None) -> dict[str, Any]:
        """The caller's rows of outputs computed on a padded batch (fit_static_batch)."""
        if rows is None:
            return outputs
        batched = {t.name for t in self.spec.outputs if t.dims and t.dims[0] == "batch"}
        return {k: v[:rows] if k in batched else v for k, v in outputs.items()}

    def graph_capture_refusal(self) -> str | None:
        """Why a caller may not capture this engine's call into a CUDA graph of its own; None if it may."""
        if self.captures_own_graph:
            return f"the {self.spec.name} engine captures its own CUDA graph (open it without cuda_graph)"
        return None

    def close(self) -> None:
        pass

    # --- weights (LoRA switching: lora.py computes the values, the engine holds them) ------------------
    def base_param(self, name: str):
        """The value torch parameter ``name`` of this component has in the engine as built (float32 tensor)."""
        raise UsageError(f"{self.spec.name}: the {self.backend} backend cannot switch LoRAs")

    def set_weights(self, params: dict[str, Any]) -> None:
        """Run with these torch parameters changed to these values and every other weight as built: an
        absolute state (an empty dict restores the built weights), never applied on top of the last one."""
        raise UsageError(f"{self.spec.name}: the {self.backend} backend cannot switch LoRAs")


def warm_up(fn) -> None:
    """Run ``fn`` on a side stream before a CUDA graph capture (autotuning, lazy kernel loading and
    allocations happen there, outside the capture), ordered with the current stream both ways."""
    import torch

    caller = torch.cuda.current_stream()
    side = torch.cuda.Stream()
    side.wait_stream(caller)
    with torch.cuda.stream(side):
        fn()
    caller.wait_stream(side)


class CudaGraphed(Engine):
    """Capture another engine's call once per input shape as a CUDA graph; replay it afterwards.

    Inputs are copied into the graph's static buffers; the returned outputs are the
    graph's static buffers (valid until the next call of the same shape). Graphs of
    one engine share a memory pool.
    """

    def __init__(self, inner: Engine):
        import torch

        super().__init__(inner.spec, inner.device)
        self.inner = inner
        self.captures_own_graph = True
        self.backend = f"{inner.backend}+cudagraph"
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple, tuple] = {}

    def __call__(self, feed: dict[str, Any]) -> dict[str, Any]:
        import torch

        self.dims(feed)
        key = tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(feed.items()))
        if key not in self.graphs:
            static_in = {k: v.detach().clone() for k, v in feed.items()}

            def twice():
                with torch.inference_mode():
                    for _ in range(2):
                        self.inner(static_in)

            warm_up(twice)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool), torch.inference_mode():
                static_out = self.inner(static_in)
            self.graphs[key] = (graph, static_in, static_out)
        graph, static_in, static_out = self.graphs[key]
        for k, v in feed.items():
            static_in[k].copy_(v)
        graph.replay()
        return static_out


def unet_slot(export, backend: str, unet: str = "default", components: list[str] | None = None) -> str:
    """The component that runs in the UNet slot for ``--unet unet`` on ``backend``, or the refusal: the one
    rule of infer, bench and serve (``load_engines`` asks here; serve asks before Triton starts).

    "unet" for the default choice, where ``components`` has no UNet, and on TensorRT (whose "unet" engine
    must then have been built with --precision int8); else the artifact (artifacts.UNET_CHOICES, e.g.
    ``unet_int8``), which the export must hold. The torch backend runs the source model: no artifact."""
    from ..artifacts import UNET_CHOICES
    from ..errors import IntegrityError

    if unet not in UNET_CHOICES:
        raise UsageError(f"--unet {unet}: choose {', '.join(UNET_CHOICES)}")
    variant = UNET_CHOICES[unet]
    if not variant or "unet" not in (export.pipeline_components if components is None else components):
        return "unet"
    if backend == "trt":  # the "unet" engine built from the artifact: sdexport build --precision int8
        from .trt import engine_entry

        precision = engine_entry(export, "unet")["precision"]
        if precision != unet:
            raise UsageError(f"--unet {unet}: the UNet engine in {export.root} is {precision}; "
                             f"build the INT8 one: sdexport build {export.root} --precision {unet}")
        return "unet"
    if backend == "torch":
        raise UsageError(f"--unet {unet} runs the {variant} ONNX graph; the torch backend runs the source "
                         "model (use --backend ort or trt)")
    if variant not in export.manifest.components:
        raise IntegrityError(f"{export.root}: no {variant} (--unet {unet}); run 'sdexport calibrate' and "
                             f"'sdexport quantize {export.root} --calib FILE' first")
    return variant


def load_engines(export_dir, backend: str, components: list[str] | None = None,
                 device: str = "cpu", dtype: str | None = None, **options) -> dict[str, Engine]:
    """Engines for ``components`` of an export directory (default: what the sampler loop runs), on ``backend``.

    ``export_dir`` is a path or an open ``ExportDir``. ``unet="int8"`` runs another artifact of the
    export in the UNet slot (``unet_slot``), under the name "unet".
    """
    from ..runtime import ExportDir

    if backend not in BACKENDS:
        raise UsageError(f"unknown backend '{backend}' (choose from {', '.join(BACKENDS)})")
    export = export_dir if isinstance(export_dir, ExportDir) else ExportDir.open(export_dir)
    components = list(components or export.pipeline_components)
    unet = options.pop("unet", None) or "default"
    variant = unet_slot(export, backend, unet, components)
    if variant != "unet":
        # The UNet slot runs another artifact of the export (e.g. unet_int8), under the name "unet".
        if options.get("cuda_graph_components") is not None:
            options["cuda_graph_components"] = [variant if c == "unet" else c for c in options["cuda_graph_components"]]
        elif options.get("cuda_graph"):
            options["cuda_graph_components"] = [variant]
        names = [variant if c == "unet" else c for c in components]
        engines = load_engines(export, backend, names, device=device, dtype=dtype, **options)
        return {("unet" if c == variant else c): engine for c, engine in engines.items()}
    if backend not in ("torch", "inductor"):  # inductor: its ONNX fallbacks are checked where it loads them
        export.check_components(components)
    if backend == "ort":
        from .ort import OrtEngine

        graph_parts = set(options.pop("cuda_graph_components", ["unet"] if options.get("cuda_graph") else []))
        graph = options.pop("cuda_graph", False)
        return {c: OrtEngine(export, c, device=device, cuda_graph=graph and c in graph_parts, **options)
                for c in components}
    if backend == "torch":
        from .torch import TorchEngine

        return TorchEngine.load_all(export, components, device=device, dtype=dtype or "fp32", **options)
    if backend == "inductor":
        from .inductor import load_all

        return load_all(export, components, device=device, **options)
    from .trt import TrtEngine

    return TrtEngine.load_all(export, components, device=device, **options)
