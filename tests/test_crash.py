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


# ---------------------------------------------------------------- the two ends of a run, killed on purpose


class _Killed(BaseException):
    """Stands in for SIGKILL at a chosen line; as a BaseException it skips the rest of the run."""


def test_killed_start_up_leaves_fresh_folder(small_teacher, mnist_small, tmp_path):
    from synthgen.transcribe import PRIVATE_DIR, transcribe

    from .conftest import small_config

    # What a kill inside the start-up leaves: the run folder and a half-built private folder.
    run = tmp_path / "run"
    (run / f".{PRIVATE_DIR}.x1y2.tmp").mkdir(parents=True)
    transcribe(small_config(small_teacher, run, mnist_small, eval_data=None, stop_after=1))
    assert [p.name for p in run.iterdir() if p.name.endswith(".tmp")] == []
    assert (run / PRIVATE_DIR / "run_config.json").is_file()


def test_kills_while_finishing_drop_secret(small_teacher, mnist_small, tmp_path, monkeypatch):
    import os

    import duckdb
    import torch

    from synthgen.transcribe import CHECKPOINT_FILE, PRIVATE_DIR, REPORT_FILE, transcribe

    from .conftest import small_config

    run = tmp_path / "run"
    checkpoint = run / PRIVATE_DIR / CHECKPOINT_FILE

    def config(**overrides):
        return small_config(small_teacher, run, mnist_small, steps=6, checkpoint_every=2, noise_seed=1234,
                            eval_data=None, **overrides)

    # Iterations 0-4 charged, checkpoint at 4 with the noise secret: iteration 5 still needs noise.
    assert not transcribe(config(stop_after=5)).completed
    assert torch.load(checkpoint, weights_only=True)["noise_secret"] == "1234"

    # Killed while the report is renamed into place: the run is not complete, the secret is gone.
    real_replace = os.replace

    def replace(source, target, *args, **kwargs):
        if Path(target).name == REPORT_FILE:
            raise _Killed()
        return real_replace(source, target, *args, **kwargs)

    with monkeypatch.context() as patch, pytest.raises(_Killed):
        patch.setattr(os, "replace", replace)
        transcribe(config(resume=True))
    assert not (run / REPORT_FILE).exists()
    assert torch.load(checkpoint, weights_only=True)["noise_secret"] != "1234"

    # Resumed from the scrubbed checkpoint and killed just before the checkpoint is deleted.
    real_unlink = Path.unlink

    def unlink(path, *args, **kwargs):
        if path.name == CHECKPOINT_FILE:
            raise _Killed()
        return real_unlink(path, *args, **kwargs)

    with monkeypatch.context() as patch, pytest.raises(_Killed):
        patch.setattr(Path, "unlink", unlink)
        transcribe(config(resume=True))
    report = json.loads((run / REPORT_FILE).read_text())
    assert report["queries"] == 6 * 16
    assert report["replayed_examples"] == 2 * 16  # iterations 4 and 5 came from the ledger, without noise
    assert report["teacher_forward_examples"] + report["replayed_examples"] == report["queries"]
    assert torch.load(checkpoint, weights_only=True)["noise_secret"] != "1234"
    with duckdb.connect(os.environ["SYNTHGEN_LEDGER"], read_only=True) as ledger:
        assert ledger.execute("SELECT SUM(queries) FROM spends").fetchone()[0] == 6 * 16
