"""The command line: bad input gets a clear error, a non-zero exit and no run folder."""

import json
import subprocess
import sys

import pytest

from synthgen.cli import main

from .conftest import small_config

SMALL = ["--steps", "4", "--batch-size", "8", "--replay-size", "32", "--replay-batch", "8", "--latent-dim", "16",
         "--generator-width", "8", "--student-width", "8", "--student-hidden", "32", "--top-k", "3",
         "--noise-seed", "5", "--device", "cpu"]


def transcribe_args(teacher, out, *extra):
    return ["transcribe", "--teacher", str(teacher), "--out", str(out), *SMALL, *extra]


@pytest.mark.parametrize("epsilon", ["0", "-1", "nan", "inf"])
def test_invalid_epsilon_exit_2(small_teacher, tmp_path, caplog, epsilon):
    code = main(transcribe_args(small_teacher, tmp_path / "run", "--epsilon", epsilon))
    assert code == 2
    assert "epsilon must be a finite number > 0" in caplog.text
    assert epsilon in caplog.text
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("delta,message", [("0", "delta must be in (0, 1)"), ("1.5", "delta must be in (0, 1)"),
                                           ("0.01", "delta must be < 1/n")])
def test_invalid_delta_exit_2(small_teacher, tmp_path, caplog, delta, message):
    code = main(transcribe_args(small_teacher, tmp_path / "run", "--delta", delta))
    assert code == 2
    assert message in caplog.text
    assert not (tmp_path / "run").exists()


def test_missing_dataset_exit_2(tmp_path, caplog):
    code = main(["train-teacher", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "teacher")])
    assert code == 2
    assert str(tmp_path / "missing") in caplog.text
    assert not (tmp_path / "teacher").exists()


def test_missing_teacher_exit_2(tmp_path, caplog):
    code = main(transcribe_args(tmp_path / "no-teacher", tmp_path / "run"))
    assert code == 2
    assert "not found" in caplog.text
    assert not (tmp_path / "run").exists()


def test_teacher_data_mismatch_exit_2(small_teacher, tmp_path, caplog):
    from .conftest import write_idx
    import numpy as np

    other = tmp_path / "other"
    other.mkdir()
    write_idx(other / "train-images-idx3-ubyte", np.zeros((20, 32, 32), np.uint8))
    write_idx(other / "train-labels-idx1-ubyte", np.arange(20, dtype=np.uint8) % 10)
    code = main(transcribe_args(small_teacher, tmp_path / "run", "--private-data", str(other)))
    assert code == 2
    assert "(1, 28, 28)" in caplog.text
    assert "(1, 32, 32)" in caplog.text
    assert not (tmp_path / "run").exists()


def test_budget_spent_exit_3(small_teacher, tmp_path, caplog):
    assert main(transcribe_args(small_teacher, tmp_path / "a", "--epsilon", "2", "--budget-epsilon", "2")) == 0
    code = main(transcribe_args(small_teacher, tmp_path / "b", "--epsilon", "1"))
    assert code == 3
    assert "already spent epsilon" in caplog.text
    assert not (tmp_path / "b").exists()


def test_config_file_and_override(small_teacher, mnist_small, tmp_path, capsys):
    import yaml

    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"mechanism": "noisy-label", "epsilon": 3.0, "steps": 9}))
    code = main(transcribe_args(small_teacher, tmp_path / "run", "--config", str(config), "--steps", "3"))
    assert code == 0
    report = json.loads((tmp_path / "run" / "privacy_report.json").read_text())
    assert report["mechanism"]["name"] == "noisy-label"
    assert report["steps"] == 3  # the command line wins over the file
    assert report["epsilon"] <= 3.0


def test_unknown_config_key_exit_2(small_teacher, tmp_path, caplog):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"epsilonn": 3.0}))
    assert main(transcribe_args(small_teacher, tmp_path / "run", "--config", str(config))) == 2
    assert "epsilonn" in caplog.text


def test_help_names_units():
    result = subprocess.run([sys.executable, "-m", "synthgen", "transcribe", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert "iterations" in result.stdout
    assert "x batch-size" in result.stdout
    assert "epsilon" in result.stdout
    assert "1/n" in result.stdout


def test_process_exit_code_on_bad_input(small_teacher, tmp_path):
    result = subprocess.run([sys.executable, "-m", "synthgen", *transcribe_args(small_teacher, tmp_path / "run",
                                                                                "--epsilon", "-3")],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "epsilon must be a finite number > 0, got -3.0" in result.stderr
    assert "Traceback" not in result.stderr


def test_ledger_show_missing_file_exit_2(tmp_path, caplog):
    missing = tmp_path / "typo" / "ledger.duckdb"
    assert main(["ledger", "--ledger", str(missing), "show"]) == 2
    assert f"no privacy ledger at --ledger {missing}" in caplog.text
    assert not missing.parent.exists()


def test_ledger_show_states_spent_epsilon(small_teacher, tmp_path, capsys):
    ledger = tmp_path / "ledger.duckdb"
    assert main(transcribe_args(small_teacher, tmp_path / "run", "--epsilon", "3", "--ledger", str(ledger))) == 0
    report = json.loads((tmp_path / "run" / "privacy_report.json").read_text())
    capsys.readouterr()
    assert main(["ledger", "--ledger", str(ledger), "show"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 1
    assert rows[0]["scope"] == f"teacher:{rows[0]['teacher_fingerprint']}"
    assert rows[0]["scope_epsilon"] == pytest.approx(report["epsilon"], abs=1e-4)
    assert rows[0]["at_delta"] == 1e-5
