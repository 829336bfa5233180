"""The name -> class tables and the decorators that fill them, one per kind of policy part:
``@register_eviction("lru")``, ``@register_prefetch("pregated")``, ``@register_miss("cpu")``,
``@register_scheduler("route-group")``, and ``@register_system("fiddler")`` for named systems.
The ``compose`` system builds a system from parts of these tables by name
(:mod:`expertsim.policies.compose`).

It sits below every policy module (of expertsim it imports only ``errors``), so a policy module registers
itself without importing :mod:`expertsim.policies.registry`, which imports the built-in policy
modules to fill these tables: no cycle (Vidur's registries work the same way).
"""
from __future__ import annotations

import difflib
import inspect
import math
from typing import Callable

from expertsim.errors import PolicyError

EVICTION: dict[str, type] = {}
PREFETCH: dict[str, type] = {}
MISS: dict[str, type] = {}
SCHEDULERS: dict[str, type] = {}
SYSTEMS: dict[str, type] = {}
# The parts a system is composed of, by the key ``compose`` takes them under.
PARTS: dict[str, dict[str, type]] = {"eviction": EVICTION, "prefetch": PREFETCH, "miss": MISS,
                                      "scheduler": SCHEDULERS}


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


def register_prefetch(name: str) -> Callable[[type], type]:
    return _register(PREFETCH, name)


def register_miss(name: str) -> Callable[[type], type]:
    return _register(MISS, name)


def register_scheduler(name: str) -> Callable[[type], type]:
    return _register(SCHEDULERS, name)


def check_params(cls: type, params: dict, what: str) -> None:
    """Parameters against the constructor's signature, before it runs: known names (with a
    did-you-mean), no NaN or infinity, and the type of the default (a number where the default is
    a number, an integer where it is an integer, true/false where it is a boolean)."""
    try:
        signature = inspect.signature(cls)
    except (TypeError, ValueError):
        return
    accepted = {n: p for n, p in signature.parameters.items()
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    takes_any = any(p.kind == p.VAR_KEYWORD for p in signature.parameters.values())
    for key, value in params.items():
        if key not in accepted and not takes_any:
            close = difflib.get_close_matches(key, list(accepted), n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise PolicyError(f"{what}: bad parameters: unknown {key}={value!r}.{hint} "
                              f"Parameters: {', '.join(accepted) or 'none'}")
        if isinstance(value, float) and not math.isfinite(value):
            raise PolicyError(f"{what}: bad parameters: {key}={value!r} is not a finite number")
        default = accepted[key].default if key in accepted else inspect.Parameter.empty
        if default is inspect.Parameter.empty or default is None:
            continue
        expected = None
        if isinstance(default, bool):
            if not isinstance(value, bool):
                expected = "true or false"
        elif isinstance(default, int):
            if isinstance(value, bool) or not isinstance(value, int):
                expected = "an integer"
        elif isinstance(default, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                expected = "a number"
        elif isinstance(default, str) and not isinstance(value, str):
            expected = "text"
        if expected:
            raise PolicyError(f"{what}: bad parameters: {key}={value!r} must be {expected} "
                              f"(default {default!r})")


def _construct(cls: type, params: dict, what: str):
    check_params(cls, params, what)
    try:
        return cls(**params)
    except PolicyError:
        raise
    except (TypeError, ValueError) as exc:
        raise PolicyError(f"{what}: bad parameters {params}: {exc}") from None
