"""A stand-in for TensorRT's runtime objects, for running ``TrtEngine`` where no GPU can run a plan.

It mirrors the parts of the TensorRT 10/11 / TensorRT-RTX 1.7 Python API that sdexport calls (Runtime,
ICudaEngine, IExecutionContext, enums), records every call, and computes with ONNX Runtime on the ONNX each
plan was built from: ``execute_async_v3`` reads the inputs from the addresses bound with ``set_tensor_address``
and writes the outputs to theirs, so the binding logic (shapes, dtypes, addresses, buffer sizes) is exercised
on real host memory. CUDA pieces torch would need (streams, graphs, device guards) are faked by ``FakeCuda``:
a graph records each enqueue with the addresses bound at capture time and replays them, which is what a CUDA
graph does with TensorRT's kernels.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import hashlib
import types
from pathlib import Path

import numpy as np

ONNX_DTYPES = {1: "FLOAT", 10: "HALF", 6: "INT32", 7: "INT64", 9: "BOOL"}
NUMPY = {"FLOAT": np.float32, "HALF": np.float16, "INT32": np.int32, "INT64": np.int64, "BOOL": np.bool_}


class Severity(enum.IntEnum):
    INTERNAL_ERROR = 0
    ERROR = 1
    WARNING = 2
    INFO = 3
    VERBOSE = 4


class ILogger:
    Severity = Severity

    def __init__(self):
        pass


class TensorIOMode(enum.IntEnum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class ExecutionContextAllocationStrategy(enum.IntEnum):
    STATIC = 0
    ON_PROFILE_CHANGE = 1
    USER_MANAGED = 2


class EngineValidity(enum.IntEnum):
    VALID = 0
    SUBOPTIMAL = 1
    INVALID = 2


class EngineInvalidityDiagnostics(enum.IntEnum):
    VERSION_MISMATCH = 1
    UNSUPPORTED_CC = 2
    OLD_CUDA_DRIVER = 4
    OLD_CUDA_RUNTIME = 8
    INSUFFICIENT_GPU_MEMORY = 16
    MALFORMED_ENGINE = 32
    CUDA_ERROR = 64


class DataType:
    def __init__(self, name):
        self.name = name


def _view(address: int, shape, dtype) -> np.ndarray:
    """The host memory at ``address`` as an array (what a kernel would read or write)."""
    count = int(np.prod(shape)) if len(shape) else 1
    nbytes = count * np.dtype(dtype).itemsize
    return np.frombuffer((ctypes.c_byte * nbytes).from_address(address), dtype=dtype).reshape(shape)


class FakeContext:
    def __init__(self, engine, strategy):
        self.engine, self.strategy = engine, strategy
        self.shapes: dict[str, tuple] = {}
        self.addresses: dict[str, int] = {}
        self.calls: list[tuple] = []
        self.capturable = True

    def set_input_shape(self, name, shape):
        self.calls.append(("set_input_shape", name, tuple(shape)))
        lo, _, hi = self.engine.profile[name]
        if len(shape) != len(lo) or any(not a <= s <= b for s, a, b in zip(shape, lo, hi)):
            return False
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name):
        if self.engine.modes[name] == TensorIOMode.INPUT:
            return self.shapes[name]
        return self.engine.output_shape(self.shapes, name)

    def set_tensor_address(self, name, address):
        self.calls.append(("set_tensor_address", name, address))
        if name not in self.engine.modes:
            return False
        self.addresses[name] = address
        return True

    def set_device_memory(self, address, size):
        self.calls.append(("set_device_memory", address, size))

    def is_stream_capturable(self, stream):
        self.calls.append(("is_stream_capturable", stream))
        return self.capturable

    def execute_async_v3(self, stream):
        self.calls.append(("execute_async_v3", stream, current_device()))
        if not FakeCuda.installed:  # real CUDA memory: nothing here can compute on it; the call is what is tested
            return True
        shapes, addresses = dict(self.shapes), dict(self.addresses)
        run = lambda: self.engine.compute(shapes, addresses)  # noqa: E731 - what a captured launch replays
        if FakeCuda.capturing is not None:
            FakeCuda.capturing.ops.append(run)
        else:
            run()
        return True


class FakeEngine:
    def __init__(self, onnx_path: Path, profile: dict, memory_bytes: int):
        import onnx
        import onnxruntime

        model = onnx.load(str(onnx_path), load_external_data=False)
        self.inputs = [(v.name, ONNX_DTYPES[v.type.tensor_type.elem_type]) for v in model.graph.input]
        self.outputs = [(v.name, ONNX_DTYPES[v.type.tensor_type.elem_type]) for v in model.graph.output]
        self.modes = {**{n: TensorIOMode.INPUT for n, _ in self.inputs}, **{n: TensorIOMode.OUTPUT for n, _ in self.outputs}}
        self.dtypes = dict(self.inputs + self.outputs)
        self.profile = profile
        self.device_memory_size_v2 = memory_bytes
        self.session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        self.contexts: list[FakeContext] = []
        self._shapes: dict[tuple, dict] = {}

    @property
    def num_io_tensors(self):
        return len(self.modes)

    def get_tensor_name(self, i):
        return list(self.modes)[i]

    def get_tensor_mode(self, name):
        return self.modes[name]

    def get_tensor_dtype(self, name):
        return DataType(self.dtypes[name])

    def create_execution_context(self, strategy=ExecutionContextAllocationStrategy.STATIC):
        context = FakeContext(self, strategy)
        context.created_on = current_device()
        self.contexts.append(context)
        return context

    def _run(self, feeds):
        return dict(zip([n for n, _ in self.outputs], self.session.run(None, feeds)))

    def output_shape(self, shapes, name):
        key = tuple(sorted(shapes.items()))
        if key not in self._shapes:
            zeros = {n: np.zeros(shapes[n], NUMPY[d]) for n, d in self.inputs}
            self._shapes[key] = {k: v.shape for k, v in self._run(zeros).items()}
        return self._shapes[key][name]

    def compute(self, shapes, addresses):
        feeds = {n: _view(addresses[n], shapes[n], NUMPY[d]).copy() for n, d in self.inputs}
        for name, value in self._run(feeds).items():
            np.copyto(_view(addresses[name], value.shape, NUMPY[self.dtypes[name]]), value)


class FakeRuntime:
    def __init__(self, module, logger):
        self.module, self.logger = module, logger

    def deserialize_cuda_engine(self, blob):
        self.module.deserialized.append((hashlib.sha256(blob).hexdigest(), current_device()))
        found = self.module.plans.get(hashlib.sha256(blob).hexdigest())
        if found is None:
            self.logger.log(Severity.ERROR, "IRuntime::deserializeCudaEngine: Error Code 1: Serialization "
                                            "(Serialization assertion magicTagRead == kMAGIC_TAG failed.)")
            return None
        engine = FakeEngine(*found)
        self.module.engines.append(engine)
        return engine


def fake_tensorrt(name="fake_tensorrt", version="10.13.3.9", validity=None):
    """A module standing in for ``tensorrt``. ``plans``: sha256 of a plan file -> (onnx path, profile,
    device memory bytes). ``validity``: a function of the plan bytes giving Runtime.get_engine_validity's
    answer (TensorRT-RTX 1.7), or None for a TensorRT without that method."""
    module = types.ModuleType(name)
    module.__version__ = version
    module.ILogger = ILogger
    module.TensorIOMode = TensorIOMode
    module.ExecutionContextAllocationStrategy = ExecutionContextAllocationStrategy
    module.EngineValidity = EngineValidity
    module.EngineInvalidityDiagnostics = EngineInvalidityDiagnostics
    module.plans, module.engines, module.deserialized = {}, [], []

    class Runtime(FakeRuntime):
        def __init__(self, logger):
            super().__init__(module, logger)

    if validity is not None:
        Runtime.get_engine_validity = lambda self, blob: validity(bytes(blob))
    module.Runtime = Runtime
    return module


def register_plans(module, export_dir: Path, memory_bytes=1 << 20):
    """Make every engine of ``export_dir``'s manifest known to the fake (by its plan's sha256)."""
    import json

    manifest = json.loads((export_dir / "manifest.json").read_text())
    for entry in manifest["engines"].values():
        onnx_entry = manifest["components"][entry["onnx"]["component"]]
        module.plans[entry["sha256"]] = (export_dir / onnx_entry["file"], entry["profile"],
                                         memory_bytes(entry) if callable(memory_bytes) else memory_bytes)


class FakeStream:
    count = 0

    def __init__(self, device=None):
        FakeStream.count += 1
        self.cuda_stream = 1000 + FakeStream.count


class FakeGraph:
    def __init__(self):
        self.ops = []
        self.replays = 0

    def replay(self):
        self.replays += 1
        for op in self.ops:
            op()


def current_device() -> int:
    """The CUDA device TensorRT would work on now: the fake's, or the real one where the fake is not installed."""
    if FakeCuda.installed:
        return FakeCuda.current_device
    import torch

    return torch.cuda.current_device()


class FakeCuda:
    """torch.cuda's stream, graph and device-guard calls, faked (installed with ``install``)."""

    installed = False
    capturing: FakeGraph | None = None
    current_device = 0
    entered: list[int] = []
    default_stream = FakeStream()

    @classmethod
    def install(cls, monkeypatch, free_bytes=1 << 40):
        import torch

        cls.capturing, cls.current_device, cls.entered = None, 0, []
        monkeypatch.setattr(cls, "installed", True)

        @contextlib.contextmanager
        def device(index):
            index = torch.device(index).index if not isinstance(index, int) else index
            previous, cls.current_device = cls.current_device, index
            cls.entered.append(index)
            try:
                yield
            finally:
                cls.current_device = previous

        @contextlib.contextmanager
        def graph(cuda_graph, pool=None, stream=None, **kw):
            cls.capturing = cuda_graph
            try:
                yield
            finally:
                cls.capturing = None

        monkeypatch.setattr(torch.cuda, "device", device)
        monkeypatch.setattr(torch.cuda, "graph", graph)
        monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
        monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: cls.default_stream)
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: cls.capturing is not None)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: cls.current_device)
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free_bytes, 2 * free_bytes))
        monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
        return cls
