"""PyTorch engine: the source model's own modules (eager, optionally torch.compile and CUDA graphs).

Eager FP32 is the reference every export is checked against. FP16 eager uses
diffusers' default scaled-dot-product attention; a component the family keeps in FP32
(``ComponentSpec.keep_fp32``: an SDXL VAE whose config sets ``force_upcast``) runs in FP32
there too, as diffusers' pipelines upcast it. ``compile`` wraps the module in
``torch.compile``; ``cuda_graph`` captures each call shape once and replays it
(CudaGraphed, base for the strongest PyTorch baseline in the benchmarks).
"""

from __future__ import annotations

from typing import Any

from ..errors import UsageError
from .base import CudaGraphed, Engine


class TorchEngine(Engine):
    backend = "torch"

    def __init__(self, spec, module, device: str, dtype: str, compile: bool = False):
        import torch

        super().__init__(spec, device)
        self.dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
        self.module = spec.wrap(module).to(device=device, dtype=self.dtype).eval()
        self.source = module  # the diffusers/transformers module inside the wrapper (parameter names are its own)
        self._base: dict[str, Any] = {}  # built values of the parameters set_weights changed
        if compile:
            self.module = torch.compile(self.module)

    @classmethod
    def load_all(cls, export, components: list[str], device: str = "cpu", dtype: str = "fp32",
                 compile: bool = False, cuda_graph: bool = False):
        if dtype not in ("fp32", "fp16", "bf16"):
            raise UsageError(f"torch dtype {dtype}: choose fp32, fp16 or bf16")
        if cuda_graph and not device.startswith("cuda"):
            raise UsageError("CUDA graphs need --device cuda")
        info = export.source_model()
        modules: dict[str, Any] = {}
        engines = {}
        for name in components:
            spec = export.spec(name)
            if spec.source not in modules:
                modules[spec.source] = info.load_torch(spec.source)
            engine = cls(spec, modules[spec.source], device, "fp32" if spec.keep_fp32 else dtype, compile=compile)
            engines[name] = CudaGraphed(engine) if cuda_graph and name == "unet" else engine
        return engines

    def base_param(self, name: str):
        if name in self._base:
            return self._base[name].float()
        try:
            return self.source.get_parameter(name).detach().float().cpu()
        except AttributeError:
            raise UsageError(f"a LoRA changes {self.spec.name}.{name}, which the model does not have") from None

    def set_weights(self, params: dict[str, Any]) -> None:
        import torch

        with torch.no_grad():
            for name in list(self._base):
                if name not in params:
                    self.source.get_parameter(name).copy_(self._base.pop(name))
            for name, value in params.items():
                param = self.source.get_parameter(name)
                self._base.setdefault(name, param.detach().clone())
                param.copy_(value.to(param))

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
