"""Serving on NVIDIA Triton Inference Server: ``sdexport serve``.

One Triton *Python-backend model* serves an export: the sampler loop of ``infer``
(pipeline.py) behind Triton's HTTP/gRPC endpoints (the KServe v2 protocol), its
dynamic batcher, its bounded queue, its health endpoints and its Prometheus metrics.
The same model is what ``--write-repository DIR`` writes for Triton fleets (a
``config.pbtxt`` and a three-line ``model.py`` that imports ``TritonPythonModel``
from here), so the path a fleet deploys is the path the tests run.

``sdexport serve OUT`` writes that repository into a temporary directory and runs
the ``tritonserver`` binary and Python backend shipped in the ``nvidia-pytriton``
wheel. Why not PyTriton's ``Triton.bind()`` (a Python callable behind a proxy
model): there, an exception in the callable fails every request of the dynamic
batch with a Python traceback as the message, all model instances are threads of
one process (one GIL for all GPUs), and the server's whole log is kept in memory.
A Python-backend model answers each request on its own (a bad request gets a 400
naming its field while the others of its batch get their images), runs one process
per instance (per GPU), and is what the official Triton container serves as is.

Batching rule: Triton's dynamic batcher hands ``execute`` up to ``max_batch_size``
images from concurrent requests; images that share height, width, steps, scheduler
and guidance scale run as ONE pipeline call with a prompt, negative prompt and
seed per image (``Pipeline.__call__`` with lists), the others in one call per
group. Each image equals ``sdexport infer`` with its seed: ONNX Runtime's CPU
kernels compute each row alike at any batch size (tested pixel for pixel).
Text-embedding cache: the text encoder runs only for token sequences it has not
seen (LRU over the token ids, bounded), so repeated prompts (and the empty negative
prompt) skip it; hits and misses are Prometheus counters.

Process layout: ``sdexport serve`` (supervisor: signals, readiness line, stub
watchdog) -> ``tritonserver`` (HTTP, gRPC, metrics, batcher) -> one Python-backend
stub process per model instance (engines, sampler loop). The stub needs the
interpreter's own ``libpython`` (``sysconfig`` LIBDIR first on ``LD_LIBRARY_PATH``:
with a pyenv or virtualenv interpreter the dynamic linker otherwise finds the
system's libpython of another patch release, and the stub fails inside
``multiprocessing``) and numpy < 2 (the Python backend of Triton 2.51, which
nvidia-pytriton 0.7.0 ships, is built with pybind11 2.10: under numpy 2 every
tensor it hands to Python is read with wrong strides). Both are checked here.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from .errors import BackendUnavailable, SdexportError, ServeFailed, UsageError
from .pipeline import SCHEDULERS, check_step_graph

MODEL_NAME = "sdexport"
# Header that unlocks Triton's model-repository API (model reload) for the supervisor only.
ADMIN_HEADER = "sdexport-admin-token"
TRITON_PACKAGES = "pip install nvidia-pytriton==0.7.0 'tritonclient[grpc,http]==2.73.0' (the 'serve' extra)"


@dataclasses.dataclass(frozen=True)
class Field:
    """One input or output of the served model (KServe v2 datatype; each has a leading batch axis)."""

    name: str
    datatype: str
    dims: tuple[int, ...] = (1,)
    required: bool = False
    doc: str = ""


INPUTS = (  # the optional ones default to sdexport infer's defaults (request_defaults)
    Field("prompt", "BYTES", required=True, doc="UTF-8 text"),
    Field("negative_prompt", "BYTES", doc="UTF-8 text"),
    Field("seed", "INT64", doc="seed of the image's noise (initial, and per step where the scheduler draws it); "
          "negative: infer's seed + 2^64"),
    Field("steps", "INT32", doc="denoising steps, 1 to the scheduler's training steps"),
    Field("guidance_scale", "FP32", doc="classifier-free guidance (off at <= 1), finite, >= 0"),
    Field("height", "INT32", doc="pixels, inside the export's range (default: native size)"),
    Field("width", "INT32", doc="pixels, inside the export's range (default: native size)"),
    Field("scheduler", "BYTES", doc=f'{", ".join(SCHEDULERS)} ("": the model\'s own)'),
    Field("image", "BYTES", doc='encoded image (PNG, JPEG, ...) to start from: image-to-image ("": none)'),
    Field("mask", "BYTES", doc='encoded grayscale mask, white = repaint, same size as image: inpainting models'),
    Field("strength", "FP32", doc="with image: how much of it is repainted, in (0, 1] (default: infer's)"),
)
OUTPUTS = (
    Field("image", "UINT8", dims=(-1, -1, 3), doc="height x width x RGB: the pixels infer writes to its PNG"),
    Field("timings", "BYTES", doc="JSON: stage times of the pipeline call that made the image, images in it, "
                                  "text-cache hits"),
)


def option_fields(options) -> tuple[Field, ...]:
    """The inputs of a model family's request options (families.base.FamilyOption: SDXL's micro-conditioning,
    the refiner's aesthetic scores): a size or coordinates is two INT32 per image (H W, TOP LEFT), a score one
    FP32. Optional; left out, the option is left out as in ``infer``."""
    return tuple(Field(o.name, "FP32" if o.kind == "score" else "INT32", dims=(1,) if o.kind == "score" else (2,),
                       doc=o.help) for o in options)


def inputs_for(export) -> tuple[Field, ...]:
    """The served model's inputs: INPUTS and the request options of the export's model."""
    return INPUTS + option_fields(export.family.options_for(export.info))


TRITON_TYPES = {"BYTES": "TYPE_STRING", "INT64": "TYPE_INT64", "INT32": "TYPE_INT32", "FP32": "TYPE_FP32",
                "UINT8": "TYPE_UINT8"}


def request_defaults() -> dict[str, Any]:
    """Defaults of the optional inputs: those of ``Pipeline.__call__`` (and so of ``sdexport infer``)."""
    import inspect

    from .pipeline import Pipeline

    params = inspect.signature(Pipeline.__call__).parameters
    return {f.name: params[f.name].default for f in INPUTS if not f.required}


@dataclasses.dataclass(frozen=True)
class ImageRequest:
    """One image a client asked for, validated against the export."""

    prompt: str
    negative_prompt: str | None
    seed: int
    steps: int
    guidance_scale: float
    height: int
    width: int
    scheduler: str | None
    image: Any = dataclasses.field(default=None, compare=False, repr=False)  # PIL image to start from
    mask: Any = dataclasses.field(default=None, compare=False, repr=False)  # PIL inpainting mask
    strength: float | None = None
    image_key: str = ""  # sha256 of the encoded image and mask ("" without an image)
    options: tuple = ()  # (name, value) of the family's request options given, checked (sorted by name)

    @property
    def batch_key(self) -> tuple:
        """Images with equal keys run as one pipeline call: the same shape and schedule, and the same input
        image and strength (the pipeline starts a call from one image). Inpainting images run one per call:
        diffusers' inpainting draws the image's latents from the first image's generator of a batch, so a
        batched image would differ from ``infer`` with its seed; image-to-image draws from each image's own."""
        key = (self.height, self.width, self.steps, self.scheduler, self.guidance_scale, self.image_key, self.strength,
               self.options)  # a pipeline call takes one value of each option (SDXL: the time ids of every row)
        return key + ((self.seed,) if self.mask is not None else ())


def schedule_error(scheduler: str | None, config: Mapping[str, Any], steps: int) -> tuple[type, str] | None:
    """infer's dry run of a schedule (limits.check_schedule), once per (scheduler, config, steps) in a process:
    the error's (type, message) where this scheduler cannot make these steps (PNDM or DDIM at 1000, DPM++ 2M,
    UniPC or LCM at 999 on SD's config), else None. A dry run costs up to half a second; requests repeat."""
    return _schedule_error(scheduler, json.dumps(config, sort_keys=True), int(steps))


@functools.lru_cache(maxsize=4096)
def _schedule_error(scheduler: str | None, config: str, steps: int) -> tuple[type, str] | None:
    from .limits import check_schedule

    try:
        check_schedule(scheduler, json.loads(config), steps)
    except SdexportError as exc:
        return type(exc), str(exc)
    return None


