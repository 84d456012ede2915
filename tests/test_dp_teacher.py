"""DP-SGD teachers: calibration, the ledger entry before training, and dp-teacher transcription."""

import json

import pytest

from synthgen.config import TeacherTrainConfig
from synthgen.data import load_image_data
from synthgen.privacy.accounting import POISSON_GAUSSIAN, PrivacyEvent, add_remove_epsilons, pld_epsilon
from synthgen.privacy.ledger import Ledger
from synthgen.teacher import META_FILE, train_teacher_dp
from synthgen.transcribe import REPORT_FILE, TranscriptionError, transcribe

from .conftest import small_config


@pytest.fixture(scope="module")
def dp_teacher(mnist_small, tmp_path_factory):
    import os

    folder = tmp_path_factory.mktemp("dp-teacher")
    ledger = folder / "ledger.duckdb"
    os.environ["TQDM_DISABLE"] = "1"
    config = TeacherTrainConfig(data=str(mnist_small), out=str(folder / "teacher"), dp=True, epsilon=8.0, delta=1e-5,
                                epochs=2, batch_size=64, lr=2e-3, width=8, hidden=32, ledger=str(ledger))
    train_teacher_dp(config, load_image_data(mnist_small, "train"), load_image_data(mnist_small, "test"))
    return folder / "teacher", ledger


def test_dp_teacher_meets_target_epsilon(dp_teacher):
    teacher, _ = dp_teacher
    dp = json.loads((teacher / META_FILE).read_text())["dp"]
    events = [PrivacyEvent(**e) for e in dp["events"]]
    assert events[0].kind == POISSON_GAUSSIAN
    assert dp["epsilon"] == pytest.approx(pld_epsilon(events, 1e-5))
    assert 7.9 <= dp["epsilon"] <= 8.0
    assert dp["unit"] == "example"
    assert dp["neighbouring_relation"] == "replace-one"
    # Add/remove-one is the weaker relation: its epsilon is smaller, and RDP is not below PLD.
    assert dp["add_remove_epsilon"]["pld"] < dp["epsilon"]
    assert dp["add_remove_epsilon"]["rdp"] >= dp["add_remove_epsilon"]["pld"]
    assert dp["steps"] == 2 * 10  # 600 examples / expected batch 64 -> 10 batches per epoch


def test_dp_spend_in_ledger_before_use(dp_teacher):
    teacher, ledger_path = dp_teacher
    dp = json.loads((teacher / META_FILE).read_text())["dp"]
    with Ledger(ledger_path) as ledger:
        rows = ledger.summary()
    assert len(rows) == 1
    assert rows[0]["unit"] == "example"
    assert rows[0]["kind"] == POISSON_GAUSSIAN
    assert rows[0]["queries"] == dp["steps"]


def test_dp_teacher_transcription_inherits_guarantee(dp_teacher, mnist_small, tmp_path):
    teacher, ledger = dp_teacher
    config = small_config(teacher, tmp_path / "run", mnist_small, mechanism="dp-teacher", ledger=str(ledger))
    report = transcribe(config).report
    dp = json.loads((teacher / META_FILE).read_text())["dp"]
    assert report["unit"] == "example"
    assert report["epsilon"] == dp["epsilon"]
    assert report["delta"] == dp["delta"]
    assert report["teacher_dp"]["verification"].startswith("matches the spend recorded")
    assert report["queries"] == 6 * 16
    with Ledger(ledger) as book:
        assert sum(r["queries"] for r in book.summary()) == dp["steps"]  # transcription charged nothing


def test_dp_teacher_mode_rejects_non_dp_teacher(small_teacher, mnist_small, tmp_path):
    with pytest.raises(TranscriptionError, match="train-teacher --dp"):
        transcribe(small_config(small_teacher, tmp_path / "run", mnist_small, mechanism="dp-teacher"))
    assert not (tmp_path / "run").exists()


def test_dp_teacher_unverified_without_ledger_entry(dp_teacher, mnist_small, tmp_path):
    teacher, _ = dp_teacher
    config = small_config(teacher, tmp_path / "run", mnist_small, mechanism="dp-teacher",
                          ledger=str(tmp_path / "other-ledger.duckdb"))
    report = transcribe(config).report
    assert report["teacher_dp"]["verification"].startswith("not found in this privacy ledger")


def test_dp_training_rejects_large_delta(mnist_small, tmp_path):
    config = TeacherTrainConfig(data=str(mnist_small), out=str(tmp_path / "t"), dp=True, epsilon=1.0, delta=0.01,
                                epochs=1, ledger=str(tmp_path / "l.duckdb"))
    with pytest.raises(ValueError, match="1/n"):
        train_teacher_dp(config, load_image_data(mnist_small, "train"))
    assert not (tmp_path / "t").exists()


def test_add_remove_epsilons_reject_other_events():
    with pytest.raises(ValueError, match="DP-SGD"):
        add_remove_epsilons([PrivacyEvent("gaussian", 3.0, 10)], 1e-5)
