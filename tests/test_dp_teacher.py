"""DP-SGD teachers: calibration, the ledger entry before training, and dp-teacher transcription."""

import json

import pytest
import torch

from synthgen.config import TeacherTrainConfig
from synthgen.data import load_image_data
from synthgen.privacy.accounting import POISSON_GAUSSIAN, PrivacyEvent, add_remove_epsilons, pld_epsilon
from synthgen.privacy.ledger import Ledger
from synthgen.teacher import META_FILE, train_teacher_dp
from synthgen.transcribe import REPORT_FILE, TranscriptionError, transcribe

from .conftest import small_config


def dp_config(mnist_small, out, ledger, **overrides) -> TeacherTrainConfig:
    """A DP training of 2 epochs x 10 Poisson batches with fixed noise, so that runs can be compared."""
    values = dict(data=str(mnist_small), out=str(out), dp=True, epsilon=8.0, delta=1e-5, epochs=2, batch_size=64,
                  lr=2e-3, width=8, hidden=32, ledger=str(ledger), noise_seed=11, checkpoint_every=3)
    values.update(overrides)
    return TeacherTrainConfig(**values)


@pytest.fixture(scope="module")
def dp_teacher(mnist_small, tmp_path_factory):
    import os

    folder = tmp_path_factory.mktemp("dp-teacher")
    ledger = folder / "ledger.duckdb"
    os.environ["TQDM_DISABLE"] = "1"
    train_teacher_dp(dp_config(mnist_small, folder / "teacher", ledger), load_image_data(mnist_small, "train"),
                     load_image_data(mnist_small, "test"))
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


# ---------------------------------------------------------------- interrupted DP training


def ledger_spends(path) -> list[tuple]:
    import duckdb

    with duckdb.connect(str(path), read_only=True) as db:
        return db.execute("SELECT run_id, step, kind, parameter, sampling_rate, queries FROM spends").fetchall()


def test_dp_training_resume_matches_uninterrupted(dp_teacher, mnist_small, tmp_path):
    from safetensors.torch import load_file

    from synthgen.dp_training import CHECKPOINT_FILE, PRIVATE_DIR
    from synthgen.teacher import load_teacher

    reference_folder, _ = dp_teacher  # the same training, uninterrupted
    reference = load_teacher(reference_folder)
    train = load_image_data(mnist_small, "train")
    test = load_image_data(mnist_small, "test")

    out, ledger = tmp_path / "teacher", tmp_path / "ledger.duckdb"
    # Stop after step 13: the last checkpoint is at step 12, so step 13 is computed twice.
    assert train_teacher_dp(dp_config(mnist_small, out, ledger, stop_after=13), train, test) is None
    checkpoint = torch.load(out / PRIVATE_DIR / CHECKPOINT_FILE, weights_only=True)
    assert checkpoint["steps_done"] == 12
    assert not (out / META_FILE).exists()
    spends_before = ledger_spends(ledger)
    assert len(spends_before) == 1
    assert spends_before[0][-1] == 20  # the whole training is charged before its first step

    resumed = train_teacher_dp(dp_config(mnist_small, out, ledger, resume=True), train, test)
    assert ledger_spends(ledger) == spends_before  # no second charge
    dp, expected = resumed.meta.dp, reference.meta.dp
    for name in ("epsilon", "opacus_prv_add_remove_epsilon", "add_remove_epsilon", "events", "steps",
                 "noise_multiplier", "sampling_rate"):
        assert dp[name] == expected[name], name
    assert dp["ledger_run_id"] == spends_before[0][0]
    assert resumed.meta.training == reference.meta.training
    assert resumed.meta.test_accuracy == reference.meta.test_accuracy
    weights = load_file(str(next(out.glob("*.safetensors"))))
    reference_weights = load_file(str(next(reference_folder.glob("*.safetensors"))))
    assert [name for name in reference_weights if not reference_weights[name].equal(weights[name])] == []
    assert not (out / PRIVATE_DIR).exists()  # the checkpoint with the generator states is gone


