"""Training commands never remove what --out contains, except their own earlier output with --overwrite."""

import pytest

from synthgen.cli import main

TEACHER = ["--epochs", "1", "--batch-size", "32", "--width", "8", "--hidden", "32", "--eval-split", ""]
ENSEMBLE = ["--num-teachers", "2", "--epochs", "1", "--batch-size", "16", "--width", "4", "--hidden", "8",
            "--eval-split", ""]


def snapshot(folder):
    """Return every file below `folder` with its bytes."""
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_teacher_keeps_folder_of_other_files(mnist_small, tmp_path, caplog):
    out = tmp_path / "runs"
    (out / "run1").mkdir(parents=True)
    (out / "run1" / "privacy_report.json").write_text("{}")
    (out / "NOTES.md").write_text("notes")
    before = snapshot(out)

    code = main(["train-teacher", "--data", str(mnist_small), "--out", str(out), *TEACHER])

    assert code == 2
    assert "does not contain a synthgen teacher" in caplog.text
    assert snapshot(out) == before
    assert [path.name for path in tmp_path.iterdir()] == ["runs"]  # no temporary folder beside it


@pytest.mark.parametrize("command,settings", [("train-teacher", TEACHER), ("train-teachers", ENSEMBLE),
                                              ("train-teacher", ["--dp", *TEACHER])])
def test_output_file_is_kept(mnist_small, tmp_path, caplog, command, settings):
    target = tmp_path / "afile"
    target.write_text("keep")

    code = main([command, "--data", str(mnist_small), "--out", str(target), *settings,
                 *(["--ledger", str(tmp_path / "ledger.duckdb")] if "--dp" in settings else [])])

    assert code == 2
    assert "is a file, not a folder" in caplog.text
    assert target.read_text() == "keep"
    assert not (tmp_path / "ledger.duckdb").exists()


def test_teacher_replaced_only_with_overwrite(mnist_small, tmp_path, caplog):
    out = tmp_path / "teacher"
    assert main(["train-teacher", "--data", str(mnist_small), "--out", str(out), *TEACHER]) == 0
    first = snapshot(out)

    assert main(["train-teacher", "--data", str(mnist_small), "--out", str(out), *TEACHER, "--seed", "1"]) == 2
    assert "pass --overwrite" in caplog.text
    assert snapshot(out) == first

    ledger = tmp_path / "ledger.duckdb"
    code = main(["train-teacher", "--data", str(mnist_small), "--out", str(out), *TEACHER, "--dp", "--ledger",
                 str(ledger)])
    assert code == 2
    assert snapshot(out) == first
    assert not ledger.exists()  # rejected before the budget check opens the ledger

    code = main(["train-teacher", "--data", str(mnist_small), "--out", str(out), *TEACHER, "--seed", "1",
                 "--overwrite"])
    assert code == 0
    replaced = snapshot(out)
    assert replaced.keys() == first.keys()
    assert replaced != first


def test_ensemble_replaced_only_with_overwrite(mnist_small, tmp_path, caplog):
    out = tmp_path / "ensemble"
    assert main(["train-teachers", "--data", str(mnist_small), "--out", str(out), *ENSEMBLE]) == 0
    first = snapshot(out)

    assert main(["train-teachers", "--data", str(mnist_small), "--out", str(out), *ENSEMBLE, "--seed", "1"]) == 2
    assert "already contains a teacher ensemble" in caplog.text
    assert snapshot(out) == first

    assert main(["train-teachers", "--data", str(mnist_small), "--out", str(out), *ENSEMBLE, "--seed", "1",
                 "--overwrite"]) == 0
    assert snapshot(out) != first


def test_current_folder_as_out_is_kept(mnist_small, tmp_path, caplog, monkeypatch):
    (tmp_path / "notes.txt").write_text("notes")
    monkeypatch.chdir(tmp_path)

    code = main(["train-teacher", "--data", str(mnist_small), "--out", ".", *TEACHER])

    assert code == 2
    assert str(tmp_path) in caplog.text
    assert [path.name for path in tmp_path.iterdir()] == ["notes.txt"]
