"""Errors expertsim raises for bad input. Each message names the bad value and the fix."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator


class ExpertSimError(ValueError):
    """Base class: a user-facing error (the CLI prints its message, not a traceback)."""


class SpecError(ExpertSimError):
    """A model, hardware or serving spec is invalid or unknown."""


class TraceError(ExpertSimError):
    """A routing trace is malformed or does not match the model."""


class PolicyError(ExpertSimError):
    """A policy name or parameter is invalid."""


class ConfigError(ExpertSimError):
    """A simulation configuration cannot run (cache too small, memory overflow, ...)."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (third-party errors can span many lines)."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else ""
    if len(text) > 200:
        text = text[:197] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__



@contextmanager
def _native_stderr_held() -> Iterator[None]:
    """Hold what native code writes to file descriptor 2 during the block: shown afterwards when
    the block succeeds, dropped when it fails (a Rust panic prints its message and backtrace there
    before Python sees the exception, and the user gets our one line instead)."""
    import os
    import sys
    import tempfile

    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no real fd 2 (an embedded interpreter)
        yield
        return
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        failed = True
        try:
            yield
            failed = False
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            if not failed:
                held.seek(0)
                text = held.read()
                if text:
                    os.write(2, text)


@contextmanager
def foreign_errors(error: type[ExpertSimError], what: str, fix: str, *,
                   hold_native_stderr: bool = False) -> Iterator[None]:
    """Turn any failure of third-party code inside the block into one ``error``:
    ``"{what} ({cause}); {fix}"``.

    Our own errors pass through unchanged, and so do KeyboardInterrupt, SystemExit and
    GeneratorExit. Everything else becomes one line, including a Rust panic from polars (pyo3's
    PanicException derives from BaseException, not Exception) and a MemoryError from a header
    that claims a huge size. With ``hold_native_stderr`` what native code prints meanwhile (a
    panic's message and backtrace) is dropped when the block fails."""
    try:
        if hold_native_stderr:
            with _native_stderr_held():
                yield
        else:
            yield
    except (ExpertSimError, KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - the point: nothing foreign escapes as a traceback
        raise error(f"{what} ({first_line(exc)}); {fix}") from None


def check_option_number(option: str, value: float | None, *, low: float = 0.0, strict: bool = True,
                        high: float | None = None, unit: str = "") -> float | None:
    """A numeric command-line option: None passes; otherwise a finite number above ``low``
    (or at least ``low`` when not ``strict``) and at most ``high``, else one ConfigError that
    names the option, the value and its unit."""
    if value is None:
        return None
    unit_text = f" {unit}" if unit else ""
    bound = f"> {low:g}" if strict else f">= {low:g}"
    if high is not None:
        bound += f" and <= {high:g}"
    ok = value == value and value not in (float("inf"), float("-inf")) and \
        (value > low if strict else value >= low) and (high is None or value <= high)
    if not ok:
        raise ConfigError(f"{option} {value!r}{unit_text}: give a finite number {bound}{unit_text}")
    return value


def check_output_path(path, option: str, *, folder: bool = False):
    """Where ``option`` will write (a file, or a folder when ``folder``): raise ConfigError
    unless it can be created there. Catches the usual mistakes before any work is done: a parent
    that is a regular file, a file where a folder is wanted (and the reverse), a read-only place.
    Returns the path as a ``Path``."""
    import os
    from pathlib import Path

    target = Path(path)
    if str(path).strip() == "":
        raise ConfigError(f"{option} is empty; give a path")
    if target.exists():
        if folder and not target.is_dir():
            raise ConfigError(f"{option} {str(path)!r} is a file, not a folder; give a folder path")
        if not folder and target.is_dir():
            raise ConfigError(f"{option} {str(path)!r} is a folder; give a file path")
        if not os.access(target, os.W_OK):
            raise ConfigError(f"{option} {str(path)!r} is not writable; choose another path")
        return target
    parent = target.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{option} {str(path)!r}: {str(parent)!r} is a file, so nothing can be "
                          f"created under it; choose another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{option} {str(path)!r}: folder {str(parent)!r} is not writable; "
                          f"choose another path")
    return target
