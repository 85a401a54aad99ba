"""Open a Stable Diffusion model in diffusers layout, or write a built-in preset.

Everything sdexport needs to know about a model is read from its directory
(``ModelInfo``): latent channels, VAE scale factor, cross-attention width,
tokenizer length and sample size come from the configs, never from constants,
so a real checkpoint that sets them differently exports correctly.

Presets are written as ordinary diffusers directories (``StableDiffusionPipeline
.save_pretrained``), so tests and benchmarks go through the same loading code as
real checkpoints. Their tokenizer is the real CLIP BPE vocabulary, taken from
the ``bpe_simple_vocab_16e6.txt.gz`` file that open_clip_torch's wheel ships.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import json
import os
from functools import cached_property
from pathlib import Path
from typing import Any

from .errors import ModelError
from .manifest import atomic_dir, sha256_files

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".ckpt")

# SD 1.5's scheduler configuration (PNDM, as shipped with the checkpoint).
SD15_SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1, clip_sample=False,
    prediction_type="epsilon",
)


@dataclasses.dataclass(frozen=True)
class Preset:
    """A model with deterministic random weights, described by diffusers configs."""

    name: str
    description: str
    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any]
    scheduler: dict[str, Any]
    seed: int = 0


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            name="tiny",
            description="tiny SD-shaped model (random weights) for CPU tests: seconds per image",
            unet=dict(
                sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                attention_head_dim=8, norm_num_groups=8,
            ),
            vae=dict(
                in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                block_out_channels=(16, 32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=8, sample_size=128,
                scaling_factor=0.18215,
            ),
            text_encoder=dict(
                vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
                projection_dim=32, bos_token_id=0, eos_token_id=2, pad_token_id=1,
            ),
            scheduler=SD15_SCHEDULER,
        ),
        Preset(
            name="sd15-random",
            description="the exact SD 1.5 architecture with RANDOM weights (for timing; images are noise)",
            unet=dict(
                sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                block_out_channels=(320, 640, 1280, 1280),
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
                flip_sin_to_cos=True, freq_shift=0, downsample_padding=1, act_fn="silu",
            ),
            vae=dict(
                in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, sample_size=512,
                scaling_factor=0.18215, act_fn="silu",
            ),
            text_encoder=dict(
                vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                projection_dim=768, bos_token_id=0, eos_token_id=2, pad_token_id=1,
            ),
            scheduler=SD15_SCHEDULER,
        ),
    )
}

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
BPE_PACKAGE = "open_clip_torch==3.3.0"


def clip_bpe_path() -> Path:
    """Locate the CLIP BPE merges file: ``$SDEXPORT_CLIP_BPE`` or open_clip_torch's wheel.

    The package is found without importing it (open_clip's import pulls torchvision).
    """
    env = os.environ.get("SDEXPORT_CLIP_BPE")
    if env:
        if not Path(env).is_file():
            raise ModelError(f"SDEXPORT_CLIP_BPE={env}: no such file")
        return Path(env)
    import importlib.util

    spec = importlib.util.find_spec("open_clip")
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / BPE_FILE
        if candidate.is_file():
            return candidate
    raise ModelError(
        f"the CLIP BPE vocabulary ({BPE_FILE}) was not found: "
        f"'pip install --no-deps {BPE_PACKAGE}' or set SDEXPORT_CLIP_BPE to the file")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode table (the BPE's base alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def write_clip_tokenizer_files(out: Path, bpe_path: Path | None = None) -> None:
    """Write ``vocab.json`` and ``merges.txt`` exactly as OpenAI CLIP derives them from its BPE file.

    49,408 entries: 256 byte symbols, the same with ``</w>``, 48,894 merges and two specials.
    """
    bpe_path = bpe_path or clip_bpe_path()
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [a + "</w>" for a in alphabet] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")


def build_tokenizer(max_length: int = 77):
    """SD 1.5's tokenizer: CLIPTokenizer over the real CLIP BPE, padded with <|endoftext|>."""
    import tempfile

    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_clip_tokenizer_files(Path(tmp))
        # from_pretrained reads vocab.json + merges.txt the same way in transformers 4.x and 5.x.
        return CLIPTokenizer.from_pretrained(tmp, pad_token="<|endoftext|>", model_max_length=max_length)


def write_preset(name: str, out: str | os.PathLike, progress=None) -> Path:
    """Write preset ``name`` as a diffusers directory at ``out`` (atomically)."""
    if name not in PRESETS:
        raise ModelError(f"unknown preset '{name}' (presets: {', '.join(PRESETS)})")
    preset = PRESETS[name]
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    say = progress or (lambda msg: None)
    torch.manual_seed(preset.seed)
    say(f"building {name}: unet")
    unet = UNet2DConditionModel(**preset.unet)
    say(f"building {name}: vae")
    vae = AutoencoderKL(**preset.vae)
    say(f"building {name}: text encoder")
    text_encoder = CLIPTextModel(CLIPTextConfig(**preset.text_encoder))
    tokenizer = build_tokenizer(preset.text_encoder["max_position_embeddings"])
    scheduler = PNDMScheduler.from_config(preset.scheduler)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    out = Path(out)
    say(f"saving {name} to {out}")
    with atomic_dir(out) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        # Keep keys PNDM ignores but other schedulers read (SD 1.5's file has clip_sample=false).
        sched_path = tmp / "scheduler" / "scheduler_config.json"
        sched_path.write_text(json.dumps({**json.loads(sched_path.read_text()), **preset.scheduler}, indent=2))
        # transformers 5 saves only tokenizer.json; 4.x (and tools pinned to it) need vocab.json + merges.txt.
        write_clip_tokenizer_files(tmp / "tokenizer")
        (tmp / "SDEXPORT_PRESET.txt").write_text(
            f"sdexport preset '{name}': {preset.description}\nseed {preset.seed}\n")
    return out


def cache_dir() -> Path:
    return Path(os.environ.get("SDEXPORT_CACHE", Path.home() / ".cache" / "sdexport"))


def resolve_model(model: str | os.PathLike, progress=None) -> "ModelInfo":
    """A directory path, or a preset name (written once into the cache, then reused)."""
    path = Path(model)
    if path.exists():
        return ModelInfo.open(path)
    if str(model) in PRESETS:
        from . import __version__

        from .manifest import ExportLock

        cached = cache_dir() / "presets" / f"{model}-{__version__}"
        if not (cached / "model_index.json").is_file():
            cached.parent.mkdir(parents=True, exist_ok=True)
            # One writer per preset: concurrent commands wait for the first to write it, then reuse it.
            with ExportLock(cached.parent, True, f"preset {model}", progress):
                if not (cached / "model_index.json").is_file():
                    write_preset(str(model), cached, progress)
        return ModelInfo.open(cached, preset=str(model))
    raise ModelError(f"{model}: no such directory, and not a preset name (presets: {', '.join(PRESETS)})")


def _read_config(path: Path, what: str = "config") -> dict[str, Any]:
    """A JSON object from a model directory; anything else is one ModelError naming the file."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{path}: missing; not a diffusers model directory") from None
    except IsADirectoryError:
        raise ModelError(f"{path}: a directory, expected a JSON file") from None
    except UnicodeDecodeError:
        raise ModelError(f"{path}: not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except OSError as exc:
        raise ModelError(f"{path}: cannot be read ({exc.strerror})") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: the {what} must be a JSON object, not a {type(data).__name__}")
    return data


# torch classes sdexport loads, by diffusers folder (model_index.json names the class; these are the ones we run).
TORCH_CLASSES = {
    "unet": ("diffusers", ("UNet2DConditionModel",)),
    "vae": ("diffusers", ("AutoencoderKL",)),
    "text_encoder": ("transformers", ("CLIPTextModel", "CLIPTextModelWithProjection")),
    "text_encoder_2": ("transformers", ("CLIPTextModelWithProjection", "CLIPTextModel")),
}
TOKENIZER_FILES = (("vocab.json", "merges.txt"), ("tokenizer.json",))


@dataclasses.dataclass
class ModelInfo:
    """What sdexport reads from a diffusers pipeline directory (or, at run time, from an export's manifest)."""

    root: Path
    pipeline_class: str
    family_name: str
    configs: dict[str, dict[str, Any]]  # diffusers folder -> its config.json (unet, vae, text encoders)
    tokenizer_max_lengths: dict[str, int]  # tokenizer folder -> model_max_length
    scheduler_config: dict[str, Any]
    index: dict[str, Any]  # model_index.json
    preset: str | None = None
    # LoRAs (lora.LoraFile) that load_torch fuses into the modules they change: those an export was made
    # with, so that PyTorch references of that export (validate, --backend torch, re-exports) are what it holds.
    loras: list = dataclasses.field(default_factory=list)

    @classmethod
    def open(cls, root: str | os.PathLike, preset: str | None = None) -> "ModelInfo":
        from .families import family_for

        root = Path(root)
        if not root.is_dir():
            raise ModelError(f"{root}: not a directory")
        index_path = root / "model_index.json"
        if not index_path.is_file():
            if (root / "manifest.json").is_file():
                raise ModelError(f"{root}: an sdexport export, not a diffusers model; commands that take MODEL "
                                 "need the diffusers directory it was exported from")
            raise ModelError(f"{root}: no model_index.json; not a diffusers pipeline directory")
        index = _read_config(index_path, "pipeline index")
        family = family_for(index, root)
        parts = family.parts_of(index)
        missing = [part for part in parts if not (root / part).is_dir()]
        if missing:
            raise ModelError(f"{root}: missing {', '.join(p + '/' for p in missing)}; not a complete "
                             f"{family.description} directory")
        configs = {part: _read_config(root / part / "config.json") for part in parts
                   if part in TORCH_CLASSES}
        lengths = {}
        for part in (p for p in parts if p.startswith("tokenizer")):
            encoder = configs.get(part.replace("tokenizer", "text_encoder"), {})
            lengths[part] = _tokenizer_length(root / part, encoder)
        info = cls(root=root.resolve(), pipeline_class=str(index.get("_class_name")), family_name=family.name,
                   configs=configs, tokenizer_max_lengths=lengths,
                   scheduler_config=_read_config(root / "scheduler" / "scheduler_config.json"),
                   index=index, preset=preset)
        info.check()
        return info

    @property
    def family(self):
        from .families import by_name

        return by_name(self.family_name)

    def check(self) -> None:
        """Config values sdexport relies on have the right types and sane sizes, then the family's checks."""
        check_configs(self)
        self.family.check(self)

    # --- configs -------------------------------------------------------------------
    @property
    def unet_config(self) -> dict[str, Any]:
        return self.configs["unet"]

    @property
    def vae_config(self) -> dict[str, Any]:
        return self.configs["vae"]

    @property
    def text_encoder_config(self) -> dict[str, Any]:
        return self.configs.get("text_encoder") or self.configs.get("text_encoder_2") or {}

    @property
    def tokenizer_max_length(self) -> int:
        return min(self.tokenizer_max_lengths.values()) if self.tokenizer_max_lengths else 77

    # --- derived facts -------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.preset or self.root.name

    @property
    def unet_in_channels(self) -> int:
        return int(self.unet_config.get("in_channels", 4))

    @property
    def latent_channels(self) -> int:
        """Channels of the VAE's latent space (what the sampler denoises); an inpainting UNet takes more."""
        return int(self.vae_config.get("latent_channels", self.unet_in_channels))

    @property
    def inpainting(self) -> bool:
        """An inpainting UNet: its input is the latents, the mask (1 channel) and the masked image's latents."""
        return self.unet_in_channels == 2 * self.latent_channels + 1

    @property
    def unet_out_channels(self) -> int:
        return int(self.unet_config.get("out_channels", self.latent_channels))

    @property
    def image_channels(self) -> int:
        return int(self.vae_config.get("in_channels", 3))

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae_config.get("block_out_channels", [0] * 4)) - 1)

    @property
    def vae_scaling_factor(self) -> float:
        return float(self.vae_config.get("scaling_factor", 0.18215))

    @property
    def unet_latent_multiple(self) -> int:
        """The UNet halves the latent once per down block but the last; sizes must divide evenly."""
        return 2 ** (len(self.unet_config.get("down_block_types", [0] * 4)) - 1)

    @property
    def latent_sample_size(self) -> int:
        size = self.unet_config.get("sample_size", 64)
        return int(size[0] if isinstance(size, (list, tuple)) else size)

    @property
    def image_size(self) -> int:
        return self.latent_sample_size * self.vae_scale_factor

    @property
    def pixel_multiple(self) -> int:
        return self.vae_scale_factor * self.unet_latent_multiple

    @property
    def cross_attention_dim(self) -> int:
        dim = self.unet_config.get("cross_attention_dim", 768)
        return int(dim[0] if isinstance(dim, (list, tuple)) else dim)

    @property
    def text_hidden_size(self) -> int:
        return int(self.text_encoder_config.get("hidden_size", 768))

    @property
    def text_projection_dim(self) -> int:
        return int(self.text_encoder_config.get("projection_dim", self.text_hidden_size))

    @property
    def vocab_size(self) -> int:
        return int(self.text_encoder_config.get("vocab_size", 49408))

    @cached_property
    def weights_sha256(self) -> str:
        """One digest over every weight file of the model (what an export was made from)."""
        files = [p for part in self.family.weight_parts if part in self.configs
                 for p in (self.root / part).rglob("*") if p.suffix in WEIGHT_SUFFIXES]
        if not files:
            raise ModelError(f"{self.root}: no weight files ({', '.join(WEIGHT_SUFFIXES)}) in "
                             f"{', '.join(p for p in self.family.weight_parts if p in self.configs)}")
        return sha256_files(files, self.root)

    # --- loading -------------------------------------------------------------------
    def load_tokenizer(self, part: str = "tokenizer"):
        from transformers import CLIPTokenizer

        folder = self.root / part
        if not any(all((folder / f).is_file() for f in files) for files in TOKENIZER_FILES):
            raise ModelError(f"{folder}: no tokenizer files (vocab.json + merges.txt, or tokenizer.json); "
                             "without them every prompt would give the same image")
        with _quiet_loading():
            try:
                tokenizer = CLIPTokenizer.from_pretrained(self.root, subfolder=part)
            except (OSError, ValueError, TypeError, KeyError) as exc:
                raise ModelError(f"{folder}: cannot load the tokenizer ({str(exc).splitlines()[0][:160]})") from None
        tokenizer.model_max_length = self.tokenizer_max_lengths.get(part, 77)
        encoder = self.configs.get(part.replace("tokenizer", "text_encoder"), {})
        vocab = int(encoder.get("vocab_size", len(tokenizer)))
        if len(tokenizer) > vocab or len(tokenizer) < 3:
            raise ModelError(f"{folder}: the tokenizer has {len(tokenizer)} tokens, the text encoder's vocabulary "
                             f"{vocab}: not this model's tokenizer")
        return tokenizer

    def torch_class(self, part: str):
        import importlib

        library, allowed = TORCH_CLASSES[part]
        named = self.index.get(part)
        cls_name = named[1] if isinstance(named, list) and len(named) == 2 and named[1] in allowed else allowed[0]
        return getattr(importlib.import_module(library), cls_name)

    def load_torch(self, part: str, dtype=None, device: str = "cpu", **kwargs):
        """Load one torch module (``unet``, ``vae``, ``text_encoder``, ``text_encoder_2``) in eval mode, with
        ``self.loras`` fused into it (diffusers' loader needs every part a LoRA names: the others are loaded
        alongside and dropped)."""
        module = self._load_torch(part, dtype, device, **kwargs)
        if self.loras:
            from .lora import fuse_loras, lora_parts

            parts = lora_parts(self)
            if part in parts:
                others = {p: self._load_torch(p, dtype, "cpu") for p in parts if p != part}
                fuse_loras(self, {part: module, **others}, self.loras)
        return module

    def _load_torch(self, part: str, dtype=None, device: str = "cpu", **kwargs):
        import torch

        cls = self.torch_class(part)
        dtype = dtype or torch.float32
        with _quiet_loading():
            try:
                module = cls.from_pretrained(self.root, subfolder=part, torch_dtype=dtype, **kwargs)
            except (OSError, ValueError, EnvironmentError, TypeError, KeyError, RuntimeError) as exc:
                raise ModelError(f"{self.root / part}: cannot load weights ({str(exc).splitlines()[0][:200]})") from None
        return module.to(device).eval().requires_grad_(False)


