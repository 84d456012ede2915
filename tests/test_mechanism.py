"""Mechanism: calibrated noise, randomized-response frequencies, charging before use."""

import math

import pytest
import torch

from synthgen.privacy.accounting import GAUSSIAN, RANDOMIZED_RESPONSE
from synthgen.privacy.mechanism import LabelMechanism, MechanismConfig, NoisyAnswer
from synthgen.teacher import TeacherBank


class FixedLogits(torch.nn.Module):
    """A real module whose output ignores its input: lets a test pick the teacher's answer."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.register_buffer("logits", logits)

    def forward(self, images):
        return self.logits.expand(images.shape[0], -1)


def make_bank(logits_per_teacher):
    return TeacherBank([FixedLogits(torch.tensor(l, dtype=torch.float32)) for l in logits_per_teacher], [0.0], [1.0])


def collect_charges():
    charges = []

    def charge(step, event, answer):
        charges.append((step, event, answer.values.clone()))

    return charges, charge


@pytest.mark.parametrize("num_teachers", [1, 4])
def test_gaussian_noise_std_matches_sensitivity(num_teachers):
    logits = [[2.0, 1.0, 0.0, -1.0]] * num_teachers
    bank = make_bank(logits)
    config = MechanismConfig(mode="gaussian", top_k=4, clip_norm=0.5, noise_multiplier=3.0)
    charges, charge = collect_charges()
    mechanism = LabelMechanism(bank, config, charge, noise_secret=7)
    images = torch.zeros(4000, 1, 2, 2)
    prior = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).expand(4000, -1)
    answer = mechanism.annotate(images, prior, step=0)
    probs = torch.softmax(torch.tensor(logits[0]), dim=0)
    clean = probs / probs.norm() * 0.5  # every teacher's vector scaled to norm C
    residual = answer.values - clean
    expected_std = 3.0 * 2 * 0.5 / num_teachers  # m * 2C / K
    assert mechanism.noise_std == pytest.approx(expected_std)
    assert residual.std().item() == pytest.approx(expected_std, rel=0.03)
    assert residual.mean().abs().item() < 4 * expected_std / math.sqrt(residual.numel())


def test_gaussian_sensitivity_mean_not_sum():
    # Two teachers that disagree completely: replacing one moves the mean by at most 2C / K.
    bank = make_bank([[10.0, -10.0], [-10.0, 10.0]])
    config = MechanismConfig(mode="gaussian", top_k=2, clip_norm=1.0, noise_multiplier=1.0)
    mechanism = LabelMechanism(bank, config, lambda *a: None, noise_secret=0)
    assert mechanism.sensitivity == pytest.approx(1.0)


def test_gaussian_charges_one_query_per_image():
    bank = make_bank([[1.0, 0.0, 0.0]])
    config = MechanismConfig(mode="gaussian", top_k=2, noise_multiplier=2.0)
    charges, charge = collect_charges()
    mechanism = LabelMechanism(bank, config, charge, noise_secret=1)
    for step in range(3):
        mechanism.annotate(torch.zeros(5, 1, 2, 2), torch.full((5, 3), 1 / 3), step)
    assert [c[0] for c in charges] == [0, 1, 2]
    assert all(c[1].kind == GAUSSIAN and c[1].count == 5 and c[1].parameter == 2.0 for c in charges)
    assert bank.forward_examples == sum(c[1].count for c in charges)


def test_answer_not_returned_when_charge_fails():
    bank = make_bank([[1.0, 0.0]])
    config = MechanismConfig(mode="gaussian", top_k=2, noise_multiplier=2.0)

    def failing_charge(step, event, answer):
        raise OSError("ledger unavailable")

    mechanism = LabelMechanism(bank, config, failing_charge, noise_secret=1)
    with pytest.raises(OSError, match="ledger unavailable"):
        mechanism.annotate(torch.zeros(3, 1, 2, 2), torch.full((3, 2), 0.5), 0)
    assert mechanism.queries_answered == 0


def test_same_step_same_noise_other_step_other_noise():
    bank = make_bank([[1.0, 0.0, 0.0]])
    config = MechanismConfig(mode="gaussian", top_k=3, noise_multiplier=1.0)
    mechanism = LabelMechanism(bank, config, lambda *a: None, noise_secret=99)
    prior = torch.full((8, 3), 1 / 3)
    first = mechanism.annotate(torch.zeros(8, 1, 2, 2), prior, 5).values
    again = mechanism.annotate(torch.zeros(8, 1, 2, 2), prior, 5).values
    other = mechanism.annotate(torch.zeros(8, 1, 2, 2), prior, 6).values
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_targets_cover_only_student_top_k():
    bank = make_bank([[5.0, 4.0, 3.0, 2.0, 1.0]])
    config = MechanismConfig(mode="gaussian", top_k=2, noise_multiplier=0.01)
    mechanism = LabelMechanism(bank, config, lambda *a: None, noise_secret=3)
    prior = torch.tensor([[0.0, 0.0, 0.1, 0.5, 0.4]])  # student prefers classes 3 and 4
    answer = mechanism.annotate(torch.zeros(1, 1, 2, 2), prior, 0)
    assert sorted(answer.classes[0].tolist()) == [3, 4]
    assert answer.targets[0, :3].abs().sum() == 0
    assert answer.targets[0].sum().item() == pytest.approx(1.0)


def rr_frequencies(teacher_label, prior, eps0, top_k, draws=40000):
    logits = [-10.0] * prior.shape[1]
    logits[teacher_label] = 10.0
    bank = make_bank([logits])
    config = MechanismConfig(mode="noisy-label", top_k=top_k, eps0=eps0)
    charges, charge = collect_charges()
    mechanism = LabelMechanism(bank, config, charge, noise_secret=11)
    answer = mechanism.annotate(torch.zeros(draws, 1, 2, 2), prior.expand(draws, -1), 0)
    labels = answer.targets.argmax(dim=1)
    assert charges[0][1].kind == RANDOMIZED_RESPONSE
    assert charges[0][1].count == draws
    return torch.bincount(labels, minlength=prior.shape[1]).double() / draws


def test_randomized_response_label_in_set_frequencies():
    eps0 = 1.0
    prior = torch.tensor([[0.3, 0.3, 0.3, 0.05, 0.05]])  # RRWithPrior picks k = 3 for this prior
    freq = rr_frequencies(teacher_label=1, prior=prior, eps0=eps0, top_k=5)
    keep = math.exp(eps0) / (math.exp(eps0) + 2)
    assert freq[1].item() == pytest.approx(keep, abs=0.01)
    assert freq[0].item() == pytest.approx((1 - keep) / 2, abs=0.01)
    assert freq[2].item() == pytest.approx((1 - keep) / 2, abs=0.01)
    assert freq[3].item() == 0
    assert freq[4].item() == 0


def test_randomized_response_label_outside_set_uniform():
    prior = torch.tensor([[0.3, 0.3, 0.3, 0.05, 0.05]])
    freq = rr_frequencies(teacher_label=4, prior=prior, eps0=1.0, top_k=5)
    for label in (0, 1, 2):
        assert freq[label].item() == pytest.approx(1 / 3, abs=0.01)
    assert freq[4].item() == 0


def test_randomized_response_k_one_ignores_teacher():
    prior = torch.tensor([[0.9, 0.05, 0.05]])  # a confident prior: k = 1
    for teacher_label in (0, 2):
        freq = rr_frequencies(teacher_label=teacher_label, prior=prior, eps0=0.5, top_k=3, draws=2000)
        assert freq[0].item() == 1.0


def test_randomized_response_ratio_bounded_by_eps0():
    eps0 = 0.7
    prior = torch.tensor([[0.25, 0.25, 0.25, 0.25]])
    table = torch.stack([rr_frequencies(label, prior, eps0, top_k=4) for label in range(4)])  # (teacher, output)
    ratio = (table.max(dim=0).values / table.min(dim=0).values).max().item()
    assert ratio <= math.exp(eps0) * 1.08  # sampling error of 40k draws


def test_noisy_answer_bytes_round_trip():
    answer = NoisyAnswer(torch.rand(4, 3), torch.tensor([[0, 1], [1, 2], [2, 0], [0, 2]]), torch.rand(4, 2))
    again = NoisyAnswer.from_bytes(answer.to_bytes())
    assert torch.equal(answer.targets, again.targets)
    assert torch.equal(answer.classes, again.classes)
    assert torch.equal(answer.values, again.values)


@pytest.mark.parametrize("kwargs,match", [
    (dict(mode="laplace"), "mechanism"), (dict(top_k=0), "top_k"), (dict(clip_norm=-1.0), "clip_norm"),
    (dict(temperature=0.0), "temperature"),
])
def test_invalid_mechanism_config_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MechanismConfig(**kwargs)


def test_noisy_label_needs_single_teacher():
    with pytest.raises(ValueError, match="exactly one teacher"):
        LabelMechanism(make_bank([[1.0, 0.0], [0.0, 1.0]]), MechanismConfig(mode="noisy-label", eps0=1.0),
                       lambda *a: None, noise_secret=0)
