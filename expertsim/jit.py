"""The compiler switch of the fast engine and the learned predictors: numba when it is installed
(the ``fast`` extra), else the kernels run as plain Python over numpy arrays, with the same
results, slower.

Every kernel is compiled with ``cache=True`` (the machine code is kept on disk and reused by
later processes) and ``nogil=True`` (so the bound's Belady replay and a predictor's layer pairs
can run on other threads). numba compiles a kernel at its first call, so importing a module of
kernels costs little; a run loads only the kernels it calls.

Where the machine code is kept (:func:`kernel_cache_dir`): numba checks a cached kernel only
against its own source file, so a kernel that calls helpers from another module would keep its
old machine code after that module changed (a stale kernel, silently wrong numbers). The cache
therefore lives in a directory named by a hash of every kernel module's source: any change to
any of them gives a new directory, and the kernels are compiled afresh.
"""
from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

STALE_CACHE_DAYS = 14  # kernel caches of other sources unused this long are removed


def _kernel_sources() -> list[Path]:
    """The modules whose source a compiled kernel may depend on: every module of the package that
    compiles kernels (it uses ``_njit``), and the fast engine's package, and this one."""
    package = Path(__file__).resolve().parent
    out = []
    for path in sorted(package.rglob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        if path.parent.name == "fast" or "_njit" in text:
            out.append(path)
    return out


def kernel_cache_dir() -> Path | None:
    """The directory of the compiled kernels: ``$NUMBA_CACHE_DIR`` (else ``$XDG_CACHE_HOME`` or
    ``~/.cache``, then ``expertsim/numba``), then a hash of the kernel modules' sources. None
    when it cannot be made (numba's default, next to the sources, is used then)."""
    base = os.environ.get("NUMBA_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "expertsim", "numba")
    package = Path(__file__).resolve().parent
    digest = hashlib.sha1()
    for path in _kernel_sources():
        name = path.relative_to(package).as_posix() if path.is_relative_to(package) else path.name
        digest.update(name.encode())
        digest.update(path.read_bytes())
    where = Path(base) / f"kernels-{digest.hexdigest()[:16]}"
    try:
        where.mkdir(parents=True, exist_ok=True)
        os.utime(where)  # in use: kept by the clean-up below
    except OSError:
        return None
    cutoff = time.time() - STALE_CACHE_DAYS * 86400
    for other in Path(base).glob("kernels-*"):
        try:
            if other != where and other.stat().st_mtime < cutoff:
                import shutil

                shutil.rmtree(other, ignore_errors=True)
        except OSError:
            pass
    return where


try:  # numba is optional: the `fast` extra
    import numba

    HAVE_NUMBA = True
    _WHERE = kernel_cache_dir()

    def _in_kernel_cache(decorator):
        """``decorator`` applied with numba's cache directory set to :func:`kernel_cache_dir`
        (numba reads it when a function is decorated), then put back: a user's own numba
        functions in the same process keep theirs."""
        def apply(func):
            before = numba.config.CACHE_DIR
            if _WHERE is not None:
                numba.config.CACHE_DIR = str(_WHERE)
            try:
                return decorator(func)
            finally:
                numba.config.CACHE_DIR = before
        return apply

    _njit = _in_kernel_cache(numba.njit(cache=True, nogil=True))
except ImportError:  # pragma: no cover - exercised where numba is absent
    HAVE_NUMBA = False

    def _njit(func):
        return func

if HAVE_NUMBA:
    _njit_inline = _in_kernel_cache(numba.njit(cache=True, nogil=True, inline="always"))
else:  # pragma: no cover
    def _njit_inline(func):
        return func


def map_threads(fn, items) -> list:
    """``[fn(x) for x in items]``, in that order, on up to as many threads as this process may
    run on at once (at most 8) when the kernels are compiled: they release the GIL (``nogil``),
    so work that is mostly kernel calls (a predictor's layer pairs) runs side by side. Each
    item's result is what it would be alone; without numba, one thread."""
    items = list(items)
    workers = min(len(items), _cpus(), 8) if HAVE_NUMBA else 1
    if workers <= 1:
        return [fn(x) for x in items]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, items))


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        return os.cpu_count() or 1
