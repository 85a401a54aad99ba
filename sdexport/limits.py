"""What sdexport accepts: the bounds of every numeric and text option, and what fits this machine.

Each bound lives here once; the CLI applies them while it parses (so a bad value is refused
before anything is loaded) and the library functions apply the same checks for callers that
skip the CLI. A number that is out of range, non-finite or absurd is a usage error (exit 2);
a request that would not fit the machine's memory or disk is refused before the work with the
size it needs and what the machine has.
"""

from __future__ import annotations

import errno
import math
import os
import shutil
from pathlib import Path

from .errors import CannotRunHere, DiskFull, SdexportError, UsageError  # noqa: F401 (DiskFull: re-exported)

MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed's range (diffusers' seeds)
MAX_GUIDANCE = 100.0  # SD uses 1-20; far above, the guided noise overflows into black or NaN images
MAX_LORA_SCALE = 100.0  # --lora FILE:SCALE, either sign; LoRAs are used at -2..2, far above the fused weights overflow
MAX_STEPS = 1000  # besides the scheduler's own num_train_timesteps
MAX_EXPORT_IMAGES = 64  # export --max-batch: images per call an export can be made for
MAX_SIDE_FACTOR = 4  # image sides up to 4x the model's native size (2048 px for SD 1.5)
MAX_INPUT_SIDE = 8192  # an input image (--image, --mask, serve's image/mask): at most this side squared, any model
MAX_INPUT_PIXELS = MAX_INPUT_SIDE ** 2  # 67 MP
MAX_SAMPLES = 65536  # calibrate --max-samples (512 is the default; 32 the least entropy needs)
MAX_RUNS = 1000  # bench --runs
MAX_WARMUP = 100  # bench --warmup
MAX_THREADS = 1024
MAX_PROMPT_CHARS = 16384  # a CLIP text encoder reads 77 tokens (~300 characters); longer is truncated
MAX_PROMPT_FILE_BYTES = 16 * 2**20
MAX_PROMPT_FILE_LINES = 200_000
MEMORY_SHARE = 0.8  # of the memory available now that one allocation may plan to use
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


# --- option values -----------------------------------------------------------------------------
def count(option: str, value: int, lo: int = 1, hi: int | None = None, why: str = "") -> int:
    """An integer option within [lo, hi]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise UsageError(f"{option} {value!r}: expected a whole number")
    if value < lo:
        raise UsageError(f"{option} {value}: must be at least {lo}")
    if hi is not None and value > hi:
        raise UsageError(f"{option} {value}: must be at most {hi}{f' ({why})' if why else ''}")
    return value


def number(option: str, value: float, lo: float | None = None, hi: float | None = None, why: str = "") -> float:
    """A finite float option within [lo, hi] (inf and nan are refused, never passed on)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UsageError(f"{option} {value}: must be a finite number")
    if lo is not None and value < lo:
        raise UsageError(f"{option} {value}: must not be {'negative' if lo == 0 else f'below {lo}'}")
    if hi is not None and value > hi:
        raise UsageError(f"{option} {value}: must be at most {hi:g}{f' ({why})' if why else ''}")
    return float(value)


def guidance(option: str, value: float) -> float:
    return number(option, value, 0.0, MAX_GUIDANCE, "SD models use 1-20")


def seed(option: str, value: int) -> int:
    return count(option, value, 0, MAX_SEED, "seeds are 64-bit unsigned, as torch.Generator takes them")


