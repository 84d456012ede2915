"""Helpers shared by the benchmark scripts: result records in benchmarks/results/*.json."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def hardware() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.get_device_name(0)} GPU, {os.cpu_count()} CPU cores ({cpu})"
    except ImportError:
        pass
    return f"{len(os.sched_getaffinity(0))} CPU cores ({cpu}), no GPU"


def record(benchmark: str, metric: str, value, **fields) -> dict:
    base = {
        "benchmark": benchmark, "dataset": "mnist", "unit": None, "mechanism": "none", "epsilon": None,
        "delta": None, "metric": metric, "value": value, "spread": None, "seeds": 1, "method": "synthgen",
        "commit": commit(), "hardware": hardware(), "command": " ".join(shlex.quote(a) for a in sys.argv),
        "date": dt.date.today().isoformat(),
    }
    base.update(fields)
    return base


# Fields that identify a record: a new record replaces an older one with the same values.
REPLACE_KEYS = ("metric", "unit", "mechanism", "epsilon", "method", "dataset")


# Fields that record where and when a number was written, not what was measured.
PROVENANCE_FIELDS = ("commit", "hardware", "command", "date")


def write_records(name: str, records: list[dict], replace_keys: tuple[str, ...] = REPLACE_KEYS,
                  results_dir: Path | None = None) -> Path:
    """Merge `records` into <results_dir>/<name>.json, replacing records with the same key fields.

    A record that repeats an existing one in every field but those of PROVENANCE_FIELDS keeps the
    existing one, so a rescan of a finished run does not restamp its measurement with the commit
    and machine of the rescan. `results_dir` defaults to benchmarks/results.
    """
    results_dir = Path(results_dir) if results_dir is not None else RESULTS
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{name}.json"
    existing = json.loads(path.read_text()) if path.is_file() else []

    def key(r: dict) -> tuple:
        return tuple(json.dumps(r.get(k)) for k in replace_keys)

    def measurement(r: dict) -> str:
        return json.dumps({k: v for k, v in r.items() if k not in PROVENANCE_FIELDS}, sort_keys=True)

    existing_by_measurement = {measurement(r): r for r in existing}
    records = [existing_by_measurement.get(measurement(r), r) for r in records]
    new_keys = {key(r) for r in records}
    merged = [r for r in existing if key(r) not in new_keys] + records
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(merged, indent=2) + "\n")
    os.replace(tmp, path)
    return path


# Record fields and the types each may hold; None marks a field that may be null.
RECORD_FIELDS = {
    "benchmark": (str,), "dataset": (str,), "unit": (str, None), "mechanism": (str,), "epsilon": (int, float, None),
    "delta": (int, float, None), "metric": (str,), "value": (int, float), "spread": (int, float, None),
    # seeds and hardware are null for counts that no run measures (bad_input_cases).
    "seeds": (int, None), "method": (str,), "commit": (str,), "hardware": (str, None), "command": (str,),
    "date": (str,),
}
UNITS = ("example", "teacher", None)
MECHANISMS = ("gaussian", "noisy-label", "gnmax", "dp-teacher", "dp-sgd", "none")


def record_errors(entry: dict) -> list[str]:
    """Return what makes `entry` an invalid result record (empty when it is valid)."""
    errors = []
    for name, types in RECORD_FIELDS.items():
        if name not in entry:
            errors.append(f"missing field {name!r}")
            continue
        value = entry[name]
        allowed = tuple(t for t in types if t is not None)
        if value is None:
            if None not in types:
                errors.append(f"{name} is null")
        elif isinstance(value, bool) or not isinstance(value, allowed):
            errors.append(f"{name} must be {' or '.join(t.__name__ for t in allowed)}, got {value!r}")
    if errors:
        return errors
    if entry["unit"] not in UNITS:
        errors.append(f"unit must be one of {UNITS}, got {entry['unit']!r}")
    if entry["mechanism"] not in MECHANISMS:
        errors.append(f"mechanism must be one of {MECHANISMS}, got {entry['mechanism']!r}")
    if entry["unit"] is not None and (entry["epsilon"] is None or entry["delta"] is None):
        errors.append(f"a private number (unit {entry['unit']!r}) must state epsilon and delta")
    if entry["seeds"] is not None and entry["seeds"] < 1:
        errors.append(f"seeds must be >= 1, got {entry['seeds']}")
    try:
        dt.date.fromisoformat(entry["date"])
    except ValueError:
        errors.append(f"date must be YYYY-MM-DD, got {entry['date']!r}")
    return errors
