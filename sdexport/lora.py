"""LoRA: fused at export, or switched on exported engines without re-export or rebuild.

Loading and fusing is diffusers' own (its LoRA loader mixin for the family: diffusers/PEFT files and the
kohya/A1111 format, for the UNet and the text encoders; PEFT does the fusing), so a LoRA means here what it
means in ``pipe.load_lora_weights(...); pipe.set_adapters(names, scales); pipe.fuse_lora(...)``.

Switching without re-export: at export, ``build_weight_map`` records, for every torch parameter of the
components a LoRA can touch, the ONNX initializer(s) that hold its values (``<component>/weights_map.json``,
hashed in the manifest). The TorchScript exporter renames what it folds (a Linear weight becomes a transposed
``onnx::MatMul_N``, a GroupNorm weight an ``onnx::Mul_N`` of shape [C, 1, 1]) and deduplicates equal values,
so the map is built by matching values (as stored, transposed, any shape with the same bytes) rather than
names. To switch, ``fused_params`` fuses the LoRAs with diffusers into modules built from the configs with
no weights, whose LoRA-wrapped layers get the exported base weights: the result is each touched parameter's
new value, computed from the base every time (A -> B -> A gives A exactly, never a blend). A pipeline keeps
each file's PEFT layers (``LoraFactors``) after its first switch and adds their deltas to the base weights the
way PEFT's merge does (the same values, without reading the file again: on sd15-random, 1.1 s -> 0.36 s on
2 CPU cores). Engines turn them
into initializers through the map (``WeightMap.initializers``): ONNX Runtime supplies them at session
creation, TensorRT refits them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from .errors import IntegrityError, SdexportError, UsageError
from .limits import MAX_LORA_SCALE

if TYPE_CHECKING:
    from .models import ModelInfo

WEIGHTS_MAP = "weights_map.json"
WEIGHTS_MAP_FORMAT = 1
# Suffixes of the down-projection ("A") matrix of one LoRA layer, in the key formats diffusers' lora_state_dict
# returns (PEFT, diffusers' older attention-processor format, kohya converted to diffusers: a UNet's attention
# layers as `attn1.processor.to_q_lora.down.weight`, its others as `proj_in.lora.down.weight`). Not counted: a
# text encoder's `self_attn.to_k_lora.down.weight`, which diffusers 0.42 converts only where the file also has
# an `out_proj` layer (`convert_state_dict_to_peft`) and otherwise drops, as it does here.
_DOWN_SUFFIXES = (".lora_A.weight", ".lora.down.weight", ".lora_linear_layer.down.weight", ".lora_down.weight",
                  *(f".processor.to_{m}_lora.down.weight" for m in ("q", "k", "v", "out")))


@dataclasses.dataclass(frozen=True)
class LoraFile:
    path: Path
    scale: float
    sha256: str

    @property
    def name(self) -> str:
        return self.path.name

    def to_json(self) -> dict[str, Any]:
        return {"file": str(self.path), "sha256": self.sha256, "scale": self.scale}

    @classmethod
    def recorded(cls, record: dict[str, Any], what: str, why: str = "") -> "LoraFile":
        """A LoRA as recorded (``to_json``: an export's manifest, a served model's config), checked against its
        sha256: a file missing or changed since is exit 5 (``what``: whose LoRA; ``why``: who needs it)."""
        from .manifest import sha256_file

        path = Path(record["file"])
        if not path.is_file() or sha256_file(path) != record["sha256"]:
            raise IntegrityError(f"{path}: the LoRA {what} is {'changed' if path.is_file() else 'missing'} "
                                 f"(sha256 {record['sha256'][:12]}…){why}")
        return cls(path, float(record["scale"]), record["sha256"])


def parse_lora(text: str) -> tuple[Path, float]:
    """``FILE[:SCALE]`` -> (path, scale); a suffix that is not a number belongs to the path."""
    path, scale = text, 1.0
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            scale = float(tail)
            path = head
        except ValueError:
            pass
    if not math.isfinite(scale):
        raise UsageError(f"--lora {text}: scale {tail} is not a finite number")
    if abs(scale) > MAX_LORA_SCALE:
        raise UsageError(f"--lora {text}: scale {tail} is outside [-{MAX_LORA_SCALE:g}, {MAX_LORA_SCALE:g}] (LoRAs are "
                         "used at -2 to 2; far above, the fused weights overflow into NaN images)")
    return Path(path), scale


def open_loras(specs: list[str] | tuple[str, ...] | None) -> list[LoraFile]:
    """The ``--lora`` arguments as files with their sha256 (a missing one is exit 2, before any work)."""
    from .manifest import sha256_file

    out = []
    for spec in specs or ():
        if isinstance(spec, LoraFile):
            out.append(spec)
            continue
        path, scale = parse_lora(str(spec))
        if path.is_dir():  # a LoRA as the Hub ships it: a folder holding pytorch_lora_weights.safetensors
            inside = sorted(p.name for p in path.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())
            found = (f"; it holds {', '.join(str(path / n) for n in inside[:3])}{', ...' if len(inside) > 3 else ''}"
                     if inside else "; it holds no .safetensors or .bin file")
            raise UsageError(f"--lora {spec}: a directory, not a LoRA file: give the weights file in it{found}")
        if not path.is_file():
            head, _, tail = str(spec).rpartition(":")  # FILE:0,8 or FILE:x: a scale that is not a number
            hint = (f" ({head} is one: '{tail}' after it is not a number, the SCALE of FILE[:SCALE])"
                    if head and Path(head).is_file() else "")
            raise UsageError(f"--lora {spec}: no such file{hint}")
        try:  # safetensors (Rust) opens only UTF-8 paths: the file would be called "not a LoRA" (exit 5)
            str(path.resolve()).encode("utf-8")
        except UnicodeEncodeError:
            raise UsageError(f"--lora {ascii(str(path))[1:-1]}: the path is not valid UTF-8, which diffusers' "
                             "loader cannot open; rename the file") from None
        out.append(LoraFile(path.resolve(), scale, sha256_file(path)))
    return out


def describe(loras: list[LoraFile]) -> str:
    return ", ".join(f"{lora.name}:{lora.scale:g}" for lora in loras) or "none"


def engine_options(backend: str) -> dict[str, Any]:
    """What ``load_engines`` needs to open engines LoRAs are switched onto (infer, bench, serve): ONNX Runtime
    runs the portable export, whose initializers the weights map names (the CUDA variant's are rewritten)."""
    return {"variant": "plain"} if backend == "ort" else {}


# --- diffusers' loader ------------------------------------------------------------------------------

def loader_class(family):
    import diffusers.loaders

    return getattr(diffusers.loaders, family.lora_loader)


def lora_parts(info: "ModelInfo") -> list[str]:
    """The diffusers folders a LoRA of this family can change that this model has (unet, text_encoder, ...)."""
    return [p for p in loader_class(info.family)._lora_loadable_modules if p in info.configs]


def _quiet():
    """diffusers' and transformers' notices and progress bars kept out of the CLI output (one home: models.py)."""
    from .models import _quiet_loading

    return _quiet_loading()


def _host(family, modules: dict[str, Any]):
    """An object with the family's LoRA loader mixin over our torch modules: diffusers' ``load_lora_weights``,
    ``set_adapters`` and ``fuse_lora`` need only the modules as attributes (no pipeline, tokenizer or VAE)."""
    mixin = loader_class(family)

    class Host(mixin):
        hf_device_map = None

        def __init__(self):
            for name in mixin._lora_loadable_modules:  # a part not given is None: diffusers skips it
                setattr(self, name, modules.get(name))

        @property
        def components(self):
            return dict(modules)

    return Host()


def _wrapped_layers(module, adapter: str | None = None):
    """(path, PEFT LoRA layer) of every layer that carries ``adapter`` (any adapter if None)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for path, layer in module.named_modules():
        if isinstance(layer, BaseTunerLayer) and (adapter is None or adapter in getattr(layer, "lora_A", {})):
            yield path, layer


def _layers_per_part(lora: LoraFile, state_dict: dict[str, Any], parts: list[str], info: "ModelInfo") -> dict[str, int]:
    """{part: LoRA layers the file has for it}, checked before anything loads: a file with no LoRA layers, or
    with weights for a part this model does not have (another text encoder: a LoRA for another architecture),
    is refused instead of loading the part that happens to match. ``parts``: the model's LoRA parts."""
    by_part: dict[str, int] = {}
    for key in state_dict:
        if key.endswith(_DOWN_SUFFIXES):
            part = key.split(".", 1)[0]
            by_part[part] = by_part.get(part, 0) + 1
    if not by_part:
        raise IntegrityError(f"--lora {lora.path}: not a LoRA this model can load (no LoRA layers in it; keys such "
                             f"as {next(iter(state_dict), '?')})")
    for part in by_part:
        if part not in parts:
            raise IntegrityError(f"--lora {lora.path}: has weights for '{part}', which {info.family.describe(info)} "
                                 f"does not have ({', '.join(parts)}): a LoRA for another architecture?")
    return by_part


def _check_matches(lora: LoraFile, by_part: dict[str, int], host, loaded: list[str], adapter: str) -> None:
    """Every layer of the file found its layer in the model (other module names: another architecture).
    ``loaded``: the parts given as modules (the others are not checked)."""
    for part, want in by_part.items():
        if part not in loaded:
            continue
        got = sum(1 for _ in _wrapped_layers(getattr(host, part), adapter))
        if got < want:
            raise IntegrityError(f"--lora {lora.path}: {want - got} of its {want} {part} layers match no layer of "
                                 f"this model once diffusers' loader has read the file (a LoRA for another "
                                 "architecture, or key names diffusers does not convert)")


def fuse_loras(info: "ModelInfo", modules: dict[str, Any], loras: list[LoraFile],
               before_fuse: Callable[[dict[str, list[tuple[str, Any]]]], None] | None = None) -> dict[str, list[str]]:
    """Load ``loras`` into ``modules`` ({diffusers folder: torch module}) with diffusers' loader, weighted by
    their scales (``set_adapters``), fuse them (``fuse_lora``) and unload the adapters: the modules keep the
    fused weights under their own parameter names. ``before_fuse`` sees the wrapped layers per part first
    (the switching path puts the base weights there). Returns the changed parameter names per part.
    A file diffusers cannot read, or one that does not match the model, is exit 5."""
    parts = [p for p in lora_parts(info) if p in modules]
    host = _host(info.family, {p: modules[p] for p in parts})
    names = _adapter_names(len(loras))
    with _quiet():
        _load_adapters(info, host, parts, loras, names)
        wrapped = {p: list(_wrapped_layers(modules[p])) for p in parts}
        if before_fuse:
            before_fuse(wrapped)
        if names:
            host.set_adapters(names, [lora.scale for lora in loras])
            host.fuse_lora(components=[p for p in parts if wrapped[p]], adapter_names=names)
            host.unload_lora_weights()
    touched = {p: [f"{path}.{name}" for path, layer in layers
                   for name, _ in layer.get_base_layer().named_parameters(recurse=False)]
               for p, layers in wrapped.items() if layers}
    for part, params in touched.items():
        for name in params:
            _check_fused_finite(loras, part, name, modules[part].get_parameter(name))
    return touched


def _check_fused_finite(loras: list[LoraFile], part: str, name: str, value) -> None:
    """A scale that overflows the weights' dtype (1e30, or 1e5 in FP16) would give NaN images with exit 0.
    The sum first: one pass without a mask (a NaN or infinity makes it one); only a sum that overflowed on
    finite values is checked element by element."""
    if not math.isfinite(float(value.sum())) and not value.isfinite().all():
        raise IntegrityError(f"--lora {describe(loras)}: the fused weight {part}.{name} is not finite "
                             "(a scale too large for the weights' precision)")


def _adapter_names(count: int) -> list[str]:
    """The adapter name diffusers' loader gets for each file, in order (error messages quote them)."""
    return [f"lora{i}" for i in range(count)]


def _load_adapters(info: "ModelInfo", host, parts: list[str], loras: list[LoraFile], names: list[str]) -> None:
    """Load each LoRA into ``host`` as adapter ``names[i]`` with diffusers' loader: a file it cannot read, or
    whose layers do not fit the model (other shapes, other module names), is exit 5 naming it. ``parts``: the
    parts given as modules."""
    from diffusers.utils import logging as dlog

    for lora, adapter in zip(loras, names):
        by_part = read_lora(info, lora)
        saved = dlog.get_verbosity()
        dlog.set_verbosity(dlog.CRITICAL)  # diffusers logs the whole error it then raises: ours is the one line
        try:
            with warnings.catch_warnings():  # PEFT's about layers it could not place: _check_matches says it
                warnings.simplefilter("ignore")
                host.load_lora_weights(str(lora.path), adapter_name=adapter, low_cpu_mem_usage=True)
        except SdexportError:
            raise
        except Exception as exc:  # diffusers, PEFT and safetensors raise many types for a bad file
            raise IntegrityError(f"--lora {lora.path}: not a LoRA this model can load "
                                 f"({type(exc).__name__}: {_first_line(exc)})") from None
        finally:
            dlog.set_verbosity(saved)
        _check_matches(lora, by_part, host, parts, adapter)


def check_loras_fit(info: "ModelInfo", loras: list[LoraFile]) -> None:
    """What fuse_loras checks (the file reads, every layer finds its layer, shapes agree), on modules built from
    the configs on the meta device: no weights, no memory (``serve --write-repository``, which loads no model,
    finds now what its server would refuse at start). A LoRA that does not fit is exit 5."""
    if not loras:
        return
    modules = {p: empty_module(info, p, device="meta") for p in lora_parts(info)}
    with _quiet():
        _load_adapters(info, _host(info.family, modules), list(modules), loras, _adapter_names(len(loras)))


def read_lora(info: "ModelInfo", lora: LoraFile) -> dict[str, int]:
    """Read ``lora`` with the family's loader, without loading it into any module: a file diffusers cannot read,
    one holding NaN/Inf, or one for other parts than this model's (another architecture) is exit 5 naming it.
    Returns {part: LoRA layers the file has for it}."""
    from diffusers.configuration_utils import FrozenDict

    with _quiet():
        try:
            # unet_config: as the SDXL loader passes it (kohya's SDXL files name blocks as in SGM's UNet)
            state_dict = loader_class(info.family).lora_state_dict(
                str(lora.path), unet_config=FrozenDict(info.unet_config))[0]
        except Exception as exc:  # diffusers, PEFT and safetensors raise many types for a bad file
            raise IntegrityError(f"--lora {lora.path}: not a LoRA this model can load "
                                 f"({type(exc).__name__}: {_first_line(exc)})") from None
    _check_finite(lora, state_dict)
    return _layers_per_part(lora, state_dict, lora_parts(info), info)


def _check_finite(lora: LoraFile, state_dict: dict[str, Any]) -> None:
    """A LoRA file holding NaN or Inf would give an export or engines that draw only NaN (exit 0 at export)."""
    for key, value in state_dict.items():
        if hasattr(value, "isfinite") and value.is_floating_point() and not value.isfinite().all():
            raise IntegrityError(f"--lora {lora.path}: holds values that are not finite (NaN/Inf in {key}): "
                                 "a corrupt LoRA file")


def _first_line(exc: BaseException) -> str:
    """The message's first line, and its second where the first only announces a list (torch's
    "Error(s) in loading state_dict for X:" then "size mismatch for ...")."""
    text = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    head = " ".join(text[:2]) if len(text) > 1 and text[0].endswith(":") else (text[0] if text else "")
    return head[:300]


def empty_module(info: "ModelInfo", part: str, device: str = "cpu"):
    """The torch module of ``part`` built from its config without initializing weights (uninitialized memory:
    only the layers a LoRA wraps are ever read, after they get the export's base weights; ``device="meta"``:
    no memory at all, for checks of shapes and names)."""
    from accelerate import init_empty_weights

    cls = info.torch_class(part)
    config = info.configs[part]
    with init_empty_weights(), _quiet():
        if hasattr(cls, "from_config") and not hasattr(cls, "config_class"):
            module = cls.from_config(config)
        else:
            module = cls(cls.config_class.from_dict(config))
    if device != "meta":
        module = module.to_empty(device=device)
    return module.eval().requires_grad_(False)


class LoraFactors:
    """One LoRA file as diffusers' loader reads it into PEFT layers, kept between switches: the PEFT layers only,
    their base weights dropped (meta tensors of the same shapes; a rank-16 SD 1.5 LoRA's factors are 17 MB, and the
    process grew by 190 MB for the first file and 35 MB for the second on sd15-random), so that switching to a
    set that holds this file again computes its layers' deltas with PEFT's own ``set_scale`` and
    ``get_delta_weight`` -- what ``set_adapters`` and ``fuse_lora`` compute -- instead of loading it again.
    ``supported`` is False for layer kinds whose merge needs more than the delta (DoRA, LoRA biases): those sets
    go through ``fuse_loras`` every time."""

    ADAPTER = _adapter_names(1)[0]  # as fuse_loras names a first file: error messages name it the same way

    def __init__(self, info: "ModelInfo", lora: LoraFile):
        import torch

        self.sha256 = lora.sha256
        # uninitialized CPU modules (on the meta device diffusers' loader leaves the LoRA factors on meta too);
        # untouched pages of torch.empty cost no memory, and the base weights are dropped below
        modules = {p: empty_module(info, p) for p in lora_parts(info)}
        with _quiet():
            _load_adapters(info, _host(info.family, modules), list(modules), [lora], [self.ADAPTER])
        self.layers = {p: list(_wrapped_layers(m, self.ADAPTER)) for p, m in modules.items()}
        for layers in self.layers.values():  # only their shapes are read (get_delta_weight of a convolution)
            for _, layer in layers:
                inner = layer.get_base_layer()
                for name, param in list(inner.named_parameters(recurse=False)):
                    setattr(inner, name, torch.nn.Parameter(torch.empty(param.shape, device="meta"),
                                                            requires_grad=False))
        self.supported = all(
            not getattr(layer, "use_dora", {}).get(self.ADAPTER) and not getattr(layer, "lora_bias", {}).get(self.ADAPTER)
            and not layer.lora_A[self.ADAPTER].weight.is_meta
            for layers in self.layers.values() for _, layer in layers)

    def deltas(self, part: str, scale: float):
        """(parameter name, delta) of each layer of ``part`` at ``scale``, as PEFT would add it at fusing."""
        for path, layer in self.layers.get(part, []):
            layer.set_scale(self.ADAPTER, scale)
            yield f"{path}.weight", layer.get_delta_weight(self.ADAPTER)


def fused_params(info: "ModelInfo", loras: list[LoraFile], parts: list[str],
                 base: Callable[[str, str], Any], factors: dict[str, LoraFactors] | None = None,
                 keep_factors: int = 8) -> dict[str, dict[str, Any]]:
    """{part: {parameter name: new value (float32 torch tensor)}} for the parameters ``loras`` change in
    ``parts``, computed from ``base(part, name)`` (the exported weight) every time. The model's other LoRA
    parts are loaded too (diffusers' loader expects every part a file names) but not returned.

    ``factors`` (sha256 -> LoraFactors, the caller's cache; the ``keep_factors`` files used last):
    each file is read by diffusers once, and every switch adds PEFT's deltas to the base weights in the order
    ``fuse_lora`` merges them -- the same arithmetic, so the same values as the full path below."""
    import torch

    if not loras:
        return {}
    if factors is not None:
        for lora in loras:  # least recently used first
            factors[lora.sha256] = factors.pop(lora.sha256, None) or LoraFactors(info, lora)
            while len(factors) > keep_factors:
                factors.pop(next(iter(factors)))
        loaded = [factors[lora.sha256] for lora in loras]
        if all(f.supported for f in loaded):
            out: dict[str, dict[str, Any]] = {}
            with torch.no_grad():  # PEFT's factors are parameters: no autograd graph for the fused weights
                for part in parts:
                    _fuse_part(loras, loaded, part, base, out)
            return out
    modules = {p: empty_module(info, p) for p in lora_parts(info)}

    before: dict[tuple[str, str], Any] = {}

    def put_base(wrapped):
        for part, layers in wrapped.items():
            for path, layer in layers:
                inner = layer.get_base_layer()
                for name, param in list(inner.named_parameters(recurse=False)):
                    value = (base(part, f"{path}.{name}").to(torch.float32).reshape(param.shape) if part in parts
                             else torch.zeros(param.shape))
                    before[(part, f"{path}.{name}")] = value
                    setattr(inner, name, torch.nn.Parameter(value.clone(), requires_grad=False))

    touched = fuse_loras(info, modules, loras, before_fuse=put_base)
    out: dict[str, dict[str, Any]] = {}
    for part, names in touched.items():
        for name in names if part in parts else ():
            value = modules[part].get_parameter(name).detach()
            if not torch.equal(value, before[(part, name)]):  # e.g. a bias the LoRA leaves alone
                out.setdefault(part, {})[name] = value.clone()
    return out


def _fuse_part(loras: list[LoraFile], loaded: list["LoraFactors"], part: str, base: Callable[[str, str], Any],
               out: dict[str, dict[str, Any]]) -> None:
    """fused_params' kept-factors path for one part: PEFT's merge (weight.data += delta, adapter by adapter) on
    the base weights, the first add making the copy; only values that differ from the base go to ``out``."""
    import torch

    bases: dict[str, Any] = {}
    fused: dict[str, Any] = {}
    for lora, f in zip(loras, loaded):
        for name, delta in f.deltas(part, lora.scale):
            if name not in fused:
                bases[name] = base(part, name).to(torch.float32).reshape(delta.shape)
                fused[name] = torch.add(bases[name], delta)
            else:
                fused[name] += delta
    for name, value in fused.items():
        _check_fused_finite(loras, part, name, value)
        if not torch.equal(value, bases[name]):
            out.setdefault(part, {})[name] = value


# --- the map from torch parameters to ONNX initializers -----------------------------------------------

def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def build_weight_map(module, onnx_path: Path) -> dict[str, Any]:
    """For each parameter of ``module``, the initializers of the ONNX file holding its values: as stored,
    transposed (2-D weights of folded MatMuls) or reshaped (same bytes, e.g. [C] -> [C, 1, 1]), in the
    initializer's dtype (FP16 exports). Found by value, because the exporter renames what it folds: first
    by exact bytes, then, for what is left, by closeness within one FP16 ulp (ModelOpt's FP16 cast keeps
    values numpy's flushes to zero, e.g. -2.8e-8 -> +6e-8)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    index: dict[tuple[str, bytes], list[str]] = {}
    arrays: dict[str, Any] = {}
    by_size: dict[int, list[str]] = {}
    dtypes: set[str] = set()
    for init in model.graph.initializer:
        arr = numpy_helper.to_array(init)
        if arr.dtype.kind != "f" or arr.size < 2:
            continue
        arrays[init.name] = arr
        by_size.setdefault(arr.size, []).append(init.name)
        dtypes.add(arr.dtype.name)
        index.setdefault((arr.dtype.name, _digest(np.ascontiguousarray(arr).tobytes())), []).append(init.name)
    del model

    def entry(name: str, transposed: bool) -> dict[str, Any]:
        return {"initializer": name, "transpose": transposed, "shape": list(arrays[name].shape),
                "dtype": arrays[name].dtype.name}

    params: dict[str, list[dict[str, Any]]] = {}
    unmapped = []
    for name, param in module.named_parameters():
        value = param.detach().cpu().float().numpy()
        forms = [(value, False)] + ([(value.T, True)] if value.ndim == 2 else [])
        found = [entry(init, transposed) for dtype in sorted(dtypes) for form, transposed in forms
                 for init in index.get((dtype, _digest(np.ascontiguousarray(form.astype(dtype)).tobytes())), [])]
        if not found:
            # Closeness, first on a few sampled elements and only then in full: a UNet has dozens of weights of
            # one size, and comparing each parameter with all of them in full made the FP16 export of SD 1.5's
            # UNet spend about 8 minutes here (quadratic in the weights of one size).
            sample = np.unique(np.linspace(0, value.size - 1, min(value.size, 64)).astype(np.int64))
            flat_forms = [(np.ascontiguousarray(form).reshape(-1), form, transposed) for form, transposed in forms]
            for init in by_size.get(value.size, []):
                arr = arrays[init]
                flat = arr.reshape(-1)  # C order: the element order of both the reshaped and the 2-D stored form
                tol = dict(rtol=2.0**-10, atol=2.0**-23) if arr.dtype == np.float16 else dict(rtol=0, atol=0)
                for form_flat, form, transposed in flat_forms:
                    shaped = arr.reshape(form.shape) if arr.ndim != 2 or not transposed else arr
                    if (shaped.shape == form.shape
                            and np.allclose(flat[sample].astype(np.float32), form_flat[sample], **tol)
                            and np.allclose(shaped.astype(np.float32), form, **tol)):
                        found.append(entry(init, transposed))
        if found:
            params[name] = found
        else:
            unmapped.append(name)
    users: dict[str, int] = {}
    for entries in params.values():
        for e in entries:
            users[e["initializer"]] = users.get(e["initializer"], 0) + 1
    return {"format": WEIGHTS_MAP_FORMAT, "params": params, "unmapped": unmapped,
            "shared": sorted(name for name, n in users.items() if n > 1)}


def tensor_view(arr):
    """A torch tensor over a numpy array without a copy, also over the read-only base weights (memory-mapped
    from the export): whoever takes it reads it, or copies it, and never writes into it."""
    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(arr)


class WeightMap:
    """One component's weights map (``<component>/weights_map.json``) and the exported initializer values it
    points at, read once from the ONNX file when first needed."""

    def __init__(self, export, component: str):
        manifest = export.manifest
        entry = manifest.component(component)
        rel = next((f["file"] for f in entry.get("files", []) if f["file"].endswith("/" + WEIGHTS_MAP)), None)
        if rel is None:
            raise IntegrityError(f"{export.root}: {component} has no {WEIGHTS_MAP} (exported before LoRA switching, "
                                 f"or not a component a LoRA changes); re-export to switch LoRAs: sdexport export "
                                 f"MODEL -o {export.root} --force")
        manifest.verified_path(entry)  # the map and the ONNX it describes, against their sha256
        self.component = component
        self.onnx_path = manifest.path(entry["file"])
        self.data = json.loads(manifest.path(rel).read_text())
        self.params: dict[str, list[dict[str, Any]]] = self.data["params"]
        self._base: dict[str, Any] | None = None
        self._by_initializer: dict[str, list[str]] | None = None

    def _initializers(self) -> dict[str, Any]:
        """The mapped initializers' values: read-only arrays over the ONNX file's external data, memory-mapped
        (pages are read when a value is used), or decoded where a tensor is stored inside the graph. Loading
        the whole model with its external data and converting every tensor took 23 of a first switch's 29 s
        (sd15-random FP32 UNet on 2 CPU cores); the mapped view reads what a switch uses."""
        if self._base is None:
            import numpy as np
            import onnx
            from onnx import helper, numpy_helper
            from onnx.external_data_helper import uses_external_data

            wanted = {e["initializer"] for entries in self.params.values() for e in entries}
            model = onnx.load(str(self.onnx_path), load_external_data=False)
            folder = self.onnx_path.parent.resolve()
            files: dict[Path, Any] = {}
            base: dict[str, Any] = {}
            for init in model.graph.initializer:
                if init.name not in wanted:
                    continue
                if not uses_external_data(init):
                    base[init.name] = numpy_helper.to_array(init)
                    continue
                info = {e.key: e.value for e in init.external_data}
                path = (folder / info["location"]).resolve()
                if path.parent != folder:  # the manifest verified the files of this folder, nothing else
                    raise IntegrityError(f"{self.onnx_path}: {init.name} points outside its folder ({info['location']})")
                # ONNX stores little-endian. Only a big-endian host gets a non-native dtype: an explicit "<f4" is
                # another dtype object than float32's, and TensorRT's Weights match dtypes by identity
                # ("Could not implicitly convert NumPy data type: f32").
                dtype = np.dtype(helper.tensor_dtype_to_np_dtype(init.data_type))
                if sys.byteorder != "little":
                    dtype = dtype.newbyteorder("<")
                count = math.prod(init.dims)
                offset = int(info.get("offset", 0))
                if "length" in info and int(info["length"]) != count * dtype.itemsize:
                    raise IntegrityError(f"{self.onnx_path}: {init.name} has {info['length']} bytes of data for "
                                         f"{count} {dtype.name} values")
                if path not in files:
                    if not path.is_file():
                        raise IntegrityError(f"{self.onnx_path}: its external data {info['location']} is missing")
                    files[path] = np.memmap(path, mode="r")
                base[init.name] = np.frombuffer(files[path], dtype=dtype, count=count,
                                                offset=offset).reshape(tuple(init.dims))
            self._base = base
        return self._base

    def _holders(self) -> dict[str, list[str]]:
        """{initializer: the parameters it holds}, made once (a check per initializer used to scan every
        parameter of the component)."""
        if self._by_initializer is None:
            self._by_initializer = {}
            for name, entries in self.params.items():
                for e in entries:
                    holders = self._by_initializer.setdefault(e["initializer"], [])
                    if name not in holders:
                        holders.append(name)
        return self._by_initializer

    def base_initializer(self, name: str):
        return self._initializers()[name]

    def base_param(self, name: str):
        """The exported value of torch parameter ``name`` (float32 torch tensor in the parameter's layout)."""
        import numpy as np

        entries = self.params.get(name)
        if not entries:
            raise IntegrityError(f"a LoRA changes {self.component}.{name}, which this export does not hold as one "
                                 "weight (the exporter folded it into other constants): fuse the LoRA at export "
                                 "instead (sdexport export MODEL --lora FILE)")
        e = entries[0]
        arr = np.asarray(self.base_initializer(e["initializer"]), dtype=np.float32)  # FP32 exports: no copy
        value = tensor_view(arr)
        # A view, never a transposed copy: the fuse's first add makes the new tensor (with these strides), and
        # initializers() turns the result back into the initializer's layout as a view again. The copies both ways took most of a
        # switch's fuse and apply on ONNX Runtime (benchmarks/results/2026-11-27-h100-session7).
        return value.T if e["transpose"] else value  # caller reshapes

    def initializers(self, values: dict[str, Any]) -> dict[str, Any]:
        """{initializer name: numpy array in its dtype and shape} for new parameter values. An initializer the
        exporter shares between parameters takes a new value only if all of them agree on it."""
        import numpy as np

        out: dict[str, Any] = {}
        for name, value in values.items():
            for e in self.params.get(name) or [None]:
                if e is None:
                    self.base_param(name)  # raises: not held as one weight
                arr = value.detach().cpu().float().numpy()
                # a value fused on base_param's transposed view is stored transposed: .T is contiguous, no copy
                arr = np.ascontiguousarray(arr.T if e["transpose"] else arr)
                arr = arr.astype(e["dtype"], copy=False).reshape(e["shape"])
                init = e["initializer"]
                if init in out and not np.array_equal(out[init], arr):
                    raise IntegrityError(f"{self.component}: the exporter stored {name} in {init} together with "
                                         "another weight the LoRA changes differently; fuse the LoRA at export instead "
                                         "(sdexport export MODEL --lora FILE)")
                out[init] = arr
        holders = self._holders()
        for init, arr in out.items():
            sharers = [n for n in holders[init] if n not in values]
            if sharers and not np.array_equal(arr, self.base_initializer(init)):
                raise IntegrityError(f"{self.component}: {init} holds {sharers[0]} too, which the LoRA leaves "
                                     "unchanged; fuse the LoRA at export instead (sdexport export MODEL --lora FILE)")
        return out
