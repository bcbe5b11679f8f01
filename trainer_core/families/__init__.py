"""Model families behind one interface (see ``base.ModelFamily``)."""

from __future__ import annotations

from ..errors import ConfigError
from .base import FamilyDefaults, Flavour, ModelFamily, TextEncoding


def _registry() -> dict[str, type[ModelFamily]]:
    from .kandinsky5_image import Kandinsky5ImageFamily
    from .kandinsky5_video import Kandinsky5VideoFamily
    from .lumina2 import Lumina2Family

    return {cls.name: cls for cls in (Lumina2Family, Kandinsky5ImageFamily, Kandinsky5VideoFamily)}


def family_names() -> list[str]:
    return list(_registry())


def get_family_class(name: str) -> type[ModelFamily]:
    registry = _registry()
    key = name.replace("_", "-") if name.replace("_", "-") in registry else name
    if key not in registry:
        raise ConfigError(f"model_family {name!r} is not supported", f"use one of: {', '.join(registry)}")
    return registry[key]


__all__ = ["FamilyDefaults", "Flavour", "ModelFamily", "TextEncoding", "family_names", "get_family_class"]
