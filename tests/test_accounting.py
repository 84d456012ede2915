"""Accounting: hand-computed single queries, PLD <= RDP, composition bounds, calibration."""

import math

import dp_accounting
import pytest
from dp_accounting import rdp
from dp_accounting.pld import privacy_loss_distribution as pld_lib
from scipy.stats import norm

from synthgen.privacy.accounting import (
    GAUSSIAN, RANDOMIZED_RESPONSE, PrivacyEvent, calibrate_gaussian, calibrate_randomized_response, pld_epsilon,
    randomized_response_epsilon, rdp_epsilon, validate_delta, validate_epsilon,
)

DELTA = 1e-5


def gaussian_delta(eps: float, ratio: float) -> float:
    """Exact delta(eps) of one Gaussian query with sensitivity/std = ratio (Balle and Wang 2018, Theorem 8)."""
    return norm.cdf(ratio / 2 - eps / ratio) - math.exp(eps) * norm.cdf(-ratio / 2 - eps / ratio)


def solve_eps(delta_of, delta: float) -> float:
    low, high = 0.0, 100.0
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (low, mid) if delta_of(mid) <= delta else (mid, high)
    return high


@pytest.mark.parametrize("multiplier", [0.8, 2.0, 5.0])
def test_single_gaussian_matches_hand_computation(multiplier):
    exact = solve_eps(lambda e: gaussian_delta(e, 1 / multiplier), DELTA)
    computed = pld_epsilon([PrivacyEvent(GAUSSIAN, multiplier, 1)], DELTA)
    assert computed >= exact - 1e-9  # pessimistic: never below the truth
    assert computed == pytest.approx(exact, rel=2e-3)


def test_single_randomized_response_matches_hand_computation():
    # One eps0-DP binary randomized response: delta(eps) = (e^eps0 - e^eps) / (1 + e^eps0) for eps < eps0.
    eps0 = 1.0
    exact = solve_eps(lambda e: max(0.0, (math.exp(eps0) - math.exp(e)) / (1 + math.exp(eps0))), DELTA)
    assert randomized_response_epsilon(eps0, 1, DELTA) == pytest.approx(exact, abs=1e-6)
    assert exact < eps0


@pytest.mark.parametrize("count", [1, 10, 1000, 100000])
def test_gaussian_composition_matches_dp_accounting(count):
    accountant = dp_accounting.pld.PLDAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(50.0), count)
    assert pld_epsilon([PrivacyEvent(GAUSSIAN, 50.0, count)], DELTA) == pytest.approx(accountant.get_epsilon(DELTA), rel=1e-3)


@pytest.mark.parametrize("eps0,count", [(0.05, 100), (0.05, 2000), (0.5, 50), (0.01, 1000)])
def test_randomized_response_within_dp_accounting_pld_bounds(eps0, count):
    p = 2 / (math.exp(eps0) + 1)
    pessimistic = pld_lib.from_randomized_response(p, 2, pessimistic_estimate=True).self_compose(count)
    optimistic = pld_lib.from_randomized_response(p, 2, pessimistic_estimate=False).self_compose(count)
    exact = randomized_response_epsilon(eps0, count, DELTA)
    assert optimistic.get_epsilon_for_delta(DELTA) - 1e-6 <= exact <= pessimistic.get_epsilon_for_delta(DELTA) + 1e-6


@pytest.mark.parametrize("event", [
    PrivacyEvent(GAUSSIAN, 3.0, 1), PrivacyEvent(GAUSSIAN, 200.0, 50000),
    PrivacyEvent(RANDOMIZED_RESPONSE, 0.05, 2000), PrivacyEvent(RANDOMIZED_RESPONSE, 1.0, 1),
])
def test_pld_not_above_rdp(event):
    assert pld_epsilon([event], DELTA) <= rdp_epsilon([event], DELTA)


@pytest.mark.parametrize("kind,parameter", [(GAUSSIAN, 20.0), (RANDOMIZED_RESPONSE, 0.1)])
@pytest.mark.parametrize("count", [2, 30, 500])
def test_composition_between_one_and_n_calls(kind, parameter, count):
    single = pld_epsilon([PrivacyEvent(kind, parameter, 1)], DELTA)
    composed = pld_epsilon([PrivacyEvent(kind, parameter, count)], DELTA)
    assert composed >= single
    # Basic composition: n calls, each (eps, delta / n)-DP, are (n eps, delta)-DP.
    assert composed <= count * pld_epsilon([PrivacyEvent(kind, parameter, 1)], DELTA / count) + 1e-9
    if kind == RANDOMIZED_RESPONSE:
        assert composed <= count * parameter


def test_rdp_gaussian_convention_same_under_both_relations():
    replace = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    replace.compose(dp_accounting.GaussianDpEvent(7.0), 100)
    add_remove = rdp.RdpAccountant()
    add_remove.compose(dp_accounting.GaussianDpEvent(7.0), 100)
    assert rdp_epsilon([PrivacyEvent(GAUSSIAN, 7.0, 100)], DELTA) == pytest.approx(add_remove.get_epsilon(DELTA))
    assert replace.get_epsilon(DELTA) == pytest.approx(add_remove.get_epsilon(DELTA))


def test_mixed_ledger_not_below_either_part():
    gaussian = PrivacyEvent(GAUSSIAN, 30.0, 1000)
    response = PrivacyEvent(RANDOMIZED_RESPONSE, 0.05, 500)
    mixed = pld_epsilon([gaussian, response], DELTA)
    assert mixed >= pld_epsilon([gaussian], DELTA)
    assert mixed >= pld_epsilon([response], DELTA)
    assert mixed <= rdp_epsilon([gaussian, response], DELTA)


@pytest.mark.parametrize("target,count", [(1.0, 1000), (10.0, 51200), (4.0, 1)])
def test_calibrate_gaussian_meets_target(target, count):
    multiplier = calibrate_gaussian(target, DELTA, count)
    reached = pld_epsilon([PrivacyEvent(GAUSSIAN, multiplier, count)], DELTA)
    assert reached <= target
    assert reached >= target * 0.99


@pytest.mark.parametrize("target,count", [(1.0, 1000), (10.0, 51200)])
def test_calibrate_randomized_response_meets_target(target, count):
    eps0 = calibrate_randomized_response(target, DELTA, count)
    reached = pld_epsilon([PrivacyEvent(RANDOMIZED_RESPONSE, eps0, count)], DELTA)
    assert reached <= target
    assert reached >= target * 0.99


@pytest.mark.parametrize("value", [0, -1.0, float("nan"), float("inf"), "ten"])
def test_invalid_epsilon_rejected(value):
    with pytest.raises(ValueError, match="epsilon"):
        validate_epsilon(value)


@pytest.mark.parametrize("value", [0, -1e-5, 1.0, float("nan"), 1e-3])
def test_invalid_delta_rejected(value):
    with pytest.raises(ValueError, match="delta"):
        validate_delta(value, num_examples=60000)


def test_delta_of_one_over_n_rejected():
    with pytest.raises(ValueError, match="1/n"):
        validate_delta(1 / 600, num_examples=600)
    assert validate_delta(1e-5, num_examples=600) == 1e-5
