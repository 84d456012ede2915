"""Teacher ensembles on disjoint shards: the plan, stacked training and queries, GNMax, the unit."""

import math

import numpy as np
import pytest
import torch

from synthgen.cli import main
from synthgen.data import ImageData, fingerprint_arrays, load_image_data
from synthgen.ensemble import (
    SYNTHGEN_PARTITION, USER_STATEMENT, EnsembleError, ShardPlan, StackedEnsemble, assemble_ensemble,
    load_ensemble, privacy_unit, train_ensemble,
)
from synthgen.ensemble_cli import EnsembleTrainConfig
from synthgen.privacy.accounting import GAUSSIAN
from synthgen.privacy.ledger import Ledger
from synthgen.privacy.mechanism import LabelMechanism, MechanismConfig
from synthgen.teacher import TeacherBank, load_teacher
from synthgen.transcribe import transcribe

from .conftest import small_config, write_idx
from .test_mechanism import FixedLogits

TINY = dict(epochs=1, batch_size=16, width=4, hidden=16, eval_split=None)


def tiny_config(data_dir, out, num_teachers=4, **overrides) -> EnsembleTrainConfig:
    values = dict(data=str(data_dir), out=str(out), num_teachers=num_teachers, **TINY)
    values.update(overrides)
    return EnsembleTrainConfig(**values)


@pytest.fixture(scope="module")
def tiny_ensemble(mnist_small, tmp_path_factory):
    """Four teachers trained stacked on disjoint shards of the small real MNIST set."""
    out = tmp_path_factory.mktemp("ensemble") / "ensemble"
    train_ensemble(tiny_config(mnist_small, out), load_image_data(mnist_small, "train"))
    return out


# ---------------------------------------------------------------- shard plan


def test_shards_disjoint_and_covering():
    plan = ShardPlan.create(1003, 7, seed=5, dataset_fingerprint="sha256:x")
    shards = plan.shard_indices()
    union = np.concatenate(shards)
    assert len(shards) == 7
    assert sorted(union.tolist()) == list(range(1003))  # covering, and no position twice
    assert max(len(s) for s in shards) - min(len(s) for s in shards) <= 1


def test_shard_plan_deterministic_from_seed():
    first = ShardPlan.create(500, 5, seed=3, dataset_fingerprint="sha256:x")
    again = ShardPlan.create(500, 5, seed=3, dataset_fingerprint="sha256:x")
    other = ShardPlan.create(500, 5, seed=4, dataset_fingerprint="sha256:x")
    assert np.array_equal(first.assignment(), again.assignment())
    assert not np.array_equal(first.assignment(), other.assignment())


def test_shard_plan_fingerprint_salted():
    # The salt keeps the released fingerprint from revealing n or the dataset fingerprint.
    first = ShardPlan.create(500, 5, seed=3, dataset_fingerprint="sha256:x")
    again = ShardPlan.create(500, 5, seed=3, dataset_fingerprint="sha256:x")
    assert first.fingerprint != again.fingerprint
    assert ShardPlan.from_dict(first.to_dict()).fingerprint == first.fingerprint


def test_altered_plan_rejected():
    record = ShardPlan.create(500, 5, seed=3, dataset_fingerprint="sha256:x").to_dict()
    record["seed"] = 4
    with pytest.raises(EnsembleError, match="fingerprint"):
        ShardPlan.from_dict(record)


def test_one_changed_example_changes_one_shard(mnist_small):
    data = load_image_data(mnist_small, "train")
    plan = ShardPlan.create(len(data), 6, seed=0, dataset_fingerprint=data.fingerprint)
    changed = data.images.copy()
    position = 123
    changed[position] = 255 - changed[position]

    def shard_fingerprints(images):
        return [fingerprint_arrays(images[index], data.labels[index], data.class_names) for index in plan.shard_indices()]

    before, after = shard_fingerprints(data.images), shard_fingerprints(changed)
    differing = [k for k in range(6) if before[k] != after[k]]
    assert differing == [int(plan.assignment()[position])]


