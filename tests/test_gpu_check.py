"""scripts/gpu_check.py on the CPU: the CIFAR-size transcription runs, and its checks can fail."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_smoke_run_passes(gpu_check, tmp_path, capsys):
    status = gpu_check.main(["--device", "cpu", "--steps", "3", "--batch-size", "4", "--work", str(tmp_path)])
    summary = json.loads(capsys.readouterr().out)
    assert status == 0, summary
    none_run, dp_run = summary["runs"]
    assert none_run["mechanism"] == "none"
    assert none_run["checks"] == "passed"
    assert none_run["steps"] == 3
    assert dp_run["mechanism"] == "gaussian"
    assert dp_run["checks"] == "passed"
    assert dp_run["unit"] == "teacher"
    assert dp_run["epsilon"] <= 10.0
    assert dp_run["steps"] == 2
    for run in summary["runs"]:
        assert run["steps_per_second"] > 0
        assert run["queries_per_second"] > run["steps_per_second"]  # 4 queries per step
        assert math.isfinite(run["student_loss_last"])


def test_checks_flag_bad_runs(gpu_check):
    report = {"queries": 40 * 8, "teacher_forward_examples": 40 * 8}
    rising = [2.0 + 0.01 * step for step in range(40)]
    falling = [2.0 - 0.01 * step for step in range(40)]
    assert gpu_check.check(report, 40, 8, falling, falling, expect_improvement=True) == []
    assert "did not improve" in gpu_check.check(report, 40, 8, rising, falling, expect_improvement=True)[0]
    assert gpu_check.check(report, 40, 8, rising, falling, expect_improvement=False) == []
    assert "not finite" in gpu_check.check(report, 40, 8, falling, falling[:-1] + [math.nan], True)[0]
    assert "queries" in gpu_check.check(report, 40, 4, falling, falling, True)[0]
    unseen = dict(report, teacher_forward_examples=report["queries"] - 1)
    assert "forward passes" in gpu_check.check(unseen, 40, 8, falling, falling, True)[0]
