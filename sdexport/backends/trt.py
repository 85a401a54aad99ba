"""TensorRT backend: flavour detection (tensorrt 10.x/11.x or tensorrt_rtx) and engine execution.

Engine building lives in build.py; this module finds the TensorRT flavour and runs engines.
"""

from __future__ import annotations

from typing import Any

from ..errors import BackendUnavailable, CannotRunHere

TRT_INSTALL = ("install TensorRT: 'pip install tensorrt-rtx-cu13==1.7.1.116' (TensorRT-RTX; builds without a GPU) "
               "or NVIDIA's 'tensorrt' 10.x/11.x")

# TensorRT-RTX 1.7 runs engines on these compute capabilities only (Hopper, 9.0, is not among them).
RTX_RUNNABLE_CC = ((7, 5), (8, 0), (8, 6), (8, 9), (12, 0), (12, 1))


def import_trt(flavour: str = "auto"):
    """Return (module, flavour) for ``tensorrt`` or ``tensorrt_rtx``; ``auto`` prefers ``tensorrt``."""
    import importlib

    order = {"auto": ("tensorrt", "tensorrt_rtx"), "tensorrt": ("tensorrt",), "rtx": ("tensorrt_rtx",)}
    if flavour not in order:
        raise BackendUnavailable(f"unknown TensorRT flavour '{flavour}' (choose auto, tensorrt or rtx)")
    for name in order[flavour]:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if getattr(module, "Builder", None) is None:  # the PyPI 'tensorrt' stub without libraries
            continue
        return module, ("rtx" if name == "tensorrt_rtx" else "tensorrt")
    raise BackendUnavailable(f"no TensorRT found ({'/'.join(order[flavour])}); {TRT_INSTALL}")


def trt_status(gpu_cc: tuple[int, int] | None) -> dict[str, Any]:
    """Which TensorRT is installed and whether it can build and run engines here, with the reason."""
    try:
        trt, flavour = import_trt()
    except BackendUnavailable as exc:
        return {"flavour": None, "version": None, "can_build": False, "can_run": False, "why": str(exc)}
    version = getattr(trt, "__version__", "?")
    status = {"flavour": "TensorRT-RTX" if flavour == "rtx" else "TensorRT", "version": version,
              "can_build": True, "can_run": False, "why": None}
    if gpu_cc is None:
        status["why"] = "no CUDA GPU visible; engines can be built (ahead of time) but not run here"
    elif flavour == "rtx" and tuple(gpu_cc) not in RTX_RUNNABLE_CC:
        status["why"] = (f"TensorRT-RTX {version} cannot run on compute capability {gpu_cc[0]}.{gpu_cc[1]} "
                         f"(it runs on {', '.join(f'{a}.{b}' for a, b in RTX_RUNNABLE_CC)})")
    else:
        status["can_run"] = True
    return status


def require_runnable(device: str) -> None:
    import torch

    cc = torch.cuda.get_device_capability(0) if torch.cuda.is_available() else None
    status = trt_status(cc)
    if not status["can_build"]:
        raise BackendUnavailable(status["why"])
    if not status["can_run"] or not device.startswith("cuda"):
        raise CannotRunHere(status["why"] or "TensorRT engines run on a CUDA device; pass --device cuda")


class TrtEngine:
    """Placeholder until the TensorRT runtime lands (issue: TensorRT engines)."""

    @classmethod
    def load_all(cls, export, components, device: str = "cpu", **options):
        require_runnable(device)
        raise BackendUnavailable("the TensorRT runtime backend is not implemented yet")


def polygraphy_runner(export, component: str):
    import torch

    require_runnable("cuda" if torch.cuda.is_available() else "cpu")
    raise BackendUnavailable("TensorRT validation is not implemented yet")
