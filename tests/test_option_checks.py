"""Range checks of numeric options and of --out, made by the command line before any data is loaded.

Each case runs the real `synthgen` entry point and checks the exit status, the whole error
message (which names the option and the value) and that nothing was written.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .test_bad_input import SMALL, Unchanged, cli

LIMIT_FIX = "omit --limit to train on every example"
THREADS_FIX = "omit --threads to let torch choose"
EMA_FIX = "pass for example 0.999, or 0 to keep no average"


def train_teacher_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train-teacher", "--data", str(data), "--out", str(out), "--epochs", "1", "--width", "8",
            "--hidden", "32", *extra]


def train_teachers_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train-teachers", "--data", str(data), "--out", str(out), "--num-teachers", "2", "--epochs", "1",
            "--width", "8", "--hidden", "16", *extra]


def transcribe_args(teacher: Path, out: Path, *extra: str) -> list[str]:
    return ["transcribe", "--teacher", str(teacher), "--out", str(out), *SMALL, *extra]


# (command, extra arguments, expected error message)
CASES = [
    ("train-teacher", ["--batch-size", "0"], "--batch-size must be an integer >= 1, got 0"),
    ("train-teacher", ["--batch-size", "-3"], "--batch-size must be an integer >= 1, got -3"),
    ("train-teacher", ["--epochs", "0"], "--epochs must be an integer >= 1, got 0"),
    ("train-teacher", ["--limit", "-5"], f"--limit must be an integer >= 1, got -5; {LIMIT_FIX}"),
    ("train-teacher", ["--limit", "0"], f"--limit must be an integer >= 1, got 0; {LIMIT_FIX}"),
    ("train-teacher", ["--dp", "--ema-decay", "1.5"],
     f"--ema-decay must be in [0, 1), got 1.5; {EMA_FIX}"),
    ("train-teacher", ["--dp", "--ema-decay", "-0.1"],
     f"--ema-decay must be in [0, 1), got -0.1; {EMA_FIX}"),
    ("train-teacher", ["--dp", "--ema-decay", "nan"],
     f"--ema-decay must be in [0, 1), got nan; {EMA_FIX}"),
    ("train-teachers", ["--limit", "-5"], f"--limit must be an integer >= 1, got -5; {LIMIT_FIX}"),
    ("train-teachers", ["--limit", "0"], f"--limit must be an integer >= 1, got 0; {LIMIT_FIX}"),
    ("train-teachers", ["--threads", "-1"], f"--threads must be an integer >= 1, got -1; {THREADS_FIX}"),
    ("train-teachers", ["--threads", "0"], f"--threads must be an integer >= 1, got 0; {THREADS_FIX}"),
    ("transcribe", ["--threads", "-1"], f"--threads must be an integer >= 1, got -1; {THREADS_FIX}"),
    ("transcribe", ["--threads", "0"], f"--threads must be an integer >= 1, got 0; {THREADS_FIX}"),
    ("transcribe", ["--eval-limit", "-1"],
     "--eval-limit must be an integer >= 1, got -1; omit --eval-limit to evaluate on every test image"),
    ("transcribe", ["--eval-limit", "0"],
     "--eval-limit must be an integer >= 1, got 0; omit --eval-limit to evaluate on every test image"),
]


@pytest.mark.parametrize("command,extra,message", CASES, ids=[f"{c}-{' '.join(e)}" for c, e, _ in CASES])
def test_option_out_of_range(command, extra, message, mnist_small, small_teacher, tmp_path, caplog, capsys):
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    out = workspace / "out"
    if command == "train-teacher":
        args = train_teacher_args(mnist_small, out, *extra)
    elif command == "train-teachers":
        args = train_teachers_args(mnist_small, out, *extra)
    else:
        args = transcribe_args(small_teacher, out, "--eval-data", str(mnist_small), *extra)
    unchanged = Unchanged(workspace)

    status, error = cli(args, caplog, capsys)

    assert status == 2, error
    assert error == message
    assert not out.exists()
    unchanged.check()


def test_transcribe_out_is_file(small_teacher, tmp_path, caplog, capsys):
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    out = workspace / "notes.txt"
    out.write_text("not a run folder\n")
    unchanged = Unchanged(workspace)

    status, error = cli(transcribe_args(small_teacher, out), caplog, capsys)

    assert status == 2, error
    assert error == f"--out {out} is a file, not a folder; choose another --out"
    unchanged.check()


def test_transcribe_out_below_file(small_teacher, tmp_path, caplog, capsys):
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    blocker = workspace / "notes.txt"
    blocker.write_text("not a run folder\n")
    out = blocker / "run"
    unchanged = Unchanged(workspace)

    status, error = cli(transcribe_args(small_teacher, out), caplog, capsys)

    assert status == 2, error
    assert error == f"--out {out} is inside {blocker}, which is a file, not a folder; choose another --out"
    unchanged.check()


@pytest.mark.parametrize("command", ["train-teacher", "train-teachers"])
def test_limit_above_dataset_size_warns(command, mnist_small, tmp_path, caplog, capsys):
    out = tmp_path / "out"
    build = train_teacher_args if command == "train-teacher" else train_teachers_args
    args = build(mnist_small, out, "--limit", "1000000", "--eval-split", "")

    status, _ = cli(args, caplog, capsys)

    assert status == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and r.name == "synthgen"]
    assert warnings == ["--limit 1000000 is larger than the training split (600 examples); training on all 600"]


def test_python_callers_get_same_checks(mnist_small, small_teacher, tmp_path):
    # The library entry points check the same options, for callers that do not use the command line.
    from synthgen.config import TeacherTrainConfig
    from synthgen.data import load_image_data
    from synthgen.dp_training import train_teacher_dp
    from synthgen.teacher import train_teacher
    from synthgen.transcribe import TranscriptionError, transcribe

    from .conftest import small_config

    train = load_image_data(str(mnist_small), "train")
    config = TeacherTrainConfig(data=str(mnist_small), out=str(tmp_path / "teacher"), batch_size=0)
    with pytest.raises(ValueError, match="--batch-size must be an integer >= 1, got 0"):
        train_teacher(config, train)
    config = TeacherTrainConfig(data=str(mnist_small), out=str(tmp_path / "teacher"), dp=True, ema_decay=1.5)
    with pytest.raises(ValueError, match=r"--ema-decay must be in \[0, 1\), got 1.5"):
        train_teacher_dp(config, train)
    with pytest.raises(TranscriptionError, match="--threads must be an integer >= 1, got -1"):
        transcribe(small_config(small_teacher, tmp_path / "run", mnist_small, threads=-1))
    assert list(tmp_path.iterdir()) == []