def test_one_changed_example_changes_one_teacher(mnist_small, tmp_path):
    data = load_image_data(mnist_small, "train")
    changed_images = data.images.copy()
    position = 77
    changed_images[position] = 255 - changed_images[position]
    changed = ImageData(changed_images, data.labels.copy(), list(data.class_names))
    first = train_ensemble(tiny_config(mnist_small, tmp_path / "a"), data)
    second = train_ensemble(tiny_config(mnist_small, tmp_path / "b"), changed)
    shard = int(first.plan.assignment()[position])
    for k in range(4):
        same = all(torch.equal(w1[k], w2[k]) for w1, w2 in zip(first.ensemble.weights, second.ensemble.weights))
        assert same == (k != shard), f"teacher {k}: weights {'equal' if same else 'differ'}, changed shard {shard}"


# ---------------------------------------------------------------- stacked model


def test_stacked_equals_separate_teachers(tiny_ensemble):
    teacher = load_ensemble(tiny_ensemble)
    images = torch.rand(9, 1, 28, 28)
    stacked = teacher.bank()(images)
    separate = torch.stack([teacher.ensemble.member(k)(images) for k in range(teacher.num_teachers)])
    assert stacked.shape == (4, 9, 10)
    torch.testing.assert_close(stacked, separate, rtol=1e-5, atol=1e-5)


def test_stacked_chunks_equal_one_call(tiny_ensemble, monkeypatch):
    teacher = load_ensemble(tiny_ensemble)
    images = torch.rand(5, 1, 28, 28)
    whole = teacher.ensemble(images)
    monkeypatch.setattr("synthgen.ensemble._CHUNK_FLOATS", 1)  # one teacher per vmap call
    torch.testing.assert_close(teacher.ensemble(images), whole, rtol=1e-5, atol=1e-6)


def test_stacked_training_matches_separate_steps(mnist_small):
    # One Adam step on the stacked model equals one step of each teacher on its own batch.
    from synthgen.ensemble import _member_config

    config = _member_config((1, 28, 28), 10, [str(i) for i in range(10)], 4, 16)
    ensemble = StackedEnsemble.initialise(config, 3, seed=0)
    members = [ensemble.member(k).train() for k in range(3)]
    data = load_image_data(mnist_small, "train")
    images = torch.from_numpy(data.images[:24]).float().view(3, 8, 1, 28, 28) / 255
    labels = torch.from_numpy(data.labels[:24]).view(3, 8)

    optimizer = torch.optim.Adam(ensemble.parameters(), lr=1e-2)
    logits = ensemble.per_teacher(images)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(3, 8)
    loss.mean(dim=1).sum().backward()
    optimizer.step()
    for k, member in enumerate(members):
        member_optimizer = torch.optim.Adam(member.parameters(), lr=1e-2)
        torch.nn.functional.cross_entropy(member(images[k]), labels[k]).backward()
        member_optimizer.step()
        torch.testing.assert_close(ensemble.member(k).fc2.weight, member.fc2.weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ensemble.member(k).features[0].weight, member.features[0].weight,
                                   rtol=1e-5, atol=1e-6)


def test_saved_ensemble_records_plan(tiny_ensemble, mnist_small):
    data = load_image_data(mnist_small, "train")
    teacher = load_ensemble(tiny_ensemble, data=data)
    assert teacher.plan.num_shards == 4
    assert teacher.plan.dataset_fingerprint == data.fingerprint
    assert teacher.plan.disjointness == SYNTHGEN_PARTITION
    assert teacher.meta.num_examples == len(data)


def test_wrong_private_data_rejected(tiny_ensemble, mnist_small):
    other = load_image_data(mnist_small, "test")
    with pytest.raises(EnsembleError, match="not the dataset"):
        load_ensemble(tiny_ensemble, data=other)


