"""``sdexport env``: what this host has, and what each backend can do here (and if not, why)."""

from __future__ import annotations

import platform
from importlib import metadata
from pathlib import Path
from typing import Any


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def describe() -> dict[str, Any]:
    from .backends.trt import gpu_capability, trt_status
    from .bench import machine
    from .inductor import host_status as inductor_status
    from .serve import host_status as serve_status

    report: dict[str, Any] = {"python": platform.python_version(), "machine": machine()}
    gpu_cc = gpu_capability()  # torch's current CUDA device
    try:
        import torch

        report["torch"] = torch.__version__
        report["torch_cuda"] = torch.version.cuda
        report["cuda_available"] = torch.cuda.is_available()
    except ImportError:
        report["torch"] = None
    backends: dict[str, dict[str, Any]] = {}

    backends["torch"] = {"can_build": None, "can_run": report.get("torch") is not None,
                         "why": None if report.get("torch") else "torch is not installed"}
    try:
        import onnxruntime as ort

        providers = ort.get_available_providers()
        report["onnxruntime"] = ort.__version__
        report["onnxruntime_providers"] = providers
        gpu_ort = "CUDAExecutionProvider" in providers
        backends["ort"] = {
            "can_build": None, "can_run": True, "device": "cuda" if gpu_ort and gpu_cc else "cpu",
            "why": None if gpu_ort or not gpu_cc else
            "CPU only: this onnxruntime has no CUDAExecutionProvider (pip install onnxruntime-gpu==1.31.1)"}
    except ImportError:
        backends["ort"] = {"can_build": None, "can_run": False, "why": "pip install onnxruntime==1.31.1"}
    report["tensorrt"] = trt_status(gpu_cc)
    backends["trt"] = {k: report["tensorrt"][k] for k in ("can_build", "can_run", "why")}
    report["inductor"] = inductor_status(report.get("torch"), bool(report.get("cuda_available")))
    backends["inductor"] = {k: report["inductor"][k] for k in ("can_build", "can_run", "device", "why")}
    report["backends"] = backends
    report["serve"] = serve_status()
    report["versions"] = {d: _version(d) for d in ("diffusers", "transformers", "onnx", "polygraphy",
                                                   "nvidia-modelopt", "tensorrt", "tensorrt-cu13", "tensorrt-cu12",
                                                   "tensorrt-rtx-cu13", "triton", "nvidia-pytriton", "tritonclient")}
    return report


def format_env(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [f"python {report['python']} on {m['platform']} ({m['cpu_count']} CPUs)"]
    if report.get("torch"):
        gpu = (f"{m['gpu']} (compute capability {m['compute_capability']}, driver {m.get('driver', '?')}, "
               f"CUDA {m.get('cuda')})" if m.get("gpu") else "no GPU visible to torch")
        lines.append(f"torch {report['torch']}: {gpu}")
    if report.get("onnxruntime"):
        lines.append(f"onnxruntime {report['onnxruntime']}: providers {', '.join(report['onnxruntime_providers'])}")
    t = report["tensorrt"]
    lines.append(f"TensorRT: {t['flavour'] or 'not installed'}{' ' + t['version'] if t.get('version') else ''}"
                 + (f" (builds for compute capability {', '.join(t['build_targets'])})" if t.get("build_targets") else ""))
    i = report["inductor"]
    if i.get("torch"):
        cuda = ("triton " + i["triton"] if i.get("triton") else "no triton") + ", " + (
            f"CUDA headers in {i['cuda_include']}" if i.get("cuda_include") else "no CUDA headers")
        lines.append(f"Inductor: C++ compiler {i['cxx_path'] or i['cxx'] + ' not found'}; for CUDA: {cuda}"
                     + (f" (builds for {', '.join(i['devices'])})" if i.get("devices") else ""))
    lines.append("")
    width = max(len(name) for name in report["backends"])
    for name, b in report["backends"].items():
        build = {True: "can build", False: "cannot build", None: "nothing to build"}[b["can_build"]]
        run = "can run here" if b["can_run"] else "cannot run here"
        lines.append(f"{name:<{width}} {build:<17} {run}{': ' + b['why'] if b.get('why') else ''}")
    lines.append(format_serve(report["serve"], width))
    return "\n".join(lines)


def format_serve(s: dict[str, Any], width: int = 6) -> str:
    """The serving row: whether ``sdexport serve`` can start Triton here, and what it does about libpython."""
    if not s["can_run"]:
        return f"{'serve':<{width}} {'cannot start here':<17} {s['why']}"
    return (f"{'serve':<{width}} {'can start here':<17} tritonserver of nvidia-pytriton {s['nvidia_pytriton']} "
            f"({s['tritonserver']}); serve puts {s['ld_library_path_first']} first on LD_LIBRARY_PATH itself, so "
            f"the Python-backend stub loads this Python's {Path(s['libpython']).name}")
