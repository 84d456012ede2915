"""The empirical audit: metrics against hand counts, attacks that find a real leak, the command end to end."""

import json
import math
import re

import numpy as np
import pytest

from synthgen.audit import (
    _logits, _losses, _train_shadow, attack_metrics, dp_tpr_bound, lira_scores, roc_auc, tpr_at_fpr,
)
from synthgen.cli import main
from synthgen.data import load_image_data
from synthgen.models import Classifier
from synthgen.transcribe import transcribe

from .conftest import SMALL_TRAIN, small_config


def test_roc_auc_matches_pairwise_count():
    rng = np.random.default_rng(0)
    members = rng.integers(0, 20, 300).astype(float)  # many ties
    nonmembers = rng.integers(0, 18, 250).astype(float)
    above = (members[:, None] > nonmembers[None, :]).sum()
    ties = (members[:, None] == nonmembers[None, :]).sum()
    assert roc_auc(members, nonmembers) == pytest.approx((above + 0.5 * ties) / (300 * 250))


def test_tpr_at_fpr_counts_by_hand():
    nonmembers = np.arange(1000, dtype=float)  # scores 0..999
    members = np.array([999.5, 998.5, 990.5, 985.0, 500.0])
    # FPR 0.1%: at most one non-member (999) above the threshold 998 -> members 999.5 and 998.5.
    assert tpr_at_fpr(members, nonmembers, 0.001) == pytest.approx(2 / 5)
    # FPR 1%: at most ten non-members (990..999) above the threshold 989 -> three members.
    assert tpr_at_fpr(members, nonmembers, 0.01) == pytest.approx(3 / 5)
    # Fewer non-members than 1/FPR: the threshold sits above every non-member.
    assert tpr_at_fpr(members, nonmembers[:500], 0.001) == pytest.approx(5 / 5)


def test_dp_tpr_bound_formula():
    assert dp_tpr_bound(1.0, 1e-5, 0.01) == pytest.approx(math.e * 0.01 + 1e-5)
    assert dp_tpr_bound(0.0001, 0.0, 0.2) == pytest.approx(0.2, rel=1e-3)  # almost no privacy loss: TPR ~ FPR
    assert dp_tpr_bound(20.0, 1e-5, 0.01) == pytest.approx(1 - math.exp(-20) * (1 - 1e-5 - 0.01))
    # The second bound takes over at large FPR: 1 - e^-eps (1 - delta - FPR).
    assert dp_tpr_bound(1.0, 0.0, 0.5) == pytest.approx(1 - math.exp(-1) * 0.5)
    assert dp_tpr_bound(None, None, 0.01) is None


def test_attack_metrics_interval_contains_value():
    rng = np.random.default_rng(1)
    metrics = attack_metrics(rng.normal(0.5, 1, 400), rng.normal(0, 1, 400), bootstrap=200, seed=0,
                             epsilon=2.0, delta=1e-5)
    for name in ("auc", "tpr_at_0.001_fpr", "tpr_at_0.01_fpr"):
        low, high = metrics[name]["ci95"]
        assert low <= metrics[name]["value"] <= high, name
    assert 0.6 < metrics["auc"]["value"] < 0.7  # two unit Gaussians 0.5 apart: AUC = Phi(0.5 / sqrt 2) = 0.638
    assert metrics["dp_tpr_bound"]["at_0.01_fpr"] == pytest.approx(math.exp(2) * 0.01 + 1e-5)