def parse_request(tensors: Mapping[str, Any], export, defaults: Mapping[str, Any]) -> list[ImageRequest]:
    """The images of one request (``tensors``: input name -> numpy array of shape [n, 1], or None when absent).
    Raises UsageError/ShapeError whose message starts with the offending input's name."""
    from .components import Geometry
    from . import limits
    from .errors import ModelError
    from .pipeline import InitImage, check_request, decode_image

    def bad(name: str, what: str):
        return UsageError(f"{name}: {what}")

    def renamed(exc: SdexportError, fallback: str) -> SdexportError:
        """infer's own check, its message naming the inputs instead of infer's options (--guidance-scale ->
        guidance_scale) and starting with one (``fallback`` where it starts with something else)."""
        message = re.sub(r"--([a-z][a-z-]*)", lambda m: m.group(1).replace("-", "_"), str(exc))
        if not message.startswith(tuple(f.name for f in fields)):
            message = f"{fallback}: {message}"
        return (UsageError if isinstance(exc, ModelError) else type(exc))(message)

    fields = inputs_for(export)
    present = {f.name: tensors[f.name] for f in fields if tensors.get(f.name) is not None}
    for f in fields:
        if f.required and f.name not in present:
            raise bad(f.name, "missing (a required input)")
    n = len(present["prompt"])
    for name, values in present.items():
        if len(values) != n:
            raise bad(name, f"{len(values)} value(s) for the {n} image(s) of 'prompt'")

    def column(name: str) -> list[Any]:
        if name not in present:
            return [defaults[name]] * n
        values = present[name].reshape(n, -1)
        if values.shape[1] != 1:
            raise bad(name, f"one value per image expected, got shape {list(present[name].shape)}")
        return [v[0] for v in values]

    def text(name: str) -> list[str]:
        out = []
        for v in column(name):
            if isinstance(v, (bytes, bytearray, memoryview)):
                try:
                    v = bytes(v).decode("utf-8")
                except UnicodeDecodeError:
                    raise bad(name, "not UTF-8 text") from None
            if v is None and name == "negative_prompt":  # absent: as infer without --negative-prompt
                out.append(None)
                continue
            if not isinstance(v, str):
                raise bad(name, f"text expected, got {type(v).__name__}")
            out.append(limits.text(name, v))  # infer's bound: a 2 MB prompt took the instance 3 s to tokenize
        return out

    def encoded(name: str) -> list[bytes | None]:
        """Encoded images (BYTES); absent or empty: none."""
        out = []
        for v in column(name):
            if v is not None and not isinstance(v, (bytes, bytearray, memoryview)):
                raise bad(name, f"encoded image bytes expected, got {type(v).__name__}")
            out.append(bytes(v) or None if v is not None else None)
        return out

    def option(f: Field) -> list[Any]:
        """A family option's value per image (None where absent): a tuple of numbers, or one number."""
        if f.name not in present:
            return [None] * n
        values = present[f.name]
        if values.ndim != 2 or values.shape[1] != f.dims[0]:
            raise bad(f.name, f"{f.dims[0]} value(s) per image expected, got shape {list(values.shape)}")
        if values.dtype.kind not in "iuf":
            raise bad(f.name, f"numbers expected, got {values.dtype}")
        return [v[0].item() if f.dims[0] == 1 else tuple(x.item() for x in v) for v in values]

    columns = {f.name: option(f) for f in fields[len(INPUTS):]}
    options = [{name: values[i] for name, values in columns.items() if values[i] is not None} for i in range(n)]

    decoded: dict[bytes, Any] = {}  # one decode per distinct image of the request

    def picture(name: str, data: bytes | None):
        if data is not None and data not in decoded:
            decoded[data] = decode_image(data, name)
        return None if data is None else decoded[data]

    images = []
    for prompt, negative, seed, steps, guidance, height, width, scheduler, image, mask, strength, given in zip(
            text("prompt"), text("negative_prompt"), column("seed"), column("steps"), column("guidance_scale"),
            column("height"), column("width"), text("scheduler") if "scheduler" in present else [None] * n,
            encoded("image"), encoded("mask"), column("strength"), options):
        try:  # infer's own check of the family's options (bounds, pairs)
            checked = export.family.check_options(export.info, given)
        except SdexportError as exc:
            raise renamed(exc, next(iter(given), "prompt")) from None
        steps, seed = int(steps), int(seed)
        guidance = float(guidance)
        strength = float(strength) if strength is not None else None
        if scheduler is not None and scheduler not in SCHEDULERS and scheduler != "":
            raise bad("scheduler", f"unknown '{scheduler}' (choose from {', '.join(SCHEDULERS)})")
        try:  # infer's own checks
            init = InitImage.for_request(export, picture("image", image), picture("mask", mask), strength,
                                         None if height is None else int(height), None if width is None else int(width))
            if init is None:
                export.family.check_text_to_image(export.info)
            height = init.height if init and init.height else (export.ranges.opt_size if height is None else int(height))
            width = init.width if init and init.width else (export.ranges.opt_size if width is None else int(width))
            check_request(export.ranges, steps, guidance, Geometry(1, height, width), export.info.scheduler_config)
            error = schedule_error(scheduler or defaults.get("scheduler"), export.info.scheduler_config, steps)
            if error is not None:  # steps this scheduler cannot make (PNDM at 1000): a 400, not a 500 after the work
                raise error[0](error[1])
            if init is not None:
                init.check_steps(steps)
        except SdexportError as exc:
            raise renamed(exc, "image") from None  # ShapeError's "height 72 is not a multiple ..." names it already
        key = hashlib.sha256(image + b"\0" + (mask or b"")).hexdigest() if image else ""
        images.append(ImageRequest(prompt, negative, seed, steps, guidance, height, width,
                                   scheduler or defaults.get("scheduler"),
                                   init and init.image, init and init.mask, strength, key,
                                   tuple(sorted(checked.items()))))
    if len({(i.height, i.width) for i in images}) > 1:
        raise bad("height", "the images of one request must share height and width (send one request per size)")
    return images


def batch_groups(requests: list[list[ImageRequest]], max_images: int) -> list[list[tuple[int, int]]]:
    """(request index, image index) of every image, grouped by ``batch_key`` in order of first appearance and
    cut to at most ``max_images`` per group: each group is one pipeline call."""
    groups: dict[tuple, list[tuple[int, int]]] = {}
    for r, images in enumerate(requests):
        for i, image in enumerate(images):
            groups.setdefault(image.batch_key, []).append((r, i))
    return [members[k:k + max_images] for members in groups.values() for k in range(0, len(members), max_images)]


class TextCaches:
    """The text caches of a model's encoders (SDXL has two) as one: summed counters, one clear."""

    def __init__(self, caches: list):
        self.caches = caches

    @property
    def hits(self) -> int:
        return sum(c.hits for c in self.caches)

    @property
    def misses(self) -> int:
        return sum(c.misses for c in self.caches)

    def clear(self) -> None:
        for c in self.caches:
            c.clear()


class CachedTextEncoder:
    """The text-encoder engine behind an LRU cache keyed by the token ids of each row: only rows it has not
    seen run (once each, also when repeated inside a batch). Same Engine interface as what it wraps."""

    def __init__(self, inner, capacity: int):
        self.inner = inner
        self.spec = inner.spec
        self.device = inner.device
        self.backend = f"{inner.backend}+cache"
        self.capacity = capacity
        self.rows: collections.OrderedDict[bytes, dict[str, Any]] = collections.OrderedDict()
        self.hits = 0
        self.misses = 0

    def __call__(self, feed: dict[str, Any]) -> dict[str, Any]:
        import torch

        if self.capacity <= 0:
            return self.inner(feed)
        ids = feed["input_ids"]
        keys = [row.tobytes() for row in ids.cpu().numpy()]
        missing = list(dict.fromkeys(k for k in keys if k not in self.rows))
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        fresh: dict[bytes, dict[str, Any]] = {}
        if missing:
            index = torch.tensor([keys.index(k) for k in missing], device=ids.device)
            out = self.inner({"input_ids": ids.index_select(0, index)})
            fresh = {k: {name: value[j].clone() for name, value in out.items()} for j, k in enumerate(missing)}
        rows = []
        for k in keys:
            row = fresh.get(k) or self.rows[k]
            self.rows[k] = row
            self.rows.move_to_end(k)
            rows.append(row)
        while len(self.rows) > self.capacity:
            self.rows.popitem(last=False)
        return {name: torch.stack([row[name] for row in rows]) for name in rows[0]}

    def clear(self) -> None:
        self.rows.clear()
        self.hits = self.misses = 0

    def base_param(self, name: str):
        return self.inner.base_param(name)

    def set_weights(self, values: dict[str, Any]) -> None:
        """LoRA switching (Pipeline.set_loras): rows encoded with the previous weights are dropped."""
        self.inner.set_weights(values)
        self.clear()

    def close(self) -> None:
        self.inner.close()


