"""Privacy accounting with Google's dp_accounting: PLD as the reported bound, RDP as a cross-check.

One convention holds everywhere in synthgen: a Gaussian query is described by its noise
multiplier m = (noise standard deviation) / (L2 sensitivity under the unit's neighbouring
relation). The sensitivity already includes the factor 2 of replace-one, so m fully
determines the mechanism and both accountants are given a Gaussian of sensitivity 1 and
standard deviation m.

A randomized-response query is described by eps0, the pure-DP parameter of one call. It is
accounted as binary randomized response with flip probability 1 / (e^eps0 + 1), the dominating
pair of every eps0-DP mechanism (Kairouz, Oh and Viswanath 2015, Theorem 4), so the bound is
valid for k-ary RRWithPrior too.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import lru_cache
from importlib import metadata
from typing import Iterable

import dp_accounting
from dp_accounting import rdp
from dp_accounting.pld import privacy_loss_distribution as pld_lib

GAUSSIAN = "gaussian"
RANDOMIZED_RESPONSE = "randomized_response"
# DP-SGD: `count` steps of a Poisson-subsampled Gaussian with sampling rate q and noise
# multiplier sigma (noise std / clipping norm), as Opacus runs it.
POISSON_GAUSSIAN = "poisson_gaussian"

# Relative tolerance of the noise calibration: the returned parameter meets the target
# epsilon exactly (never above it) and is at most this fraction noisier than necessary.
CALIBRATION_RTOL = 1e-3


def accountant_versions() -> dict[str, str]:
    return {"dp_accounting": metadata.version("dp-accounting")}


@dataclass(frozen=True)
class PrivacyEvent:
    """`count` queries of one mechanism with one parameter."""

    kind: str  # GAUSSIAN, RANDOMIZED_RESPONSE or POISSON_GAUSSIAN
    parameter: float  # noise multiplier m (Gaussian, DP-SGD sigma) or eps0 (randomized response)
    count: int
    sampling_rate: float | None = None  # POISSON_GAUSSIAN only

    def __post_init__(self) -> None:
        if self.kind == POISSON_GAUSSIAN and not (self.sampling_rate and 0 < self.sampling_rate <= 1):
            raise ValueError(f"a DP-SGD event needs a sampling rate in (0, 1], got {self.sampling_rate}")
        if self.kind not in (GAUSSIAN, RANDOMIZED_RESPONSE, POISSON_GAUSSIAN):
            raise ValueError(f"unknown privacy event kind {self.kind!r}")
        if not (self.parameter > 0 and math.isfinite(self.parameter)):
            raise ValueError(f"{self.kind} parameter must be a positive finite number, got {self.parameter}")
        if self.count < 0:
            raise ValueError(f"query count must be >= 0, got {self.count}")

    def to_dict(self) -> dict:
        return asdict(self)


def validate_epsilon(epsilon: float, name: str = "epsilon") -> float:
    try:
        value = float(epsilon)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number > 0, got {epsilon!r}") from None
    if not math.isfinite(value) or value <= 0:
        flag = "--" + name.replace("_", "-")
        raise ValueError(f"{name} must be a finite number > 0, got {epsilon!r}; pass for example {flag} 10")
    return value


def validate_delta(delta: float, num_examples: int | None = None) -> float:
    """Check 0 < delta < 1/n; a delta of 1/n or more allows releasing one record in the clear."""
    try:
        value = float(delta)
    except (TypeError, ValueError):
        raise ValueError(f"delta must be a number in (0, 1), got {delta!r}") from None
    if not math.isfinite(value) or value <= 0 or value >= 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}; a common choice is 1e-5")
    if num_examples is not None and value >= 1.0 / num_examples:
        raise ValueError(
            f"delta must be < 1/n = {1.0 / num_examples:.3g} for a private dataset of n = {num_examples} "
            f"examples, got {delta!r}; pass a smaller --delta, such as {10 ** math.floor(math.log10(0.1 / num_examples)):.0e}"
        )
    return value


def _gaussian_pld(noise_multiplier: float, interval: float = 1e-4):
    return pld_lib.from_gaussian_mechanism(
        standard_deviation=noise_multiplier, sensitivity=1.0, value_discretization_interval=interval
    )


def _rr_pld(eps0: float, count: int, interval: float):
    # Binary randomized response in dp_accounting's parametrisation: with probability
    # noise_parameter the output is uniform over 2 buckets, so a flip happens with
    # probability noise_parameter / 2 = 1 / (e^eps0 + 1).
    # NOTE: PLDAccountant in dp-accounting 0.6.0 ignores the count of a self-composed
    # randomized-response event under REPLACE_ONE, so the PLD is composed here directly.
    base = pld_lib.from_randomized_response(
        2.0 / (math.exp(eps0) + 1.0), 2, value_discretization_interval=interval
    )
    return base.self_compose(count)


def _merge(events: Iterable[PrivacyEvent]) -> list[PrivacyEvent]:
    counts: dict[tuple, int] = {}
    for event in events:
        if event.count:
            key = (event.kind, event.parameter, event.sampling_rate or 0.0)
            counts[key] = counts.get(key, 0) + event.count
    return [PrivacyEvent(kind, parameter, count, rate or None) for (kind, parameter, rate), count in sorted(counts.items())]


def _dp_sgd_epsilon(events: list[PrivacyEvent], delta: float) -> float:
    """Compose ledgers that hold DP-SGD steps with dp_accounting's PLD accountant under replace-one."""
    accountant = dp_accounting.pld.PLDAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    for event in events:
        if event.kind == POISSON_GAUSSIAN:
            base = dp_accounting.PoissonSampledDpEvent(event.sampling_rate, dp_accounting.GaussianDpEvent(event.parameter))
        elif event.kind == GAUSSIAN:
            # Under REPLACE_ONE this accountant reads GaussianDpEvent(s) as std s over a bound
            # whose replace-one sensitivity is 2, so s = 2m gives our ratio 1/m (checked in tests).
            base = dp_accounting.GaussianDpEvent(2 * event.parameter)
        else:
            raise ValueError("randomized response and DP-SGD cannot be composed in one scope")
        accountant.compose(base, event.count)
    return float(max(accountant.get_epsilon(delta), 0.0))


