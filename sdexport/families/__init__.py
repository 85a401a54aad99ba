"""Model families: one file per family (sd.py, sdxl.py), each declaring its components, conditioning,
default ranges and reference pipeline (base.py says what a family answers)."""

from __future__ import annotations

from typing import Any

from ..errors import ModelError
from .base import Family, FamilyOption, Guidance, guidance_for
from .sd import FAMILY as SD
from .sdxl import FAMILY as SDXL

FAMILIES: dict[str, Family] = {SD.name: SD, SDXL.name: SDXL}


def register(family: Family) -> None:
    FAMILIES[family.name] = family


def all_options() -> dict[str, FamilyOption]:
    """Every family's request options by name (the CLI offers them all; each model checks its own)."""
    return {o.name: o for f in FAMILIES.values() for o in f.options}


def default_strengths() -> str:
    """Every family's default --strength for the CLI's help ("0.8 SD, 0.3 SDXL; inpainting 1.0 SD, ...")."""
    return "; ".join(("" if mode == "image-to-image" else f"{mode} ")
                     + ", ".join(f"{f.default_strength[mode]} {f.name.upper()}" for f in FAMILIES.values())
                     for mode in ("image-to-image", "inpainting"))


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


__all__ = ["FAMILIES", "Family", "FamilyOption", "Guidance", "by_name", "default_strengths", "family_for", "all_options",
           "guidance_for", "register"]
