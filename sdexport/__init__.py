"""sdexport: Stable Diffusion (diffusers layout) -> validated ONNX / TensorRT engines."""

__version__ = "0.2.0"