def _tokenizer_length(folder: Path, encoder_config: dict[str, Any]) -> int:
    """The tokenizer's model_max_length, bounded by the text encoder's positions (CLIP: 77)."""
    positions = encoder_config.get("max_position_embeddings", 77)
    positions = positions if isinstance(positions, int) and positions > 0 else 77
    config = folder / "tokenizer_config.json"
    length = _read_config(config).get("model_max_length") if config.is_file() else None
    if not isinstance(length, int) or isinstance(length, bool) or not 1 <= length <= positions:
        length = positions
    return length


# Bounds for config values that size tensors: beyond them a config is corrupt or hostile (a UNet with
# 10^9 channels would allocate terabytes before failing).
_INT_FIELDS = {
    "unet": {"in_channels": (1, 64), "out_channels": (1, 64), "sample_size": (1, 1024),
             "cross_attention_dim": (1, 16384), "layers_per_block": (1, 16), "norm_num_groups": (1, 1024)},
    "vae": {"in_channels": (1, 16), "out_channels": (1, 16), "latent_channels": (1, 64), "sample_size": (1, 8192),
            "layers_per_block": (1, 16), "norm_num_groups": (1, 1024)},
    "text_encoder": {"hidden_size": (1, 16384), "vocab_size": (3, 1 << 20), "max_position_embeddings": (1, 4096),
                     "num_hidden_layers": (1, 128), "intermediate_size": (1, 65536), "num_attention_heads": (1, 256),
                     "projection_dim": (1, 16384)},
}
_INT_FIELDS["text_encoder_2"] = _INT_FIELDS["text_encoder"]
_MAX_CHANNELS = 16384