@dataclasses.dataclass
class Served:
    """What one pipeline call gave one request's images (or the error that request gets)."""

    images: Any = None  # uint8 [n, H, W, 3]
    timings: list[dict[str, Any]] | None = None  # per image: its pipeline call's stage times
    error: Exception | None = None


def served_components(export, backend: str) -> list[str]:
    """The components a served model loads: the VAE encoder too (image inputs) where the export has it for this
    backend."""
    manifest = export.manifest
    image = "vae_encoder" in manifest.components and (backend != "trt" or "vae_encoder" in manifest.engines)
    return export.components_for(image)


def check_engines(export, options: "ServeOptions") -> None:
    """What the model's load inside Triton would refuse about the backend's engines, said before Triton starts
    (one line and the command's exit code, not Triton's log with the model's traceback): no TensorRT engine or
    Inductor package, another TensorRT installed, TensorRT engines on a host whose GPUs cannot run them."""
    if options.backend == "inductor":
        from .backends.inductor import check_has_packages

        check_has_packages(export)
    elif options.backend == "trt":
        from .backends.trt import check_gpu, check_installed, engine_entry

        entries = {c: engine_entry(export, c) for c in served_components(export, "trt")}
        for component, entry in entries.items():
            check_installed(entry, component, export.root)
        for component, entry in entries.items():
            for device in [f"cuda:{g}" for g in options.gpus] or [options.device]:
                check_gpu(entry, component, device, export.root)


class ImageService:
    """Requests in, images out, for one model instance: validation, grouping, pipeline calls, the cache.
    No Triton here (TritonPythonModel adapts it), so it runs in tests as it runs in the server."""

    def __init__(self, export_dir: str | Path, backend: str = "ort", device: str = "cpu", step_graph: bool = False,
                 text_cache_size: int = 256, warn: Callable[[str], None] | None = None, loras=(),
                 scheduler: str | None = None, threads: int | None = None, label: str | None = None,
                 unet: str = "default"):
        """``loras``: ``FILE[:SCALE]`` strings or lora.LoraFile, switched onto the engines for every request;
        ``scheduler``: the one of requests that name none (default: the model's own); ``threads``: this
        instance's CPU threads (torch and ONNX Runtime; default theirs); ``label``: the device as the
        timings name it (a GPU instance that sees only its GPU runs on cuda:0 of its own); ``unet``: infer's
        ``--unet`` (int8: the export's INT8 UNet in the UNet slot, refused as infer refuses it)."""
        from .backends import load_engines
        from .lora import engine_options, open_loras
        from .pipeline import Pipeline
        from .runtime import ExportDir

        self.export = ExportDir.open(export_dir)
        loras = open_loras(loras)
        manifest = self.export.manifest
        if threads:
            from .bench import set_threads

            set_threads(threads)
        self.label = label or device
        self.unet = unet
        engines = load_engines(self.export, backend, components=served_components(self.export, backend), device=device,
                               unet=unet,
                               **(engine_options(backend) if loras else {}),
                               **({"threads": threads} if threads and backend in ("ort", "inductor") else {}),
                               # dynamic batching: ONNX Runtime CUDA convolutions choose cuDNN algorithms by
                               # heuristics, not by a search at each new batch size (ort.conv_algo_search)
                               **({"batch_varies": True} if backend in ("ort", "inductor") else {}))
        caches = {}
        for name in [n for n in engines if n.startswith("text_encoder")]:  # SDXL: both encoders cached
            caches[name] = engines[name] = CachedTextEncoder(engines[name], text_cache_size)
        self.text_cache = TextCaches(list(caches.values()))
        self.pipe = Pipeline(engines, self.export, device=device, warn=warn, step_graph=step_graph)
        # dynamic batching changes the batch size on most calls: a VAE that pays for each change decodes one
        # image per call (measured on an H100: 700-1400 ms of a 5-image call's 1.8 s went to the VAE's changes)
        self.pipe.vae_slicing = engines["vae_decoder"].fixed_batch_preferred
        self.loras = loras
        if loras:
            self.pipe.set_loras(loras)  # a LoRA that does not fit is exit 5 before the server is ready
        # infer's defaults: Pipeline.__call__'s, and the family's steps and guidance (LCM: 4 steps at 8.5)
        self.defaults = {**request_defaults(), **self.export.family.request_defaults(self.export.info)}
        if scheduler is not None:
            self.defaults["scheduler"] = scheduler
        self.images_total = 0
        self.calls_total = 0

    def warm_up(self, shapes: list[tuple[int, int, int]], steps: int | None = None) -> None:
        """Run each (height, width, images) once before serving (engine allocations, kernels, step graphs),
        then forget the warm-up prompts so the cache counters describe real traffic. Each run is a request
        with the server's defaults (steps: ``steps``, else the default request's; its guidance and scheduler),
        so the step graphs it captures are the ones such requests use; the pipeline keeps all of them."""
        from .pipeline import MAX_STEP_GRAPH_KINDS
        from PIL import Image

        from .errors import ModelError

        info = self.export.info
        try:
            self.export.family.check_text_to_image(info)
            needs_image = info.inpainting
        except ModelError:  # an SDXL refiner
            needs_image = True
        self.pipe.step_graph_kinds = max(self.pipe.step_graph_kinds, len(shapes) + MAX_STEP_GRAPH_KINDS)
        for height, width, n in shapes:
            image = {}
            if needs_image:  # a mid-grey picture repainted in full (strength 1; the mask: all of it)
                image = {"image": Image.new("RGB", (width, height), (128, 128, 128)), "strength": 1.0,
                         "mask": Image.new("L", (width, height), 255) if info.inpainting else None}
            self.pipe([f"warm-up {i}" for i in range(n)], negative_prompt=[""] * n, seed=list(range(n)),
                      steps=self.defaults["steps"] if steps is None else steps,
                      guidance_scale=self.defaults["guidance_scale"], scheduler=self.defaults["scheduler"],
                      height=height, width=width, batch_size=n, **image)
        self.text_cache.clear()

    def parse(self, tensors: Mapping[str, Any]) -> list[ImageRequest]:
        return parse_request(tensors, self.export, self.defaults)

    def run(self, requests: list[list[ImageRequest] | Exception]) -> list[Served]:
        """One Served per request. A request that failed to parse keeps its error; a pipeline call that raises
        fails only the requests with images in that call."""
        import numpy as np

        served = [Served(error=r) if isinstance(r, Exception) else Served() for r in requests]
        valid = [r if not isinstance(r, Exception) else [] for r in requests]
        done: dict[tuple[int, int], tuple[Any, dict[str, Any]]] = {}
        for group in batch_groups(valid, self.export.ranges.max_images):
            images = [valid[r][i] for r, i in group]
            first = images[0]
            hits, misses = self.text_cache.hits, self.text_cache.misses
            try:
                result = self.pipe([im.prompt for im in images], negative_prompt=[im.negative_prompt for im in images],
                                   seed=[im.seed for im in images], steps=first.steps,
                                   guidance_scale=first.guidance_scale, height=first.height, width=first.width,
                                   batch_size=len(images), scheduler=first.scheduler, image=first.image,
                                   mask=first.mask, strength=first.strength, **dict(first.options))
            except Exception as exc:  # noqa: BLE001 -- one failed call must not fail the other groups
                for r, _ in group:
                    served[r].error = exc
                continue
            self.images_total += len(images)
            self.calls_total += 1
            call = {**{k: round(v, 3) for k, v in result.stage_summary().items()}, "images_in_call": len(images),
                    "text_cache_hits": self.text_cache.hits - hits,
                    "text_cache_misses": self.text_cache.misses - misses, "loop": result.loop,
                    "device": self.label, "unet": self.unet}
            for (r, i), pixels in zip(group, result.uint8()):
                done[r, i] = (pixels, call)
        for r, s in enumerate(served):
            if s.error is None:
                s.images = np.stack([done[r, i][0] for i in range(len(valid[r]))])
                s.timings = [done[r, i][1] for i in range(len(valid[r]))]
        return served

    def close(self) -> None:
        for engine in self.pipe.engines.values():
            engine.close()


