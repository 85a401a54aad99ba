"""The shape of the JSON sdexport reads: model configs and the export manifest, checked before use.

A model directory's ``model_index.json`` and component configs, and an export's ``manifest.json``,
may be malformed in any way (not UTF-8, not an object, a missing key, a string where a number
belongs, a size of 10^9). Each is checked here once, when it is read, so the error is one line
naming the file and the field (exit 3 for a model, 5 for an export's artifacts) instead of a
traceback or an attempt to allocate terabytes:

- ``read_json_object``: a regular file of bounded size, UTF-8, strict JSON (no NaN/Infinity), an object;
- ``check_model_configs``: the fields sdexport and diffusers size things from, by type and bound
  (``CONFIG_FIELDS``); counts that make modules (layers, blocks) are bounded so that the next check
  stays fast;
- ``check_loadable``: each torch module is built on PyTorch's meta device from its config (no memory),
  which catches every config diffusers/transformers cannot build, and its parameter count must fit
  the memory this machine has;
- ``check_manifest``: the keys and types every consumer of a manifest reads.
"""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path
from typing import Any

from .errors import IntegrityError, ModelError

MAX_JSON_BYTES = 64 * 2**20

# field: (kind, low, high). Kinds: int, float, str, int+ (an int or a list of ints), size (an int or
# [h, w]), ints (a list of ints), strs (a list of strings); a trailing "?" allows null. For lists, the
# length is bounded by LIST_LENGTH[field] where given.
CONFIG_FIELDS: dict[str, dict[str, tuple[str, float, float]]] = {
    "unet": {
        "in_channels": ("int", 1, 64), "out_channels": ("int", 1, 64), "sample_size": ("size", 1, 256),
        "block_out_channels": ("ints", 1, 65536), "down_block_types": ("strs", 0, 0),
        "up_block_types": ("strs", 0, 0), "layers_per_block": ("int+", 1, 64),
        "transformer_layers_per_block": ("int+", 1, 64), "cross_attention_dim": ("int+", 1, 65536),
        "attention_head_dim": ("int+", 1, 65536), "num_attention_heads": ("int+?", 1, 65536),
        "norm_num_groups": ("int?", 1, 65536), "time_cond_proj_dim": ("int?", 1, 65536),
        "addition_embed_type": ("str?", 0, 0), "class_embed_type": ("str?", 0, 0),
    },
    "vae": {
        "in_channels": ("int", 1, 16), "out_channels": ("int", 1, 16), "latent_channels": ("int", 1, 64),
        "block_out_channels": ("ints", 1, 65536), "down_block_types": ("strs", 0, 0),
        "up_block_types": ("strs", 0, 0), "layers_per_block": ("int", 1, 64), "norm_num_groups": ("int", 1, 65536),
        "sample_size": ("size", 1, 8192), "scaling_factor": ("float", 1e-6, 1e3),
    },
    "text_encoder": {
        "vocab_size": ("int", 2, 2**20), "hidden_size": ("int", 1, 65536), "intermediate_size": ("int", 1, 2**18),
        "num_hidden_layers": ("int", 1, 256), "num_attention_heads": ("int", 1, 4096),
        "max_position_embeddings": ("int", 1, 8192), "projection_dim": ("int", 1, 65536),
    },
    "scheduler": {"_class_name": ("str", 0, 0), "num_train_timesteps": ("int", 1, 100_000)},
    "model_index": {"_class_name": ("str", 0, 0)},
}
LIST_LENGTH = {"block_out_channels": 6, "down_block_types": 6, "up_block_types": 6}
REQUIRED = {"scheduler": ("_class_name",), "model_index": ("_class_name",)}


