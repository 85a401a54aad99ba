"""Engines: one small class per backend behind the ``Engine`` interface (base.py).

``load_engines(export_dir, backend, ...)`` is the only entry point the sampler
loop, validation and benchmarks use; none of them knows which backend it drives.
"""

from .base import BACKENDS, Engine, load_engines

__all__ = ["BACKENDS", "Engine", "load_engines"]
