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

from expertsim.errors import PolicyError
# The tables and decorators live one module down, so that the policy modules that register
# themselves do not import this one (which imports them): re-exported here for callers.
from expertsim.policies.registration import (
    EVICTION,
    MISS,
    PARTS,
    PREFETCH,
    SCHEDULERS,
    SYSTEMS,
    _construct,
    check_params,
    register_eviction,
    register_miss,
    register_prefetch,
    register_scheduler,
    register_system,
)

__all__ = ["EVICTION", "PREFETCH", "MISS", "SCHEDULERS", "SYSTEMS", "PARTS", "register_eviction",
           "register_prefetch", "register_miss", "register_scheduler", "register_system", "load_plugin",
           "eviction_names", "system_names", "check_params", "make_eviction", "make_system", "make_policy"]

_loaded_builtins = False
_loaded_entry_points = False


def _ensure_loaded() -> None:
    global _loaded_builtins, _loaded_entry_points
    if not _loaded_builtins:
        _loaded_builtins = True
        importlib.import_module("expertsim.policies.eviction")
        importlib.import_module("expertsim.policies.systems")
        importlib.import_module("expertsim.policies.hybrid")
        importlib.import_module("expertsim.policies.compose")
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
        if spec is None or spec.loader is None:
            raise PolicyError(f"plugin file {path!r} is not an importable Python file; name it *.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException as exc:  # noqa: BLE001 - the user's code: report where it failed
            sys.modules.pop(spec.name, None)
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            raise PolicyError(f"plugin {path!r} failed to import: {_where(exc, str(file))}; fix the file "
                              f"(run `python {path}` to see the full traceback)") from None
    else:
        try:
            importlib.import_module(path)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # noqa: BLE001
            raise PolicyError(f"cannot import plugin module {path!r}: {_where(exc, None)}") from None


def _where(exc: BaseException, file: str | None) -> str:
    """``file:line: Kind: message`` of an exception raised while importing a plug-in."""
    import traceback

    if isinstance(exc, SyntaxError):
        return f"{exc.filename or file}:{exc.lineno}: SyntaxError: {exc.msg}"
    frames = traceback.extract_tb(exc.__traceback__)
    mine = [f for f in frames if file is None or f.filename == file] or frames
    loc = f"{mine[-1].filename}:{mine[-1].lineno}: " if mine else ""
    text = str(exc).strip().splitlines()
    return f"{loc}{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


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
    return _construct(EVICTION[name], params, f"eviction policy {name!r}")


def make_system(name: str, **params):
    _ensure_loaded()
    if name not in SYSTEMS:
        raise _unknown(name, "system", sorted(SYSTEMS))
    return _construct(SYSTEMS[name], params, f"system {name!r}")


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
