"""The compiled kernels' cache is named by the kernel modules' sources: a change to any of them
(not only to the module that defines a kernel) gives a fresh cache, so no stale machine code runs."""
from __future__ import annotations

import os

import pytest

import expertsim.jit as jit


def test_cache_dir_follows_every_kernel_source(tmp_path, monkeypatch):
    a, b = tmp_path / "kernels_a.py", tmp_path / "helpers_b.py"
    a.write_text("def kernel(): return helper()\n")
    b.write_text("def helper(): return 1\n")
    monkeypatch.setattr(jit, "_kernel_sources", lambda: [a, b])
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "cache"))
    first = jit.kernel_cache_dir()
    assert first is not None and first.is_dir() and first.parent == tmp_path / "cache"
    assert jit.kernel_cache_dir() == first  # the same sources: the same cache
    b.write_text("def helper(): return 2\n")  # only the helper's module changes
    second = jit.kernel_cache_dir()
    assert second != first and second.is_dir()


def test_stale_caches_are_removed_and_the_current_one_kept(tmp_path, monkeypatch):
    src = tmp_path / "k.py"
    src.write_text("x = 1\n")
    monkeypatch.setattr(jit, "_kernel_sources", lambda: [src])
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path))
    old, recent = tmp_path / "kernels-old", tmp_path / "kernels-recent"
    old.mkdir()
    recent.mkdir()
    os.utime(old, (0, 0))  # last used in 1970: far past the clean-up's age
    current = jit.kernel_cache_dir()
    assert current.is_dir() and recent.is_dir() and not old.exists()


@pytest.mark.skipif(not jit.HAVE_NUMBA, reason="numba absent: no compiled kernels")
def test_the_kernels_are_cached_under_it_and_numbas_setting_is_left_alone():
    import numba
    import numpy as np

    from expertsim.policies.ridge import own_columns

    own_columns(np.zeros((2, 1, 1), dtype=np.int64), 3)
    where = jit.kernel_cache_dir()
    assert any(where.rglob("*own_columns*.nbi"))  # this kernel's index is in the kernels' cache
    assert numba.config.CACHE_DIR == (os.environ.get("NUMBA_CACHE_DIR") or "")  # not changed for others
