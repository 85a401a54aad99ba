"""benchmarks/gpu_bench.py's kept FP32-eager reference image (read by later sdxl invocations on the host)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture
def gpu_bench():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_bench.py"
    spec = importlib.util.spec_from_file_location("gpu_bench_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reference_is_kept_whole_or_not_at_all(gpu_bench, tmp_path, monkeypatch):
    """A write that fails part-way (a full disk) leaves no file under the reference's name for the next run to
    load, and the previous reference as it was; a whole write is loaded back equal."""
    kept = gpu_bench._reference_file(tmp_path, {"steps": 30})
    image = np.random.default_rng(0).random((1, 8, 8, 3), dtype=np.float32)
    gpu_bench._keep_reference(kept, image)
    assert np.array_equal(np.load(kept), image)

    def torn(file, array, *a, **k):  # np.save's first bytes, then the disk is full
        if isinstance(file, (str, Path)):
            file = open(file, "wb")
        with file:
            file.write(b"\x93NUMPY")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "save", torn)
    with pytest.raises(OSError):
        gpu_bench._keep_reference(kept, image * 2)
    monkeypatch.undo()
    assert np.array_equal(np.load(kept), image) and [p.name for p in tmp_path.iterdir()] == [kept.name]
    kept.unlink()
    monkeypatch.setattr(np, "save", torn)
    with pytest.raises(OSError):
        gpu_bench._keep_reference(kept, image)
    assert not list(tmp_path.iterdir())
