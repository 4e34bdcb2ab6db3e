"""Model-family adapters, installed as ``pumer_patch.adapters`` (import it only under that name).

One file per family. The registry is lazy: an adapter module is imported only when the library it
adapts has been imported already, since a model of that library cannot exist otherwise.
"""

from __future__ import annotations

import importlib
import sys

from .base import Adapter, LayerCount, PatchState, Plan, Trace

__all__ = ["Adapter", "LayerCount", "PatchState", "Plan", "Trace", "REGISTRY", "get_adapter", "loaded_adapters"]

# name -> (library that must be imported, module, class), in the order roots are searched; a root nested
# inside another family's root is left to that owner (see base.py), and no two adapters claim one module
REGISTRY: dict[str, tuple[str, str, str]] = {
    "meter": ("pumer_patch.models.meter", "pumer_patch.adapters.meter", "MeterAdapter"),
    "vilt": ("transformers", "pumer_patch.adapters.vilt", "ViltAdapter"),
    "hf_vlm": ("transformers", "pumer_patch.adapters.hf_vlm", "HfVlmAdapter"),
    "hf_vit": ("transformers", "pumer_patch.adapters.hf_vit", "HfVitAdapter"),
    "open_clip": ("open_clip", "pumer_patch.adapters.open_clip", "OpenClipAdapter"),
    "timm_eva": ("timm", "pumer_patch.adapters.timm_eva", "TimmEvaAdapter"),
    "timm": ("timm", "pumer_patch.adapters.timm", "TimmAdapter"),
}

_instances: dict[str, Adapter] = {}


def get_adapter(name: str) -> Adapter:
    """The adapter registered under ``name`` (imported on first use)."""
    if name not in _instances:
        _, module, cls = REGISTRY[name]
        _instances[name] = getattr(importlib.import_module(module), cls)()
    return _instances[name]


def loaded_adapters() -> list[Adapter]:
    """Adapters whose library is imported, in registry order."""
    return [get_adapter(name) for name, (library, _, _) in REGISTRY.items() if library in sys.modules]
