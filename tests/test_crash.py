"""Crash safety: short runs of scripts/crash_test.py (3 SIGKILLs per target) in the default suite."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_crash_test(target: str, small_teacher, mnist_small, tmp_path) -> dict:
    summary_path = tmp_path / "summary.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "crash_test.py"), "--target", target, "--kills", "3", "--steps", "24",
         "--rows", "600", "--shard-size", "100", "--seed", "3", "--teacher", str(small_teacher), "--data",
         str(mnist_small), "--work-dir", str(tmp_path / "work"), "--summary", str(summary_path), "--no-record"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert summary_path.is_file(), result.stderr[-4000:]
    (summary,) = json.loads(summary_path.read_text())["targets"]
    assert summary["failures"] == [], result.stderr[-4000:]
    assert result.returncode == 0, result.stderr[-4000:]
    return summary


def test_transcription_survives_three_sigkills(small_teacher, mnist_small, tmp_path):
    summary = run_crash_test("transcribe", small_teacher, mnist_small, tmp_path)
    assert summary["attempts"] == 3
    assert summary["kills_survived"] == 3, json.dumps(summary["kills"], indent=2)


@pytest.mark.skipif(not (ROOT / "synthgen" / "build.py").is_file(), reason="no dataset builder in this checkout")
def test_dataset_build_survives_three_sigkills(small_teacher, mnist_small, tmp_path):
    summary = run_crash_test("build", small_teacher, mnist_small, tmp_path)
    assert summary["attempts"] == 3
    assert summary["kills_survived"] == 3, json.dumps(summary["kills"], indent=2)