def test_dp_training_resume_rejects_changes(mnist_small, tmp_path):
    from synthgen.dp_training import CHECKPOINT_FILE, PRIVATE_DIR

    train = load_image_data(mnist_small, "train")
    out, ledger = tmp_path / "teacher", tmp_path / "ledger.duckdb"
    assert train_teacher_dp(dp_config(mnist_small, out, ledger, stop_after=4), train) is None
    checkpoint = (out / PRIVATE_DIR / CHECKPOINT_FILE).read_bytes()
    spends = ledger_spends(ledger)

    with pytest.raises(ValueError, match="epsilon, max_grad_norm differ from the interrupted training"):
        train_teacher_dp(dp_config(mnist_small, out, ledger, resume=True, epsilon=4.0, max_grad_norm=2.0), train)
    with pytest.raises(ValueError, match="ledger differ from the interrupted training"):
        train_teacher_dp(dp_config(mnist_small, out, tmp_path / "other.duckdb", resume=True), train)
    with pytest.raises(ValueError, match="contains an interrupted DP training: pass --resume"):
        train_teacher_dp(dp_config(mnist_small, out, ledger), train)
    with pytest.raises(ValueError, match="contains no interrupted DP training"):
        train_teacher_dp(dp_config(mnist_small, tmp_path / "fresh", ledger, resume=True), train)
    assert ledger_spends(ledger) == spends
    assert (out / PRIVATE_DIR / CHECKPOINT_FILE).read_bytes() == checkpoint
    assert not (tmp_path / "fresh").exists()
    assert not (tmp_path / "other.duckdb").exists()


def test_dp_training_cli_stop_and_resume(mnist_small, tmp_path, capsys):
    from synthgen.cli import main

    out, ledger = tmp_path / "teacher", tmp_path / "ledger.duckdb"
    # The privacy settings of the dp_teacher fixture, whose calibration is cached in this process.
    args = ["train-teacher", "--data", str(mnist_small), "--out", str(out), "--dp", "--epsilon", "8", "--delta",
            "1e-5", "--epochs", "2", "--batch-size", "64", "--width", "8", "--hidden", "32", "--ledger", str(ledger),
            "--eval-split", ""]
    assert main(args + ["--stop-after", "5"]) == 0
    assert json.loads(capsys.readouterr().out)["completed"] is False
    assert main(args + ["--resume", "--epsilon", "4"]) == 2
    assert main(args + ["--resume"]) == 0
    assert json.loads(capsys.readouterr().out)["epsilon"] <= 8.0
    assert len(ledger_spends(ledger)) == 1
    assert (out / META_FILE).is_file()


# ---------------------------------------------------------------- layers DP-SGD cannot train


def test_batchnorm_replaced_for_dp_sgd():
    import torch
    from opacus import PrivacyEngine
    from torch import nn

    from synthgen.dp_training import make_dp_compatible

    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 26 * 26, 10))
    fixed = make_dp_compatible(model)
    assert not any(isinstance(layer, nn.modules.batchnorm._BatchNorm) for layer in fixed.modules())
    assert any(isinstance(layer, nn.GroupNorm) for layer in fixed.modules())
    # Opacus accepts the fixed model and trains one noisy step with it.
    data = torch.utils.data.TensorDataset(torch.rand(32, 1, 28, 28), torch.arange(32) % 10)
    loader = torch.utils.data.DataLoader(data, batch_size=16)
    private_model, optimizer, private_loader = PrivacyEngine().make_private(
        module=fixed, optimizer=torch.optim.SGD(fixed.parameters(), lr=0.1), data_loader=loader,
        noise_multiplier=1.0, max_grad_norm=1.0)
    images, labels = next(iter(private_loader))
    torch.nn.functional.cross_entropy(private_model(images), labels).backward()
    optimizer.step()


class _BatchMixingLayer(torch.nn.Linear):
    """A layer that a registered Opacus validator rejects and that no fixer replaces."""


def test_unfixable_layer_rejected_for_dp_sgd():
    from opacus.validators import register_module_validator
    from opacus.validators.errors import UnsupportableModuleError
    from torch import nn

    from synthgen.dp_training import make_dp_compatible
    from synthgen.teacher import TeacherError

    @register_module_validator(_BatchMixingLayer)
    def reject(module, **kwargs):
        return [UnsupportableModuleError("this layer mixes the examples of a batch")]

    model = nn.Sequential(nn.Flatten(), _BatchMixingLayer(4, 2))
    with pytest.raises(TeacherError, match="layers that DP-SGD cannot train and Opacus cannot replace: this layer "
                                           "mixes the examples of a batch"):
        make_dp_compatible(model)