# --- the Triton Python-backend model ------------------------------------------------------------------------

def _param(config: dict[str, Any], name: str, default: str = "") -> str:
    return config.get("parameters", {}).get(name, {}).get("string_value", default)


class TritonPythonModel:
    """What Triton's Python backend instantiates (once per model instance; ``model.py`` imports it).

    ``config.pbtxt`` parameters: ``export_dir`` (absolute, or relative to the model's directory), ``backend``,
    ``device`` (``cpu`` or ``cuda``: a KIND_GPU instance runs on its own GPU), ``step_graph``,
    ``text_cache_size``, ``warmup`` (``HxWxN,...``), ``warmup_steps`` (empty: the default request's),
    ``scheduler`` (of requests that name none; empty: the model's), ``unet`` (infer's ``--unet``; absent:
    default) and ``loras`` (JSON: the LoRAs switched onto the engines, each file checked against its recorded
    sha256)."""

    def initialize(self, args: dict[str, str]) -> None:
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        self.log = pb_utils.Logger
        config = json.loads(args["model_config"])
        self.instance = args.get("model_instance_name", "?")
        export_dir = Path(_param(config, "export_dir"))
        if not export_dir.is_absolute():
            export_dir = Path(args["model_repository"]) / export_dir
        device = label = _param(config, "device", "cpu")
        if args.get("model_instance_kind") == "GPU":
            device, label = own_gpu(int(args["model_instance_device_id"]))
        threads = instance_threads(config)
        try:
            from .lora import LoraFile

            loras = [LoraFile.recorded(r, f"{export_dir} is served with", "; write the repository again")
                     for r in json.loads(_param(config, "loras", "[]"))]
            self.service = ImageService(export_dir, backend=_param(config, "backend", "ort"), device=device,
                                        step_graph=_param(config, "step_graph", "false") == "true",
                                        text_cache_size=int(_param(config, "text_cache_size", "256")),
                                        warn=self.log.log_warn, loras=loras,
                                        scheduler=_param(config, "scheduler", "") or None, threads=threads,
                                        label=label, unet=_param(config, "unet", "default"))
            self.fields = inputs_for(self.service.export)
            t0 = time.perf_counter()
            shapes = [parse_warmup(s) for s in _param(config, "warmup").split(",") if s]
            steps = _param(config, "warmup_steps", "2")
            self.service.warm_up(shapes, steps=int(steps) if steps else None)
        except SdexportError as exc:
            status = os.environ.get("SDEXPORT_SERVE_STATUS")
            if status:  # sdexport serve turns this into its own error line and exit code
                Path(status).write_text(json.dumps({"exit_code": exc.exit_code, "message": str(exc)}))
            raise
        from .lora import describe

        self.log.log_info(f"{self.instance}: {export_dir} on {device}, {self.service.unet} UNet, LoRA "
                          f"{describe(loras)}, warm-up "
                          f"{', '.join('x'.join(map(str, s)) for s in shapes) or 'none'} in "
                          f"{time.perf_counter() - t0:.1f} s")
        labels = {"model": args["model_name"], "instance": self.instance}
        kind = pb_utils.MetricFamily.COUNTER
        self.families = {  # the families must outlive their metrics
            name: pb_utils.MetricFamily(name=f"sdexport_{name}_total", description=doc, kind=kind)
            for name, doc in (("text_cache_hits", "text-encoder rows answered from the text-embedding cache"),
                              ("text_cache_misses", "text-encoder rows computed (not in the cache)"),
                              ("images", "images generated"),
                              ("pipeline_calls", "pipeline calls (images / calls = mean images per call)"))}
        self.metrics = {name: family.Metric(labels=labels) for name, family in self.families.items()}
        self.counted = dict.fromkeys(self.metrics, 0)

    def _count(self) -> None:
        s = self.service
        now = {"text_cache_hits": s.text_cache.hits, "text_cache_misses": s.text_cache.misses,
               "images": s.images_total, "pipeline_calls": s.calls_total}
        for name, value in now.items():
            if value > self.counted[name]:
                self.metrics[name].increment(value - self.counted[name])
            self.counted[name] = value

    def execute(self, requests):
        import numpy as np

        pb = self.pb
        parsed: list[Any] = []
        for request in requests:
            try:
                tensors = {}
                for f in self.fields:
                    t = pb.get_input_tensor_by_name(request, f.name)
                    tensors[f.name] = None if t is None else t.as_numpy()
                parsed.append(self.service.parse(tensors))
            except Exception as exc:  # noqa: BLE001 -- answered as this request's error (_error)
                parsed.append(exc)
        served = self.service.run(parsed)
        self._count()
        responses = []
        for s in served:
            if s.error is not None:
                responses.append(pb.InferenceResponse(error=self._error(s.error)))
                continue
            timings = np.array([[json.dumps(t).encode()] for t in s.timings], dtype=np.object_)
            responses.append(pb.InferenceResponse(output_tensors=[
                pb.Tensor("image", np.ascontiguousarray(s.images)), pb.Tensor("timings", timings)]))
        return responses

    def _error(self, exc: Exception):
        """Our own errors are the client's (400, the message names the input); anything else is logged with
        its traceback and answered as an internal error (500) of this request only."""
        if isinstance(exc, SdexportError):
            return self.pb.TritonError(str(exc), self.pb.TritonError.INVALID_ARG)
        import traceback

        self.log.log_error(f"{self.instance}: request failed:\n"
                           f"{''.join(traceback.format_exception(type(exc), exc, exc.__traceback__))}")
        return self.pb.TritonError(f"internal error: {type(exc).__name__}: {exc}", self.pb.TritonError.INTERNAL)

    def finalize(self) -> None:
        cache = self.service.text_cache
        lookups = cache.hits + cache.misses
        self.log.log_info(f"{self.instance}: {self.service.images_total} images in {self.service.calls_total} "
                          f"pipeline calls; text-embedding cache {cache.hits}/{lookups} hits"
                          f"{f' ({100 * cache.hits / lookups:.0f}%)' if lookups else ''}")
        self.service.close()


MODEL_PY = '''"""Triton Python-backend model: Stable Diffusion from an sdexport export (written by sdexport serve).
The logic is sdexport.serve.TritonPythonModel; this file only finds it. Triton's Python backend ignores
PYTHONPATH: directories in SDEXPORT_PYTHONPATH are searched first."""
import os
import sys

sys.path[:0] = [p for p in os.environ.get("SDEXPORT_PYTHONPATH", "").split(os.pathsep) if p]

from sdexport.serve import TritonPythonModel  # noqa: E402,F401
'''


# --- options, repository, launcher ----------------------------------------------------------------------------

def parse_warmup(spec: str) -> tuple[int, int, int | None]:
    """``HxW`` or ``HxWxN`` (N images in one call) -> (height, width, images); images None for ``HxW`` (one
    image, or with step graphs every batch size up to --max-batch: ServeOptions.resolved)."""
    from .limits import image_size

    return image_size("--warmup", spec, images=True)


