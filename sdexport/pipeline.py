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
import math
import sys
from typing import Any, Callable

import numpy as np

from .backends.base import serving
from .components import Geometry
from .errors import ShapeError, UsageError
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


_OWN_CONFIGS_MADE: set[str] = set()  # scheduler configs make_scheduler made the model's own class of


def make_scheduler(name: str | None, config: dict[str, Any]):
    """A diffusers scheduler of kind ``name`` (None: the model's own), configured from the model's config.
    A class other than the model's own gets the keys it takes only: the others were written for another class
    (PNDM's skip_prk_steps in SDXL's Euler config), and diffusers, which ignores them, warned of them each time
    (three times a command for ``--scheduler lcm``). The model's own class gets its whole config, so that
    diffusers still warns of a key that class does not take: once a process, as diffusers' own pipeline does
    when it loads the model (a command makes the scheduler three times: twice for the schedule's dry run, once
    to run; an LCM model saved from SDXL's Euler config printed diffusers' warning three times a command)."""
    import inspect

    import diffusers

    if name is None:
        cls = getattr(diffusers, config["_class_name"])
        seen = json.dumps(config, sort_keys=True, default=str)
        if seen not in _OWN_CONFIGS_MADE:
            _OWN_CONFIGS_MADE.add(seen)
            return cls.from_config(config)
        from .models import _quiet_loading

        with _quiet_loading():  # diffusers said what it ignores of this config the first time
            return cls.from_config(config)
    if name not in SCHEDULERS:
        raise UsageError(f"unknown scheduler '{name}' (choose from {', '.join(SCHEDULERS)})")
    cls_name, overrides = SCHEDULERS[name]
    cls = getattr(diffusers, cls_name)
    if cls_name != config.get("_class_name"):
        takes = inspect.signature(cls.__init__).parameters
        if not any(p.kind is p.VAR_KEYWORD for p in takes.values()):
            config = {k: v for k, v in config.items() if k in takes or k.startswith("_")}
    return cls.from_config({**config, **overrides})


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


MASK_MODES = ("1", "L", "RGB")  # binary, grayscale, or grayscale saved as RGB (white = repaint)


def rgb_image(image, flag: str = "--image"):
    """The RGB image diffusers' ``load_image`` makes of a file (``convert("RGB")``: grayscale, palette and
    binary images spread to three channels, alpha dropped); 16-bit and float images are refused, as PIL would
    clip them to white rather than scale them."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "F") or image.mode.startswith("I;"):
        raise UsageError(f"{flag}: a {image.mode} image (16/32-bit or float pixels); save it as an 8-bit image "
                         "(RGB, grayscale, palette or RGBA)")
    return image.convert("RGB")


def check_strength(strength: float, family, mode: str) -> None:
    """``mode``: "image-to-image" or "inpainting"; the message names the family's default for it."""
    if not isinstance(strength, (int, float)) or not math.isfinite(strength) or not 0 < strength <= 1:
        raise UsageError(f"--strength {strength}: must be in (0, 1] (1 repaints everything, small values keep "
                         f"more of the image); without --strength, {family.description} {mode} uses "
                         f"{family.default_strength[mode]} (diffusers' default)")