# ---------------------------------------------------------------- mechanisms


def voting_bank(votes: list[int], num_classes: int = 4) -> TeacherBank:
    logits = [[5.0 if c == vote else 0.0 for c in range(num_classes)] for vote in votes]
    return TeacherBank([FixedLogits(torch.tensor(row)) for row in logits], [0.0], [1.0])


def test_gnmax_noise_std_matches_sensitivity():
    bank = voting_bank([0, 0, 0, 1, 1, 2])
    charges = []
    mechanism = LabelMechanism(bank, MechanismConfig(mode="gnmax", top_k=4, noise_multiplier=2.5),
                               lambda step, event, answer: charges.append(event), noise_secret=3)
    draws = 20000
    prior = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).expand(draws, -1)
    noisy = mechanism.noisy_histogram(torch.zeros(draws, 1, 2, 2), prior, step=0)
    residual = noisy - torch.tensor([3.0, 2.0, 1.0, 0.0])
    expected_std = 2.5 * math.sqrt(2.0)  # m * sqrt(2): one example moves one vote between two classes
    assert mechanism.noise_std == pytest.approx(expected_std)
    # The sample std of 80,000 normal draws lies within 2% of the truth with probability > 1 - 1e-12.
    assert residual.std().item() == pytest.approx(expected_std, rel=0.02)
    assert residual.mean().abs().item() < 5 * expected_std / math.sqrt(residual.numel())
    assert charges == [charges[0]]
    assert charges[0].kind == GAUSSIAN
    assert charges[0].parameter == 2.5
    assert charges[0].count == draws


def test_gnmax_labels_follow_the_plurality():
    bank = voting_bank([2, 2, 2, 2, 2, 2, 2, 1])
    mechanism = LabelMechanism(bank, MechanismConfig(mode="gnmax", top_k=3, noise_multiplier=0.3),
                               lambda *args: None, noise_secret=0)
    prior = torch.tensor([[0.1, 0.5, 0.3, 0.1]]).expand(200, -1)  # top-3: classes 1, 2, and 0 or 3
    answer = mechanism.annotate(torch.zeros(200, 1, 2, 2), prior, step=0)
    assert (answer.targets.argmax(dim=1) == 2).float().mean().item() > 0.99
    assert torch.equal(answer.targets.sum(dim=1), torch.ones(200))


def test_gnmax_votes_only_within_student_top_k():
    # All teachers vote class 3, which is outside the student's top-2: the answer is in the top-2.
    bank = voting_bank([3, 3, 3, 3])
    mechanism = LabelMechanism(bank, MechanismConfig(mode="gnmax", top_k=2, noise_multiplier=0.5),
                               lambda *args: None, noise_secret=0)
    prior = torch.tensor([[0.6, 0.3, 0.05, 0.05]]).expand(50, -1)
    answer = mechanism.annotate(torch.zeros(50, 1, 2, 2), prior, step=0)
    assert set(answer.targets.argmax(dim=1).tolist()) <= {0, 1}


def test_gnmax_needs_two_teachers():
    with pytest.raises(ValueError, match=">= 2 teachers"):
        LabelMechanism(voting_bank([0]), MechanismConfig(mode="gnmax", noise_multiplier=1.0), lambda *a: None, 0)


def test_ensemble_gaussian_sensitivity_two_c_over_k(tiny_ensemble):
    teacher = load_ensemble(tiny_ensemble)
    mechanism = LabelMechanism(teacher.bank(), MechanismConfig(mode="gaussian", clip_norm=0.5, noise_multiplier=1.0),
                               lambda *a: None, 0)
    assert mechanism.sensitivity == pytest.approx(2 * 0.5 / 4)


# ---------------------------------------------------------------- privacy unit


def test_single_teacher_is_teacher_level(small_teacher):
    assert privacy_unit(load_teacher(small_teacher)) == "teacher"


