"""PyTorch eager engine: the source model's own modules, the reference every export is checked against."""

from __future__ import annotations

from typing import Any

from ..errors import UsageError
from .base import Engine


class TorchEngine(Engine):
    backend = "torch"

    def __init__(self, spec, module, device: str, dtype: str):
        import torch

        super().__init__(spec, device)
        self.dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
        self.module = spec.wrap(module).to(device=device, dtype=self.dtype).eval()

    @classmethod
    def load_all(cls, export, components: list[str], device: str = "cpu", dtype: str = "fp32"):
        if dtype not in ("fp32", "fp16", "bf16"):
            raise UsageError(f"torch dtype {dtype}: choose fp32, fp16 or bf16")
        info = export.source_model()
        modules: dict[str, Any] = {}
        engines = {}
        for name in components:
            spec = export.spec(name)
            if spec.source not in modules:
                modules[spec.source] = info.load_torch(spec.source)
            engines[name] = cls(spec, modules[spec.source], device, dtype)
        return engines

    def __call__(self, feed: dict[str, Any]) -> dict[str, Any]:
        import torch

        self.dims(feed)
        args = []
        for t in self.spec.inputs:
            value = feed[t.name].to(self.device)
            args.append(value.to(self.dtype) if value.is_floating_point() else value)
        with torch.inference_mode():
            outs = self.module(*args)
        if not isinstance(outs, (tuple, list)):
            outs = (outs,)
        return {t.name: o.to(getattr(torch, t.dtype)) for t, o in zip(self.spec.outputs, outs)}
