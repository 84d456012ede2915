"""`synthgen privacy recompute` against model cards written by hand for cases with known answers.

Each card's epsilon is computed here from first principles, without synthgen or dp_accounting:
the Gaussian mechanism by its exact (epsilon, delta) curve (Balle and Wang 2018, Theorem 8),
randomized response by the exact hockey-stick divergence of two binomial distributions. The
card states that epsilon; recompute must agree, and must reject the same card once a number on
it is changed.
"""

from __future__ import annotations

import json
import math

import pytest
from scipy.stats import binom, norm

pytest.importorskip("synthgen.recompute", reason="the recompute command is not in this checkout")

from synthgen.cli import main  # noqa: E402

DELTA = 1e-5
# YAML 1.1, which the Hub's card parser follows, reads "1e-05" as a string: a float needs a dot.
DELTA_YAML = "1.0e-05"
MISMATCH_EXIT = 4  # synthgen privacy recompute: the card disagrees with the recomputation


def bisect_epsilon(delta_of, delta: float, high: float = 100.0) -> float:
    """Return the smallest epsilon in [0, high] with delta_of(epsilon) <= delta, to about 1e-12."""
    low = 0.0
    for _ in range(200):
        middle = (low + high) / 2
        low, high = (low, middle) if delta_of(middle) <= delta else (middle, high)
    return high


def gaussian_epsilon(ratio: float, delta: float) -> float:
    """Epsilon of one Gaussian query whose sensitivity / noise std is `ratio` (Balle and Wang 2018, Thm 8)."""

    def delta_of(eps: float) -> float:
        return norm.cdf(ratio / 2 - eps / ratio) - math.exp(eps) * norm.cdf(-ratio / 2 - eps / ratio)

    return bisect_epsilon(delta_of, delta)


def randomized_response_epsilon(eps0: float, count: int, delta: float) -> float:
    """Epsilon of `count` binary randomized responses that keep the truth with probability e^eps0 / (1 + e^eps0).

    The outputs are summarised by B, the number of truthful answers: B ~ Bin(n, q) under one
    dataset and Bin(n, 1 - q) under its neighbour, and delta(eps) = sum_b [P(b) - e^eps Q(b)]_+.
    """
    q = math.exp(eps0) / (1 + math.exp(eps0))

    def delta_of(eps: float) -> float:
        return sum(max(0.0, binom.pmf(b, count, q) - math.exp(eps) * binom.pmf(b, count, 1 - q))
                   for b in range(count + 1))

    return bisect_epsilon(delta_of, delta, high=count * eps0)


def gaussian_card(epsilon: float, multiplier: float, queries: int, clip: float, teachers: int, unit: str) -> str:
    """A model card written as a person would, with the block recompute reads."""
    sensitivity = 2 * clip / teachers
    return f"""---
license: apache-2.0
tags:
- synthgen
- differential-privacy
differential_privacy:
  private: true
  unit: {unit}
  epsilon: {epsilon!r}
  delta: {DELTA_YAML}
  queries: {queries}
  events:
  - kind: gaussian
    parameter: {multiplier!r}
    count: {queries}
    sampling_rate: null
  mechanism:
    name: gaussian
    num_teachers: {teachers}
    clip_norm: {clip!r}
    l2_sensitivity: {sensitivity!r}
    noise_multiplier: {multiplier!r}
    noise_std: {multiplier * sensitivity!r}
---

# A hand-written card
"""


def randomized_response_card(epsilon: float, eps0: float, queries: int) -> str:
    return f"""---
license: apache-2.0
differential_privacy:
  private: true
  unit: teacher
  epsilon: {epsilon!r}
  delta: {DELTA_YAML}
  queries: {queries}
  events:
  - kind: randomized_response
    parameter: {eps0!r}
    count: {queries}
  mechanism:
    name: noisy-label
    num_teachers: 1
    eps0: {eps0!r}
---

# A hand-written card
"""


def recompute(card_text: str, tmp_path, capsys) -> tuple[int, dict]:
    card = tmp_path / "README.md"
    card.write_text(card_text)
    status = main(["privacy", "recompute", str(card)])
    return status, json.loads(capsys.readouterr().out)