def test_plan_not_matching_members_is_teacher_level(tiny_ensemble):
    teacher = load_ensemble(tiny_ensemble)
    assert privacy_unit(teacher) == "example"
    teacher.plan = ShardPlan.create(600, 2, seed=0, dataset_fingerprint=teacher.plan.dataset_fingerprint)
    assert privacy_unit(teacher) == "teacher"


def test_single_teacher_transcription_teacher_level(small_teacher, mnist_small, tmp_path):
    report = transcribe(small_config(small_teacher, tmp_path / "run", mnist_small, steps=2, eval_every=0)).report
    assert report["unit"] == "teacher"
    assert "ensemble" not in report


@pytest.mark.parametrize("mechanism, mode", [("noisy-label", "gnmax"), ("gaussian", "gaussian")])
def test_ensemble_transcription_example_level(tiny_ensemble, mnist_small, tmp_path, mechanism, mode):
    config = small_config(tiny_ensemble, tmp_path / "run", mnist_small, mechanism=mechanism, steps=4, eval_every=0)
    report = transcribe(config).report
    plan = load_ensemble(tiny_ensemble).plan
    assert report["unit"] == "example"
    assert report["mechanism"]["name"] == mode
    assert report["ensemble"]["num_teachers"] == 4
    assert report["ensemble"]["shard_plan_fingerprint"] == plan.fingerprint
    assert report["ensemble"]["disjointness"] == SYNTHGEN_PARTITION
    assert report["accounting_method"] == "data-independent"
    assert report["epsilon"] <= config.epsilon
    with Ledger(config.ledger) as ledger:
        spends = ledger.summary()
    assert [row["unit"] for row in spends] == ["example"]
    assert spends[0]["queries"] == config.steps * config.batch_size
    assert report["queries"] == config.steps * config.batch_size
    assert report["teacher_forward_examples"] == config.steps * config.batch_size


def test_gnmax_report_parameters(tiny_ensemble, mnist_small, tmp_path):
    config = small_config(tiny_ensemble, tmp_path / "run", mnist_small, mechanism="noisy-label", steps=2, eval_every=0)
    report = transcribe(config).report
    facts = report["mechanism"]
    assert facts["l2_sensitivity"] == pytest.approx(math.sqrt(2))
    assert facts["noise_std"] == pytest.approx(facts["noise_multiplier"] * math.sqrt(2))
    assert report["events"] == [{"kind": GAUSSIAN, "parameter": facts["noise_multiplier"], "count": 32,
                                 "sampling_rate": None}]
    assert "per_query_label_dp" not in report


def test_gnmax_card_recomputes(tiny_ensemble, mnist_small, tmp_path):
    from synthgen.cards import card_metadata
    from synthgen.recompute import recompute_card

    config = small_config(tiny_ensemble, tmp_path / "run", mnist_small, mechanism="noisy-label", steps=2, eval_every=0)
    metadata = card_metadata(transcribe(config).report)
    result = recompute_card(metadata)
    assert result.passed, [check for check in result.checks if not check.passed]
    assert metadata["differential_privacy"]["ensemble"]["num_teachers"] == 4
    assert metadata["differential_privacy"]["accounting_method"] == "data-independent"
    mechanism = metadata["differential_privacy"]["mechanism"]
    mechanism["l2_sensitivity"] = math.sqrt(2) / 4  # a sensitivity wrongly divided by K
    mechanism["noise_std"] = mechanism["noise_multiplier"] * mechanism["l2_sensitivity"]
    assert not recompute_card(metadata).passed


# ---------------------------------------------------------------- bad input


def test_cli_fewer_than_two_teachers(mnist_small, tmp_path, caplog):
    code = main(["train-teachers", "--data", str(mnist_small), "--num-teachers", "1", "--out", str(tmp_path / "e")])
    assert code == 2
    assert "--num-teachers K >= 2" in caplog.text
    assert not (tmp_path / "e").exists()


