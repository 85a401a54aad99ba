"""Artifacts made from the exported components, in one table.

An export holds the components a family declares (``OUT/<component>/model.onnx``) and artifacts made
from them that keep a component's interface: ``unet_int8`` (``sdexport quantize``) is a UNet. The
``--unet`` choice of infer/bench/build names which of them runs in the UNet slot. Every module asks
here instead of spelling the names.
"""

from __future__ import annotations

# artifact -> the component whose interface (spec) it has
VARIANT_OF = {"unet_int8": "unet"}
# --unet choice -> the artifact that runs in the UNet slot (None: the exported UNet itself)
UNET_CHOICES = {"default": None, "int8": "unet_int8"}
INT8_UNET = "unet_int8"
# manifest sections of engines built from a component (TensorRT, ONNX Runtime CUDA variant, AOTInductor
# package), keyed by component: a re-export of the component, or of the model, makes them stale
BUILT_SECTIONS = ("engines", "ort_cuda", "inductor")


def unet_artifact(choice: str) -> str:
    """The manifest component that runs in the UNet slot for ``--unet choice``."""
    return UNET_CHOICES[choice] or "unet"
