"""INT8 calibration data: the UNet's inputs at real denoising steps of the PyTorch pipeline.

``sdexport calibrate`` runs the family's diffusers reference pipeline (``StableDiffusionPipeline``,
``StableDiffusionXLPipeline``; loaded from the model directory, FP32, classifier-free guidance exactly
as at inference) over prompts from a prompt file and records what the UNet is called with at every
denoising step: ``sample`` (the scaled latent model input), ``timestep``, ``encoder_hidden_states``,
and the family's added inputs (SDXL's ``text_embeds`` and ``time_ids``, LCM's ``timestep_cond``).
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
DEFAULT_PROMPTS = Path(__file__).resolve().parent / "data" / "prompts.txt"  # package data (data/PROMPTS.md)


# --- prompts -------------------------------------------------------------------------
def load_prompts(path: str | Path) -> list[str]:
    """Prompts of a prompt file: one per line; ``#`` comment lines and blank lines are skipped.

    Read line by line with bounds (limits.py): the file's bytes and lines, and one prompt's length, so a
    huge or binary file is refused early instead of filling memory."""
    from .limits import MAX_PROMPT_CHARS, MAX_PROMPT_FILE_BYTES, MAX_PROMPT_FILE_LINES, human_bytes
    from .manifest import check_regular

    path = Path(path)
    if not path.exists():
        raise UsageError(f"--prompts {path}: no such file")
    check_regular(path, UsageError)
    line_bytes = 4 * MAX_PROMPT_CHARS + 2  # UTF-8 takes at most 4 bytes a character, plus the line end
    prompts, total = [], 0
    with open(path, "rb") as handle:
        for lineno in range(1, MAX_PROMPT_FILE_LINES + 2):
            raw = handle.readline(line_bytes + 1)
            if not raw:
                break
            total += len(raw)
            if lineno > MAX_PROMPT_FILE_LINES or total > MAX_PROMPT_FILE_BYTES:
                raise UsageError(f"--prompts {path}: more than {MAX_PROMPT_FILE_LINES:,} lines or "
                                 f"{human_bytes(MAX_PROMPT_FILE_BYTES)}; a prompt file is at most that")
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as exc:
                raise UsageError(f"--prompts {path}: line {lineno} is not UTF-8 text ({exc.reason} at byte "
                                 f"{exc.start})") from None
            if len(raw) > line_bytes or len(line) > MAX_PROMPT_CHARS:
                raise UsageError(f"--prompts {path}: line {lineno} is longer than {MAX_PROMPT_CHARS:,} characters "
                                 "(the text encoder reads 77 tokens, about 300 characters)")
            if line and not line.startswith("#"):
                prompts.append(line)
    if not prompts:
        raise UsageError(f"--prompts {path}: no prompts (the file is empty or has only comments and blank lines)")
    return prompts


def select_prompts(prompts: list[str], num_prompts: int, seed: int) -> list[str]:
    """``num_prompts`` distinct prompts, drawn with a seeded RNG (the file is ordered by subject,
    so the first N would all be portraits). Asking for more than the file has is an error:
    repeating prompts adds no information (sdexport/data/PROMPTS.md)."""
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
    from .models import TORCH_CLASSES, _quiet_loading
    from .pipeline import make_scheduler

    # the torch components through models.ModelInfo.load_torch, the loader export and the references use: it
    # refuses weights files that lack the model's weights (which the pipeline would fill at random) or that
    # safetensors cannot read, as one ModelError
    modules = {part: info.load_torch(part) for part in info.configs if part in TORCH_CLASSES}
    with _quiet_loading():
        try:
            cls = getattr(diffusers, info.family.reference_pipeline)
            extra = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False} \
                if "safety_checker" in inspect.signature(cls.__init__).parameters else {}
            pipe = cls.from_pretrained(info.root, torch_dtype=torch.float32, **modules, **extra)
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
              steps: int | None = None, max_samples: int = 512, guidance_scale: float | None = None,
              scheduler: str | None = None,
              height: int | None = None, width: int | None = None, seed: int = 0, negative_prompt: str = "",
              device: str = "cpu", say: Callable[[str], None] = lambda msg: None,
              progress_bar: bool = True) -> dict[str, Any]:
    """Capture UNet inputs over ``num_prompts`` prompts x ``steps`` steps into ``out`` (.npz).
    ``steps``/``guidance_scale`` None: the model's defaults, as infer takes them (``Family.request_defaults``:
    30 steps, 4 for an LCM UNet), so the UNet is calibrated at the timesteps it is run with."""
    import sys

    from tqdm import tqdm

    from . import __version__, limits
    from .errors import ModelError
    from .manifest import atomic_path, sha256_file, versions
    from .models import model_path, resolve_model
    from .paths import Guarded, check_output, enclosing_export, model_inputs
    from .schema import check_loadable

    if steps is not None:
        limits.count("--steps", steps, 1, limits.MAX_STEPS)
    if guidance_scale is not None:
        limits.guidance("--guidance-scale", guidance_scale)
    limits.count("--max-samples", max_samples, 1, limits.MAX_SAMPLES)
    limits.count("--num-prompts", num_prompts, 1, limits.MAX_PROMPT_FILE_LINES)
    limits.seed("--seed", seed)
    limits.text("--negative-prompt", negative_prompt)
    if seed + num_prompts - 1 > limits.MAX_SEED:
        raise UsageError(f"--seed {seed}: prompt i runs with seed + i, and seed + {num_prompts - 1} passes "
                         f"2^64-1; use a seed at most {limits.MAX_SEED - num_prompts + 1}")
    guard = Guarded().file(prompts_file, f"the prompt file {prompts_file}")
    source = model_path(model)
    if source is not None:
        guard = guard | model_inputs(source, f"the model {source}")
    check_output("-o", out, guard | enclosing_export(out))
    if Path(out).suffix.lower() != ".npz" or Path(out).name.startswith("."):
        # numpy's savez would name it OUT.npz (quantize --calib reads any name): the name written is the one given
        raise UsageError(f"-o {out}: the calibration file must be a .npz file")
    reservoir = Reservoir(max_samples, seed)
    prompts = select_prompts(load_prompts(prompts_file), num_prompts, seed)
    info = resolve_model(model, progress=say)
    info.family.check_text_to_image(info)  # the capture runs the family's text-to-image reference pipeline
    steps, guidance_scale = info.family.request_settings(info, steps, guidance_scale)  # infer's
    height = info.image_size if height is None else height
    width = info.image_size if width is None else width
    for side, value in (("height", height), ("width", width)):
        limits.check_side(f"--{side}", value, info.image_size)
        if value % info.pixel_multiple:
            raise ShapeError(f"--{side} {value} is not a positive multiple of {info.pixel_multiple} "
                             "(VAE scale factor x UNet downsampling)")
    limits.check_schedule(scheduler, info.scheduler_config, steps, ModelError)
    row_bytes = 4 * (info.latent_channels * (height // info.vae_scale_factor) * (width // info.vae_scale_factor)
                     + info.tokenizer_max_length * info.cross_attention_dim + 1) + 9
    limits.check_memory(f"--max-samples {max_samples}: {max_samples} rows of {limits.human_bytes(row_bytes)}",
                        max_samples * row_bytes, "lower --max-samples, --height or --width")
    limits.check_disk(out, max_samples * row_bytes, "the calibration file")
    check_loadable(info)
    device = limits.device("--device", device)
    info.weights_sha256  # hashed before the run: the file records which weights it was captured from
    from .families.base import unused_negative_prompt

    unused = unused_negative_prompt(info.family.guidance(info, guidance_scale)) if negative_prompt else None
    if unused:  # diffusers' pipeline drops it as infer's does: the same one line
        say(f"warning: {unused[1]}")
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


MAX_META_CHARS = 2**20


def read_headers(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of every array of an ``.npz`` from its .npy headers, reading no array data."""
    import zipfile

    headers = {}
    with zipfile.ZipFile(path) as archive:
        members = archive.infolist()
        if len(members) > 64:
            raise ValueError(f"{len(members)} members")
        for member in members:
            if not member.filename.endswith(".npy"):
                raise ValueError(f"member {member.filename!r} is not a .npy array")
            with archive.open(member) as handle:
                version = np.lib.format.read_magic(handle)
                read = {(1, 0): np.lib.format.read_array_header_1_0,
                        (2, 0): np.lib.format.read_array_header_2_0}.get(version)
                if read is None:
                    raise ValueError(f"member {member.filename!r}: .npy format {version}")
                shape, _, dtype = read(handle)
            headers[member.filename[:-4]] = (tuple(shape), dtype)
    return headers


