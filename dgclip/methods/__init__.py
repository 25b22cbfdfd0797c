"""Method registry: `register_method(name)`, `get_method(name)`, `list_methods()`.

Method modules are imported lazily on first lookup, so a method whose optional dependency is
missing does not break the registry for the others (its import error is reported when asked for).
"""
from __future__ import annotations

import importlib
import importlib.util

from .base import Batch, Method

__all__ = ["Batch", "Method", "register_method", "get_method", "list_methods", "UnknownMethodError"]

# name -> module that registers it (imported on demand)
_MODULES = {
    "zero-shot": "dgclip.methods.zeroshot",
    "coop": "dgclip.methods.coop",
    "cocoop": "dgclip.methods.cocoop",
    "dpl": "dgclip.methods.dpl",
    "dalsclip": "dgclip.methods.dalsclip",
    "gopro": "dgclip.methods.gopro",
    "seeclip": "dgclip.methods.seeclip",
}
_REGISTRY: dict[str, type[Method]] = {}


class UnknownMethodError(KeyError):
    def __str__(self):  # KeyError quotes its message; keep it readable
        return str(self.args[0])


def register_method(name: str):
    """Class decorator: register a Method subclass under `name` (also sets cls.name)."""

    def deco(cls):
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise TypeError(f"register_method({name!r}) expects a Method subclass, got {cls!r}")
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"method name {name!r} is already registered by {_REGISTRY[name]!r}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def get_method(name: str) -> type[Method]:
    if name not in _REGISTRY:
        module = _MODULES.get(name)
        if module is None:
            raise UnknownMethodError(f"unknown method {name!r}; available: {', '.join(list_methods())}")
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name and (exc.name == module or module.startswith(exc.name + ".")):
                raise UnknownMethodError(f"method {name!r} is not available in this build "
                                         f"({module} not found)") from exc
            raise ImportError(f"method {name!r} needs a missing dependency: {exc}") from exc
        if name not in _REGISTRY:
            raise UnknownMethodError(f"{module} did not register method {name!r}")
    return _REGISTRY[name]


def list_methods() -> list[str]:
    """Names known to the registry (registered or importable lazily), in a stable order."""
    names = list(_MODULES)
    names += sorted(n for n in _REGISTRY if n not in _MODULES)
    out = []
    for n in names:
        if n in _REGISTRY or importlib.util.find_spec(_MODULES[n]) is not None:
            out.append(n)
    return out
