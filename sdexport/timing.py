"""Stage timing that adds no host synchronisation on the GPU.

On CUDA each interval is a pair of CUDA events recorded on torch's current
stream; elapsed times are read once, after the work, with one synchronize. On
the CPU, intervals are ``time.perf_counter`` differences.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections import defaultdict


class StageClock:
    def __init__(self, device: str = "cpu"):
        self.cuda = device.startswith("cuda")
        self._marks: dict[str, list] = defaultdict(list)

    @contextlib.contextmanager
    def stage(self, name: str):
        if self.cuda:
            import torch

            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._marks[name].append((start, end))
        else:
            t0 = time.perf_counter()
            yield
            self._marks[name].append(time.perf_counter() - t0)

    def results_ms(self) -> dict[str, list[float]]:
        """Every recorded interval per stage, in milliseconds (synchronizes once on CUDA)."""
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            return {k: [s.elapsed_time(e) for s, e in v] for k, v in self._marks.items()}
        return {k: [x * 1e3 for x in v] for k, v in self._marks.items()}


def summarize_ms(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    p90 = ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]
    return {"median_ms": round(statistics.median(ordered), 4), "p90_ms": round(p90, 4),
            "min_ms": round(ordered[0], 4), "n": len(ordered)}


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