@pytest.fixture
def one_thread():
    """Train tiny models on one thread: on a busy machine, more threads slow them down many times over."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_attacks_detect_overfit_classifier(mnist_small, one_thread):
    # A classifier trained 40 epochs on 120 images memorises them: both attacks must see it,
    # or a low AUC on a student proves nothing.
    train, test = load_image_data(mnist_small, "train"), load_image_data(mnist_small, "test")
    members, member_labels = train.images[:120], train.labels[:120]
    heldout, heldout_labels = test.images[:120], test.labels[:120]

    def build():
        return Classifier(width=8, hidden=32)

    target = _train_shadow(build, members, member_labels, epochs=40, seed=99)
    loss = attack_metrics(-_losses(_logits(target, members), member_labels),
                          -_losses(_logits(target, heldout), heldout_labels), 200, 0, None, None)
    assert loss["auc"]["ci95"][0] > 0.55
    scores = lira_scores({"target": target}, np.concatenate([members, heldout]),
                         np.concatenate([member_labels, heldout_labels]), build, shadow_models=8, shadow_epochs=40,
                         seed=0)["target"]
    lira = attack_metrics(scores[:120], scores[120:], 200, 0, None, None)
    assert lira["auc"]["ci95"][0] > 0.55


@pytest.fixture(scope="module")
def finished_run(small_teacher, mnist_small, tmp_path_factory):
    folder = tmp_path_factory.mktemp("audited")
    transcribe(small_config(small_teacher, folder / "run", mnist_small, ledger=str(folder / "ledger.duckdb")))
    return folder / "run"


def test_audit_command_writes_audit_json(finished_run, mnist_small, capsys, one_thread):
    args = ["audit", str(finished_run), "--private-data", str(mnist_small), "--audit-size", "100",
            "--shadow-models", "4", "--shadow-epochs", "2", "--synthetic-samples", "100", "--bootstrap", "50",
            "--threads", "1"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    audit = json.loads((finished_run / "audit.json").read_text())
    report = json.loads((finished_run / "privacy_report.json").read_text())
    assert audit["format"] == "synthgen-audit/1"
    assert set(audit["attacks"]) == {"loss_threshold", "lira", "synthetic_distance"}
    assert set(audit["attacks"]["lira"]) == {"student", "teacher", "untrained_control"}
    assert audit["attacks"]["loss_threshold"]["untrained_control"]["dp_tpr_bound"]["at_0.01_fpr"] is None
    student = audit["attacks"]["loss_threshold"]["student"]
    for name in ("auc", "tpr_at_0.001_fpr", "tpr_at_0.01_fpr"):
        assert 0 <= student[name]["ci95"][0] <= student[name]["value"] <= student[name]["ci95"][1] <= 1
    epsilon, delta = report["epsilon"], report["delta"]
    bound = min(math.exp(epsilon) * 0.01 + delta, 1 - math.exp(-epsilon) * (1 - delta - 0.01))
    assert student["dp_tpr_bound"]["at_0.01_fpr"] == pytest.approx(bound)
    assert audit["attacks"]["lira"]["teacher"]["dp_tpr_bound"]["at_0.01_fpr"] is None  # a non-private teacher
    assert audit["privacy"]["epsilon"] == report["epsilon"]
    assert 0 <= audit["nearest_neighbour"]["closer_to_training_fraction"]["value"] <= 1
    assert summary["loss_threshold/student"]["auc"] == round(student["auc"]["value"], 4)
    # audit.json is released with the run: it must not state the private training-set size.
    assert not re.search(rf"(?<![\d.]){SMALL_TRAIN}(?![\d.])", (finished_run / "audit.json").read_text())
    assert str(mnist_small) not in (finished_run / "audit.json").read_text()


def test_audit_of_limited_teacher_takes_whole_dataset(mnist_small, tmp_path, capsys, one_thread):
    # The teacher saw 300 of the 600 examples; the user passes the dataset it drew them from.
    teacher = tmp_path / "teacher"
    assert main(["train-teacher", "--data", str(mnist_small), "--out", str(teacher), "--limit", "300", "--epochs",
                 "1", "--width", "8", "--hidden", "32", "--eval-split", ""]) == 0
    transcribe(small_config(teacher, tmp_path / "run", mnist_small, ledger=str(tmp_path / "ledger.duckdb")))
    args = ["audit", str(tmp_path / "run"), "--private-data", str(mnist_small), "--audit-size", "50",
            "--shadow-models", "2", "--shadow-epochs", "1", "--synthetic-samples", "50", "--bootstrap", "10"]
    assert main([*args, "--threads", "-1"]) == 2
    assert main(args) == 0
    assert (tmp_path / "run" / "audit.json").is_file()
