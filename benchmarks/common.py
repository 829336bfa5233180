"""Shared helpers for the benchmarks: the machine, the shared traces, timing, result files."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"


def shared_trace(name: str = "mixtral-8x7b-mtbench.dev.parquet") -> Path:
    env = os.environ.get("EXPERTSIM_SHARED_TRACES")
    folder = Path(env) if env else (REPO / ".." / "shared" / "traces").resolve()
    path = folder / name
    if not path.is_file():
        sys.exit(f"shared trace {path} not found (set EXPERTSIM_SHARED_TRACES)")
    return path


def machine() -> dict:
    """Where and when: CPU model and count (lscpu), load, versions."""
    info = {"date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "python": platform.python_version(), "cpus": os.cpu_count(),
            "load_avg_1_5_15": [round(x, 2) for x in os.getloadavg()]}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("Model name", "CPU(s)", "Thread(s) per core", "Hypervisor vendor"):
                info["lscpu " + key.strip()] = value.strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    import numpy

    info["numpy"] = numpy.__version__
    try:
        import numba

        info["numba"] = numba.__version__
    except ImportError:
        info["numba"] = None
    try:
        import libcachesim

        info["libcachesim"] = getattr(libcachesim, "__version__", "?")
    except ImportError:
        info["libcachesim"] = None
    return info


def best_of(fn, repeat: int, walls: list | None = None) -> tuple[float, object]:
    """(fastest wall seconds, last result) over ``repeat`` calls; every wall is appended to
    ``walls`` when given (for the spread)."""
    best, result = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        wall = time.perf_counter() - t0
        best = min(best, wall)
        if walls is not None:
            walls.append(wall)
    return best, result


class SimpyEventCounter:
    """Counts the SimPy events processed inside the ``with`` block (SimPy's event loop is
    patched for its duration): a measure of the DES's work that does not depend on the machine."""

    def __enter__(self):
        import simpy

        self.count = 0
        self._step = step = simpy.Environment.step

        def counting_step(env):
            self.count += 1
            return step(env)

        simpy.Environment.step = counting_step
        return self

    def __exit__(self, *exc):
        import simpy

        simpy.Environment.step = self._step
        return False


def save(name: str, data: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    print(f"wrote {path.relative_to(REPO)}")
    return path