def test_cli_more_teachers_than_examples(mnist_small, tmp_path, caplog):
    code = main(["train-teachers", "--data", str(mnist_small), "--num-teachers", "20", "--limit", "10",
                 "--out", str(tmp_path / "e"), "--epochs", "1"])
    assert code == 2
    assert "larger than the training set (10 examples)" in caplog.text
    assert not (tmp_path / "e").exists()


def test_cli_train_teachers_writes_ensemble(mnist_small, tmp_path, capsys):
    out = tmp_path / "e"
    code = main(["train-teachers", "--data", str(mnist_small), "--num-teachers", "3", "--epochs", "1", "--width", "4",
                 "--hidden", "16", "--limit", "300", "--eval-split", "test", "--out", str(out)])
    assert code == 0
    assert load_ensemble(out).num_teachers == 3
    assert '"unit": "example"' in capsys.readouterr().out


def _train_member(data_dir, out, seed=0):
    from synthgen.config import TeacherTrainConfig
    from synthgen.teacher import train_teacher

    train_teacher(TeacherTrainConfig(data=str(data_dir), out=str(out), epochs=1, batch_size=64, width=4, hidden=16,
                                     eval_split=None, seed=seed), load_image_data(data_dir, "train"))
    return out


@pytest.fixture(scope="module")
def member_variants(mnist_small, tmp_path_factory):
    """Teachers for assembly: two on MNIST 28x28 with 10 classes, one on 32x32 images, one with 5 classes."""
    root = tmp_path_factory.mktemp("members")
    data = load_image_data(mnist_small, "train")
    padded = root / "padded"
    padded.mkdir()
    write_idx(padded / "train-images-idx3-ubyte", np.pad(data.images[:, 0], ((0, 0), (2, 2), (2, 2))))
    write_idx(padded / "train-labels-idx1-ubyte", data.labels.astype("uint8"))
    fewer = root / "fewer"
    fewer.mkdir()
    write_idx(fewer / "train-images-idx3-ubyte", data.images[:, 0])
    write_idx(fewer / "train-labels-idx1-ubyte", (data.labels % 5).astype("uint8"))
    return {
        "a": _train_member(mnist_small, root / "a"),
        "b": _train_member(mnist_small, root / "b", seed=1),
        "shape": _train_member(padded, root / "shape-member"),
        "classes": _train_member(fewer, root / "classes-member"),
    }


def test_assembled_ensemble_user_statement(member_variants, mnist_small, tmp_path):
    # The two members are trained on the same data here; synthgen cannot tell, which is why the
    # report must call the disjointness the user's statement.
    data = load_image_data(mnist_small, "train")
    teacher = assemble_ensemble([str(member_variants["a"]), str(member_variants["b"])], data, tmp_path / "e")
    assert teacher.plan.disjointness == USER_STATEMENT
    assert "not verified" in teacher.privacy_facts()["partition"]
    images = torch.rand(3, 1, 28, 28)
    separate = torch.stack([load_teacher(member_variants[name]).bank()(images)[0] for name in ("a", "b")])
    torch.testing.assert_close(teacher.bank()(images), separate, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant, message", [("shape", "input shape"), ("classes", "classes")])
def test_cli_assemble_mismatched_members(member_variants, mnist_small, tmp_path, caplog, variant, message):
    code = main(["assemble-teachers", "--member", str(member_variants["a"]), "--member", str(member_variants[variant]),
                 "--data", str(mnist_small), "--out", str(tmp_path / "e")])
    assert code == 2
    assert f"disagree on the {message}" in caplog.text
    assert not (tmp_path / "e").exists()


def test_cli_assemble_one_member(member_variants, mnist_small, tmp_path, caplog):
    code = main(["assemble-teachers", "--member", str(member_variants["a"]), "--data", str(mnist_small),
                 "--out", str(tmp_path / "e")])
    assert code == 2
    assert "K >= 2" in caplog.text
