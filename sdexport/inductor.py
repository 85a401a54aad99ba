"""AOTInductor engines: each component compiled ahead of time by PyTorch Inductor into a package.

``sdexport build OUT --backend inductor --static HxW [--batch N]`` compiles the source model's
components for one request shape on this machine's device (CUDA, or the CPU) with
``torch.export`` + ``torch._inductor.aoti_compile_and_package`` and writes
``OUT/inductor/<component>.<device>.<shape>.pt2`` through the export's transaction; the manifest's
``inductor`` section records each package with its sha256, the torch version, the device and
compute capability it was compiled for, the shape, the precision, the graph changes and the source
weights. ``--backend inductor`` on infer/bench/validate runs them (backends/inductor.py).

Graph changes applied before compiling, each measured on an H200 (benchmarks/speed_probe.py, SD 1.5
UNet, batch 2, 512 px, CUDA graph; torch.compile default 7.02 ms/step):
 - fused QKV projections (diffusers' ``fuse_qkv_projections``): one GEMM instead of three per
   self-attention, and K/V of the cross-attention in one;
 - channels-last memory format for the convolution stack, so no layout copies around cuDNN's NHWC kernels;
together 6.21 ms/step, 1.13x, at the same error against FP32 (rel. L2 1.2e-3). Inductor options: weights
frozen into the package (``freezing``: constant folding, weight layouts prepared once) and 1x1
convolutions as matrix products. ``max-autotune`` is not used: on SD 1.5 it had not finished compiling
after 15 minutes on an H200.

Packages hold compiled code for one device type and (CUDA) one compute capability: they are checked
before loading (exit 8 on another GPU, 5 on another torch) and rebuilt when an input changes.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from . import __version__
from .components import Geometry
from .errors import CannotRunHere, IntegrityError, UsageError
from .manifest import sha256_file, versions, writing
from .runtime import ExportDir

SECTION = "inductor"
PRECISIONS = ("fp16", "fp32", "bf16")
# Inductor settings every package is compiled with (recorded in the manifest and the rebuild key).
INDUCTOR_CONFIGS = {"freezing": True, "conv_1x1_as_mm": True}


def device_tag(device: str) -> tuple[str, str | None]:
    """('cuda', '9.0') or ('cpu', None): what a package is compiled for."""
    import torch

    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise CannotRunHere("no CUDA GPU visible: build Inductor engines for the CPU with --device cpu, or on "
                                "the GPU that will run them")
        major, minor = torch.cuda.get_device_capability(torch.device(device))
        return "cuda", f"{major}.{minor}"
    if device != "cpu":
        raise UsageError(f"--device {device}: choose cpu or cuda[:N]")
    return "cpu", None


CXX_INSTALL = "apt-get install g++, or set CXX to a C++ compiler"
CUDA_TOOLKIT_INSTALL = "install the CUDA toolkit (e.g. apt-get install cuda-toolkit-13-0) or set CUDA_HOME to one"


def cxx_compiler() -> tuple[str, str | None]:
    """The C++ compiler AOTInductor compiles and links every package with, found as torch finds it, without
    importing Inductor: ``torch._inductor.config.cpp.cxx`` is ``$CXX``, else ``g++`` (``cpp_builder.
    get_cpp_compiler`` runs it, a name on PATH or a path). Returns (what is asked for, its path or None)."""
    name = os.environ.get("CXX", "g++")
    return name, shutil.which(name) if name else None


def cuda_headers() -> tuple[str | None, str | None]:
    """The CUDA toolkit whose headers a CUDA package's C++ includes (``cuda.h``, ``cuda_runtime.h``), found as
    ``torch.utils.cpp_extension`` finds CUDA_HOME (Inductor's ``cpp_builder`` asks it for the include paths):
    ``$CUDA_HOME`` or ``$CUDA_PATH``, else the directory above ``nvcc`` on PATH, else ``/usr/local/cuda``.
    Returns (the toolkit directory or None, the directory holding ``cuda_runtime.h`` or None)."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home is None:
        nvcc = shutil.which("nvcc")
        home = os.path.dirname(os.path.dirname(nvcc)) if nvcc else "/usr/local/cuda"
        if not os.path.exists(home):
            home = None
    if home is None:
        return None, None
    for include in (os.path.join(home, "include"), os.environ.get("CUDA_INC_PATH")):
        if include and os.path.isfile(os.path.join(include, "cuda_runtime.h")):
            return home, include
    return home, None


def triton_requirement() -> str:
    """What to install for triton: the version this torch's wheel pins (its metadata), else any."""
    from importlib import metadata

    try:
        pins = [r.split(";")[0].strip() for r in metadata.requires("torch") or [] if r.startswith("triton")]
    except metadata.PackageNotFoundError:
        pins = []
    return f"pip install '{pins[0]}'" if pins else "pip install triton (the version your torch's CUDA wheel pins)"


def host_status(torch_version: str | None, cuda_available: bool) -> dict[str, Any]:
    """Whether ``build --backend inductor`` can compile here, for which devices, and what is missing; whether
    packages can run. Import-free (``sdexport env`` stays fast): triton is looked up, not imported."""
    import importlib.util

    cxx, cxx_path = cxx_compiler()
    status: dict[str, Any] = {"torch": torch_version, "cxx": cxx, "cxx_path": cxx_path, "triton": None,
                              "cuda_home": None, "cuda_include": None, "devices": [], "device": None,
                              "can_build": False, "can_run": torch_version is not None, "why": None}
    if torch_version is None:
        status["why"] = "torch is not installed"
        return status
    if importlib.util.find_spec("triton") is not None:
        status["triton"] = next((v for v in (_dist_version(d) for d in ("triton", "pytorch-triton")) if v),
                                "installed")
    status["cuda_home"], status["cuda_include"] = cuda_headers()
    missing = []
    if cxx_path is None:
        asked = f"$CXX ({cxx!r})" if "CXX" in os.environ else "g++ (torch's default; $CXX overrides it)"
        missing.append(f"no C++ compiler: AOTInductor compiles every package with {asked}, which is not on "
                       f"PATH ({CXX_INSTALL})")
    cuda_missing = []
    if cuda_available:
        if status["triton"] is None:
            cuda_missing.append(f"triton is not installed (Inductor's GPU kernels; {triton_requirement()})")
        if status["cuda_include"] is None:
            where = (f"{status['cuda_home']}/include has no cuda_runtime.h" if status["cuda_home"] else
                     "no CUDA toolkit found ($CUDA_HOME, nvcc on PATH, /usr/local/cuda)")
            cuda_missing.append(f"{where}, which a CUDA package's C++ includes ({CUDA_TOOLKIT_INSTALL})")
    if cxx_path is not None:
        status["devices"] = ["cuda", "cpu"] if cuda_available and not cuda_missing else ["cpu"]
        status["can_build"] = True
        status["device"] = status["devices"][0]
    if cuda_missing:
        missing.append(f"--device cuda cannot build: {'; '.join(cuda_missing)}")
    if not cuda_available:
        missing.append("no CUDA GPU visible to torch: CPU packages only (--device cpu --precision fp32)")
    elif cuda_missing and cxx_path is not None:
        missing.append("builds CPU packages only (--device cpu --precision fp32)")
    status["why"] = "; ".join(missing) or None
    return status


def _dist_version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def graph_changes(component: str, precision: str) -> list[str]:
    """The graph changes applied to one component before compiling (one home for the list)."""
    changes = ["channels_last"] if component in ("unet", "vae_decoder", "vae_encoder") else []
    if component == "unet":
        changes.insert(0, "fused_qkv")
    return changes


def _module(export: ExportDir, info, component: str, precision: str, device: str):
    """The component's torch module as the engine runs it: FP32 in and out (the interface every engine of an
    export shares), the graph changes applied, computing in ``precision`` on ``device``."""
    import torch

    spec = export.specs[component]
    dtype = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    if spec.keep_fp32:
        dtype = torch.float32
    module = info.load_torch(spec.source, dtype=dtype, device=device)
    changes = graph_changes(component, precision)
    if "fused_qkv" in changes and hasattr(module, "fuse_qkv_projections"):
        module.fuse_qkv_projections()
    if "channels_last" in changes:
        module = module.to(memory_format=torch.channels_last)
    inner = spec.wrap(module)

    class Engine(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = inner

        def forward(self, *args):
            cast = [a.to(dtype) if a.is_floating_point() else a for a in args]
            outs = self.inner(*cast)
            outs = outs if isinstance(outs, (tuple, list)) else (outs,)
            return tuple(o.float() for o in outs)

    return Engine().eval(), changes


def package_rel(component: str, device: str, cc: str | None, geo: Geometry, max_batch: int | None) -> str:
    where = f"sm{cc.replace('.', '')}" if cc else "cpu"
    batch = f"b1-{max_batch}" if max_batch else f"b{geo.images}"
    return f"{SECTION}/{component}.{where}.{batch}-{geo.height}x{geo.width}.pt2"


def default_precision(kind: str) -> str:
    """The precision a package is compiled in when none is asked for: fp16 on a GPU, fp32 on the CPU (the one
    the CPU compiles)."""
    return "fp32" if kind == "cpu" else "fp16"


def build(export_dir: str | Path, static: str, batch: int | None = 1, components: list[str] | None = None,
          precision: str | None = None, device: str = "cuda", force: bool = False, max_batch: int | None = None,
          say: Callable[[str], None] = lambda msg: None) -> dict[str, Any]:
    """Compile AOTInductor packages for one image size: ``batch`` images per call (static), or any number
    from 1 to ``max_batch`` (a dynamic batch axis, one package for every batch size); returns the entries.
    ``precision`` None: the device's (``default_precision``: fp16 on cuda, fp32 on the CPU)."""
    import torch

    from .limits import image_size

    if precision is not None and precision not in PRECISIONS:
        raise UsageError(f"--precision {precision}: Inductor engines take fp16 or fp32 (fp32 on the CPU)"
                         + ("; bf16 through the Python API" if "bf16" in PRECISIONS else ""))
    if static is None:
        raise UsageError("--backend inductor compiles for one image size: give --static HxW (with --batch N for N "
                         "images per call, or --max-batch N for any number from 1 to N)")
    if batch is not None and batch < 1:
        raise UsageError(f"--batch {batch}: must be at least 1")
    if max_batch is not None and (batch or 1) != 1:
        raise UsageError(f"--batch {batch} and --max-batch {max_batch}: give one (--batch N: N images per call; "
                         "--max-batch N: one package for 1..N)")
    if max_batch is not None and max_batch < 2:
        raise UsageError(f"--max-batch {max_batch}: a dynamic batch is 1..N images with N >= 2; for one image per "
                         "call leave it out (--batch 1 is the default)")
    kind, cc = device_tag(device)
    precision = precision or default_precision(kind)
    if kind == "cpu" and precision != "fp32":
        raise UsageError(f"--precision {precision}: Inductor engines for the CPU are fp32 "
                         "(--precision fp32, the CPU's default)")
    h, w = image_size("--static", static)
    from .paths import check_export_writable

    # an export (not a missing path, nor a model directory that would get a lock file) that takes new files
    export = ExportDir.open(export_dir)
    export.verify_components()  # nothing is built on (nor written into) a damaged export
    check_export_writable(export, "build --backend inductor writes inductor/ there")
    with writing(export_dir, "build --backend inductor", say, create=False) as txn:
        export = ExportDir.open(export_dir)
        export.manifest = txn.manifest
        # Packages are compiled from the source model, not from the ONNX files: a component need not have been
        # exported to ONNX to get one (e.g. an SDXL UNet compiled without its 10 GB FP32 ONNX export).
        names = list(dict.fromkeys(components or export.pipeline_components))
        unknown = [c for c in names if c not in export.specs]
        if unknown:
            raise UsageError(f"--components: {', '.join(unknown)} is not a component of a "
                             f"{export.family.description} model ({', '.join(export.specs)})")
        section = export.manifest.data.setdefault(SECTION, {})
        info = None
        built, current = [], []
        for i, component in enumerate(names, 1):
            spec = export.specs[component]
            # N images with the family's default guidance (two UNet rows per image under CFG, one for LCM)
            cfg = export.family.guidance(export.info, 7.5).cfg
            geo = Geometry(max_batch or batch or 1, h, w, guidance=cfg)
            export.ranges.check(geo)
            dims = spec.dims_for(geo)
            spec.check_dims(dims)
            batch_range = None
            if max_batch:  # the example is at 2 images (a batch axis of 1 would be specialised away)
                batch_range = [spec.dims_for(Geometry(1, h, w, guidance=cfg))["batch"], dims["batch"]]
                dims = spec.dims_for(Geometry(2, h, w, guidance=cfg))
            key = json.loads(json.dumps({
                "weights_sha256": export.manifest.data["model"]["weights_sha256"],
                "loras": export.loras_of(component), "precision": precision,
                "device": kind, "compute_capability": cc, "dims": dims, "batch_range": batch_range,
                "torch": torch.__version__,
                "configs": INDUCTOR_CONFIGS, "changes": graph_changes(component, precision), "sdexport": __version__}))
            old = section.get(component)
            label = f"[{i}/{len(names)}] {component}"
            if not force and old and old.get("key") == key and export.manifest.intact(old):
                say(f"{label}: up to date ({old['file']}), not recompiled")
                current.append(component)
                continue
            if info is None:
                info = export.source_model()
            t0 = time.perf_counter()
            module, changes = _module(export, info, component, precision, device)
            feed = spec.sample_inputs(dims, seed=0, device=device)
            args = tuple(feed[n] for n in spec.input_names)
            computes = "fp32" if spec.keep_fp32 else precision  # what _module runs it in
            kept = f" (kept FP32: {spec.keep_fp32})" if computes != precision else ""
            say(f"{label}: torch.export + AOTInductor ({computes}{kept}, {kind}{' sm' + cc if cc else ''}, "
                f"{'x'.join(map(str, args[0].shape))}; {', '.join(changes) or 'no graph changes'})")
            dynamic = None
            if batch_range:
                axis = torch.export.Dim("batch", min=batch_range[0], max=batch_range[1])
                # forward(*args): one entry, the tuple of the positional inputs
                dynamic = (tuple({0: axis} if "batch" in t.dims[:1] else {} for t in spec.inputs),)
            with torch.no_grad():
                program = torch.export.export(module, args, dynamic_shapes=dynamic)
                rel = package_rel(component, kind, cc, geo, max_batch)
                path = txn.stage(rel)
                torch._inductor.aoti_compile_and_package(program, package_path=str(path),
                                                         inductor_configs=dict(INDUCTOR_CONFIGS))
            for old_entry in [old] if old else []:  # the package this one replaces
                if old_entry["file"] != rel and (export.root / old_entry["file"]).exists():
                    txn.remove(old_entry["file"])
            entry = {"file": rel, "sha256": sha256_file(path), "size_bytes": path.stat().st_size,
                     "device": kind, "compute_capability": cc, "precision": computes,
                     **({"kept_fp32": spec.keep_fp32} if computes != precision else {}),
                     "geometry": vars(geo), "dims": dims, "batch_range": batch_range, "changes": changes,
                     "inductor_configs": INDUCTOR_CONFIGS,
                     "torch": torch.__version__, "build_seconds": round(time.perf_counter() - t0, 1),
                     "key": key, "versions": versions()}
            section[component] = entry
            built.append(component)
            say(f"{label}: wrote {rel} ({entry['size_bytes'] / 2**20:.1f} MiB, {entry['build_seconds']} s)")
            del module, program
        if built:
            txn.commit()
        return {"built": built, "up_to_date": current, "engines": {c: section[c] for c in names},
                "held": sorted(section), "precision": precision, "device": kind, "compute_capability": cc}


def check_package(export: ExportDir, component: str, device: str) -> tuple[Path, dict[str, Any]]:
    """The package of ``component`` after every check that can fail before loading it."""
    import torch

    entry = export.manifest.data.get(SECTION, {}).get(component)
    if not entry:
        raise IntegrityError(f"{export.root}: no Inductor engine for {component}; run 'sdexport build "
                             f"{export.root} --backend inductor --static HxW'")
    path = export.manifest.verified_path(entry, remedy=f"rebuild: sdexport build {export.root} --backend inductor "
                                                       "--force")
    model = export.manifest.data["model"]
    if entry.get("key", {}).get("weights_sha256") != model["weights_sha256"]:
        raise IntegrityError(f"{path}: compiled from other weights than the export's; rebuild with --force")
    # packages are compiled with the LoRAs fused into the components they apply to
    if export.lora_applies(component) and entry.get("key", {}).get("loras", []) != model.get("loras", []):
        raise IntegrityError(f"{path}: compiled with other fused LoRAs than the export's (sdexport export --lora); "
                             f"rebuild: sdexport build {export.root} --backend inductor --force")
    if entry["torch"] != torch.__version__:
        raise IntegrityError(f"{path}: compiled by torch {entry['torch']}, this is torch {torch.__version__}; "
                             f"AOTInductor packages run on the torch that made them: rebuild with --force")
    kind = "cuda" if device.startswith("cuda") else "cpu"
    if kind != entry["device"]:
        raise CannotRunHere(f"{path}: compiled for {entry['device']}, asked to run on {device} (pass --device "
                            f"{entry['device']}, or build for {kind})")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise CannotRunHere(f"{path}: compiled for CUDA and no CUDA GPU is visible here")
        major, minor = torch.cuda.get_device_capability(torch.device(device))
        if f"{major}.{minor}" != entry["compute_capability"]:
            raise CannotRunHere(f"{path}: compiled for compute capability {entry['compute_capability']}, this GPU is "
                                f"{major}.{minor}: rebuild on it (sdexport build {export.root} --backend inductor)")
    return path, entry
