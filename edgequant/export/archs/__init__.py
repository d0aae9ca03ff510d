"""Architecture registry: one module per family, registered by HF architecture name.

Adding a family (Qwen2, Phi-3, Gemma, ...) is one new module here that subclasses
:class:`~edgequant.export.archs.base.Architecture` and decorates it with :func:`register`;
``docs/adding-an-architecture.md`` walks through it. Nothing outside ``archs/`` knows
architecture details.
"""

from __future__ import annotations

import importlib
import pkgutil

from edgequant.errors import EdgequantError
from edgequant.export.archs.base import Architecture

_REGISTRY: dict[str, type[Architecture]] = {}


def register(*hf_names: str):
    def deco(cls: type[Architecture]) -> type[Architecture]:
        for n in hf_names:
            _REGISTRY[n] = cls
        cls.hf_names = hf_names
        return cls

    return deco


def _load_all() -> None:
    for mod in pkgutil.iter_modules(__path__):
        if mod.name != "base":
            importlib.import_module(f"{__name__}.{mod.name}")


def supported() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def architecture_for(hf_name: str) -> type[Architecture]:
    _load_all()
    try:
        return _REGISTRY[hf_name]
    except KeyError:
        raise EdgequantError(
            f"unsupported architecture {hf_name}; edgequant converts {', '.join(supported())} "
            f"(see docs/adding-an-architecture.md to add one)"
        ) from None