def test_single_gaussian_query_card(tmp_path, capsys):
    # One query, one teacher, C = 1: sensitivity 2, noise std 2 x 2 = 4, ratio 1/2.
    expected = gaussian_epsilon(ratio=0.5, delta=DELTA)
    status, output = recompute(gaussian_card(expected, 2.0, 1, 1.0, 1, "teacher"), tmp_path, capsys)
    assert status == 0, output["failed_checks"]
    assert output["pld_epsilon"] == pytest.approx(expected, rel=1e-6)
    assert output["rdp_epsilon"] >= output["pld_epsilon"]


def test_randomized_response_calls_card(tmp_path, capsys):
    eps0, calls = 0.5, 40
    expected = randomized_response_epsilon(eps0, calls, DELTA)
    assert eps0 < expected < calls * eps0  # composition costs more than one call, less than the sum
    status, output = recompute(randomized_response_card(expected, eps0, calls), tmp_path, capsys)
    assert status == 0, output["failed_checks"]
    assert output["pld_epsilon"] == pytest.approx(expected, rel=1e-6)


def test_ensemble_gaussian_card(tmp_path, capsys):
    # K = 4 teachers on disjoint shards, C = 1: the mean moves by at most 2C/K = 0.5 when one
    # example (one shard's teacher) changes. 100 queries at multiplier 30 compose exactly into
    # one Gaussian with ratio sqrt(100) / 30.
    multiplier, queries = 30.0, 100
    expected = gaussian_epsilon(ratio=math.sqrt(queries) / multiplier, delta=DELTA)
    status, output = recompute(gaussian_card(expected, multiplier, queries, 1.0, 4, "example"), tmp_path, capsys)
    assert status == 0, output["failed_checks"]
    assert output["pld_epsilon"] == pytest.approx(expected, rel=1e-6)
    assert output["unit"] == "example"


def test_card_with_understated_epsilon_rejected(tmp_path, capsys):
    expected = gaussian_epsilon(ratio=0.5, delta=DELTA)
    status, output = recompute(gaussian_card(expected * 0.99, 2.0, 1, 1.0, 1, "teacher"), tmp_path, capsys)
    assert status == MISMATCH_EXIT
    assert output["failed_checks"] == ["epsilon"]


def test_card_with_sum_sensitivity_rejected(tmp_path, capsys):
    # A card that states the sensitivity of a sum over the K teachers (2C) beside the noise of a
    # mean (m x 2C / K) describes noise K times too small for its claim.
    expected = gaussian_epsilon(ratio=math.sqrt(100) / 30.0, delta=DELTA)
    text = gaussian_card(expected, 30.0, 100, 1.0, 4, "example").replace("l2_sensitivity: 0.5", "l2_sensitivity: 2.0")
    status, output = recompute(text, tmp_path, capsys)
    assert status == MISMATCH_EXIT
    assert output["failed_checks"] == ["noise_scale"]


def test_card_with_fewer_queries_than_events_rejected(tmp_path, capsys):
    expected = randomized_response_epsilon(0.5, 40, DELTA)
    text = randomized_response_card(expected, 0.5, 40).replace("  queries: 40\n", "  queries: 20\n")
    status, output = recompute(text, tmp_path, capsys)
    assert status == MISMATCH_EXIT
    assert output["failed_checks"] == ["queries"]


@pytest.mark.parametrize("teachers,unit", [(1, "example"), (4, "teacher")])
def test_card_with_wrong_unit_rejected(tmp_path, capsys, teachers, unit):
    # One teacher protects only the teacher as a whole; an ensemble's Gaussian mean is example-level.
    multiplier, queries = 30.0, 100
    ratio = math.sqrt(queries) / multiplier
    status, output = recompute(gaussian_card(gaussian_epsilon(ratio, DELTA), multiplier, queries, 1.0, teachers, unit),
                               tmp_path, capsys)
    assert status == MISMATCH_EXIT
    assert output["failed_checks"] == ["unit"]