@dataclasses.dataclass
class InitImage:
    """The image (and mask) a request starts from, with diffusers' rules for them: preprocessing by
    ``VaeImageProcessor`` (the image resized to the request's size with Lanczos, scaled to [-1, 1]; the mask
    made grayscale and binarized at 0.5), the strength's timestep schedule (``get_timesteps``), the generator
    order (image latents, noise, masked-image latents) and the latents (``add_noise`` at the first kept
    timestep; pure noise at strength 1 for inpainting), as ``StableDiffusionImg2ImgPipeline`` and
    ``StableDiffusionInpaintPipeline`` do, and their SDXL counterparts (``StableDiffusionXLImg2ImgPipeline``,
    the refiner's pipeline, and ``StableDiffusionXLInpaintPipeline``), which follow the same rules."""

    mode: str  # "image-to-image" or "inpainting"
    image: Any  # PIL image
    mask: Any | None
    strength: float
    height: int | None = None  # image-to-image: the image's own size unless the request names one
    width: int | None = None

    @classmethod
    def for_request(cls, export, image, mask, strength, height, width) -> "InitImage | None":
        """The request's image input checked against the export (runtime.ExportDir), before any work; None for
        text-to-image. The strength defaults to the family's (diffusers' pipeline default)."""
        info, root = export.info, export.root
        if image is None:
            if mask is not None:
                raise UsageError("--mask needs --image (the picture whose masked part is repainted)")
            if info.inpainting:
                raise UsageError(f"{root}: an inpainting model (its UNet takes {info.unet_in_channels} channels: latents, "
                                 "mask, masked image); give --image and --mask")
            if strength is not None:
                raise UsageError("--strength applies to --image (image-to-image or inpainting)")
            return None
        if mask is None and info.inpainting:
            raise UsageError(f"{root}: an inpainting model; give --mask (white = repaint) with --image")
        if mask is not None and not info.inpainting:
            raise UsageError(f"--mask: {root} is not an inpainting model (its UNet takes {info.unet_in_channels} "
                             f"channels, an inpainting UNet {2 * info.latent_channels + 1}); leave out --mask for "
                             "image-to-image, or export an inpainting checkpoint")
        mode = "inpainting" if mask is not None else "image-to-image"
        strength = export.family.default_strength[mode] if strength is None else strength
        check_strength(strength, export.family, mode)
        init = cls(mode, rgb_image(image), mask, float(strength))
        if mask is not None:
            if mask.mode not in MASK_MODES:
                raise UsageError(f"--mask: a {mask.mode} image; a mask is grayscale (modes {', '.join(MASK_MODES)}; "
                                 "white = repaint, black = keep)")
            if mask.size != image.size:
                raise UsageError(f"--mask is {mask.size[0]}x{mask.size[1]} px, --image {image.size[0]}x{image.size[1]} px: "
                                 "they must be the same size")
        elif height is None or width is None:
            init.height, init.width = init.default_size(export, height, width)
        return init

    def default_size(self, export, height, width) -> tuple[int, int]:
        """Image-to-image keeps the image's size, rounded down to a multiple of the VAE factor (diffusers'
        ``get_default_height_width``), on the sides the request leaves open; a size the export cannot take is
        refused naming the allowed ones. A side the request names is taken as given (checked as for
        text-to-image, never rounded)."""
        from diffusers.image_processor import VaeImageProcessor

        h, w = VaeImageProcessor(vae_scale_factor=export.info.vae_scale_factor).get_default_height_width(self.image)
        ranges = export.ranges
        for side, given in ((h, height), (w, width)):
            if given is None and (side % ranges.pixel_multiple or not ranges.min_size <= side <= ranges.max_size):
                raise ShapeError(f"--image is {self.image.size[0]}x{self.image.size[1]} px; image-to-image keeps its "
                                 f"size ({w}x{h} after rounding to the VAE factor {export.info.vae_scale_factor}) and this "
                                 f"export takes sides that are multiples of {ranges.pixel_multiple} in "
                                 f"[{ranges.min_size}, {ranges.max_size}]: pass --height/--width to resize it")
        return (h if height is None else height), (w if width is None else width)

    def check_steps(self, steps: int) -> None:
        if steps - self._t_start(steps) < 1:
            raise UsageError(f"--strength {self.strength} with --steps {steps} leaves no denoising step "
                             f"(diffusers runs int(steps x strength) of them): raise --steps or --strength")

    def _t_start(self, steps: int) -> int:
        return max(steps - min(int(steps * self.strength), steps), 0)

    def timesteps(self, sched, steps: int):
        """The tail of the schedule that strength keeps (diffusers' ``get_timesteps``)."""
        begin = self._t_start(steps) * sched.order
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(begin)
        return sched.timesteps[begin:]

    def latents(self, pipe: "Pipeline", sched, timesteps, shape, generator, cfg: bool):
        """(initial latents, what an inpainting UNet takes after them or None), drawing from the generator in
        diffusers' order."""
        import torch
        from diffusers.image_processor import VaeImageProcessor

        dev = pipe.device
        batch, f = shape[0], pipe.info.vae_scale_factor
        height, width = shape[2] * f, shape[3] * f
        with pipe.stage("image_preprocess"):
            pixels = VaeImageProcessor(vae_scale_factor=f).preprocess(self.image, height=height, width=width)
            pixels = pixels.to(dtype=torch.float32, device=dev)
        first = timesteps[:1].repeat(batch)
        if self.mode == "image-to-image":
            if isinstance(generator, list):  # one encoder draw per image, each from its own generator
                init = pipe.encode_image(torch.cat([pixels] * batch), generator)
            else:  # one draw for the image, repeated over the batch
                init = pipe.encode_image(pixels, generator).repeat(batch, 1, 1, 1)
            noise = pipe.noise(shape, generator).to(dev)
            return sched.add_noise(init, noise, first), None
        full = self.strength == 1.0
        if not full:
            init = pipe.encode_image(pixels, generator).repeat(batch, 1, 1, 1)
        noise = pipe.noise(shape, generator).to(dev)
        latents = noise * sched.init_noise_sigma if full else sched.add_noise(init, noise, first)
        with pipe.stage("image_preprocess"):
            mask = VaeImageProcessor(vae_scale_factor=f, do_normalize=False, do_binarize=True,
                                     do_convert_grayscale=True).preprocess(self.mask, height=height, width=width)
            masked = pixels * (mask.to(dev) < 0.5)
            mask = torch.nn.functional.interpolate(mask, size=(shape[2], shape[3])).to(dev)
        masked_latents = pipe.encode_image(masked, generator).repeat(batch, 1, 1, 1)
        concat = torch.cat([mask.repeat(batch, 1, 1, 1), masked_latents], dim=1)
        return latents, torch.cat([concat] * 2) if cfg else concat


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
    mode: str = "text-to-image"  # or "image-to-image", "inpainting"
    strength: float | None = None  # the strength used with an init image (the family's default when none given)

    def uint8(self) -> np.ndarray:
        return (self.images * 255).round().astype("uint8")

    def stage_summary(self) -> dict[str, float]:
        """Stage times; ``loop_overhead`` is the denoising loop's own time (scheduler, guidance,
        casts and any gap between UNet calls), ``other`` what the pipeline spends outside the
        engines and the loop (tokenizing, drawing the initial noise, post-processing, and the image and
        mask preprocessing of an image request, which ``image_preprocess`` times alone)."""
        t = self.timings_ms
        total = sum(t["total"])
        unet = sum(t.get("unet", []))
        denoise = sum(t.get("denoise", []))
        text = sum(t.get("text_encoder", []))
        encode = sum(t.get("vae_encoder", []))
        engines = text + encode + sum(t.get("vae_decoder", []))
        return {
            "text_encoder_ms": text,
            "vae_encoder_ms": encode,
            "image_preprocess_ms": sum(t.get("image_preprocess", [])),
            "unet_total_ms": unet,
            "unet_steps": len(t.get("unet", [])),
            "vae_decoder_ms": sum(t.get("vae_decoder", [])),
            "denoise_loop_ms": denoise,
            "total_ms": total,
            "loop_overhead_ms": denoise - unet,
            "loop_overhead_pct": 100.0 * (denoise - unet) / total if total else 0.0,
            "other_ms": total - denoise - engines,
        }


