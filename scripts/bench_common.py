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


def write_records(name: str, records: list[dict], replace_keys: tuple[str, ...] = ("metric", "unit", "mechanism", "epsilon", "method", "dataset")) -> Path:
    """Merge `records` into benchmarks/results/<name>.json, replacing records with the same key fields."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    existing = json.loads(path.read_text()) if path.is_file() else []

    def key(r: dict) -> tuple:
        return tuple(json.dumps(r.get(k)) for k in replace_keys)

    new_keys = {key(r) for r in records}
    merged = [r for r in existing if key(r) not in new_keys] + records
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(merged, indent=2) + "\n")
    os.replace(tmp, path)
    return path