def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def read_json_object(path: str | os.PathLike, error: type = ModelError, what: str = "") -> dict[str, Any]:
    """A JSON object from a regular file of at most MAX_JSON_BYTES, strict (no NaN/Infinity), UTF-8."""
    path = Path(path)
    label = f"{path}{f' ({what})' if what else ''}"
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise error(f"{label}: missing") from None
    except OSError as exc:
        raise error(f"{label}: cannot be read ({exc.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{label}: not a regular file")
    if st.st_size > MAX_JSON_BYTES:
        raise error(f"{label}: {st.st_size:,} bytes; a JSON file sdexport reads is at most {MAX_JSON_BYTES:,}")
    try:
        raw = path.read_bytes()
        data = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except OSError as exc:
        raise error(f"{label}: cannot be read ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise error(f"{label}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise error(f"{label}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except (ValueError, RecursionError) as exc:
        raise error(f"{label}: not valid JSON ({str(exc)[:80]})") from None
    if not isinstance(data, dict):
        raise error(f"{label}: expected a JSON object, found {_json_type(data)}")
    return data


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_field(where: str, name: str, value: Any, kind: str, lo: float, hi: float) -> str | None:
    """The problem with one field's value, or None."""
    optional = kind.endswith("?")
    kind = kind.rstrip("?")
    if value is None:
        return None if optional else "is null"

    def bounded_int(v: Any) -> str | None:
        if not _is_int(v):
            return f"{v!r} is not a whole number"
        if not lo <= v <= hi:
            return f"{v} is outside [{lo:g}, {hi:g}]"
        return None

    if kind == "int":
        return bounded_int(value)
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return f"{value!r} is not a finite number"
        return None if lo <= value <= hi else f"{value} is outside [{lo:g}, {hi:g}]"
    if kind == "str":
        return None if isinstance(value, str) else f"{value!r} is not a string"
    if kind in ("int+", "size", "ints"):
        if kind != "ints" and _is_int(value):
            return bounded_int(value)
        if not isinstance(value, list) or not value:
            return f"{value!r} is not {'a list of whole numbers' if kind == 'ints' else 'a whole number or a list of them'}"
        if kind == "size" and len(value) != 2:
            return f"{value!r} is not a size (a number or [height, width])"
        if len(value) > LIST_LENGTH.get(name, 64):
            return f"has {len(value)} entries; at most {LIST_LENGTH.get(name, 64)}"
        for v in value:
            problem = bounded_int(v)
            if problem:
                return problem
        return None
    if kind == "strs":
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            return f"{value!r} is not a list of names"
        if len(value) > LIST_LENGTH.get(name, 64):
            return f"has {len(value)} entries; at most {LIST_LENGTH.get(name, 64)}"
        return None
    raise AssertionError(kind)


def check_config(kind: str, config: dict[str, Any], where: str, error: type = ModelError) -> None:
    """Types and bounds of the fields of one config (``kind`` of CONFIG_FIELDS)."""
    if not isinstance(config, dict):
        raise error(f"{where}: expected a JSON object, found {_json_type(config)}")
    for name in REQUIRED.get(kind, ()):
        if name not in config:
            raise error(f"{where}: no '{name}'")
    for name, (field_kind, lo, hi) in CONFIG_FIELDS[kind].items():
        if name in config:
            problem = _check_field(where, name, config[name], field_kind, lo, hi)
            if problem:
                raise error(f"{where}: '{name}' {problem}")


def config_kind(part: str) -> str | None:
    """The CONFIG_FIELDS table for a diffusers folder (text_encoder_2 is a text encoder too)."""
    kind = "text_encoder" if part.startswith("text_encoder") else part
    return kind if kind in CONFIG_FIELDS else None


def check_model_configs(root: Path, configs: dict[str, dict[str, Any]], error: type = ModelError,
                        where: dict[str, str] | None = None) -> None:
    """Every config of a model: ``configs`` maps a diffusers folder (or "scheduler") to its parsed JSON."""
    for part, config in configs.items():
        kind = config_kind(part)
        if kind:
            check_config(kind, config, (where or {}).get(part, f"{root}/{part}"), error)


def check_regular_files(root: Path, parts: tuple[str, ...], error: type = ModelError) -> None:
    """Every file under the model's part directories is a regular file (after links): diffusers and
    transformers would block forever on a FIFO or read a link to /dev/zero without end."""
    from .manifest import check_regular

    for part in parts:
        for dirpath, _, filenames in os.walk(root / part):
            for name in filenames:
                check_regular(Path(dirpath) / name, error)


# --- building on the meta device --------------------------------------------------------------------
def parameter_count(cls, config: dict[str, Any]) -> int:
    """Parameters of the torch module class ``cls`` (a diffusers model or a transformers text encoder)
    built from ``config`` on PyTorch's meta device: no memory is allocated, whatever sizes it declares."""
    import warnings

    import torch

    from .models import _quiet_loading

    with torch.device("meta"), warnings.catch_warnings(), _quiet_loading():
        warnings.simplefilter("ignore")
        if hasattr(cls, "from_config"):  # diffusers
            module = cls.from_config(dict(config))
        else:  # transformers
            module = cls(cls.config_class.from_dict(dict(config)))
    return sum(p.numel() for p in module.parameters())


def check_loadable(info, parts: tuple[str, ...] | None = None, bytes_per_param: int = 4) -> dict[str, int]:
    """Refuse, before any allocation, a model whose configs diffusers/transformers cannot build or whose
    weights would not fit this machine's memory together; returns each part's parameter count."""
    from .limits import check_memory

    parts = tuple(parts if parts is not None else info.configs)
    counts = {}
    for part in parts:
        try:
            counts[part] = parameter_count(info.torch_class(part), info.configs[part])
        except Exception as exc:  # diffusers/transformers/torch raise many types for a config they cannot build
            message = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
            raise ModelError(f"{info.root / part}/config.json: cannot build the {part} from it ({message})") from None
    total = sum(counts.values())
    check_memory(f"{info.root}: {total:,} parameters ({', '.join(parts)}) in FP32, which", total * bytes_per_param,
                 "as their config.json files declare them", ModelError)
    return counts


# --- the export manifest --------------------------------------------------------------------------------
SHA256_HEX = 64


def check_manifest(data: dict[str, Any], path: Path) -> None:
    """What Manifest.check_shape and ExportDir.open leave to check (exit 5): every digest is a sha256 hex
    digest, every component names its dtype, and the model configs recorded at export time (from which the
    runtime rebuilds the specs) have the types and bounds of CONFIG_FIELDS."""
    def bad(what: str) -> IntegrityError:
        return IntegrityError(f"{path}: {what}; not a manifest sdexport wrote (re-export to repair it)")

    if not isinstance(data, dict):
        raise bad("not a JSON object")
    for section, value in data.items():
        if not isinstance(value, dict):
            continue
        for name, entry in value.items():
            if isinstance(entry, dict) and "file" in entry:
                for extra in [entry] + [e for e in entry.get("external_data", []) + entry.get("files", [])
                                        if isinstance(e, dict)]:
                    digest = extra.get("sha256")
                    if not isinstance(digest, str) or len(digest) != SHA256_HEX or \
                            any(c not in "0123456789abcdef" for c in digest):
                        raise bad(f"{section}.{name}: {extra.get('file')!r} has no sha256 hex digest")
    for name, entry in data.get("components", {}).items():
        precision = entry.get("precision")
        if not isinstance(precision, dict) or not isinstance(precision.get("dtype"), str):
            raise bad(f"components.{name}.precision.dtype is missing")
    model = data.get("model")
    configs = model.get("configs") if isinstance(model, dict) else None
    if isinstance(configs, dict):
        for part, config in configs.items():
            if config_kind(part):
                check_config(config_kind(part), config, f"{path}: model.configs.{part}", IntegrityError)
