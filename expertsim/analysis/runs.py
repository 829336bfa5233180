"""The run files of a sweep directory: ``DIR/runs/<run_id>.json``, one record a run (and
``<run_id>.timeline.parquet`` when it kept a timeline), each written atomically (a temporary file,
then ``os.replace``), so that a killed sweep leaves whole files or none.

Both :mod:`expertsim.analysis.sweep` (which writes them) and :mod:`expertsim.analysis.results`
(which reads them into a table) stand on this module.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

RUNS_DIR = "runs"


def _json_default(value):
    try:
        import numpy as np

        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, np.ndarray):
            return value.tolist()
    except ImportError:  # pragma: no cover
        pass
    return str(value)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_run(out_dir: Path, record: dict) -> Path:
    """DIR/runs/<run_id>.json (and .timeline.parquet when the record has a timeline), atomically."""
    runs = Path(out_dir) / RUNS_DIR
    runs.mkdir(parents=True, exist_ok=True)
    timeline = record.pop("timeline", None)
    if timeline is not None:
        from expertsim.sim.metrics import Timeline

        tl = Timeline()
        tl.rows = list(zip(*(timeline[c] for c in Timeline.COLUMNS)))
        path = runs / f"{record['run_id']}.timeline.parquet"
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tl.to_frame().write_parquet(tmp)
        os.replace(tmp, path)
        record["timeline_file"] = path.name
    path = runs / f"{record['run_id']}.json"
    atomic_write_bytes(path, json.dumps(record, default=_json_default, allow_nan=True).encode())
    return path


def read_run(path: Path) -> dict | None:
    """The record in a run file, or None when the file is torn or not a run record (cut short by
    a full disk or a copy, edited by hand, or not ours): such a run counts as not done."""
    try:
        record = json.loads(path.read_bytes())
    except (OSError, ValueError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None
    if not isinstance(record, dict) or record.get("run_id") != path.stem \
            or record.get("status") not in ("ok", "error") or not isinstance(record.get("config", {}), dict) \
            or not isinstance(record.get("metrics", {}), dict):
        return None
    return record


def _run_files(out_dir: Path) -> list[Path]:
    runs = Path(out_dir) / RUNS_DIR
    if not runs.is_dir():
        return []
    return sorted(p for p in runs.glob("*.json") if not p.name.startswith("."))


def torn_run_files(out_dir: Path) -> list[Path]:
    """Run files that cannot be read back as a run record."""
    return [p for p in _run_files(out_dir) if read_run(p) is None]


def finished_run_ids(out_dir: Path, *, include_errors: bool = True) -> set[str]:
    """Ids of the runs whose file reads back whole (torn files are not finished runs)."""
    done = set()
    for path in _run_files(out_dir):
        record = read_run(path)
        if record is None or (not include_errors and record["status"] != "ok"):
            continue
        done.add(path.stem)
    return done


def clean_stale_tmp(out_dir: Path) -> list[Path]:
    """Remove temporary files (``.<name>.<pid>.tmp``) left by killed sweeps whose process is gone."""
    removed = []
    out = Path(out_dir)
    for folder in (out, out / RUNS_DIR):
        if not folder.is_dir():
            continue
        for path in folder.glob(".*.tmp"):
            try:
                pid = int(path.name.rsplit(".", 2)[-2])
            except (ValueError, IndexError):
                pid = None
            if pid is not None and pid != os.getpid() and _alive(pid):
                continue
            try:
                path.unlink()
                removed.append(path)
            except OSError:
                pass
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def iter_records(out_dir: str | Path) -> Iterable[dict]:
    for path in _run_files(Path(out_dir)):
        record = read_run(path)
        if record is not None:  # a torn run file is re-run by the next resume, not reported
            yield record
