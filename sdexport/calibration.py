"""INT8 calibration data: the UNet's inputs at real denoising steps of the PyTorch pipeline.

``sdexport calibrate`` runs diffusers' own ``StableDiffusionPipeline`` (loaded from the
model directory, FP32, classifier-free guidance exactly as at inference) over prompts
from a prompt file and records what the UNet is called with at every denoising step:
``sample`` (the scaled latent model input), ``timestep`` and ``encoder_hidden_states``.
A forward pre-hook on the UNet sees the calls; nothing of diffusers is re-implemented.

Rows, not calls, are the unit: a UNet call under guidance has two rows (negative and
positive prompt), and each row is one calibration sample. Rows are kept by reservoir
sampling (Vitter's algorithm R, seeded), so the file holds a uniform sample of at most
``--max-samples`` rows and memory stays bounded however many prompts and steps run.

The ``.npz`` holds the three inputs (float32, first axis = samples), per-sample
``step``/``prompt``/``cond`` indices, and ``meta``: a JSON string with the model's
weights sha256, the UNet's channels, cross-attention width and sequence length, the
shapes, the settings and the versions, so that ``quantize`` can refuse a file that was
captured from another model or at shapes the export does not cover. It is written
with ``allow_pickle``-free arrays only.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import random
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .errors import IntegrityError, ShapeError, UsageError

CALIB_FORMAT = 1
UNET_INPUTS = ("sample", "timestep", "encoder_hidden_states")
INDEX_ARRAYS = ("step", "prompt", "cond")
DEFAULT_PROMPTS = Path(__file__).resolve().parent.parent / "calibration" / "prompts.txt"


# --- prompts -------------------------------------------------------------------------
def load_prompts(path: str | Path) -> list[str]:
    """Prompts of a prompt file: one per line; ``#`` comment lines and blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--prompts {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"--prompts {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise UsageError(f"--prompts {path}: no prompts (the file is empty or has only comments and blank lines)")
    return prompts


def select_prompts(prompts: list[str], num_prompts: int, seed: int) -> list[str]:
    """``num_prompts`` distinct prompts, drawn with a seeded RNG (the file is ordered by subject,
    so the first N would all be portraits). Asking for more than the file has is an error:
    repeating prompts adds no information (calibration/README.md)."""
    if num_prompts < 1:
        raise UsageError(f"--num-prompts {num_prompts}: must be at least 1")
    if num_prompts > len(prompts):
        raise UsageError(f"--num-prompts {num_prompts}: the prompt file has only {len(prompts)} prompts; "
                         "add prompts instead of repeating them")
    if num_prompts == len(prompts):
        return list(prompts)
    return random.Random(seed).sample(prompts, num_prompts)


# --- bounded sample ------------------------------------------------------------------
class Reservoir:
    """A uniform random sample of at most ``capacity`` rows out of a stream (algorithm R).

    Storage is allocated once, at the first row, for ``capacity`` rows; after that
    memory does not grow. Row k (0-based) of the stream replaces a random slot with
    probability capacity / (k + 1).
    """

    def __init__(self, capacity: int, seed: int = 0):
        if capacity < 1:
            raise UsageError(f"--max-samples {capacity}: must be at least 1")
        self.capacity = capacity
        self.seen = 0
        self.rng = np.random.default_rng(seed)
        self.store: dict[str, np.ndarray] = {}

    def add(self, rows: dict[str, np.ndarray]) -> None:
        n = len(next(iter(rows.values())))
        if not self.store:
            self.store = {k: np.empty((self.capacity,) + v.shape[1:], dtype=v.dtype) for k, v in rows.items()}
        for i in range(n):
            k = self.seen
            self.seen += 1
            slot = k if k < self.capacity else int(self.rng.integers(0, k + 1))
            if slot < self.capacity:
                for name, value in rows.items():
                    self.store[name][slot] = value[i]

    def arrays(self) -> dict[str, np.ndarray]:
        kept = min(self.seen, self.capacity)
        return {k: v[:kept] for k, v in self.store.items()}