@dataclasses.dataclass(frozen=True)
class ServeOptions:
    export_dir: str
    backend: str = "ort"
    device: str = "cpu"  # cpu | cuda (one instance per GPU in ``gpus``)
    gpus: tuple[int, ...] = ()
    max_batch: int | None = None  # images per execute; default: the export's maximum
    max_queue_delay_ms: float = 5.0
    max_queue_size: int = 32
    # default: native size; HxW without N: one image, or with step graphs each batch size 1..max_batch
    warmup: tuple[tuple[int, int, int | None], ...] | None = None
    warmup_steps: int | None = None  # default: with step graphs the default request's steps, else 2
    scheduler: str | None = None  # of requests that name none (and of the warm-up); default: the model's
    text_cache_size: int = 256
    step_graph: bool = False
    model_name: str = MODEL_NAME
    address: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    drain_timeout_s: int = 30
    loras: tuple = ()  # FILE[:SCALE] strings; resolved: lora.LoraFile (path, scale, sha256)
    unet: str = "default"  # infer's --unet: int8 serves the export's INT8 UNet (sdexport quantize)

    def resolved(self, export) -> "ServeOptions":
        """Defaults filled in from the export, every value checked (UsageError/ShapeError before Triton starts)."""
        from .backends import BACKENDS
        from .backends.base import unet_slot
        from .components import Geometry
        from .lora import open_loras

        ranges = export.ranges
        loras = tuple(open_loras(self.loras))  # a missing file or a scale that is not finite: exit 2, now
        if self.backend not in BACKENDS:
            raise UsageError(f"--backend {self.backend}: choose from {', '.join(BACKENDS)}")
        if self.device not in ("cpu", "cuda"):
            raise UsageError(f"--device {self.device}: cpu or cuda (list GPUs with --gpus)")
        unet_slot(export, self.backend, self.unet, served_components(export, self.backend))  # infer's refusals
        if self.gpus and self.device != "cuda":
            raise UsageError("--gpus needs --device cuda")
        if len(set(self.gpus)) != len(self.gpus) or any(g < 0 for g in self.gpus):
            raise UsageError(f"--gpus {','.join(map(str, self.gpus))}: distinct GPU indices >= 0")
        max_batch = self.max_batch if self.max_batch is not None else ranges.max_images
        if not 1 <= max_batch <= ranges.max_images:
            raise UsageError(f"--max-batch {max_batch}: the export runs 1 to {ranges.max_images} images per call "
                             f"(export with --max-batch to raise it)")
        if not math.isfinite(self.max_queue_delay_ms) or self.max_queue_delay_ms < 0 or self.max_queue_size < 1:
            raise UsageError(f"--max-queue-delay-ms {self.max_queue_delay_ms}, --max-queue-size {self.max_queue_size}: "
                             "the delay must be a finite number >= 0 and the size >= 1")
        check_step_graph(self.step_graph, self.device)  # before Triton loads the model, as infer and bench say it
        if self.scheduler is not None and self.scheduler not in SCHEDULERS:
            raise UsageError(f"--scheduler {self.scheduler}: unknown (choose from {', '.join(SCHEDULERS)})")
        warmup_steps = self.warmup_steps if self.warmup_steps is not None else (None if self.step_graph else 2)
        for option, value, least in (("--warmup-steps", warmup_steps, 1),
                                     ("--drain-timeout-s", self.drain_timeout_s, 1),
                                     ("--text-cache-size", self.text_cache_size, 0)):
            if value is not None and value < least:
                raise UsageError(f"{option} {value}: must be at least {least}")
        if warmup_steps is not None:  # infer's dry run of the schedule: the warm-up would fail inside Triton
            error = schedule_error(self.scheduler, export.info.scheduler_config, warmup_steps)
            if error is not None:
                raise error[0](error[1].replace("--steps", "--warmup-steps", 1))
        # A step graph is captured per request shape, batch size included, on its first use. Dynamic batching makes
        # any size from 1 to max_batch: capture them all before reporting ready, or the first requests of each size
        # pay for a capture while serving (measured on an H100: it hid most of a second GPU's throughput).
        sizes = range(1, max_batch + 1) if self.step_graph else (1,)
        warmup = []
        for h, w, n in (self.warmup if self.warmup is not None else ((ranges.opt_size, ranges.opt_size, None),)):
            spec = f"--warmup {h}x{w}" + (f"x{n}" if n is not None else "")
            for m in ((n,) if n is not None else sizes):
                if m > max_batch:
                    raise UsageError(f"{spec}: more images than --max-batch {max_batch}")
                try:  # the export's range; its message names the side, this the option
                    ranges.check(Geometry(m, h, w))
                except SdexportError as exc:
                    raise type(exc)(f"{spec}: {exc}") from None
                warmup.append((h, w, m))
        if not self.model_name or not all(c.isalnum() or c in "._-" for c in self.model_name):
            raise UsageError(f"--model-name {self.model_name!r}: letters, digits, '.', '_' and '-' only")
        ports = (self.http_port, self.grpc_port, self.metrics_port)
        if len(set(ports)) != 3 or not all(0 < p < 65536 for p in ports):
            raise UsageError(f"ports {ports}: three distinct ports in 1..65535")
        gpus = self.gpus or ((0,) if self.device == "cuda" else ())
        return dataclasses.replace(self, max_batch=max_batch, warmup=tuple(warmup), gpus=gpus, warmup_steps=warmup_steps,
                                   export_dir=str(Path(self.export_dir).resolve()), loras=loras)