def check_configs(info: "ModelInfo") -> None:
    for part, fields in _INT_FIELDS.items():
        config = info.configs.get(part)
        if config is None:
            continue
        where = info.root / part / "config.json"
        for key, (lo, hi) in fields.items():
            if key not in config or (key == "sample_size" and isinstance(config[key], list)):
                continue
            value = config[key]
            if isinstance(value, list) and key == "cross_attention_dim":
                values = value
            else:
                values = [value]
            for v in values:
                if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
                    raise ModelError(f"{where}: {key} = {json.dumps(value)[:60]} is not an integer in [{lo}, {hi}]")
        for key in ("block_out_channels",):
            if key in config:
                value = config[key]
                if not isinstance(value, list) or not value or not all(
                        isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= _MAX_CHANNELS for v in value):
                    raise ModelError(f"{where}: {key} = {json.dumps(value)[:60]} is not a list of channel counts "
                                     f"in [1, {_MAX_CHANNELS}]")
        for key in ("down_block_types", "up_block_types"):
            if key in config and (not isinstance(config[key], list) or not config[key]
                                  or not all(isinstance(v, str) for v in config[key])):
                raise ModelError(f"{where}: {key} must be a non-empty list of block names")
        if "scaling_factor" in config and (not isinstance(config["scaling_factor"], (int, float))
                                           or isinstance(config["scaling_factor"], bool)
                                           or not 0 < config["scaling_factor"] < 1e3):
            raise ModelError(f"{where}: scaling_factor = {config['scaling_factor']!r} is not a positive number")
    if not isinstance(info.scheduler_config.get("_class_name"), str):
        raise ModelError(f"{info.root}/scheduler/scheduler_config.json: no scheduler _class_name")


@contextlib.contextmanager
def _quiet_loading():
    """diffusers/transformers print progress bars and notices on load; keep the CLI output ours."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    saved = dlog.get_verbosity(), tlog.get_verbosity()
    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        tlog.enable_progress_bar()
        dlog.set_verbosity(saved[0])
        tlog.set_verbosity(saved[1])


def describe_tokenization(tokenizer, prompt: str) -> tuple[list[int], bool]:
    """Token ids (padded to the model length) and whether the prompt was truncated."""
    full = tokenizer(prompt, truncation=False)["input_ids"]
    ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True)["input_ids"]
    return ids, len(full) > tokenizer.model_max_length