# --- capture ---------------------------------------------------------------------------
def load_pipeline(info, scheduler: str | None, device: str = "cpu"):
    """The family's diffusers reference pipeline (e.g. StableDiffusionPipeline) from the model directory,
    FP32, with ``scheduler``."""
    import diffusers
    import torch

    from .errors import ModelError
    from .models import _quiet_loading
    from .pipeline import make_scheduler

    with _quiet_loading():
        try:
            cls = getattr(diffusers, info.family.reference_pipeline)
            extra = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False} \
                if "safety_checker" in inspect.signature(cls.__init__).parameters else {}
            pipe = cls.from_pretrained(info.root, torch_dtype=torch.float32, **extra)
        except (OSError, ValueError, TypeError) as exc:
            raise ModelError(f"{info.root}: diffusers cannot load it as a {info.family.reference_pipeline} "
                             f"({str(exc).splitlines()[0][:200]})") from None
    pipe.scheduler = make_scheduler(scheduler, info.scheduler_config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def run_capture(pipe, prompts: list[str], steps: int, guidance_scale: float, height: int, width: int,
                seed: int, on_call: Callable[[int, int, dict[str, np.ndarray]], None],
                negative_prompt: str = "", progress: Callable[[], None] | None = None) -> None:
    """Run ``pipe`` on each prompt (seed ``seed + i`` for prompt i) and call
    ``on_call(prompt_index, step, rows)`` with the UNet's inputs at every denoising step."""
    import torch

    state = {"prompt": 0, "step": 0}
    batch_images = 1  # one image per prompt: a call with two rows ran under classifier-free guidance

    def hook(module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        hidden = args[2] if len(args) > 2 else kwargs["encoder_hidden_states"]
        rows = sample.shape[0]
        t = torch.as_tensor(timestep).detach().float().reshape(-1).cpu()
        t = t.expand(rows) if t.numel() == 1 else t
        record = {
            "sample": sample.detach().float().cpu().numpy(),
            "timestep": t.numpy().astype(np.float32),
            "encoder_hidden_states": hidden.detach().float().cpu().numpy(),
        }
        # SDXL's added conditioning and LCM's guidance embedding: the UNet inputs beyond the first three
        for name, value in {**(kwargs.get("added_cond_kwargs") or {}),
                            "timestep_cond": kwargs.get("timestep_cond")}.items():
            if value is not None:
                record[name] = value.detach().float().cpu().numpy()
        record["cond"] = _cond_flags(rows, rows == 2 * batch_images)
        on_call(state["prompt"], state["step"], record)
        state["step"] += 1
        if progress:
            progress()

    handle = pipe.unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for i, prompt in enumerate(prompts):
            state["prompt"], state["step"] = i, 0
            with torch.inference_mode():
                pipe(prompt, negative_prompt=negative_prompt or None, num_inference_steps=steps,
                     guidance_scale=guidance_scale, height=height, width=width,
                     generator=torch.Generator("cpu").manual_seed(seed + i), output_type="latent")
    finally:
        handle.remove()


def _cond_flags(rows: int, cfg: bool) -> np.ndarray:
    """diffusers orders a guidance batch [negative..., positive...]: 0 = negative row, 1 = positive."""
    flags = np.ones(rows, dtype=np.int8)
    if cfg:
        flags[: rows // 2] = 0
    return flags


def calibrate(model: str, out: str | Path, prompts_file: str | Path = DEFAULT_PROMPTS, num_prompts: int = 64,
              steps: int = 30, max_samples: int = 512, guidance_scale: float = 7.5, scheduler: str | None = None,
              height: int | None = None, width: int | None = None, seed: int = 0, negative_prompt: str = "",
              device: str = "cpu", say: Callable[[str], None] = lambda msg: None,
              progress_bar: bool = True) -> dict[str, Any]:
    """Capture UNet inputs over ``num_prompts`` prompts x ``steps`` steps into ``out`` (.npz)."""
    import sys

    from tqdm import tqdm

    from . import __version__
    from .manifest import atomic_path, sha256_file, versions
    from .models import resolve_model

    if steps < 1:
        raise UsageError(f"--steps {steps}: must be at least 1")
    if guidance_scale < 0:
        raise UsageError(f"--guidance-scale {guidance_scale}: must not be negative")
    reservoir = Reservoir(max_samples, seed)
    prompts = select_prompts(load_prompts(prompts_file), num_prompts, seed)
    info = resolve_model(model, progress=say)
    height = height or info.image_size
    width = width or info.image_size
    for side, value in (("height", height), ("width", width)):
        if value <= 0 or value % info.pixel_multiple:
            raise ShapeError(f"--{side} {value} is not a positive multiple of {info.pixel_multiple} "
                             "(VAE scale factor x UNet downsampling)")
    say(f"calibrate: {len(prompts)} prompts x {steps} steps on {info.name} ({height}x{width}, guidance "
        f"{guidance_scale}); keeping at most {max_samples} UNet input rows")
    pipe = load_pipeline(info, scheduler, device)
    tok = pipe.tokenizer
    long = sum(len(tok(p).input_ids) > tok.model_max_length for p in prompts)
    if long:
        say(f"calibrate: {long} prompt(s) longer than {tok.model_max_length} tokens are truncated, as at inference")
    pipe.scheduler.set_timesteps(steps)  # only to size the bar: PNDM's PLMS makes steps + 1 UNet calls
    bar = tqdm(total=len(prompts) * len(pipe.scheduler.timesteps), desc="calibrating", unit="step", file=sys.stderr, leave=False,
               disable=None if progress_bar else True)

    calls = {"n": 0}

    def on_call(prompt_index: int, step: int, rows: dict[str, np.ndarray]) -> None:
        calls["n"] += 1
        n = len(rows["sample"])
        rows = dict(rows, step=np.full(n, step, np.int32), prompt=np.full(n, prompt_index, np.int32))
        reservoir.add(rows)

    from .models import _quiet_loading

    try:
        with _quiet_loading():  # diffusers would log each truncation; counted above instead
            run_capture(pipe, prompts, steps, guidance_scale, height, width, seed, on_call,
                        negative_prompt=negative_prompt, progress=bar.update)
    finally:
        bar.close()
    arrays = reservoir.arrays()
    meta = {
        "format": CALIB_FORMAT, "truncated_prompts": long, "family": info.family_name,
        "model": {"path": str(info.root), "preset": info.preset, "weights_sha256": info.weights_sha256},
        "unet": {"in_channels": info.unet_in_channels, "cross_attention_dim": info.cross_attention_dim,
                 "sequence_length": info.tokenizer_max_length, "latent_height": height // info.vae_scale_factor,
                 "latent_width": width // info.vae_scale_factor},
        "settings": {"prompts_file": str(Path(prompts_file).resolve()), "prompts_sha256": sha256_file(prompts_file),
                     "num_prompts": len(prompts), "steps": steps, "guidance_scale": guidance_scale,
                     "scheduler": type(pipe.scheduler).__name__, "height": height, "width": width, "seed": seed,
                     "negative_prompt": negative_prompt, "max_samples": max_samples},
        "rows_seen": reservoir.seen, "samples": int(len(arrays["sample"])),
        "unet_calls": calls["n"],
        "shapes": {k: list(v.shape) for k, v in arrays.items()},
        "dtypes": {k: str(v.dtype) for k, v in arrays.items()},
        "versions": {**versions(), "sdexport": __version__},
    }
    out = Path(out)
    with atomic_path(out, suffix=".npz") as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, meta=np.array(json.dumps(meta)), **arrays)
    say(f"calibrate: kept {meta['samples']} of {reservoir.seen} UNet input rows "
        f"({meta['unet_calls']} UNet calls) -> {out}")
    return meta


# --- reading ---------------------------------------------------------------------------
@dataclasses.dataclass
class Calibration:
    path: Path
    arrays: dict[str, np.ndarray]
    meta: dict[str, Any]
    sha256: str

    @property
    def samples(self) -> int:
        return int(len(self.arrays["sample"]))

    @property
    def input_names(self) -> list[str]:
        """The UNet inputs the file holds (SD: three; SDXL and LCM UNets add their conditioning)."""
        return [k for k in self.arrays if k not in INDEX_ARRAYS]

    def batches(self, rows: int) -> list[dict[str, np.ndarray]]:
        """The UNet inputs in batches of up to ``rows`` rows (the quantizers' calibration feed)."""
        n = self.samples
        return [{k: np.ascontiguousarray(self.arrays[k][i:i + rows]) for k in self.input_names}
                for i in range(0, n, rows)]


def load_calibration(path: str | Path) -> Calibration:
    """Read a calibration file written by ``calibrate``; corrupt or foreign files are refused."""
    import zipfile

    from .manifest import sha256_file

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--calib {path}: no such file; write one with 'sdexport calibrate MODEL -o {path}'")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise IntegrityError(f"{path}: not a calibration file written by 'sdexport calibrate' "
                             f"({str(exc).splitlines()[0][:120]})") from None
    missing = [k for k in ("meta",) + UNET_INPUTS if k not in arrays]
    if missing:
        raise IntegrityError(f"{path}: not a calibration file written by 'sdexport calibrate' "
                             f"(missing {', '.join(missing)})")
    try:
        meta = json.loads(str(arrays.pop("meta")))
        if not isinstance(meta["model"]["weights_sha256"], str):
            raise TypeError
    except (json.JSONDecodeError, KeyError, TypeError):
        raise IntegrityError(f"{path}: its 'meta' record is unreadable; re-run 'sdexport calibrate'") from None
    if meta.get("format") != CALIB_FORMAT:
        raise IntegrityError(f"{path}: calibration format {meta.get('format')} (this sdexport reads {CALIB_FORMAT})")
    counts = {k: len(arrays[k]) if arrays[k].ndim else -1 for k in UNET_INPUTS}
    if len(set(counts.values())) != 1:
        raise IntegrityError(f"{path}: inputs disagree on the number of samples ({counts})")
    return Calibration(path=path, arrays=arrays, meta=meta, sha256=sha256_file(path))