def own_gpu(device_id: int, environ=os.environ, modules=sys.modules, load_torch=None) -> tuple[str, str]:
    """(torch device, label) of a KIND_GPU model instance (its own stub process). Where CUDA is not yet
    initialised in the process, the instance is narrowed to its GPU (CUDA_VISIBLE_DEVICES: that GPU only, as
    the server's own list maps Triton's device ids) so that nothing it loads can make a context or run work on
    another GPU, and it runs on cuda:0; where CUDA was initialised already (the narrowing would not apply),
    on cuda:<device_id>. The label names the physical GPU either way."""
    visible = [v.strip() for v in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    physical = visible[device_id] if device_id < len(visible) else str(device_id)
    if "torch" not in modules and "onnxruntime" not in modules:
        environ["CUDA_VISIBLE_DEVICES"] = physical
    if load_torch is None:
        import torch
    else:
        torch = load_torch()

    narrowed = environ.get("CUDA_VISIBLE_DEVICES") == physical and torch.cuda.device_count() == 1
    device = "cuda:0" if narrowed else f"cuda:{device_id}"
    torch.cuda.set_device(device)
    return device, f"cuda:{physical}"


def instance_threads(config: Mapping[str, Any]) -> int | None:
    """CPU threads of one model instance where there are several: the usable cores shared out among them, so
    that the thread pools of several instances (torch's, ONNX Runtime's) do not each size themselves to every
    core. None (each library's default) for a single instance."""
    from .bench import usable_cores

    count = 0
    for group in config.get("instance_group", []) or [{}]:
        count += int(group.get("count", 1)) * max(1, len(group.get("gpus", []) or []))
    return max(1, usable_cores() // count) if count > 1 else None


REPOSITORY_MARK = "# Written by sdexport serve"  # config.pbtxt's first line: a model --write-repository may replace


def model_config(options: ServeOptions) -> str:
    """``config.pbtxt`` of the served model (options already resolved; its inputs: ``inputs_for`` the export)."""
    from .runtime import ExportDir

    inputs = inputs_for(ExportDir.open(options.export_dir))

    def tensor(f: Field, optional: bool, last: bool) -> str:
        dims = ", ".join(map(str, f.dims))
        extra = " optional: true" if optional else ""
        return (f'  {{ name: "{f.name}" data_type: {TRITON_TYPES[f.datatype]} dims: [ {dims} ]{extra} }}'
                f'{"" if last else ","}  # {f.doc}')

    if options.gpus:
        instances = f"  {{ count: 1 kind: KIND_GPU gpus: [ {', '.join(map(str, options.gpus))} ] }}"
    else:
        instances = "  { count: 1 kind: KIND_CPU }"
    params = {"export_dir": options.export_dir, "backend": options.backend, "device": options.device,
              "step_graph": "true" if options.step_graph else "false", "text_cache_size": str(options.text_cache_size),
              "warmup": ",".join("x".join(map(str, s)) for s in options.warmup or ()),
              "warmup_steps": "" if options.warmup_steps is None else str(options.warmup_steps),
              "scheduler": options.scheduler or "", "unet": options.unet,
              "loras": json.dumps([lora.to_json() for lora in options.loras])}
    lines = [
        f"{REPOSITORY_MARK} (sdexport {_version()}). Inputs and outputs: README 'Serving'.",
        f'name: "{options.model_name}"', 'backend: "python"', f"max_batch_size: {options.max_batch}",
        "input [", *(tensor(f, not f.required, f is inputs[-1]) for f in inputs), "]",
        "output [", *(tensor(f, False, f is OUTPUTS[-1]) for f in OUTPUTS), "]",
        "dynamic_batching {", f"  max_queue_delay_microseconds: {int(options.max_queue_delay_ms * 1000)}",
        f"  default_queue_policy {{ max_queue_size: {options.max_queue_size} }}", "}",
        "instance_group [", instances, "]",
        *[f'parameters {{ key: "{k}" value: {{ string_value: {json.dumps(v)} }} }}' for k, v in params.items()],
    ]
    return "\n".join(lines) + "\n"


def _version() -> str:
    from . import __version__

    return __version__


def write_repository(options: ServeOptions, directory: str | Path, export=None) -> Path:
    """A standard Triton model repository: ``DIR/<model>/config.pbtxt`` and ``DIR/<model>/1/model.py``.
    The model directory is written under a temporary name and renamed into place. ``export`` (a user's DIR;
    serve's own temporary repository has none): paths.check_repository_output first, never into the export or
    its source model, never over another directory's contents."""
    import shutil
    import tempfile

    from .paths import check_repository_output

    if export is not None:
        from .lora import check_loras_fit

        export.verify_components()  # nothing is written from a damaged export
        check_repository_output(directory, options.model_name, export, options.loras)
        check_loras_fit(export.info, list(options.loras))  # the server loads them at start: found now instead
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / options.model_name
    tmp = Path(tempfile.mkdtemp(prefix=f".{options.model_name}.", dir=directory))
    try:
        (tmp / "1").mkdir()
        (tmp / "1" / "model.py").write_text(MODEL_PY)
        (tmp / "config.pbtxt").write_text(model_config(options))
        tmp.chmod(0o755)
        if final.exists():
            old = directory / f".{options.model_name}.old"
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


@dataclasses.dataclass(frozen=True)
class TritonInstall:
    """The tritonserver binary, its libraries and the Python backend, from the nvidia-pytriton wheel."""

    binary: Path
    libs: Path
    python_backend: Path  # libtriton_python.so + triton_python_backend_utils.py
    stub: Path  # triton_python_backend_stub built for this Python

    @classmethod
    def find(cls) -> "TritonInstall":
        """The files of the installed nvidia-pytriton wheel (found, not imported: importing pytriton pulls in
        its whole client stack, which the server does not use)."""
        import importlib.util
        import sysconfig
        from importlib import metadata

        spec = importlib.util.find_spec("pytriton")
        if spec is None or not spec.submodule_search_locations:
            raise BackendUnavailable(f"serving needs nvidia-pytriton: {TRITON_PACKAGES}")
        root = Path(list(spec.submodule_search_locations)[0])
        numpy_version = metadata.version("numpy")
        if int(numpy_version.split(".")[0]) >= 2:
            raise BackendUnavailable(
                f"numpy {numpy_version} is installed; the Triton Python backend in nvidia-pytriton "
                f"{metadata.version('nvidia-pytriton')} needs numpy < 2 (its stub is built with pybind11 2.10): "
                "pip install 'numpy<2' (nvidia-pytriton's own requirement)")
        version = f"{sys.version_info[0]}.{sys.version_info[1]}"
        libs = root.parent / "nvidia_pytriton.libs"  # auditwheel's directory (an editable install has its own)
        found = cls(binary=root / "tritonserver" / "bin" / "tritonserver",
                    libs=libs if libs.is_dir() else root / "tritonserver" / "external_libs",
                    python_backend=root / "tritonserver" / "backends" / "python",
                    stub=root / "tritonserver" / "python_backend_stubs" / version / "triton_python_backend_stub")
        if not found.binary.is_file():
            raise BackendUnavailable(f"{found.binary}: missing from the nvidia-pytriton install; {TRITON_PACKAGES}")
        if not found.stub.is_file():
            raise BackendUnavailable(f"nvidia-pytriton has no Python-backend stub for Python {version} "
                                     f"(it ships 3.8 to 3.13)")
        libpython = cls.libpython()
        if not libpython.is_file() or not sysconfig.get_config_var("Py_ENABLE_SHARED"):
            raise BackendUnavailable(f"this Python ({sys.executable}) has no shared libpython ({libpython}); the "
                                     "Triton Python backend stub embeds one: use a Python built with --enable-shared")
        return found

    @staticmethod
    def libdir() -> str:
        """``sysconfig``'s LIBDIR: the directory ``environment`` puts first on ``LD_LIBRARY_PATH``."""
        import sysconfig

        return sysconfig.get_config_var("LIBDIR") or ""

    @classmethod
    def libpython(cls) -> Path:
        """This interpreter's shared libpython, which the stub must load (from ``libdir``)."""
        import sysconfig

        return Path(cls.libdir()) / (sysconfig.get_config_var("INSTSONAME") or "")

    def backend_directory(self, work: Path) -> Path:
        """A ``--backend-directory`` with the Python backend and the stub for this Python (links, no copies)."""
        python = work / "backends" / "python"
        python.mkdir(parents=True, exist_ok=True)
        for src in (self.python_backend / "libtriton_python.so",
                    self.python_backend / "triton_python_backend_utils.py", self.stub):
            (python / src.name).symlink_to(src)
        return python.parent

    @staticmethod
    def python_prefix(work: Path) -> Path:
        """A virtual-environment prefix for the stubs that sees modules exactly as this process does.

        The stub's embedded Python ignores PYTHONPATH and takes its prefix (and so its site-packages) from
        ``python3`` on PATH; a ``.pth`` file here puts this process's ``sys.path`` first, so the stub imports
        the numpy, torch and sdexport this process imports (also those found through PYTHONPATH)."""
        prefix = work / "python"
        (prefix / "bin").mkdir(parents=True, exist_ok=True)
        (prefix / "bin" / "python3").symlink_to(os.path.realpath(sys.executable))
        (prefix / "pyvenv.cfg").write_text(f"home = {Path(os.path.realpath(sys.executable)).parent}\n"
                                           "include-system-site-packages = false\n")
        site_packages = prefix / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"
        site_packages.mkdir(parents=True)
        paths = [str(Path(__file__).resolve().parent.parent)] + [p for p in sys.path if p and Path(p).exists()]
        paths = list(dict.fromkeys(paths))
        (site_packages / "_sdexport_paths.pth").write_text(
            f"import sys; sys.path[:] = list(dict.fromkeys({paths!r} + sys.path))\n")  # one line, no names
        return prefix

    def environment(self, work: Path, **extra: str) -> dict[str, str]:
        """Environment of tritonserver and so of the stubs: this interpreter's libpython first on the library
        path (see the module docstring), then the wheel's libraries; the stub prefix's ``bin`` first on PATH."""
        env = dict(os.environ)
        libdirs = [self.libdir(), str(self.libs), env.get("LD_LIBRARY_PATH", "")]
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in libdirs if p)
        env["PATH"] = os.pathsep.join([str(self.python_prefix(work) / "bin"), env.get("PATH", "")])
        env.update(extra)
        return env


def host_status() -> dict[str, Any]:
    """Whether ``sdexport serve`` can start Triton here (what ``TritonInstall.find`` checks, nothing imported),
    where its files are, and what serve does about the stub's libpython."""
    from importlib import metadata

    libdir = TritonInstall.libdir()
    status: dict[str, Any] = {"can_run": False, "why": None, "nvidia_pytriton": None, "tritonserver": None,
                              "stub": None, "libpython": str(TritonInstall.libpython()),
                              "ld_library_path_first": libdir,
                              # whether this shell's LD_LIBRARY_PATH already starts with it (for running the
                              # wheel's tritonserver by hand; serve sets it itself)
                              "ld_library_path_has_it": os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep)[0]
                              == libdir}
    try:
        status["nvidia_pytriton"] = metadata.version("nvidia-pytriton")
    except metadata.PackageNotFoundError:
        pass
    try:
        found = TritonInstall.find()
    except BackendUnavailable as exc:
        status["why"] = str(exc)
        return status
    status.update(can_run=True, tritonserver=str(found.binary), stub=str(found.stub))
    return status


def _set_parent_death_signal() -> None:
    """In the child before exec: SIGTERM when the parent dies (a killed supervisor leaves no server behind)."""
    import ctypes
    import signal

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _http(url: str, method: str = "GET", headers: dict[str, str] | None = None, timeout: float = 2.0) -> int:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, method=method, headers=headers or {}, data=b"{}" if method == "POST" else None)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def _stub_pids(parent: int) -> list[int]:
    """Live Python-backend stub processes of ``parent`` (one per model instance)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)
            name = fields[0].split("(", 1)[1]
            state, ppid = fields[1].split()[:2]
        except (OSError, IndexError, ValueError):
            continue
        if int(ppid) == parent and name.startswith("triton_python") and state not in ("Z", "X"):
            found.append(int(stat.parent.name))
    return found


def _touch_forward(path: Path) -> None:
    """Move ``path``'s mtime forward (at least 1 s past its last one): Triton sees the model as changed."""
    st = path.stat()
    t = max(time.time_ns(), st.st_mtime_ns + 1_000_000_000)
    os.utime(path, ns=(t, t))