def effective_gaussian_multiplier(events: Iterable[PrivacyEvent]) -> float | None:
    """Return the noise multiplier of one Gaussian query equivalent to all Gaussian `events`.

    Composing Gaussian mechanisms with sensitivity-to-noise ratios r_i is exactly a Gaussian
    mechanism with ratio sqrt(sum r_i^2) (Dong, Roth and Su 2019, Corollary 3.3), so n queries
    at multiplier m equal one query at m / sqrt(n), with no discretisation error from composing.
    """
    total = sum(e.count / e.parameter**2 for e in events if e.kind == GAUSSIAN)
    return None if total == 0 else 1.0 / math.sqrt(total)


def randomized_response_epsilon(eps0: float, count: int, delta: float) -> float:
    """Return the exact epsilon at `delta` of `count` eps0-DP calls composed.

    The privacy-loss distribution of n binary randomized responses is binomial: with
    q = e^eps0 / (1 + e^eps0) and B ~ Binomial(n, q) the number of truthful answers, the loss
    is (2B - n) eps0. Hence delta(eps) = P[L > eps] - e^eps Q[L > eps], where under Q the
    count is Binomial(n, 1 - q). This is the optimal composition theorem of Kairouz, Oh and
    Viswanath (2015, Theorem 3.3) evaluated directly. It is used instead of dp_accounting's
    discretised PLD because rounding each of n losses up to a 1e-4 grid adds up to n * 1e-4 to
    epsilon, which swamps the result when eps0 is small and n large (checked against that PLD
    in the tests, where the grid error is small).
    """
    if count == 0:
        return 0.0
    from scipy.stats import binom

    q = math.exp(eps0) / (1.0 + math.exp(eps0))

    def delta_of(eps: float) -> float:
        # Smallest number of truthful answers whose loss exceeds eps.
        threshold = math.floor((eps / eps0 + count) / 2) + 1
        if threshold > count:
            return 0.0
        log_p = binom.logsf(threshold - 1, count, q)
        log_q = binom.logsf(threshold - 1, count, 1.0 - q)
        return float(math.exp(log_p) - math.exp(min(eps + log_q, 700.0)))

    if delta_of(0.0) <= delta:
        return 0.0
    low, high = 0.0, count * eps0
    while high - low > 1e-9 * max(1.0, high):
        mid = (low + high) / 2
        low, high = (low, mid) if delta_of(mid) <= delta else (mid, high)
    return high


def gaussian_epsilon(noise_multiplier: float, delta: float) -> float:
    """Return the exact epsilon at `delta` of one Gaussian query with sensitivity 1 and std `noise_multiplier`.

    Uses the closed-form delta(epsilon) of dp_accounting's GaussianPrivacyLoss (the privacy-loss
    distribution without discretisation), inverted by bisection to a relative 1e-9.
    """
    from dp_accounting.pld.privacy_loss_mechanism import GaussianPrivacyLoss

    loss = GaussianPrivacyLoss(standard_deviation=noise_multiplier, sensitivity=1.0)
    if loss.get_delta_for_epsilon(0.0) <= delta:
        return 0.0
    low, high = 0.0, 1.0
    while loss.get_delta_for_epsilon(high) > delta:
        low, high = high, high * 2
    while high - low > 1e-9 * high:
        mid = (low + high) / 2
        low, high = (low, mid) if loss.get_delta_for_epsilon(mid) <= delta else (mid, high)
    return high