def check_headers(path: Path, headers: dict[str, tuple[tuple[int, ...], np.dtype]]) -> int:
    """What a calibration file must be before its arrays are read: the keys, dtypes and ranks that
    ``calibrate`` writes, one sample count for every input, and a size this machine can hold."""
    from .limits import MAX_SAMPLES, check_memory

    def bad(what: str) -> IntegrityError:
        return IntegrityError(f"{path}: not a calibration file written by 'sdexport calibrate' ({what})")

    missing = [k for k in ("meta",) + UNET_INPUTS if k not in headers]
    if missing:
        raise bad(f"missing {', '.join(missing)}")
    meta_shape, meta_dtype = headers["meta"]
    if meta_shape != () or meta_dtype.kind != "U" or meta_dtype.itemsize > 4 * MAX_META_CHARS:
        raise bad("its 'meta' record is not a JSON string")
    ranks = {"sample": 4, "timestep": 1, "encoder_hidden_states": 3}
    for name, (shape, dtype) in headers.items():
        if dtype.hasobject or dtype.kind not in "fiub" + ("U" if name == "meta" else ""):
            raise bad(f"'{name}' has dtype {dtype}")
        if name in ranks and len(shape) != ranks[name]:
            raise ShapeError(f"{path}: '{name}' has shape {shape}; calibrate writes rank {ranks[name]}")
    samples = {headers[k][0][0] for k in UNET_INPUTS}
    if len(samples) != 1:
        raise IntegrityError(f"{path}: inputs disagree on the number of samples "
                             f"({ {k: headers[k][0][0] for k in UNET_INPUTS} })")
    count = samples.pop()
    if count > MAX_SAMPLES:
        raise IntegrityError(f"{path}: {count:,} samples; calibrate writes at most {MAX_SAMPLES:,} (--max-samples)")
    total = sum(int(np.prod(shape, dtype=np.float64)) * dtype.itemsize for shape, dtype in headers.values())
    check_memory(f"{path}: its arrays", total, "as their .npy headers declare them", IntegrityError)
    return count


