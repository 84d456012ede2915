"""Small real transcription runs shared by the pipeline, card and Hub tests.

Each run costs several seconds on 2 CPU cores, so a run is made once per test session (keyed
by pytest's base temporary folder) and reused by every module that requests it.
"""

from __future__ import annotations

import os
from pathlib import Path

from .conftest import small_config

MECHANISMS = ("gaussian", "noisy-label", "dp-teacher")
_RUNS: dict[tuple[str, str], Path] = {}


def _dp_sgd_teacher(mnist_small: Path, folder: Path, ledger: Path) -> Path:
    from synthgen.config import TeacherTrainConfig
    from synthgen.data import load_image_data
    from synthgen.teacher import train_teacher_dp

    out = folder / "dp-sgd-teacher"
    if not out.exists():
        # Epsilon 1 over 4 DP-SGD steps keeps the noise calibration to a few seconds.
        config = TeacherTrainConfig(data=str(mnist_small), out=str(out), dp=True, epsilon=1.0, delta=1e-5, epochs=1,
                                    batch_size=150, width=8, hidden=32, ledger=str(ledger))
        train_teacher_dp(config, load_image_data(mnist_small, "train"))
    return out


def release_run(mechanism: str, small_teacher: Path, mnist_small: Path, tmp_path_factory) -> Path:
    """Return a finished run folder of `mechanism` (see MECHANISMS), made on first request."""
    from synthgen.transcribe import transcribe

    key = (mechanism, str(tmp_path_factory.getbasetemp()))
    if key not in _RUNS:
        os.environ.setdefault("TQDM_DISABLE", "1")
        folder = tmp_path_factory.mktemp(f"release-{mechanism}")
        # The ledger is named here because module fixtures start before the per-test
        # SYNTHGEN_LEDGER is set.
        ledger = folder / "ledger.duckdb"
        teacher = _dp_sgd_teacher(mnist_small, folder, ledger) if mechanism == "dp-teacher" else small_teacher
        transcribe(small_config(teacher, folder / "run", mnist_small, mechanism=mechanism, ledger=str(ledger)))
        _RUNS[key] = folder / "run"
    return _RUNS[key]


def audited_run(small_teacher: Path, mnist_small: Path, tmp_path_factory) -> Path:
    """Return a copy of the Gaussian run with a small real `synthgen audit` (audit.json) in it."""
    import shutil

    from synthgen.audit import AuditConfig, run_audit

    key = ("audited", str(tmp_path_factory.getbasetemp()))
    if key not in _RUNS:
        run_dir = tmp_path_factory.mktemp("release-audited") / "run"
        shutil.copytree(release_run("gaussian", small_teacher, mnist_small, tmp_path_factory), run_dir)
        run_audit(AuditConfig(run_dir=str(run_dir), private_data=str(mnist_small), audit_size=100, shadow_models=2,
                              shadow_epochs=1, synthetic_samples=100, bootstrap=20))
        _RUNS[key] = run_dir
    return _RUNS[key]