class _Supervisor:
    """Watches a running tritonserver: reloads the model when an instance's process dies, and on SIGTERM drains.

    Why the drain is ours: Triton 2.51, on SIGTERM, stops accepting connections but then waits for every open
    HTTP connection to close (idle keep-alive ones included, and it still serves requests arriving on them)
    before it even looks at in-flight requests, so with any keep-alive client it runs into its exit timeout and
    exits 1. Here: an admin connection is opened while Triton still accepts, Triton gets SIGTERM (no new
    connections), and the model is unloaded over that connection; Triton unloads a model only after its
    in-flight requests (queued or executing) are answered. Then Triton is stopped."""

    def __init__(self, proc, options: ServeOptions, host: str, token: str, say: Callable[[str], None],
                 model_dir: Path | None = None):
        self.proc, self.options, self.host, self.token, self.say = proc, options, host, token, say
        self.base = f"http://{host}:{options.http_port}"
        self.model_dir = model_dir  # the model's directory in the repository Triton loads from (ours, temporary)
        self.reloading = False
        self.missing = False  # an instance process is gone and no reload has brought it back yet

    def watch(self) -> None:
        """Reload the model (new instance processes, warm-up again) when one of its processes has died.

        Triton (explicit model control) reloads a model on a load request only when the model's files changed
        since its last load; otherwise it answers 200 and keeps the dead instance (a config override equal to
        the running config is no change either: the instance is kept). So the model file's mtime is moved
        forward before each load. The warning is said once per death, not once per retry."""
        import threading

        if self.reloading:
            return
        if len(_stub_pids(self.proc.pid)) >= max(1, len(self.options.gpus)):
            self.missing = False
            return
        if not self.missing:
            self.say("warning: a model instance process died; reloading the model")
        self.missing = True
        self.reloading = True

        def reload():
            try:
                if self.model_dir is not None:
                    _touch_forward(self.model_dir / "1" / "model.py")
                status = _http(f"{self.base}/v2/repository/models/{self.options.model_name}/load", "POST",
                               {ADMIN_HEADER: self.token}, timeout=24 * 3600)
                if status != 200:
                    self.say(f"warning: reloading the model failed (HTTP {status}); trying again")
                    time.sleep(1)
            finally:
                self.reloading = False

        threading.Thread(target=reload, daemon=True).start()

    def drain(self) -> bool:
        """SIGTERM Triton and return once every in-flight request is answered (True), or False when that took
        longer than --drain-timeout-s. Triton is not running afterwards."""
        import http.client
        import signal

        name, headers = self.options.model_name, {ADMIN_HEADER: self.token, "Content-Type": "application/json"}
        deadline = time.monotonic() + self.options.drain_timeout_s
        conn = http.client.HTTPConnection(self.host, self.options.http_port, timeout=self.options.drain_timeout_s)
        try:  # a request answered on it makes it a kept-alive connection, which Triton serves while draining
            conn.request("GET", "/v2/health/live")
            conn.getresponse().read()
        except (OSError, http.client.HTTPException) as exc:
            self.say(f"warning: no admin connection ({exc}); Triton drains by itself")
            conn = None
        self.proc.send_signal(signal.SIGTERM)
        drained = False
        try:
            if conn is not None:
                conn.request("POST", f"/v2/repository/models/{name}/unload", b"{}", headers)
                conn.getresponse().read()
                while time.monotonic() < deadline and self.proc.poll() is None:
                    conn.request("POST", "/v2/repository/index", b"{}", headers)
                    index = json.loads(conn.getresponse().read() or b"[]")
                    if all(m.get("state") == "UNAVAILABLE" for m in index if m.get("name") == name):
                        drained = True
                        break
                    time.sleep(0.05)
        except (OSError, http.client.HTTPException, ValueError) as exc:
            self.say(f"warning: admin connection lost while draining ({type(exc).__name__}: {exc})")
        finally:
            if conn is not None:
                conn.close()
        try:  # without other open connections Triton now exits by itself
            self.proc.wait(timeout=2 if drained else max(0.0, deadline - time.monotonic()))
        except Exception:  # noqa: BLE001 -- subprocess.TimeoutExpired: idle client connections keep it waiting
            self.proc.kill()
            self.proc.wait()
        return drained or self.proc.returncode == 0


WORK_PREFIX = "sdexport-serve-"  # serve's work directory in the temporary directory: the repository, stub prefix
WORK_OWNER = "owner.json"  # in it: the processes that use it (supervisor, tritonserver) and its shm prefix
_SHM_PREFIX = re.compile(r"sdexport_[0-9]+_[0-9a-f]+_")