def load_calibration(path: str | Path, check: Callable[[dict[str, Any], dict], None] | None = None) -> Calibration:
    """Read a calibration file written by ``calibrate``; corrupt, foreign or oversized files are refused,
    from the arrays' headers, before any array is read. ``check(meta, headers)``: the caller's own check of
    the file's ``meta`` record and .npy headers (e.g. the model it was captured from), also before any array."""
    import zipfile

    from .manifest import check_regular, sha256_file

    path = Path(path)
    if not path.exists():
        raise UsageError(f"--calib {path}: no such file; write one with 'sdexport calibrate MODEL -o {path}'")
    check_regular(path, UsageError)
    try:
        headers = read_headers(path)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, KeyError) as exc:
        raise IntegrityError(f"{path}: not a calibration file written by 'sdexport calibrate' "
                             f"({str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__})") from None
    check_headers(path, headers)
    try:
        with np.load(path, allow_pickle=False) as data:
            record = str(data["meta"])  # the meta record alone (np.load reads a member when it is asked for)
            meta = _parse_meta(path, record)
            if check is not None:
                check(meta, headers)
            arrays = {k: data[k] for k in data.files if k != "meta"}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise IntegrityError(f"{path}: not a calibration file written by 'sdexport calibrate' "
                             f"({str(exc).splitlines()[0][:120]})") from None
    return Calibration(path=path, arrays=arrays, meta=meta, sha256=sha256_file(path))


def _parse_meta(path: Path, record: str) -> dict[str, Any]:
    try:
        meta = json.loads(record)
        if not isinstance(meta["model"]["weights_sha256"], str):
            raise TypeError
    except (json.JSONDecodeError, KeyError, TypeError):
        raise IntegrityError(f"{path}: its 'meta' record is unreadable; re-run 'sdexport calibrate'") from None
    if meta.get("format") != CALIB_FORMAT:
        raise IntegrityError(f"{path}: calibration format {meta.get('format')} (this sdexport reads {CALIB_FORMAT})")
    return meta
