"""Open a Stable Diffusion model in diffusers layout, or write a built-in preset.

Everything sdexport needs to know about a model is read from its directory
(``ModelInfo``): latent channels, VAE scale factor, cross-attention width,
tokenizer length and sample size come from the configs, never from constants,
so a real checkpoint that sets them differently exports correctly.

Presets are written as ordinary diffusers directories (``StableDiffusionPipeline
.save_pretrained``), so tests and benchmarks go through the same loading code as
real checkpoints. Their tokenizer is the real CLIP BPE vocabulary
(``bpe_simple_vocab_16e6.txt.gz``, shipped in ``sdexport/data``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import json
import os
import shutil
from functools import cached_property
from pathlib import Path
from typing import Any

from .errors import ModelError
from .manifest import _temp_name, atomic_dir, sha256_files

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".ckpt")

# SD 1.5's scheduler configuration (PNDM, as shipped with the checkpoint).
SD15_SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1, clip_sample=False,
    prediction_type="epsilon",
)


# SDXL base 1.0's scheduler configuration (Euler, leading spacing, as shipped with the checkpoint).
SDXL_SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    interpolation_type="linear", prediction_type="epsilon", sample_max_value=1.0, set_alpha_to_one=False,
    skip_prk_steps=True, steps_offset=1, timestep_spacing="leading", use_karras_sigmas=False, clip_sample=False,
)


@dataclasses.dataclass(frozen=True)
class Preset:
    """A model with deterministic random weights, described by diffusers configs. The family says which
    reference pipeline class writes it, each text encoder's class and each tokenizer's pad token."""

    name: str
    description: str
    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoders: dict[str, dict[str, Any]]  # diffusers folder -> CLIPTextConfig
    scheduler: dict[str, Any]
    family: str = "sd"
    scheduler_class: str = "PNDMScheduler"
    seed: int = 0

    @property
    def text_encoder(self) -> dict[str, Any]:
        return self.text_encoders["text_encoder"]


# The CLIP ViT-L/14 text encoder of SD 1.5 and of SDXL's first encoder.
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
              projection_dim=768, bos_token_id=0, eos_token_id=2, pad_token_id=1)


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
            text_encoders={"text_encoder": dict(
                vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
                projection_dim=32, bos_token_id=0, eos_token_id=2, pad_token_id=1,
            )},
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
            text_encoders={"text_encoder": CLIP_L},
            scheduler=SD15_SCHEDULER,
        ),
        Preset(
            name="sdxl-tiny",
            description="tiny SDXL-shaped model (random weights) for CPU tests: two text encoders, pooled and "
                        "size conditioning, 3-level UNet with linear projections and 2-layer transformer blocks",
            family="sdxl", scheduler_class="EulerDiscreteScheduler",
            unet=dict(
                sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                block_out_channels=(32, 64, 64),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 8), use_linear_projection=True,
                cross_attention_dim=80, addition_embed_type="text_time", addition_time_embed_dim=8,
                projection_class_embeddings_input_dim=40 + 6 * 8, norm_num_groups=8,
            ),
            vae=dict(
                in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                block_out_channels=(16, 32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=8, sample_size=128,
                scaling_factor=0.13025, force_upcast=True,
            ),
            text_encoders={
                "text_encoder": dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                     num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
                                     projection_dim=32, bos_token_id=0, eos_token_id=2, pad_token_id=1),
                "text_encoder_2": dict(vocab_size=49408, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                       num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu",
                                       projection_dim=40, bos_token_id=0, eos_token_id=2, pad_token_id=1),
            },
            scheduler=SDXL_SCHEDULER,
        ),
        Preset(
            name="sdxl-random",
            description="the exact SDXL base 1.0 architecture with RANDOM weights (for timing; images are noise)",
            family="sdxl", scheduler_class="EulerDiscreteScheduler",
            unet=dict(
                sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                block_out_channels=(320, 640, 1280),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
                cross_attention_dim=2048, addition_embed_type="text_time", addition_embed_type_num_heads=64,
                addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, norm_num_groups=32,
                flip_sin_to_cos=True, freq_shift=0, downsample_padding=1, act_fn="silu", norm_eps=1e-5,
            ),
            vae=dict(
                in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, sample_size=1024,
                scaling_factor=0.13025, force_upcast=True, act_fn="silu",
            ),
            text_encoders={
                "text_encoder": dict(CLIP_L, layer_norm_eps=1e-5),
                "text_encoder_2": dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120,
                                       num_hidden_layers=32, num_attention_heads=20, max_position_embeddings=77,
                                       hidden_act="gelu", projection_dim=1280, bos_token_id=0, eos_token_id=2,
                                       pad_token_id=1, layer_norm_eps=1e-5),
            },
            scheduler=SDXL_SCHEDULER,
        ),
    )
}

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"


def clip_bpe_path() -> Path:
    """The CLIP BPE merges file: ``$SDEXPORT_CLIP_BPE``, else the copy sdexport ships as package data
    (``sdexport/data``, MIT, from open_clip_torch's wheel), so no second install step is needed."""
    env = os.environ.get("SDEXPORT_CLIP_BPE")
    if env:
        if not Path(env).is_file():
            raise ModelError(f"SDEXPORT_CLIP_BPE={env}: no such file")
        return Path(env)
    shipped = Path(__file__).resolve().parent / "data" / BPE_FILE
    if not shipped.is_file():
        raise ModelError(f"the CLIP BPE vocabulary {shipped} is missing from this installation; reinstall "
                         "sdexport, or set SDEXPORT_CLIP_BPE to a copy of the file")
    return shipped


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


def vocab_and_merges_from_tokenizer_json(folder: Path) -> dict[str, str]:
    """``vocab.json`` and ``merges.txt`` (name -> text) for a tokenizer folder that transformers 5 wrote with
    ``tokenizer.json`` alone: transformers 4, which Optimum's environment pins, reads only the pair. The same
    vocabulary and merges, so both load the same tokenizer; empty where the pair is there or cannot be derived
    (not a BPE, or tokens added beyond the vocabulary, which the pair cannot hold)."""
    if (folder / "vocab.json").exists() or (folder / "merges.txt").exists() or not (folder / "tokenizer.json").is_file():
        return {}
    try:
        data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
        model = data["model"]
        vocab, merges = model["vocab"], model["merges"]
        added = {a["content"]: a["id"] for a in data.get("added_tokens", [])}
    except (ValueError, KeyError, TypeError):
        return {}
    if model.get("type") != "BPE" or not isinstance(vocab, dict) or not isinstance(merges, list) or \
            any(vocab.get(token) != token_id for token, token_id in added.items()):
        return {}
    if any(isinstance(m, list) and (len(m) != 2 or any(" " in part for part in m)) for m in merges):
        return {}  # merges.txt separates a merge's parts by a space
    lines = [" ".join(m) if isinstance(m, list) else str(m) for m in merges]
    return {"vocab.json": json.dumps(vocab, ensure_ascii=False),
            "merges.txt": "#version: 0.2\n" + "\n".join(lines) + "\n"}


def build_tokenizer(max_length: int = 77, pad_token: str = "<|endoftext|>"):
    """A CLIPTokenizer over the real CLIP BPE: SD 1.5's (and SDXL's first) pads with <|endoftext|>,
    SDXL's ``tokenizer_2`` with "!" (id 0)."""
    import tempfile

    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_clip_tokenizer_files(Path(tmp))
        # from_pretrained reads vocab.json + merges.txt the same way in transformers 4.x and 5.x.
        return CLIPTokenizer.from_pretrained(tmp, pad_token=pad_token, model_max_length=max_length)


PRESET_MARK = "SDEXPORT_PRESET.txt"


def is_preset_dir(path: Path, name: str) -> bool:
    """Whether ``path`` is a directory that ``write_preset(name, ...)`` wrote."""
    try:
        return (path / "model_index.json").is_file() and \
            (path / PRESET_MARK).read_text().startswith(f"sdexport preset '{name}'")
    except (OSError, UnicodeDecodeError):
        return False


def write_preset(name: str, out: str | os.PathLike, progress=None, option: str = "-o") -> Path:
    """Write preset ``name`` as a diffusers directory at ``out`` (atomically), with its family's reference
    pipeline class: what ``from_pretrained`` of that class loads. ``out`` must be new, empty, or already this
    preset: anything else it holds would be replaced, so it is refused first."""
    from .paths import check_new_or_empty_dir, check_output

    if name not in PRESETS:
        raise ModelError(f"unknown preset '{name}' (presets: {', '.join(PRESETS)})")
    preset = PRESETS[name]
    out = Path(out)
    check_output(option, out, kind="dir")
    check_new_or_empty_dir(option, out, f"the '{name}' preset", ok=is_preset_dir(out, name))
    import diffusers
    import torch
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from .families import by_name

    family = by_name(preset.family)
    _check_preset_fits(name, preset, family, out)
    say = progress or (lambda msg: None)
    torch.manual_seed(preset.seed)  # one seed, modules built in a fixed order: the same weights everywhere
    say(f"building {name}: unet")
    parts: dict[str, Any] = {"unet": UNet2DConditionModel(**preset.unet)}
    say(f"building {name}: vae")
    parts["vae"] = AutoencoderKL(**preset.vae)
    for part, config in preset.text_encoders.items():
        say(f"building {name}: {part.replace('_', ' ')}")
        cls = getattr(transformers, family.preset_text_classes[part])
        parts[part] = cls(transformers.CLIPTextConfig(**config))
        tokenizer = part.replace("text_encoder", "tokenizer")
        parts[tokenizer] = build_tokenizer(config["max_position_embeddings"], family.preset_pad_tokens[tokenizer])
    parts["scheduler"] = getattr(diffusers, preset.scheduler_class).from_config(preset.scheduler)
    pipe = getattr(diffusers, family.reference_pipeline)(**parts, **family.preset_pipeline_kwargs)
    say(f"saving {name} to {out}")
    # Over this same preset (checked above): written beside it, then swapped in, so it is never half there.
    target = _temp_name(out) if out.is_dir() and any(out.iterdir()) else out
    with atomic_dir(target) as tmp:
        with _quiet_loading():  # transformers' "Writing model shards" bars; say() is the preset's progress
            pipe.save_pretrained(tmp, safe_serialization=True)
        # Keep keys a scheduler ignores but others read (SD 1.5's file has clip_sample=false).
        sched_path = tmp / "scheduler" / "scheduler_config.json"
        sched_path.write_text(json.dumps({**json.loads(sched_path.read_text()), **preset.scheduler}, indent=2))
        # transformers 5 saves only tokenizer.json; 4.x (and tools pinned to it) need vocab.json + merges.txt.
        for part in preset.text_encoders:
            write_clip_tokenizer_files(tmp / part.replace("text_encoder", "tokenizer"))
        (tmp / PRESET_MARK).write_text(
            f"sdexport preset '{name}': {preset.description}\nseed {preset.seed}\n")
    if target != out:
        old = _temp_name(out)
        os.replace(out, old)
        os.replace(target, out)
        shutil.rmtree(old, ignore_errors=True)
    return out


def _check_preset_fits(name: str, preset: "Preset", family, out: Path) -> None:
    """Before building: the preset's FP32 weights fit this machine's memory (the modules hold them all) and
    the disk that ``out`` is on (saved as FP32 safetensors). Counted on PyTorch's meta device (no memory).
    Without it, a preset too large for its disk was built for minutes and then failed writing; written into
    the cache by ``export``, that failure named the export's -o, not the cache's disk that was full."""
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from .limits import check_disk, check_memory
    from .schema import parameter_count

    params = parameter_count(UNet2DConditionModel, preset.unet) + parameter_count(AutoencoderKL, preset.vae)
    params += sum(parameter_count(getattr(transformers, family.preset_text_classes[part]), config)
                  for part, config in preset.text_encoders.items())
    what = f"the '{name}' preset ({params:,} parameters in FP32)"
    check_memory(f"building {what}", 4 * params, error=ModelError)
    check_disk(out, 4 * params, f"writing {what}")


def cache_dir() -> Path:
    return Path(os.environ.get("SDEXPORT_CACHE", Path.home() / ".cache" / "sdexport"))


def preset_cache_path(name: str) -> Path:
    from . import __version__

    return cache_dir() / "presets" / f"{name}-{__version__}"


def _open_path(model: str | os.PathLike) -> "ModelInfo":
    """The directory ``model`` names. A path wins over a preset of the same name (it is what the user named),
    but one that hides a preset and is no diffusers model (e.g. ``export tiny -o tiny`` run before) says so."""
    path = Path(model)
    try:
        return ModelInfo.open(path)
    except ModelError as exc:
        if str(model) not in PRESETS:
            raise
        from .paths import is_export_dir

        what = ("an sdexport export, not a diffusers model" if is_export_dir(path)
                else f"not a diffusers model: {str(exc).removeprefix(f'{path}: ')}")
        raise ModelError(f"{model}: is the {'directory' if path.is_dir() else 'file'} ./{model} here ({what}), "
                         f"not the built-in preset {model} (a path wins over a preset name); for the preset, run "
                         f"from another directory, or write it with 'sdexport preset {model} -o DIR' and give "
                         "DIR") from None


def model_path(model: str | os.PathLike) -> Path | None:
    """Where ``resolve_model`` finds ``model`` (a directory, or a preset's cache), without writing anything.
    A path named like a preset that is no model is resolve_model's error here (not "-o would overwrite it")."""
    if Path(model).exists():
        if str(model) in PRESETS:
            _open_path(model)
        return Path(model)
    return preset_cache_path(str(model)) if str(model) in PRESETS else None


def resolve_model(model: str | os.PathLike, progress=None, preset_only: bool = False) -> "ModelInfo":
    """A directory path, or a preset name (written once into the cache, then reused). ``preset_only``: the
    preset even where a path of its name exists (an export's recorded preset is no user's directory)."""
    path = Path(model)
    if path.exists() and not preset_only:
        return _open_path(model)
    if str(model) in PRESETS:
        from .manifest import ExportLock

        cached = preset_cache_path(str(model))
        if not (cached / "model_index.json").is_file():
            cached.parent.mkdir(parents=True, exist_ok=True)
            # One writer per preset: concurrent commands wait for the first to write it, then reuse it.
            with ExportLock(cached.parent, True, f"preset {model}", progress):
                if not (cached / "model_index.json").is_file():
                    write_preset(str(model), cached, progress, option="the preset cache")
        return ModelInfo.open(cached, preset=str(model))
    raise ModelError(f"{model}: no such directory, and not a preset name (presets: {', '.join(PRESETS)})")


def _export_not_model(root: Path, no_index: bool) -> str | None:
    """Where ``root`` is an sdexport export given for a diffusers model directory: the line that says so and
    names the model it was exported from (its manifest records it). None for anything else, e.g. a diffusers
    directory that happens to hold a manifest.json of its own."""
    try:
        data = json.loads((root / "manifest.json").read_text())
    except (OSError, ValueError):  # none, or not JSON
        data = None
    model = data.get("model") if isinstance(data, dict) and "manifest_version" in data else None
    if not isinstance(model, dict):
        if not (no_index and (root / "manifest.json").is_file()):
            return None
        model = {}  # a damaged export: no name to give
    recorded = f": {model['path']}" if model.get("path") else ""
    source = (f"the preset it was exported from: {model['preset']}" if model.get("preset")
              else f"the diffusers model directory it was exported from{recorded}")
    return f"{root}: an sdexport export, not a diffusers model directory; give {source}"


def _read_config(path: Path, what: str = "") -> dict[str, Any]:
    """A JSON object from a model directory (schema.read_json_object); anything else is one ModelError."""
    from .schema import read_json_object

    return read_json_object(path, ModelError, what)


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
        no_index = not index_path.exists() and not index_path.is_symlink()
        refusal = _export_not_model(root, no_index)  # an export holds a model_index.json too (Optimum's layout)
        if refusal:
            raise ModelError(refusal)
        if no_index:
            raise ModelError(f"{root}: no model_index.json; not a diffusers pipeline directory")
        from .schema import check_config, check_regular_files

        index = _read_config(index_path, "the pipeline index")
        check_config("model_index", index, str(index_path))
        family = family_for(index, root)
        parts = family.parts_of(index)
        missing = [part for part in parts if not (root / part).is_dir()]
        if missing:
            raise ModelError(f"{root}: missing {', '.join(p + '/' for p in missing)}; not a complete "
                             f"{family.description} directory")
        check_regular_files(root, tuple(parts))
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
        return sha256_files(files, self.root, error=ModelError)

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

        from .schema import check_loadable

        cls = self.torch_class(part)
        check_loadable(self, (part,))  # before any allocation: a config it cannot build, or too big for here
        dtype = dtype or torch.float32
        from safetensors import SafetensorError

        with _quiet_loading():
            try:
                module, loading = cls.from_pretrained(self.root, subfolder=part, torch_dtype=dtype,
                                                      output_loading_info=True, **kwargs)
            # transformers lets safetensors' own error through (a garbled header); diffusers wraps it in OSError
            except (OSError, ValueError, EnvironmentError, TypeError, KeyError, RuntimeError, SafetensorError) as exc:
                message = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
                raise ModelError(f"{self.root / part}: cannot load weights ({message})") from None
        # before .to(): weights the file lacks are left random (transformers) or on the meta device (diffusers)
        _check_loading(self.root / part, module, loading)
        return module.to(device).eval().requires_grad_(False)


def _check_loading(folder: Path, module, loading: dict[str, Any]) -> None:
    """Refuse a load that left weights the model needs uninitialised or that the loader could not copy
    (``output_loading_info``): transformers fills missing weights with random values and diffusers leaves them
    on the meta device, so another component's file or a partial checkpoint would otherwise export as a model
    with random weights. Keys the file has and the model does not (``unexpected_keys``) alone are accepted:
    both libraries already drop the ones they know to be harmless (e.g. old ``position_ids`` buffers)."""
    missing = sorted(loading.get("missing_keys") or ())
    mismatched = [k[0] if isinstance(k, (tuple, list)) else k for k in loading.get("mismatched_keys") or ()]
    errors = [str(e).splitlines()[0][:160] for e in loading.get("error_msgs") or () if str(e)]
    files = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)) \
        if folder.is_dir() else []
    source = ", ".join(files) or "the weights"

    def some(keys) -> str:
        return ", ".join(list(keys)[:3]) + (", ..." if len(keys) > 3 else "")

    if missing:
        total = max(len(module.state_dict()), len(missing))
        extra = len(loading.get("unexpected_keys") or ())
        extra = f", and has {extra} the model does not" if extra else ""
        raise ModelError(f"{folder}: {source} lacks {len(missing)} of the model's {total} weights "
                         f"({some(missing)}){extra}: is it this component's file?")
    if mismatched:
        raise ModelError(f"{folder}: {source} has {len(mismatched)} weights of the wrong shape ({some(mismatched)}): "
                         "is it this component's file?")
    if errors:
        raise ModelError(f"{folder}: cannot load weights ({errors[0]})")


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
def check_configs(info: "ModelInfo") -> None:
    """Every config's fields by type and bound (schema.CONFIG_FIELDS: one table for models and manifests)."""
    from .schema import check_model_configs

    configs = {part: config for part, config in info.configs.items()}
    configs["scheduler"] = info.scheduler_config
    check_model_configs(info.root, configs, where={
        part: str(info.root / part / ("scheduler_config.json" if part == "scheduler" else "config.json"))
        for part in configs})


@contextlib.contextmanager
def _quiet_loading():
    """diffusers/transformers print progress bars and notices on load; keep the CLI output ours."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    # restored as they were, not switched back on: an inner use (empty_module inside a LoRA load) must not
    # turn the bars on again for the rest of the outer one (transformers' "Loading weights" bar leaked so)
    saved = dlog.get_verbosity(), tlog.get_verbosity()
    bars = dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled()
    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        for enabled, module in zip(bars, (dlog, tlog)):
            if enabled:
                module.enable_progress_bar()
        dlog.set_verbosity(saved[0])
        tlog.set_verbosity(saved[1])


def describe_tokenization(tokenizer, prompt: str) -> tuple[list[int], bool]:
    """Token ids (padded to the model length) and whether the prompt was truncated."""
    full = tokenizer(prompt, truncation=False)["input_ids"]
    ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True)["input_ids"]
    return ids, len(full) > tokenizer.model_max_length