def pld_epsilon(events: Iterable[PrivacyEvent], delta: float) -> float:
    """Return epsilon at `delta` of the composition of `events` (privacy-loss distributions).

    Gaussian queries alone use the exact PLD of the equivalent single Gaussian;
    randomized response alone uses the exact binomial PLD. A ledger that mixes both is composed
    with dp_accounting's pessimistic PLD on a 1e-4 grid, and for several eps0 values the
    homogeneous bound at the largest eps0 is also valid; the smaller valid bound is returned.
    """
    merged = _merge(events)
    if not merged:
        return 0.0
    if any(e.kind == POISSON_GAUSSIAN for e in merged):
        return _dp_sgd_epsilon(merged, delta)
    gaussian = effective_gaussian_multiplier(merged)
    responses = [e for e in merged if e.kind == RANDOMIZED_RESPONSE]
    if not responses:
        return gaussian_epsilon(gaussian, delta)
    if gaussian is None and len(responses) == 1:
        return randomized_response_epsilon(responses[0].parameter, responses[0].count, delta)
    total = None if gaussian is None else _gaussian_pld(gaussian)
    for event in responses:
        part = _rr_pld(event.parameter, event.count, 1e-4)
        total = part if total is None else total.compose(part)
    composed = float(max(total.get_epsilon_for_delta(delta), 0.0))
    if gaussian is None:
        largest = max(e.parameter for e in responses)
        composed = min(composed, randomized_response_epsilon(largest, sum(e.count for e in responses), delta))
    return composed


def rdp_epsilon(events: Iterable[PrivacyEvent], delta: float) -> float | None:
    """Return epsilon at `delta` of the same composition with the RDP accountant (None for DP-SGD)."""
    merged = _merge(events)
    if not merged:
        return 0.0
    # REPLACE_ONE is required for randomized-response events. The RDP accountant reads a
    # GaussianDpEvent(m) as sensitivity 1 and std m under either relation (checked in tests).
    if any(e.kind == POISSON_GAUSSIAN for e in merged):
        # dp-accounting 0.6.0 has no replace-one RDP analysis of Poisson sampling; see
        # add_remove_epsilons for the cross-check that exists.
        return None
    accountant = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    for event in merged:
        if event.kind == GAUSSIAN:
            base = dp_accounting.GaussianDpEvent(event.parameter)
        else:
            base = dp_accounting.RandomizedResponseDpEvent(2.0 / (math.exp(event.parameter) + 1.0), 2)
        accountant.compose(dp_accounting.SelfComposedDpEvent(base, event.count))
    return float(accountant.get_epsilon(delta))


def _bisect(eps_of, low: float, high: float, target: float, increasing: bool) -> float:
    """Find the parameter in [low, high] whose epsilon is closest to `target` without exceeding it."""
    # Work in log space: the parameters span orders of magnitude.
    lo, hi = math.log(low), math.log(high)
    while hi - lo > CALIBRATION_RTOL:
        mid = (lo + hi) / 2
        within = eps_of(math.exp(mid)) <= target
        if increasing:  # epsilon grows with the parameter (eps0): keep the largest safe value
            lo, hi = (mid, hi) if within else (lo, mid)
        else:  # epsilon falls as the parameter grows (noise multiplier): keep the smallest safe value
            lo, hi = (lo, mid) if within else (mid, hi)
    return math.exp(lo if increasing else hi)


# The PLD of one Gaussian of standard deviation s spans privacy losses of about +-40 / s on a
# grid of 1e-4, so very small multipliers cost a lot of memory; below this value the target
# epsilon is far above anything a release should claim.
_MIN_EFFECTIVE_MULTIPLIER = 0.05


