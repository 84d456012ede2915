"""Crash safety: a short run of scripts/crash_test.py (3 SIGKILLs) in the default suite."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_three_sigkills_survived(small_teacher, mnist_small, tmp_path):
    summary_path = tmp_path / "summary.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "crash_test.py"), "--kills", "3", "--steps", "24", "--seed", "3",
         "--teacher", str(small_teacher), "--data", str(mnist_small), "--work-dir", str(tmp_path / "work"),
         "--summary", str(summary_path), "--no-record"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    summary = json.loads(summary_path.read_text())
    assert summary["failures"] == [], result.stderr[-4000:]
    assert summary["attempts"] == 3
    assert summary["kills_survived"] == 3, json.dumps(summary["kills"], indent=2)
    assert result.returncode == 0
