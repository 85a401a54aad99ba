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

REQUIRED_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SUPPORTED_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline",
                       "StableDiffusionInpaintPipeline")
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

        cached = cache_dir() / "presets" / f"{model}-{__version__}"
        if not (cached / "model_index.json").is_file():
            write_preset(str(model), cached, progress)
        return ModelInfo.open(cached, preset=str(model))
    raise ModelError(f"{model}: no such directory, and not a preset name (presets: {', '.join(PRESETS)})")


def _read_config(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelError(f"{path}: missing; not a diffusers model directory") from None
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None


@dataclasses.dataclass
class ModelInfo:
    """What sdexport reads from a diffusers Stable Diffusion directory."""

    root: Path
    pipeline_class: str
    unet_config: dict[str, Any]
    vae_config: dict[str, Any]
    text_encoder_config: dict[str, Any]
    tokenizer_max_length: int
    scheduler_config: dict[str, Any]
    preset: str | None = None

    @classmethod
    def open(cls, root: str | os.PathLike, preset: str | None = None) -> "ModelInfo":
        root = Path(root)
        if not root.is_dir():
            raise ModelError(f"{root}: not a directory")
        index_path = root / "model_index.json"
        if not index_path.is_file():
            raise ModelError(f"{root}: no model_index.json; not a diffusers pipeline directory")
        index = _read_config(index_path)
        pipeline_class = index.get("_class_name", "")
        if "text_encoder_2" in index or "XL" in pipeline_class:
            raise ModelError(
                f"{root}: {pipeline_class or 'this pipeline'} is an SDXL-style pipeline (it has a second text "
                "encoder, text_encoder_2, and pooled text embeddings); sdexport supports SD 1.x/2.x pipelines")
        if pipeline_class not in SUPPORTED_PIPELINES:
            raise ModelError(
                f"{root}: pipeline class '{pipeline_class}' is not supported "
                f"(supported: {', '.join(SUPPORTED_PIPELINES)})")
        missing = [part for part in REQUIRED_PARTS if not (root / part).is_dir()]
        if missing:
            raise ModelError(f"{root}: missing {', '.join(missing)}/; not a complete diffusers SD directory")
        tokenizer_config = root / "tokenizer" / "tokenizer_config.json"
        max_length = _read_config(tokenizer_config).get("model_max_length") if tokenizer_config.is_file() else None
        text_cfg = _read_config(root / "text_encoder" / "config.json")
        if not isinstance(max_length, int) or max_length > text_cfg.get("max_position_embeddings", 77):
            max_length = text_cfg.get("max_position_embeddings", 77)
        info = cls(
            root=root.resolve(), pipeline_class=pipeline_class,
            unet_config=_read_config(root / "unet" / "config.json"),
            vae_config=_read_config(root / "vae" / "config.json"),
            text_encoder_config=text_cfg, tokenizer_max_length=max_length,
            scheduler_config=_read_config(root / "scheduler" / "scheduler_config.json"),
            preset=preset)
        info.check()
        return info

    def check(self) -> None:
        if self.unet_config.get("addition_embed_type"):
            raise ModelError(f"{self.root}: UNet uses addition_embed_type="
                             f"'{self.unet_config['addition_embed_type']}' (SDXL-style); not supported")
        if self.cross_attention_dim != self.text_hidden_size:
            raise ModelError(f"{self.root}: UNet cross_attention_dim {self.cross_attention_dim} differs from the "
                             f"text encoder hidden size {self.text_hidden_size}")
        if self.vae_config.get("latent_channels", 4) != self.latent_channels:
            raise ModelError(f"{self.root}: VAE latent_channels {self.vae_config.get('latent_channels')} "
                             f"differs from UNet in_channels {self.latent_channels}")

    # --- derived facts -------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.preset or self.root.name

    @property
    def latent_channels(self) -> int:
        return int(self.unet_config.get("in_channels", 4))

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
        files = [p for part in ("unet", "vae", "text_encoder") for p in (self.root / part).rglob("*")
                 if p.suffix in WEIGHT_SUFFIXES]
        return sha256_files(files, self.root)

    # --- loading -------------------------------------------------------------------
    def load_tokenizer(self):
        from transformers import CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(self.root, subfolder="tokenizer")
        tokenizer.model_max_length = self.tokenizer_max_length
        return tokenizer

    def load_torch(self, part: str, dtype=None, device: str = "cpu", **kwargs):
        """Load one torch module (``unet``, ``vae`` or ``text_encoder``) in eval mode."""
        import torch
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel

        cls = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel}[part]
        dtype = dtype or torch.float32
        with _quiet_loading():
            try:
                module = cls.from_pretrained(self.root, subfolder=part, torch_dtype=dtype, **kwargs)
            except (OSError, ValueError, EnvironmentError) as exc:
                raise ModelError(f"{self.root / part}: cannot load weights ({str(exc).splitlines()[0]})") from None
        return module.to(device).eval().requires_grad_(False)


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

