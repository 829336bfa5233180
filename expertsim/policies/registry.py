"""Name -> policy registries. A new policy is one class and one decorator line.

``register_eviction("lru")`` registers an EvictionPolicy class; ``register_system("fiddler")``
registers a System class. ``make_policy(name)`` resolves a name to a ready System: a named system,
or a plain eviction policy wrapped in the base System (copy on every miss, no prefetch).
User plug-ins register themselves the same way when their module is imported
(``--plugin my_policies.py`` on the command line, or the ``expertsim.policies`` entry point group).
"""
from __future__ import annotations

import difflib
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Callable

from expertsim.errors import PolicyError

EVICTION: dict[str, type] = {}
SYSTEMS: dict[str, type] = {}
_loaded_builtins = False
_loaded_entry_points = False


def register_eviction(name: str) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        cls.name = name
        EVICTION[name] = cls
        return cls

    return deco


def register_system(name: str) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        cls.name = name
        SYSTEMS[name] = cls
        return cls

    return deco


def _ensure_loaded() -> None:
    global _loaded_builtins, _loaded_entry_points
    if not _loaded_builtins:
        _loaded_builtins = True
        importlib.import_module("expertsim.policies.eviction")
        importlib.import_module("expertsim.policies.systems")
    if not _loaded_entry_points:
        _loaded_entry_points = True
        from importlib.metadata import entry_points

        for ep in entry_points(group="expertsim.policies"):
            ep.load()


def load_plugin(path: str) -> None:
    """Import a user's policy file (or dotted module) so its decorators register its classes."""
    if path.endswith(".py") or Path(path).is_file():
        file = Path(path)
        if not file.is_file():
            raise PolicyError(f"plugin file {path!r} does not exist")
        spec = importlib.util.spec_from_file_location(f"expertsim_plugin_{file.stem}", file)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    else:
        try:
            importlib.import_module(path)
        except ImportError as exc:
            raise PolicyError(f"cannot import plugin module {path!r}: {exc}") from None


def eviction_names() -> list[str]:
    _ensure_loaded()
    return sorted(EVICTION)


def system_names() -> list[str]:
    _ensure_loaded()
    return sorted(SYSTEMS)


def _unknown(name: str, kind: str, known: list[str]) -> PolicyError:
    close = difflib.get_close_matches(name, known, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return PolicyError(
        f"unknown {kind} {name!r}.{hint} Known: {', '.join(known)} (`expertsim policies list`)"
    )


def make_eviction(name: str, **params):
    _ensure_loaded()
    if name not in EVICTION:
        raise _unknown(name, "eviction policy", sorted(EVICTION))
    try:
        return EVICTION[name](**params)
    except TypeError as exc:
        raise PolicyError(f"eviction policy {name!r}: bad parameters {params}: {exc}") from None


def make_system(name: str, **params):
    _ensure_loaded()
    if name not in SYSTEMS:
        raise _unknown(name, "system", sorted(SYSTEMS))
    try:
        return SYSTEMS[name](**params)
    except TypeError as exc:
        raise PolicyError(f"system {name!r}: bad parameters {params}: {exc}") from None


def make_policy(name: str, **params):
    """A System for ``name``: a named system, else an eviction policy with copy-on-miss."""
    _ensure_loaded()
    if name in SYSTEMS:
        return make_system(name, **params)
    if name in EVICTION:
        from expertsim.policies.base import System

        system = System(make_eviction(name, **params))
        system.name = name
        return system
    raise _unknown(name, "policy", sorted(set(SYSTEMS) | set(EVICTION)))