def check_step_graph(step_graph: bool, device: str) -> None:
    """Step graphs are CUDA graphs: refused on any other device (infer, bench and serve say it alike)."""
    if step_graph and not device.startswith("cuda"):
        raise UsageError("--step-graph needs a CUDA device (--device cuda)")


class Pipeline:
    """Text to image over an export's engines, generic over model families (the family encodes prompts)."""

    def __init__(self, engines: dict[str, Any], export, device: str = "cpu",
                 warn: Callable[[str], None] | None = None, step_graph: bool = False):
        check_step_graph(step_graph, device)
        self.engines = engines
        self.step_graph = step_graph
        self.step_graph_kinds = MAX_STEP_GRAPH_KINDS
        # Decode one image per VAE call (diffusers' "VAE slicing"): serve sets it where the VAE engine pays for a
        # change of batch size (Engine.fixed_batch_preferred), since dynamic batching changes it on most calls.
        self.vae_slicing = False
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
        self.loras: list = []  # switched onto the engines (set_loras), on top of any fused at export
        self._lora_factors: dict[str, Any] = {}  # sha256 -> lora.LoraFactors: each file read by diffusers once
        self._lora_key: list | None = []  # (sha256, scale) of the LoRAs the engines hold (None: unknown)
        for part in self.family.tokenizer_parts:  # a missing or foreign tokenizer fails here, not as equal images
            if part in self.info.tokenizer_max_lengths:
                self.tokenizer(part)

    def set_loras(self, loras) -> dict[str, float]:
        """Switch the engines to the base weights plus ``loras`` (``FILE[:SCALE]`` strings or lora.LoraFile; an
        empty list: the weights as exported), without re-export or rebuild: diffusers fuses them into the
        exported base weights of the layers they touch (lora.fused_params) and each engine takes the result
        (ONNX Runtime: a session with those initializers; TensorRT: a refit; torch: the parameters). Each file
        is read by diffusers' loader on its first switch only (its LoRA factors stay with the pipeline).
        Returns the switch's timings in ms. A LoRA that does not fit the model leaves the engines as they were."""
        import time

        from .lora import fused_params, lora_parts, open_loras

        t0 = time.perf_counter()
        files = open_loras(loras)
        key = [(f.sha256, f.scale) for f in files]
        if key == self._lora_key:  # the engines hold this set already
            return {"fuse_ms": 0.0, "apply_ms": 0.0, "switch_ms": (time.perf_counter() - t0) * 1e3, "files_ms": 0.0,
                    "base_ms": 0.0}
        parts = lora_parts(self.info)
        engines = {e.spec.source: e for e in self.engines.values() if e.spec.source in parts}
        base_s = [0.0]  # of the fuse: reading the exported base weights from the engines

        def base(part, name):
            b0 = time.perf_counter()
            try:
                return engines[part].base_param(name)
            finally:
                base_s[0] += time.perf_counter() - b0

        t_files = time.perf_counter()
        values = fused_params(self.info, files, list(engines), base=base, factors=self._lora_factors)
        t1 = time.perf_counter()
        self._graphs.clear()  # step graphs captured the previous engines' state (ONNX Runtime: its old sessions)
        self._lora_key = None  # unknown until every engine has taken its values
        for part, engine in engines.items():
            engine.set_weights(values.get(part, {}))
        t2 = time.perf_counter()
        self.loras, self._lora_key = files, key
        # fuse = files (open and hash the LoRA files) + base weights read + the deltas added (the rest)
        return {"fuse_ms": (t1 - t0) * 1e3, "apply_ms": (t2 - t1) * 1e3, "switch_ms": (t2 - t0) * 1e3,
                "files_ms": (t_files - t0) * 1e3, "base_ms": base_s[0] * 1e3}

    def _decode(self, latents):
        vae = self.engines["vae_decoder"]
        if not self.vae_slicing or latents.shape[0] == 1:
            return vae({"latent_sample": latents})["sample"]
        import torch

        # each output copied out: an engine may hand back the same bound buffer on its next call of this shape
        return torch.cat([vae({"latent_sample": latents[i:i + 1]})["sample"].clone()
                          for i in range(latents.shape[0])])

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

    def stage(self, name: str):
        """The current request's clock's stage ``name`` (nothing outside a request)."""
        return self.clock.stage(name) if self.clock else contextlib.nullcontext()

    def encode_text(self, part: str, ids):
        """Run one text encoder engine (timed as the text stage)."""
        with self.stage("text_encoder"):
            return self.engines[part]({"input_ids": ids})

    def __call__(self, prompt: str | list[str], negative_prompt: str | list[str] | None = None,
                 steps: int | None = None, guidance_scale: float | None = None, seed: int | list[int] = 0,
                 height: int | None = None, width: int | None = None, batch_size: int = 1,
                 scheduler: str | None = None, progress: Callable[[int, int], None] | None = None,
                 image: Any = None, mask: Any = None, strength: float | None = None, **options) -> GenerationResult:
        """Generate ``batch_size`` images. ``prompt``, ``negative_prompt`` and ``seed`` may be lists (one per
        image): with a list of seeds each image's noise comes from its own generator, so image i equals a
        single-image call with seed i; one seed seeds the whole batch, as diffusers' ``num_images_per_prompt``.
        ``steps``/``guidance_scale`` default to the family's (``Family.request_defaults``). ``image`` (a PIL
        image): image-to-image from it, as ``StableDiffusionImg2ImgPipeline``; with ``mask`` (white = repaint)
        inpainting, as ``StableDiffusionInpaintPipeline`` (inpainting UNets only). ``options``: the family's
        own (SDXL micro-conditioning, ``Family.options``)."""
        import torch

        from .families.base import unused_negative_prompt

        steps, guidance_scale = self.family.request_settings(self.info, steps, guidance_scale)
        init = InitImage.for_request(self.export, image, mask, strength, height, width)
        height = init.height if init and init.height else (self.ranges.opt_size if height is None else height)
        width = init.width if init and init.width else (self.ranges.opt_size if width is None else width)
        if init is None:
            self.family.check_text_to_image(self.info)
        options = self.family.check_options(self.info, options)
        guidance = self.family.guidance(self.info, guidance_scale)
        geo = Geometry(batch_size, height, width, guidance=guidance.cfg)
        check_request(self.ranges, steps, guidance_scale, geo, self.info.scheduler_config)
        if init is not None:
            init.check_steps(steps)
        prompts = _as_list(prompt, batch_size, "prompt")
        negatives = _as_list(negative_prompt, batch_size, "negative prompt")
        unused = unused_negative_prompt(guidance) if any(negatives) else None  # "" says nothing
        if unused and unused[0] not in self._noted:  # infer/serve: one line a kind (LCM; guidance <= 1) a pipeline
            self._noted.add(unused[0])
            self.warn(unused[1])
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
        # What the request needs from diffusers beyond its schedulers is imported before the clock starts: the first
        # import of diffusers' models or pipelines takes about a second per process, which infer's single timed call
        # reported as pipeline time ("other": total 0.9-1.5 s against 50 ms for text-to-image on sdxl-tiny).
        if init is not None:
            from diffusers.image_processor import VaeImageProcessor  # noqa: F401  (InitImage.latents)
            from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution  # noqa: F401  (encode_image)
        if guidance.embedding_dim:
            from diffusers import LatentConsistencyModelPipeline  # noqa: F401  (guidance_embedding)

        with self._on_own_stream(), serving(geo):  # engine errors speak of this request's images per call
            with clock.stage("total"):
                cond = self.family.encode(self, prompts, negatives, guidance, geo, options)
                if guidance.embedding_dim:  # LCM: the guidance scale as an embedding, one row per image
                    from .families.base import guidance_embedding

                    cond["timestep_cond"] = guidance_embedding(guidance.scale, geo.rows, guidance.embedding_dim).to(dev)

                shape = (batch_size, self.info.latent_channels, height // f, width // f)
                # The scheduler keeps its tables on the CPU: its per-step scalars then enter GPU ops as
                # host scalars, and no step indexes a CPU table with a GPU tensor (a hidden host sync).
                # The timesteps the UNet sees are copied to the device once, before the loop.
                sched.set_timesteps(steps, device="cpu")
                timesteps = sched.timesteps
                if init is None:
                    latents = self.noise(shape, generator).to(dev) * sched.init_noise_sigma
                else:
                    timesteps = init.timesteps(sched, steps)
                    latents, concat = init.latents(self, sched, timesteps, shape, generator, guidance.cfg)
                    if concat is not None:
                        cond[CONCAT_KEY] = concat
                unet_timesteps = timesteps.to(dtype=torch.float32).to(dev)
                step_params = inspect.signature(sched.step).parameters
                extra = {}
                if "eta" in step_params:
                    extra["eta"] = 0.0
                if "generator" in step_params and not _noise_unused(sched, extra.get("eta", 0.0)):
                    extra["generator"] = generator
                unet = self.engines["unet"]
                rows = geo.rows
                graphs = None
                if self.step_graph:
                    # the scheduler as resolved (None and the model's own scheduler named are one kind)
                    key = (type(sched).__name__, json.dumps(dict(sched.config), sort_keys=True, default=str),
                           steps, tuple(latents.shape), guidance.cfg, guidance_scale,
                           tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(cond.items())),
                           extra.get("eta"), "generator" in extra, init.strength if init else None)
                    graphs = self._step_graphs(key, lambda: _StepGraphs.capture(
                        self, sched, unet_timesteps, timesteps, latents, cond, guidance, rows, extra))
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
                    image = self._decode(self.unscale_latents(latents))
                images = (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()
        self.clock = None
        return GenerationResult(images=images, latents=latents, timings_ms=clock.results_ms(), steps=steps,
                                truncated=self._truncated, loop="step-graph" if graphs is not None else "eager",
                                scheduler=type(sched).__name__, guidance_scale=guidance_scale,
                                mode=init.mode if init else "text-to-image", strength=init.strength if init else None)

    @staticmethod
    def noise(shape, generator):
        """Gaussian noise as diffusers draws it (``randn_tensor`` on the CPU generator(s): one per image for a
        list), on the CPU."""
        from diffusers.utils.torch_utils import randn_tensor

        import torch

        return randn_tensor(shape, generator=generator, device=torch.device("cpu"), dtype=torch.float32)

    def encode_image(self, pixels, generator):
        """Pixels in [-1, 1] -> scaled latents: the VAE encoder engine's latent distribution, sampled with the
        generator as diffusers' ``retrieve_latents(..., sample_mode="sample")`` does (one draw per generator
        and row for a list), then scaled (and normalized, for VAEs with latents_mean/std)."""
        import torch
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        if "vae_encoder" not in self.engines:
            raise UsageError(f"{self.export.root}: image input needs the vae_encoder engine (export it: "
                             f"sdexport export MODEL -o {self.export.root} --components ...,vae_encoder)")
        with self.stage("vae_encoder"):
            if isinstance(generator, list):
                params = [self.engines["vae_encoder"]({"sample": pixels[i:i + 1]})["latent_parameters"].clone()
                          for i in range(pixels.shape[0])]
                samples = [DiagonalGaussianDistribution(p).sample(g) for p, g in zip(params, generator)]
                latents = torch.cat(samples)
            else:
                params = self.engines["vae_encoder"]({"sample": pixels})["latent_parameters"]
                latents = DiagonalGaussianDistribution(params).sample(generator)
        return self.scale_latents(latents)

    def scale_latents(self, latents):
        """The VAE's latents -> the UNet's latent space (the inverse of ``unscale_latents``)."""
        import torch

        vae = self.info.vae_config
        if vae.get("latents_mean") is not None and vae.get("latents_std") is not None:
            c = len(vae["latents_mean"])
            mean = torch.tensor(vae["latents_mean"]).view(1, c, 1, 1).to(latents)
            std = torch.tensor(vae["latents_std"]).view(1, c, 1, 1).to(latents)
            return (latents - mean) * self.info.vae_scaling_factor / std
        return latents * self.info.vae_scaling_factor

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
        if CONCAT_KEY in cond:  # inpainting UNet: mask and masked-image latents after the scaled latents
            cond = dict(cond)
            model_in = torch.cat([model_in, cond.pop(CONCAT_KEY)], dim=1)
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
        found = self._graphs.pop(key, None)
        if found is not None:
            self._graphs[key] = found  # least recently used goes first
        else:
            try:
                found = capture()
            except _NotCapturable as exc:
                found = str(exc)
            except Exception as exc:  # CUDA/ORT raise their own types; the eager loop still works
                found = f"capture failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            while len(self._graphs) >= self.step_graph_kinds:  # bounded device memory for many request kinds
                self._graphs.pop(next(iter(self._graphs)))
            self._graphs[key] = found
            if isinstance(found, str):
                self.warn(f"step graph not used ({found}); running the denoising loop eagerly")
        return None if isinstance(found, str) else found


# The conditioning entry holding what an inpainting UNet takes after the latents (mask, masked-image latents),
# concatenated on the channel axis each step, as StableDiffusionInpaintPipeline does.
CONCAT_KEY = "sample_concat"

# Request kinds (shape, steps, scheduler, guidance) whose step graphs are kept by default; the least recently
# used goes first. A server raises it to hold every kind it warmed up (serve.ImageService.warm_up).
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
    def capture(cls, pipe: "Pipeline", sched, unet_timesteps, timesteps, latents, cond, guidance, rows, extra):
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
            for i, t in list(enumerate(timesteps))[:2]:
                x = pipe._step(warm, unet, i, t, x, static_cond, unet_timesteps, guidance, rows, extra)

        warm_up(two_steps)
        pool = torch.cuda.graph_pool_handle()
        graphs, x = [], static_latents
        for i, t in enumerate(timesteps):
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


def load_image(path, flag: str):
    """A PIL image from ``path`` for ``flag`` (--image, --mask), fully decoded now: a missing file, one that
    is not an image PIL can read (or is truncated), or one over ``limits.MAX_INPUT_PIXELS`` is one UsageError
    naming it."""
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{flag} {path}: no such file")
    return decode_image(path, f"{flag} {path}")


def decode_image(source, what: str):
    """A PIL image from a path or encoded bytes (PNG, JPEG, ...), fully decoded now; anything PIL cannot read
    (or a truncated file) is one UsageError starting with ``what``, as is an image over limits.MAX_INPUT_PIXELS
    (limits.check_input_pixels), refused from its header before decoding."""
    import io

    from PIL import Image

    from .limits import check_input_pixels

    try:
        with Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source) as img:
            check_input_pixels(what, img.size)  # PIL opens lazily: only the header is read so far
            img.load()
            return img.copy()
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as exc:
        import re

        # PIL names an in-memory file by its repr ("<_io.BytesIO object at 0x7f...>"): noise to a client
        reason = re.sub(r"\s*<[^<>]* object at 0x[0-9a-fA-F]+>", "", str(exc).splitlines()[0])
        raise UsageError(f"{what}: not an image PIL can read ({reason[:120]})") from None


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