@lru_cache(maxsize=64)
def calibrate_gaussian(target_epsilon: float, delta: float, num_queries: int) -> float:
    """Return the smallest noise multiplier (within CALIBRATION_RTOL) for which `num_queries`
    Gaussian queries are (target_epsilon, delta)-DP under the PLD accountant."""
    validate_epsilon(target_epsilon)
    validate_delta(delta)
    if num_queries < 1:
        raise ValueError(f"num_queries must be >= 1, got {num_queries}")

    # Calibrate the single equivalent query (see effective_gaussian_multiplier), then scale.
    def eps_of(m_eff: float) -> float:
        return pld_epsilon([PrivacyEvent(GAUSSIAN, m_eff, 1)], delta)

    low, high = 0.5, 1.0
    while eps_of(high) > target_epsilon:
        low, high = high, high * 4
    while eps_of(low) <= target_epsilon:
        if low <= _MIN_EFFECTIVE_MULTIPLIER:
            raise ValueError(
                f"epsilon {target_epsilon} at delta {delta} is too large to calibrate a Gaussian noise "
                "multiplier; choose epsilon <= 50"
            )
        low, high = max(low / 2, _MIN_EFFECTIVE_MULTIPLIER), low
    m_eff = _bisect(eps_of, low, high, target_epsilon, increasing=False)
    return m_eff * math.sqrt(num_queries)


@lru_cache(maxsize=64)
def calibrate_randomized_response(target_epsilon: float, delta: float, num_queries: int) -> float:
    """Return the largest eps0 (within CALIBRATION_RTOL) for which `num_queries` eps0-DP calls
    are (target_epsilon, delta)-DP under the PLD accountant."""
    validate_epsilon(target_epsilon)
    validate_delta(delta)
    if num_queries < 1:
        raise ValueError(f"num_queries must be >= 1, got {num_queries}")

    def pld_of(eps0: float) -> float:
        return pld_epsilon([PrivacyEvent(RANDOMIZED_RESPONSE, eps0, num_queries)], delta)

    def rdp_of(eps0: float) -> float:
        return rdp_epsilon([PrivacyEvent(RANDOMIZED_RESPONSE, eps0, num_queries)], delta)

    # The RDP bound is never below the PLD bound, so the eps0 that RDP allows is a safe lower
    # end of the bracket; RDP is cheap, the PLD of many randomized-response calls is not.
    low = min(target_epsilon, 1.0)
    while rdp_of(low) > target_epsilon:
        low /= 2
        if low < 1e-9:
            raise ValueError(f"no eps0 reaches epsilon {target_epsilon} for {num_queries} queries")
    low = _bisect(rdp_of, low, max(target_epsilon, 2 * low), target_epsilon, increasing=True)
    high = low * 2
    while pld_of(high) <= target_epsilon and high < target_epsilon:
        low, high = high, high * 2
    high = min(high, target_epsilon * (1 + 2 * CALIBRATION_RTOL))
    if pld_of(low) > target_epsilon:  # PLD <= RDP rules this out, so raise if it happens
        raise RuntimeError(f"PLD epsilon exceeds the RDP epsilon at eps0={low}; accountant inconsistency")
    return _bisect(pld_of, low, high, target_epsilon, increasing=True)


@lru_cache(maxsize=64)
def calibrate_dp_sgd(target_epsilon: float, delta: float, sampling_rate: float, steps: int) -> float:
    """Return the smallest DP-SGD noise multiplier (within CALIBRATION_RTOL) that makes `steps`
    Poisson-subsampled steps (target_epsilon, delta)-DP under replace-one, by the PLD accountant."""
    validate_epsilon(target_epsilon)
    validate_delta(delta)

    def eps_of(sigma: float) -> float:
        return pld_epsilon([PrivacyEvent(POISSON_GAUSSIAN, sigma, steps, sampling_rate)], delta)

    low, high = 0.5, 1.0
    while eps_of(high) > target_epsilon:
        low, high = high, high * 2
        if high > 1e4:
            raise ValueError(f"no noise multiplier reaches epsilon {target_epsilon} in {steps} steps")
    while eps_of(low) <= target_epsilon:
        if low < 0.3:
            break  # below this, the PLD of one step gets very wide; the bracket is good enough
        low, high = low / 2, low
    return _bisect(eps_of, low, high, target_epsilon, increasing=False)


def add_remove_epsilons(events: Iterable[PrivacyEvent], delta: float) -> dict[str, float]:
    """Return PLD and RDP epsilons of DP-SGD events under add/remove-one, the relation Opacus and
    most published DP-SGD results use; the RDP value must not be below the PLD value."""
    pld_accountant = dp_accounting.pld.PLDAccountant()
    rdp_accountant = rdp.RdpAccountant()
    for event in _merge(events):
        if event.kind != POISSON_GAUSSIAN:
            raise ValueError(f"add/remove epsilons are computed for DP-SGD events only, got {event.kind}")
        base = dp_accounting.PoissonSampledDpEvent(event.sampling_rate, dp_accounting.GaussianDpEvent(event.parameter))
        pld_accountant.compose(base, event.count)
        rdp_accountant.compose(base, event.count)
    return {"pld": float(pld_accountant.get_epsilon(delta)), "rdp": float(rdp_accountant.get_epsilon(delta))}
