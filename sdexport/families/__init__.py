"""Model families: one file per family (sd.py, sdxl.py), each declaring its components, conditioning,
default ranges and reference pipeline (base.py says what a family answers)."""

from __future__ import annotations

from typing import Any

from ..errors import ModelError
from .base import Family, Guidance, guidance_for
from .sd import FAMILY as SD

FAMILIES: dict[str, Family] = {SD.name: SD}


def register(family: Family) -> None:
    FAMILIES[family.name] = family


def by_name(name: str) -> Family:
    if name not in FAMILIES:
        raise ModelError(f"model family '{name}' is unknown to this sdexport (knows {', '.join(FAMILIES)})")
    return FAMILIES[name]


def family_for(index: dict[str, Any], where) -> Family:
    """The family whose pipeline classes include the directory's ``_class_name``."""
    cls = index.get("_class_name", "")
    for family in FAMILIES.values():
        if cls in family.pipeline_classes:
            return family
    known = ", ".join(c for f in FAMILIES.values() for c in f.pipeline_classes)
    raise ModelError(f"{where}: pipeline class '{cls or '?'}' is not supported (supported: {known})")


__all__ = ["FAMILIES", "Family", "Guidance", "by_name", "family_for", "guidance_for", "register"]
