"""The sampler loop: diffusers' schedulers driving Engine objects.

It follows ``diffusers.StableDiffusionPipeline`` step for step (tokenization,
the order [negative, positive] of the guidance batch, latent noise drawn from a
CPU ``torch.Generator`` seeded like diffusers, ``init_noise_sigma``,
``scale_model_input``, guidance, ``scheduler.step`` with the same generator,
VAE scaling and post-processing), so that with FP32 engines an image matches
diffusers' own pipeline for the same seed. Classifier-free guidance is one
batched UNet call. The loop never knows which backend it drives.

``step_graph`` (CUDA only): every denoising step -- scale_model_input, the UNet
call, guidance and ``scheduler.step`` -- is captured once per request shape as a
CUDA graph of its own (one graph per step index, all in one memory pool, replayed
in capture order), so a step costs one ``graph.replay()`` of host time. The
scheduler's per-step scalars (sigmas, alphas, solver coefficients) are host values
baked into each step's graph, which is why there is a graph per step rather than
one graph replayed with new scalars: diffusers' schedulers are used unmodified.
A scheduler that draws host-side noise every step (a CPU generator, e.g. Euler
ancestral) or whose step cannot be captured falls back to the eager loop with a
one-line warning; ``GenerationResult.loop`` says which ran.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import json
import sys
from typing import Any, Callable

import numpy as np

from .components import Geometry
from .errors import UsageError
from .timing import StageClock

SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "dpm++2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "lcm": ("LCMScheduler", {}),  # LCM-distilled UNets (time_cond_proj_dim); their own config keeps its settings
}


def make_scheduler(name: str | None, config: dict[str, Any]):
    """A diffusers scheduler of kind ``name`` (None: the model's own), configured from the model's config."""
    import diffusers

    if name is None:
        return getattr(diffusers, config["_class_name"]).from_config(config)
    if name not in SCHEDULERS:
        raise UsageError(f"unknown scheduler '{name}' (choose from {', '.join(SCHEDULERS)})")
    cls_name, overrides = SCHEDULERS[name]
    return getattr(diffusers, cls_name).from_config({**config, **overrides})


def _noise_unused(sched, eta: float = 0.0) -> bool:
    """Schedulers whose ``step`` takes a generator but draws no noise in the configuration we run:
    Euler (noise used only when ``s_churn > 0``, never set here; it is drawn anyway, so without the
    generator the unused draw stays on the device), DDIM with ``eta == 0``, and DPM-Solver++ in its
    non-SDE forms. Passing them a CPU generator costs a host sync per step (Euler) and stops the
    step from being captured as a CUDA graph; images are identical either way."""
    name = type(sched).__name__
    if name == "EulerDiscreteScheduler":
        return True
    if name == "DDIMScheduler":
        return eta == 0
    if name == "DPMSolverMultistepScheduler":
        return "sde" not in str(sched.config.algorithm_type)
    return False


def check_request(ranges, steps: int, guidance_scale: float, geo: Geometry, scheduler_config: dict | None = None
                  ) -> None:
    """Reject a generation request before any work: bad steps/guidance (limits.py), or a shape outside the export."""
    from . import limits

    limits.count("--steps", steps, 1, limits.MAX_STEPS)
    train = int((scheduler_config or {}).get("num_train_timesteps", 1000) or 1000)
    if steps > train:
        raise UsageError(f"--steps {steps}: the scheduler was trained with {train} timesteps; use at most {train}")
    limits.guidance("--guidance-scale", guidance_scale)
    for option, value in (("--height", geo.height), ("--width", geo.width), ("--batch-size", geo.images)):
        limits.count(option, value, 1)
    ranges.check(geo)


def _as_list(value, n: int, what: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise UsageError(f"{what}: {len(value)} values for a batch of {n}")
        return list(value)
    return [value] * n


@dataclasses.dataclass
class GenerationResult:
    images: np.ndarray  # float32 (B, H, W, 3) in [0, 1], as diffusers' output_type="np"
    latents: Any
    timings_ms: dict[str, list[float]]
    steps: int
    truncated: bool
    loop: str = "eager"  # "eager", or "step-graph" (every step one CUDA graph replay; "unet" times whole steps)
    scheduler: str = ""  # the diffusers scheduler class that ran
    guidance_scale: float | None = None  # the scale used (the family's default when the request gave none)

    def uint8(self) -> np.ndarray:
        return (self.images * 255).round().astype("uint8")

    def stage_summary(self) -> dict[str, float]:
        """Stage times; ``loop_overhead`` is the denoising loop's own time (scheduler, guidance,
        casts and any gap between UNet calls), ``other`` what the pipeline spends outside the
        engines and the loop (tokenizing, drawing the initial noise, post-processing)."""
        t = self.timings_ms
        total = sum(t["total"])
        unet = sum(t.get("unet", []))
        denoise = sum(t.get("denoise", []))
        text = sum(t.get("text_encoder", []))
        engines = text + sum(t.get("vae_decoder", []))
        return {
            "text_encoder_ms": text,
            "unet_total_ms": unet,
            "unet_steps": len(t.get("unet", [])),
            "vae_decoder_ms": sum(t.get("vae_decoder", [])),
            "denoise_loop_ms": denoise,
            "total_ms": total,
            "loop_overhead_ms": denoise - unet,
            "loop_overhead_pct": 100.0 * (denoise - unet) / total if total else 0.0,
            "other_ms": total - denoise - engines,
        }


class Pipeline:
    """Text to image over an export's engines, generic over model families (the family encodes prompts)."""

    def __init__(self, engines: dict[str, Any], export, device: str = "cpu",
                 warn: Callable[[str], None] | None = None, step_graph: bool = False):
        if step_graph and not device.startswith("cuda"):
            raise UsageError("--step-graph needs a CUDA device (--device cuda)")
        self.engines = engines
        self.step_graph = step_graph
        self._graphs: dict[tuple, Any] = {}  # request key -> _StepGraphs, or the reason capture failed
        self.export = export
        self.info = export.info
        self.family = export.family
        self.ranges = export.ranges
        self.device = device
        self._tokenizers: dict[str, Any] = {}
        self.warn = warn or (lambda msg: print(f"warning: {msg}", file=sys.stderr))
        self._stream = None
        self._warned: set[str] = set()
        self._noted: set[str] = set()  # one-time notes of this pipeline (not per request)
        self._truncated = False
        self.clock: StageClock | None = None
        for part in self.family.tokenizer_parts:  # a missing or foreign tokenizer fails here, not as equal images
            if part in self.info.tokenizer_max_lengths:
                self.tokenizer(part)

    def tokenizer(self, part: str = "tokenizer"):
        if part not in self._tokenizers:
            self._tokenizers[part] = self.info.load_tokenizer(part)
        return self._tokenizers[part]

    @contextlib.contextmanager
    def _on_own_stream(self):
        """On CUDA, run the whole generation on a torch stream of the pipeline's own: engines get a real
        stream handle (TensorRT synchronises extra on the legacy default stream, ONNX Runtime ignores
        handle 0), and the caller's stream waits for the result by event, not by a host sync."""
        if not self.device.startswith("cuda"):
            yield
            return
        import torch

        caller = torch.cuda.current_stream(self.device)
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=self.device)
        self._stream.wait_stream(caller)
        with torch.cuda.stream(self._stream):
            yield
        caller.wait_stream(self._stream)

    # --- stages --------------------------------------------------------------------
    def tokenize(self, part: str, texts: list[str], n_negative: int = 0):
        """Token ids (int32, on the device) padded to the tokenizer's length; a text longer than that is
        truncated with one warning naming the words dropped and whether it was a prompt or a negative prompt."""
        import torch

        tok = self.tokenizer(part)
        limit = tok.model_max_length
        ids = tok(texts, padding="max_length", max_length=limit, truncation=True, return_tensors="pt").input_ids
        for i, text in enumerate(texts):
            full = tok(text, truncation=False)["input_ids"]
            if len(full) <= limit:
                continue
            self._truncated = True
            which = "negative prompt" if i < n_negative else "prompt"
            if (which, text) in self._warned:
                continue
            self._warned.add((which, text))
            dropped = tok.decode(full[limit - 1:-1], skip_special_tokens=True).strip()
            self.warn(f"{which} longer than {limit} tokens was truncated; dropped: {dropped!r}")
        return ids.to(torch.int32).to(self.device)

    def encode_text(self, part: str, ids):
        """Run one text encoder engine (timed as the text stage)."""
        with (self.clock.stage("text_encoder") if self.clock else contextlib.nullcontext()):
            return self.engines[part]({"input_ids": ids})

    def __call__(self, prompt: str | list[str], negative_prompt: str | list[str] | None = None,
                 steps: int | None = None, guidance_scale: float | None = None, seed: int | list[int] = 0,
                 height: int | None = None, width: int | None = None, batch_size: int = 1,
                 scheduler: str | None = None, progress: Callable[[int, int], None] | None = None,
                 **options) -> GenerationResult:
        """Generate ``batch_size`` images. ``prompt``, ``negative_prompt`` and ``seed`` may be lists (one per
        image): with a list of seeds each image's noise comes from its own generator, so image i equals a
        single-image call with seed i; one seed seeds the whole batch, as diffusers' ``num_images_per_prompt``.
        ``steps``/``guidance_scale`` default to the family's (``Family.request_defaults``). ``options``: the
        family's own (SDXL micro-conditioning, ``Family.options``)."""
        import torch

        defaults = self.family.request_defaults(self.info)
        steps = defaults["steps"] if steps is None else steps
        guidance_scale = defaults["guidance_scale"] if guidance_scale is None else guidance_scale
        height = self.ranges.opt_size if height is None else height
        width = self.ranges.opt_size if width is None else width
        self.family.check_text_to_image(self.info)
        options = self.family.check_options(self.info, options)
        guidance = self.family.guidance(self.info, guidance_scale)
        geo = Geometry(batch_size, height, width, guidance=guidance.cfg)
        check_request(self.ranges, steps, guidance_scale, geo, self.info.scheduler_config)
        prompts = _as_list(prompt, batch_size, "prompt")
        negatives = _as_list(negative_prompt, batch_size, "negative prompt")
        if guidance.embedding_dim and any(n is not None for n in negatives) and "lcm-negative" not in self._noted:
            self._noted.add("lcm-negative")
            self.warn("the negative prompt is not used: an LCM UNet runs without classifier-free guidance "
                      "(diffusers' LCM pipelines take none)")
        seeds = _as_list(seed, batch_size, "seed") if isinstance(seed, (list, tuple)) else None
        sched = make_scheduler(scheduler, self.info.scheduler_config)
        clock = self.clock = StageClock(self.device)
        self._warned, self._truncated = set(), False
        dev = self.device
        if seeds is None:
            generator: Any = torch.Generator("cpu").manual_seed(seed)
        else:
            generator = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        f = self.info.vae_scale_factor

        with self._on_own_stream():
            with clock.stage("total"):
                cond = self.family.encode(self, prompts, negatives, guidance, geo, options)
                if guidance.embedding_dim:  # LCM: the guidance scale as an embedding, one row per image
                    from .families.base import guidance_embedding

                    cond["timestep_cond"] = guidance_embedding(guidance.scale, geo.rows, guidance.embedding_dim).to(dev)

                shape = (batch_size, self.info.latent_channels, height // f, width // f)
                if seeds is None:
                    latents = torch.randn(shape, generator=generator, dtype=torch.float32)
                else:
                    latents = torch.cat([torch.randn((1, *shape[1:]), generator=g, dtype=torch.float32)
                                         for g in generator])
                latents = latents.to(dev)
                # The scheduler keeps its tables on the CPU: its per-step scalars then enter GPU ops as
                # host scalars, and no step indexes a CPU table with a GPU tensor (a hidden host sync).
                # The timesteps the UNet sees are copied to the device once, before the loop.
                sched.set_timesteps(steps, device="cpu")
                latents = latents * sched.init_noise_sigma
                unet_timesteps = sched.timesteps.to(dtype=torch.float32).to(dev)
                step_params = inspect.signature(sched.step).parameters
                extra = {}
                if "eta" in step_params:
                    extra["eta"] = 0.0
                if "generator" in step_params and not _noise_unused(sched, extra.get("eta", 0.0)):
                    extra["generator"] = generator
                unet = self.engines["unet"]
                rows = geo.rows
                timesteps = sched.timesteps
                graphs = None
                if self.step_graph:
                    key = (scheduler, steps, tuple(latents.shape), guidance.cfg, guidance_scale,
                           tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(cond.items())),
                           extra.get("eta"), "generator" in extra)
                    graphs = self._step_graphs(key, lambda: _StepGraphs.capture(
                        self, sched, unet_timesteps, latents, cond, guidance, rows, extra))
                with clock.stage("denoise"):
                    if graphs is not None:
                        latents = graphs.run(latents, cond, clock, progress)
                    else:
                        for i, t in enumerate(timesteps):
                            latents = self._step(sched, unet, i, t, latents, cond, unet_timesteps, guidance,
                                                 rows, extra, clock)
                            if progress:
                                progress(i + 1, len(timesteps))

                with clock.stage("vae_decoder"):
                    image = self.engines["vae_decoder"]({"latent_sample": self.unscale_latents(latents)})["sample"]
                images = (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()
        self.clock = None
        return GenerationResult(images=images, latents=latents, timings_ms=clock.results_ms(), steps=steps,
                                truncated=self._truncated, loop="step-graph" if graphs is not None else "eager",
                                scheduler=type(sched).__name__, guidance_scale=guidance_scale)

    def unscale_latents(self, latents):
        """Latents -> the VAE decoder's input: divide by the scaling factor, and (VAEs whose config has
        ``latents_mean``/``latents_std``) un-normalize, as diffusers' pipelines do."""
        import torch

        vae = self.info.vae_config
        if vae.get("latents_mean") is not None and vae.get("latents_std") is not None:
            c = len(vae["latents_mean"])
            mean = torch.tensor(vae["latents_mean"]).view(1, c, 1, 1).to(latents)
            std = torch.tensor(vae["latents_std"]).view(1, c, 1, 1).to(latents)
            return latents * std / self.info.vae_scaling_factor + mean
        return latents / self.info.vae_scaling_factor

    @staticmethod
    def _step(sched, unet, i, t, latents, cond, unet_timesteps, guidance, rows, extra, clock=None):
        """One denoising step: the batched guidance input, the UNet call, guidance, the scheduler update."""
        import torch

        model_in = torch.cat([latents] * 2) if guidance.cfg else latents
        model_in = sched.scale_model_input(model_in, t)
        t_batch = unet_timesteps[i].expand(rows)
        with clock.stage("unet") if clock else contextlib.nullcontext():
            noise = unet({"sample": model_in, "timestep": t_batch, **cond})["out_sample"]
        if guidance.cfg:
            uncond, text = noise.chunk(2)
            noise = uncond + guidance.scale * (text - uncond)
        return sched.step(noise, t, latents, **extra, return_dict=False)[0]

    def _step_graphs(self, key, capture):
        """The captured steps for this request, capturing them on first use; None (and one warning per
        request kind) when they cannot be captured, in which case the eager loop runs."""
        found = self._graphs.get(key)
        if found is None:
            try:
                found = capture()
            except _NotCapturable as exc:
                found = str(exc)
            except Exception as exc:  # CUDA/ORT raise their own types; the eager loop still works
                found = f"capture failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            while len(self._graphs) >= MAX_STEP_GRAPH_KINDS:  # bounded device memory for many request kinds
                self._graphs.pop(next(iter(self._graphs)))
            self._graphs[key] = found
            if isinstance(found, str):
                self.warn(f"step graph not used ({found}); running the denoising loop eagerly")
        return None if isinstance(found, str) else found


# Request kinds (shape, steps, scheduler, guidance) whose step graphs are kept; the oldest goes first.
MAX_STEP_GRAPH_KINDS = 4


class _NotCapturable(Exception):
    pass


class _StepGraphs:
    """One CUDA graph per denoising step of one request kind, captured in order into one pool."""

    def __init__(self, graphs, static_latents, static_cond, result, keep):
        self.graphs = graphs
        self.static_latents = static_latents
        self.static_cond = static_cond
        self.result = result
        self.keep = keep  # the scheduler (its multistep history lives in graph memory) and the timesteps

    @classmethod
    def capture(cls, pipe: "Pipeline", sched, unet_timesteps, latents, cond, guidance, rows, extra):
        """Capture from the request's scheduler (timesteps set, at step 0), which stays untouched: the
        eager loop still has it if the capture fails."""
        import torch

        from .backends.base import warm_up

        if "generator" in extra:
            raise _NotCapturable("the scheduler draws noise from a CPU generator every step")
        unet = getattr(pipe.engines["unet"], "inner", pipe.engines["unet"])  # CudaGraphed: no nested capture
        refusal = unet.graph_capture_refusal()
        if refusal:
            raise _NotCapturable(refusal)
        sched = copy.deepcopy(sched)
        static_latents, static_cond = latents.clone(), {k: v.clone() for k, v in cond.items()}
        # Warm-up outside the capture (autotuning, lazy kernel loading, ONNX Runtime's buffers for this
        # shape), on a copy of the scheduler so that the captured one starts at step 0.
        def two_steps():
            warm, x = copy.deepcopy(sched), static_latents.clone()
            for i, t in list(enumerate(warm.timesteps))[:2]:
                x = pipe._step(warm, unet, i, t, x, static_cond, unet_timesteps, guidance, rows, extra)

        warm_up(two_steps)
        pool = torch.cuda.graph_pool_handle()
        graphs, x = [], static_latents
        for i, t in enumerate(sched.timesteps):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                x = pipe._step(sched, unet, i, t, x, static_cond, unet_timesteps, guidance, rows, extra)
            graphs.append(graph)
        return cls(graphs, static_latents, static_cond, x, (sched, unet_timesteps))

    def run(self, latents, cond, clock, progress):
        self.static_latents.copy_(latents)
        for k, v in cond.items():
            self.static_cond[k].copy_(v)
        n = len(self.graphs)
        for i, graph in enumerate(self.graphs):
            with clock.stage("unet"):
                graph.replay()
            if progress:
                progress(i + 1, n)
        return self.result.clone()  # the graphs' buffer is overwritten by the next request


def image_paths(path, images: int):
    """What ``infer -o FILE.png`` writes: ``FILE.png`` (or ``FILE-0.png``, ``FILE-1.png``... for a batch)
    and the sidecar ``FILE.json``."""
    from pathlib import Path

    path = Path(path)
    if path.suffix.lower() != ".png" or path.name.startswith("."):
        raise UsageError(f"-o {path}: the output must be a .png file")
    names = [path] if images == 1 else [path.with_name(f"{path.stem}-{i}.png") for i in range(images)]
    return names, path.with_suffix(".json")


def save_images(result: GenerationResult, path, metadata: dict[str, Any]) -> list[str]:
    """Write PNG(s) and the JSON sidecar as one set (paths.write_set): all of them, or none."""
    import io

    from PIL import Image

    from .manifest import finite_json
    from .paths import write_set

    if not np.isfinite(result.images).all():  # uint8 would turn NaN into black pixels
        from .errors import ValidationFailed

        raise ValidationFailed("the generation produced NaN/Inf pixels; no image was written (an engine out of "
                               "its numeric range: run 'sdexport validate' on the export)")
    images = result.uint8()
    names, sidecar = image_paths(path, len(images))
    files = []
    for img, name in zip(images, names):
        buffer = io.BytesIO()
        Image.fromarray(img).save(buffer, format="PNG")
        files.append((name, buffer.getvalue()))
    meta = {**metadata, "images": [str(n) for n in names]}
    files.append((sidecar, (json.dumps(finite_json(meta), indent=2, allow_nan=False) + "\n").encode()))
    write_set(files)  # the sidecar last: it names the images
    return [str(n) for n in names]