def _process_identity(pid: int) -> str | None:
    """``pid``'s start time (jiffies since boot, /proc/PID/stat field 22): with the pid it names one process
    even after the pid is reused. None where no such process runs (a zombie is gone: it runs nothing)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _write_owner(work: Path, shm_prefix: str, *pids: int) -> None:
    """Record who uses ``work`` (written whole, then renamed: a reader never sees half of it)."""
    owner = {"processes": [[pid, _process_identity(pid)] for pid in pids], "pid_namespace": _pid_namespace(),
             "shm_prefix": shm_prefix}
    tmp = work / f".{WORK_OWNER}.tmp"
    tmp.write_text(json.dumps(owner))
    os.replace(tmp, work / WORK_OWNER)


def remove_stale_work_dirs(say: Callable[[str], None], tmp: str | Path | None = None) -> list[Path]:
    """Remove the work directories (and /dev/shm regions) of ``sdexport serve`` runs whose processes are all gone
    (a supervisor killed with SIGKILL cannot remove its own). A directory is kept when any process it records
    still runs, when it records none (being created, or written by an older sdexport), when it was written in
    another pid namespace (another container sharing /tmp: its pids mean nothing here), or when it is not ours."""
    import shutil
    import tempfile

    removed = []
    namespace = _pid_namespace()
    for work in sorted(Path(tmp or tempfile.gettempdir()).glob(f"{WORK_PREFIX}*")):
        try:
            if work.is_symlink() or not work.is_dir() or work.stat().st_uid != os.getuid():
                continue
            owner = json.loads((work / WORK_OWNER).read_text())
            processes = [(int(pid), start) for pid, start in owner["processes"]]
            if owner.get("pid_namespace") != namespace or not processes:
                continue
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if any(start is None or _process_identity(pid) == start for pid, start in processes):
            continue  # a live server's (or one whose start time could not be read: kept)
        prefix = owner.get("shm_prefix")
        if isinstance(prefix, str) and _SHM_PREFIX.fullmatch(prefix):
            for region in Path("/dev/shm").glob(f"{prefix}*"):
                region.unlink(missing_ok=True)
        shutil.rmtree(work, ignore_errors=True)
        if not work.exists():
            removed.append(work)
            say(f"removed {work}: the work directory of an 'sdexport serve' (pid {processes[0][0]}) that is gone")
    return removed


def _check_ports_free(options: ServeOptions) -> None:
    """Refuse a port in use now rather than after the engines loaded (Triton binds its ports last)."""
    import socket

    for flag, port in (("--http-port", options.http_port), ("--grpc-port", options.grpc_port),
                       ("--metrics-port", options.metrics_port)):
        with socket.socket(socket.AF_INET6 if ":" in options.address else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((options.address, port))
            except OSError as exc:
                raise UsageError(f"{flag} {port}: cannot listen on {options.address}:{port} ({exc.strerror})") from None


def serve(options: ServeOptions, say: Callable[[str], None], announce: Callable[[str], None]) -> int:
    """Run Triton on the export until SIGTERM/SIGINT; returns 0 once every in-flight request was answered.
    ``announce`` gets one line once the server is ready (engines loaded, warm-up done)."""
    import secrets
    import signal
    import subprocess
    import tempfile

    from .lora import describe
    from .runtime import ExportDir

    export = ExportDir.open(options.export_dir)
    options = options.resolved(export)
    triton = TritonInstall.find()
    _check_ports_free(options)
    if options.device == "cuda":
        import torch

        count = torch.cuda.device_count()
        if count == 0:  # the line every command gives for --device cuda without a GPU
            from . import limits

            limits.device("--device", "cuda")
        if max(options.gpus) >= count:
            from .errors import CannotRunHere

            raise CannotRunHere(f"--gpus {','.join(map(str, options.gpus))}: this host has {count} CUDA GPU(s)")
    check_engines(export, options)
    host = "127.0.0.1" if options.address in ("0.0.0.0", "::") else options.address
    token = secrets.token_urlsafe(24)
    shm_prefix = f"sdexport_{os.getpid()}_{secrets.token_hex(4)}_"
    remove_stale_work_dirs(say)  # left by a server killed with SIGKILL (its own cleanup never ran)
    with tempfile.TemporaryDirectory(prefix=WORK_PREFIX) as work_dir:
        work = Path(work_dir)
        _write_owner(work, shm_prefix, os.getpid())
        repository = write_repository(options, work / "models").parent
        status = work / "status.json"
        restricted = f"model-repository:{ADMIN_HEADER}={token}"
        cmd = [str(triton.binary), f"--model-repository={repository}",
               f"--backend-directory={triton.backend_directory(work)}", "--model-control-mode=explicit",
               f"--load-model={options.model_name}", "--strict-readiness=true", "--exit-on-error=true",
               f"--exit-timeout-secs={options.drain_timeout_s + 30}", f"--http-address={options.address}",
               f"--http-port={options.http_port}", f"--grpc-address={options.address}",
               f"--grpc-port={options.grpc_port}", f"--metrics-address={options.address}",
               f"--metrics-port={options.metrics_port}", f"--allow-gpu-metrics={str(bool(options.gpus)).lower()}",
               f"--http-restricted-api={restricted}", f"--grpc-restricted-protocol={restricted}",
               f"--backend-config=python,shm-region-prefix-name={shm_prefix}"]
        say(f"starting tritonserver: {options.model_name} from {options.export_dir} ({options.backend} on "
            f"{'GPU ' + ','.join(map(str, options.gpus)) if options.gpus else 'CPU'}, max batch {options.max_batch}"
            f"{', ' + options.unet.upper() + ' UNet' if options.unet != 'default' else ''}"
            f"{', LoRA ' + describe(options.loras) if options.loras else ''})")
        env = triton.environment(work, SDEXPORT_SERVE_STATUS=str(status))
        proc = subprocess.Popen(cmd, env=env, stdout=sys.stderr, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=_set_parent_death_signal)
        _write_owner(work, shm_prefix, os.getpid(), proc.pid)  # Triton outlives a killed supervisor by its drain
        supervisor = _Supervisor(proc, options, host, token, say, repository / options.model_name)
        stopping: list[int] = []
        previous = {s: signal.signal(s, lambda signum, _: stopping.append(signum))
                    for s in (signal.SIGTERM, signal.SIGINT)}
        drained = ready = False
        try:
            while proc.poll() is None and not stopping:
                if not ready:
                    ready = _http(f"{supervisor.base}/v2/health/ready") == 200
                    if ready:
                        announce(f"ready: http://{host}:{options.http_port}/v2/models/{options.model_name} (gRPC "
                                 f"{host}:{options.grpc_port}, metrics http://{host}:{options.metrics_port}/metrics)")
                    else:
                        time.sleep(0.1)
                    continue
                supervisor.watch()
                try:
                    proc.wait(timeout=0.5)
                except subprocess.TimeoutExpired:
                    pass
            if stopping and proc.poll() is None and ready:
                say(f"{signal.Signals(stopping[0]).name}: answering in-flight requests "
                    f"(up to {options.drain_timeout_s} s), accepting no new connections")
                drained = supervisor.drain()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            for region in Path("/dev/shm").glob(f"{shm_prefix}*"):  # left behind when Triton was stopped hard
                region.unlink(missing_ok=True)
        if stopping and not ready:  # before 'ready:' there is nothing to drain: an interrupted start (130, 143)
            from . import interrupts

            interrupts.record(stopping[0])
            raise interrupts.Interrupted(stopping[0])
        if stopping:
            if drained:
                say("stopped: in-flight requests answered")
                return 0
            raise ServeFailed(f"in-flight requests were not answered within --drain-timeout-s "
                              f"{options.drain_timeout_s}; stopped anyway")
        if status.is_file():
            failure = json.loads(status.read_text())
            exc = SdexportError(failure["message"])
            exc.exit_code = failure["exit_code"]
            raise exc
        raise ServeFailed(f"tritonserver exited with status {proc.returncode} (its log is above)")


# The README's examples (and `sdexport serve --help`'s): tests run both against a real server.
CURL_EXAMPLE = """curl -s localhost:8000/v2/models/sdexport/infer -H 'Content-Type: application/json' -d '{
  "inputs": [
    {"name": "prompt", "datatype": "BYTES", "shape": [1, 1], "data": ["a red bicycle by the sea"]},
    {"name": "seed", "datatype": "INT64", "shape": [1, 1], "data": [42]},
    {"name": "steps", "datatype": "INT32", "shape": [1, 1], "data": [20]}],
  "outputs": [{"name": "timings"}, {"name": "image"}]}' > response.json
python3 -c 'import json, numpy as np; from PIL import Image
out = {o["name"]: o for o in json.load(open("response.json"))["outputs"]}
print(out["timings"]["data"][0])
Image.fromarray(np.array(out["image"]["data"], np.uint8).reshape(out["image"]["shape"][1:])).save("image.png")'"""

CLIENT_EXAMPLE = """import numpy as np
import tritonclient.http as httpclient  # pip install 'tritonclient[http]'
from PIL import Image

client = httpclient.InferenceServerClient("localhost:8000")
inputs = []
for name, datatype, value in [("prompt", "BYTES", np.array([[b"a red bicycle by the sea"]], dtype=np.object_)),
                              ("seed", "INT64", np.array([[42]], dtype=np.int64)),
                              ("steps", "INT32", np.array([[20]], dtype=np.int32))]:
    inputs.append(httpclient.InferInput(name, list(value.shape), datatype))
    inputs[-1].set_data_from_numpy(value)
result = client.infer("sdexport", inputs)
Image.fromarray(result.as_numpy("image")[0]).save("image.png")
print(result.as_numpy("timings")[0, 0].decode())"""


# The README's recipe for a written repository under the tritonserver binary of the nvidia-pytriton wheel (no
# container): Triton finds the Python backend and its stub for this Python in one directory, and the stub needs
# this interpreter's libpython before the system's. The tests run it.
TRITONSERVER_EXAMPLE = """sdexport serve engines/tiny --write-repository models
T=$(python3 -c 'from pytriton.utils.distribution import get_root_module_path as r; print(r() / "tritonserver")')
V=$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
mkdir -p backends/python
ln -sf "$T"/backends/python/*.* "$T"/python_backend_stubs/$V/triton_python_backend_stub backends/python/
LD_LIBRARY_PATH=$(python3 -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR"))') \\
  "$T"/bin/tritonserver --model-repository "$PWD/models" --backend-directory "$PWD/backends\""""


def client_inputs(module, **values) -> list:
    """tritonclient ``InferInput`` objects for one request (``module``: ``tritonclient.http`` or ``.grpc``);
    a value may be one item (for every image) or a list (one per image); a family option's pair (H W, TOP LEFT)
    is two numbers (for every image) or a list of pairs. Inputs left out take the server's defaults."""
    import numpy as np

    from .families import all_options

    np_types = {"BYTES": np.object_, "INT64": np.int64, "INT32": np.int32, "FP32": np.float32}
    fields = {f.name: f for f in INPUTS + option_fields(all_options().values())}
    pairs = {name for name, f in fields.items() if f.dims[0] == 2}  # H W / TOP LEFT: a tuple per image

    def per_image(name, value):
        if name in pairs:  # one pair (H W) for every image, or a list of pairs, one per image
            return isinstance(value, (list, tuple)) and all(isinstance(v, (list, tuple)) for v in value)
        return isinstance(value, (list, tuple))

    n = max((len(v) for k, v in values.items() if per_image(k, v)), default=1)
    inputs = []
    for name, value in values.items():
        f = fields[name]
        items = value if per_image(name, value) else [value] * n
        data = np.array([list(v) if name in pairs else [v.encode() if isinstance(v, str) else v] for v in items],
                        dtype=np_types[f.datatype])
        tensor = module.InferInput(name, list(data.shape), f.datatype)
        tensor.set_data_from_numpy(data)
        inputs.append(tensor)
    return inputs
