"""The name -> class tables and the decorators that fill them: ``@register_eviction("lru")``,
``@register_system("fiddler")``.

It sits below every policy module (it imports nothing of expertsim), so a policy module registers
itself without importing :mod:`expertsim.policies.registry`, which imports the built-in policy
modules to fill these tables: no cycle (Vidur's registries work the same way).
"""
from __future__ import annotations

from typing import Callable

EVICTION: dict[str, type] = {}
SYSTEMS: dict[str, type] = {}


def _register(table: dict[str, type], name: str) -> Callable[[type], type]:
    """A class decorator that names the class ``name`` and files it in ``table``."""
    def deco(cls: type) -> type:
        cls.name = name
        table[name] = cls
        return cls

    return deco


def register_eviction(name: str) -> Callable[[type], type]:
    return _register(EVICTION, name)


def register_system(name: str) -> Callable[[type], type]:
    return _register(SYSTEMS, name)