def text(option: str, value: str, max_chars: int = MAX_PROMPT_CHARS) -> str:
    """A prompt: valid UTF-8 (argv bytes that are not arrive as lone surrogates) and of bounded length."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise UsageError(f"{option}: not valid UTF-8 text (an undecodable byte at character {exc.start})") from None
    if len(value) > max_chars:
        raise UsageError(f"{option}: {len(value):,} characters; at most {max_chars:,} (the text encoder reads "
                         "77 tokens, about 300 characters; longer prompts are truncated)")
    return value


def device_name(option: str, value: str) -> str:
    """The spelling of a device (auto, cpu, cuda or cuda:N), checked without importing torch."""
    text_value = str(value).strip().lower()
    head, _, index = text_value.partition(":")
    if head not in ("auto", "cpu", "cuda") or (index and (head != "cuda" or not index.isdigit())) \
            or text_value.endswith(":"):
        raise UsageError(f"{option} {value!r}: choose auto, cpu, cuda or cuda:N")
    return text_value


def device(option: str, value: str) -> str:
    """auto, cpu, cuda or cuda:N, resolved against this host: a CUDA device that is not here is refused (exit 8)."""
    text_value = device_name(option, value)
    head, _, index = text_value.partition(":")
    if head == "cpu":
        return "cpu"
    import torch

    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if head == "auto":
        return "cuda" if available else "cpu"
    if not available:
        raise CannotRunHere(f"{option} {value}: no CUDA GPU is visible here (torch {torch.__version__}, "
                            f"CUDA {torch.version.cuda or 'not built in'}); use --device cpu")
    if index and int(index) >= available:
        raise CannotRunHere(f"{option} {value}: this host has {available} CUDA device(s) (cuda:0"
                            f"{f'..cuda:{available - 1}' if available > 1 else ''})")
    return text_value


def image_size(option: str, value: str, images: bool = False) -> tuple:
    """The one parser of image sizes: HEIGHTxWIDTH in pixels (build --static/--min-size/--opt-size/--max-size)
    -> (height, width); with ``images`` also HEIGHTxWIDTHxIMAGES (serve --warmup) -> (height, width, images or
    None). A lone number is refused, never taken as a square: it does not say which side it is."""
    parts = str(value).strip().lower().replace("*", "x").split("x")
    values = [int(p) for p in parts if p.isascii() and p.isdigit()]
    if len(values) != len(parts) or len(values) not in ((2, 3) if images else (2,)) or min(values) < 1:
        form = "HEIGHTxWIDTH in pixels" + (" or HEIGHTxWIDTHxIMAGES, e.g. 1024x1024 or 1024x1024x4" if images
                                           else ", e.g. 1024x1024")
        raise UsageError(f"{option} takes {form} (got {value!r})")
    return tuple(values) if not images else (values[0], values[1], values[2] if len(values) == 3 else None)


def max_image_side(native_px: int) -> int:
    return MAX_SIDE_FACTOR * native_px


def check_input_pixels(what: str, size: tuple[int, int]) -> None:
    """Refuse (exit 2 / HTTP 400) an input image (infer/bench --image and --mask, serve's image and mask) of
    ``size`` (width, height) over MAX_INPUT_PIXELS, checked from its header before it is decoded. The bound is
    the same for every model: it takes any camera's photo (a 48 MP phone photo is resized to the request's
    size, as diffusers does) while a PNG of a few KB that claims more cannot make a server decode gigabytes
    (PIL's own bound is ~179 MP)."""
    if size[0] * size[1] > MAX_INPUT_PIXELS:
        raise UsageError(f"{what}: {size[0]}x{size[1]} px is {size[0] * size[1]:,} pixels; at most "
                         f"{MAX_INPUT_PIXELS:,} ({MAX_INPUT_SIDE}x{MAX_INPUT_SIDE}) are read; downscale it first")


def check_side(option: str, value: int, native_px: int) -> None:
    """An image side (export --min/--max-size, calibrate --height/--width) within what this model can take."""
    count(option, value, 1)
    top = max_image_side(native_px)
    if value > top:
        raise UsageError(f"{option} {value}: at most {top} px ({MAX_SIDE_FACTOR}x the model's native {native_px} px)")


# --- the machine -----------------------------------------------------------------------------------
def available_memory_bytes() -> int | None:
    """Memory a new allocation can get now: MemAvailable, lowered by a cgroup limit where one is set."""
    found = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found = int(line.split()[1]) * 1024
                    break
    except OSError:
        return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        current = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max":
            room = int(limit) - current
            found = room if found is None else min(found, room)
    except (OSError, ValueError):
        pass
    return found


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


def check_memory(what: str, need_bytes: float, hint: str = "", error: type = UsageError,
                 share: float = MEMORY_SHARE, at_least: bool = False) -> None:
    """Refuse (``error``, exit 2 by default) an allocation that cannot fit the memory available now. ``share``:
    the part of it a plan may use (1.0 where ``need_bytes`` is a measured peak rather than one allocation);
    ``at_least``: ``need_bytes`` is a lower bound (a size at which the work was seen killed)."""
    have = available_memory_bytes()
    if have is not None and need_bytes > share * have:
        raise error(f"{what} needs {'more than ' if at_least else ''}{human_bytes(need_bytes)} of memory; "
                    f"this machine has {human_bytes(have)} available{f' ({hint})' if hint else ''}")


def free_disk_bytes(path: str | os.PathLike) -> int | None:
    """Free bytes on the filesystem that holds ``path`` (or its nearest existing ancestor)."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def check_disk(path: str | os.PathLike, need_bytes: float, what: str) -> None:
    """Refuse (exit 10) before the work when ``path``'s filesystem has less free space than ``need_bytes``."""
    free = free_disk_bytes(path)
    if free is not None and need_bytes > free:
        raise DiskFull(f"{path}: {what} needs about {human_bytes(need_bytes)} of disk space; "
                       f"{human_bytes(free)} free there")


def disk_full_message(exc: BaseException, outputs: list[Path]) -> str | None:
    """The one line for an exception that a full disk caused (ENOSPC, EDQUOT, EFBIG), else None.

    Libraries that write through C++ (protobuf, ONNX Runtime) report it only in their message text."""
    full = isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS
    text_value = str(exc)
    full = full or any(os.strerror(e) in text_value for e in DISK_FULL_ERRNOS)
    if not full:
        return None
    where = getattr(exc, "filename", None) or (outputs[0] if outputs else None)
    reason = os.strerror(exc.errno) if isinstance(exc, OSError) and exc.errno else "no space left on device"
    return f"{where or 'output'}: {reason.lower()} while writing; nothing was left under a final name{_room(where)}"


def _room(where) -> str:
    """' (N free there now)', or the filesystem's inodes when those ran out."""
    if not where:
        return ""
    p = Path(os.path.abspath(where))
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        st = os.statvfs(p)
    except OSError:
        return ""
    if st.f_files and st.f_favail == 0:
        return f" (no free inodes left there: {st.f_files:,} in all)"
    return f" ({human_bytes(st.f_bavail * st.f_frsize)} free there now)"


# --- the scheduler ---------------------------------------------------------------------------------------
def _dry_run(scheduler: str | None, config: dict, steps: int) -> None:
    """The whole schedule on a zero latent and a zero noise prediction: set_timesteps, scale_model_input
    and step, as the sampler loop calls them (about a millisecond a step)."""
    import inspect

    import torch

    from .pipeline import make_scheduler

    sched = make_scheduler(scheduler, config)
    sched.set_timesteps(steps, device="cpu")
    sample = torch.zeros(1, 1, 2, 2) * sched.init_noise_sigma
    params = inspect.signature(sched.step).parameters
    extra = {"generator": torch.Generator("cpu").manual_seed(0)} if "generator" in params else {}
    for t in sched.timesteps:
        sched.scale_model_input(sample, t)
        sample = sched.step(torch.zeros_like(sample), t, sample, **extra, return_dict=False)[0]
    if not torch.isfinite(sample).all():
        raise FloatingPointError("the schedule produces NaN/Inf")


def check_schedule(scheduler: str | None, config: dict, steps: int, error: type | None = None) -> None:
    """Refuse, before any model loads, a schedule that would fail or give NaN images: more steps than the
    scheduler's num_train_timesteps, or steps this scheduler and config cannot make (exit 2), or a
    scheduler config that cannot run at all (``error``: IntegrityError for an export, ModelError for a model)."""
    import warnings

    from .errors import IntegrityError

    error = error or IntegrityError
    count("--steps", steps, 1, MAX_STEPS)
    train = config.get("num_train_timesteps", 1000)
    if isinstance(train, int) and steps > train:
        raise UsageError(f"--steps {steps}: the scheduler has {train} training timesteps; at most {train} steps")
    name = scheduler or config.get("_class_name")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            _dry_run(scheduler, config, 1)
        except Exception as exc:  # diffusers raises many types for a config it cannot use
            raise error(f"scheduler {name}: cannot run with this scheduler config ({_first_line(exc)})") from None
        try:
            _dry_run(scheduler, config, steps)
        except Exception as exc:
            raise UsageError(f"--steps {steps}: scheduler {name} cannot run {steps} steps with this model's "
                             f"scheduler config ({_first_line(exc)}); use fewer steps") from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__)
