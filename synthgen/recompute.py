"""Recompute a release's epsilon from the `differential_privacy` block of its model card alone.

The check trusts nothing in the card but the privacy events, delta and the mechanism
parameters: it recomputes epsilon with both accountants of dp_accounting and checks that the
card's other numbers agree with those events.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

# Relative tolerance between a card's epsilon and the recomputed one. Both accountants are
# deterministic for one dp_accounting version (bisections stop at a relative 1e-9), so a larger
# gap comes from an edited card or from another accountant version. 1e-4 still flags a change
# in the fourth significant digit.
RECOMPUTE_RTOL = 1e-4


@dataclass
class Check:
    name: str
    passed: bool
    detail: str


@dataclass
class Recomputation:
    """Recomputed epsilons and the checks run on one card."""

    card_epsilon: float
    delta: float
    unit: str | None
    pld_epsilon: float
    rdp_epsilon: float | None
    add_remove_epsilons: dict[str, float] | None
    accountant_version: str
    card_accountant_version: str | None
    tolerance: float = RECOMPUTE_RTOL
    checks: list[Check] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["passed"] = self.passed
        data["failed_checks"] = [check.name for check in self.checks if not check.passed]
        return data


def _close(a: float, b: float, rtol: float = RECOMPUTE_RTOL) -> bool:
    return math.isclose(float(a), float(b), rel_tol=rtol, abs_tol=1e-12)


def _number(block: dict, key: str, where: str) -> float:
    value = block.get(key)
    if isinstance(value, str) and _parses_as_float(value):
        # A card is checked as published: every YAML 1.1 reader, PyYAML and the Hub among them,
        # reads this value as text, so accepting it here would pass a card that those readers
        # cannot use as a number.
        raise ValueError(
            f"{where}.{key} is the text {value!r}, not a number: YAML 1.1 reads an exponent number without a dot "
            f"as text; write it as {_yaml_float(float(value))}"
        )
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where}.{key} must be a finite number, got {value!r}")
    return float(value)


def _parses_as_float(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _yaml_float(value: float) -> str:
    """Spell `value` so that YAML 1.1 reads it as a float: the mantissa needs a dot (1.0e-05, not 1e-05)."""
    text = repr(value)
    mantissa, marker, exponent = text.partition("e")
    if marker and "." not in mantissa:
        return f"{mantissa}.0e{exponent}"
    return text


def recompute_card(metadata: dict) -> Recomputation:
    """Recompute epsilon from a card's YAML metadata and compare it with the stated numbers.

    Args:
        metadata: the parsed YAML front matter of a synthgen model card.

    Returns:
        A `Recomputation` whose `passed` is False when any stated number disagrees with the
        recomputation beyond `RECOMPUTE_RTOL` (relative).

    Raises:
        ValueError: the metadata has no usable `differential_privacy` block.
    """
    from .privacy.accounting import (
        POISSON_GAUSSIAN, PrivacyEvent, accountant_versions, add_remove_epsilons, pld_epsilon, rdp_epsilon,
    )

    block = metadata.get("differential_privacy")
    if not isinstance(block, dict):
        raise ValueError("the card has no 'differential_privacy' block in its YAML metadata; it is not a synthgen "
                         "privacy datasheet")
    if not block.get("private"):
        raise ValueError("the card states that the release is not private: there is no epsilon to recompute")
    where = "differential_privacy"
    card_epsilon = _number(block, "epsilon", where)
    delta = _number(block, "delta", where)
    if not 0 < delta < 1:
        raise ValueError(f"{where}.delta must be in (0, 1), got {delta}")
    raw_events = block.get("events")
    if not isinstance(raw_events, list) or not raw_events:
        raise ValueError(f"{where}.events must be a non-empty list of privacy events, got {raw_events!r}")
    try:
        events = [PrivacyEvent(**event) for event in raw_events]
    except TypeError as error:
        raise ValueError(f"{where}.events contains an entry that is not a privacy event: {error}") from None

    pld = pld_epsilon(events, delta)
    dp_sgd = any(event.kind == POISSON_GAUSSIAN for event in events)
    rdp = None if dp_sgd else rdp_epsilon(events, delta)
    add_remove = add_remove_epsilons(events, delta) if dp_sgd else None
    accountant = block.get("accountant") or {}
    result = Recomputation(
        card_epsilon=card_epsilon, delta=delta, unit=block.get("unit"), pld_epsilon=pld, rdp_epsilon=rdp,
        add_remove_epsilons=add_remove, accountant_version=accountant_versions()["dp_accounting"],
        card_accountant_version=accountant.get("version"),
    )
    checks = result.checks
    checks.append(Check("epsilon", _close(card_epsilon, pld),
                        f"card {card_epsilon!r}, recomputed by the PLD accountant {pld!r}"))
    if rdp is not None:
        checks.append(Check("rdp_not_below_pld", rdp >= pld * (1 - RECOMPUTE_RTOL),
                            f"RDP {rdp!r} must not be below PLD {pld!r}"))
        if block.get("rdp_epsilon") is not None:
            stated = _number(block, "rdp_epsilon", where)
            checks.append(Check("rdp_epsilon", _close(stated, rdp), f"card {stated!r}, recomputed {rdp!r}"))
    if add_remove is not None:
        checks.append(Check("add_remove_rdp_not_below_pld", add_remove["rdp"] >= add_remove["pld"] * (1 - RECOMPUTE_RTOL),
                            f"add/remove RDP {add_remove['rdp']!r} must not be below PLD {add_remove['pld']!r}"))
        stated = (block.get("teacher_dp") or {}).get("add_remove_epsilon") or {}
        for accountant_name in ("pld", "rdp"):
            if stated.get(accountant_name) is not None:
                checks.append(Check(f"add_remove_{accountant_name}",
                                    _close(stated[accountant_name], add_remove[accountant_name]),
                                    f"card {stated[accountant_name]!r}, recomputed {add_remove[accountant_name]!r}"))
    _check_mechanism(block, events, checks)
    return result


def _check_mechanism(block: dict, events, checks: list[Check]) -> None:
    """Check that the mechanism parameters and query counts on the card are the ones in its events."""
    mechanism = block.get("mechanism") or {}
    name = mechanism.get("name")
    charged = [event for event in events if event.kind != "poisson_gaussian"]
    unit = block.get("unit")
    if name in ("gaussian", "noisy-label", "gnmax"):
        # One teacher can change arbitrarily when one example changes, so noise on its answers
        # protects the teacher as a whole. Only an ensemble of >= 2 teachers on disjoint shards
        # supports the example level, and GNMax exists only for such an ensemble.
        teachers = mechanism.get("num_teachers")
        ensemble = isinstance(teachers, int) and not isinstance(teachers, bool) and teachers >= 2
        expected = "example" if ensemble and name in ("gaussian", "gnmax") else "teacher"
        checks.append(Check("unit", unit == expected and (ensemble or name != "gnmax"),
                            f"unit {unit!r} with mechanism {name!r} and num_teachers {teachers!r}; expected "
                            f"{expected!r}"))
    elif name == "dp-teacher":
        expected = (block.get("teacher_dp") or {}).get("unit", "example")
        checks.append(Check("unit", unit == expected, f"unit {unit!r}, the DP-SGD teacher's unit {expected!r}"))
    if name in ("gaussian", "noisy-label", "gnmax"):
        total = sum(event.count for event in charged)
        checks.append(Check("queries", block.get("queries") == total,
                            f"card states {block.get('queries')!r} queries, the events hold {total}"))
    if name == "gaussian":
        multiplier = mechanism.get("noise_multiplier")
        checks.append(Check("noise_multiplier", all(e.kind == "gaussian" and e.parameter == multiplier for e in charged),
                            f"mechanism.noise_multiplier {multiplier!r}, event parameters "
                            f"{sorted({e.parameter for e in charged})}"))
        clip, teachers = mechanism.get("clip_norm"), mechanism.get("num_teachers")
        sensitivity, std = mechanism.get("l2_sensitivity"), mechanism.get("noise_std")
        try:
            consistent = (_close(sensitivity, 2.0 * clip / teachers)
                          and _close(std, multiplier * sensitivity))
        except (TypeError, ZeroDivisionError):
            consistent = False
        checks.append(Check("noise_scale", consistent,
                            f"need l2_sensitivity = 2 clip_norm / num_teachers and noise_std = noise_multiplier x "
                            f"l2_sensitivity; card has clip_norm {clip!r}, num_teachers {teachers!r}, l2_sensitivity "
                            f"{sensitivity!r}, noise_std {std!r}"))
    elif name == "gnmax":
        # The vote histogram's L2 sensitivity under replace-one is sqrt(2), whatever the number of teachers.
        multiplier = mechanism.get("noise_multiplier")
        checks.append(Check("noise_multiplier", all(e.kind == "gaussian" and e.parameter == multiplier for e in charged),
                            f"mechanism.noise_multiplier {multiplier!r}, event parameters "
                            f"{sorted({e.parameter for e in charged})}"))
        sensitivity, std = mechanism.get("l2_sensitivity"), mechanism.get("noise_std")
        try:
            consistent = _close(sensitivity, math.sqrt(2.0)) and _close(std, multiplier * sensitivity)
        except TypeError:
            consistent = False
        checks.append(Check("noise_scale", consistent,
                            f"need l2_sensitivity = sqrt(2) and noise_std = noise_multiplier x l2_sensitivity; card "
                            f"has l2_sensitivity {sensitivity!r}, noise_std {std!r}"))
    elif name == "noisy-label":
        eps0 = mechanism.get("eps0")
        checks.append(Check("eps0", all(e.kind == "randomized_response" and e.parameter == eps0 for e in charged),
                            f"mechanism.eps0 {eps0!r}, event parameters {sorted({e.parameter for e in charged})}"))
        label_dp = block.get("per_query_label_dp")
        if label_dp is not None:
            checks.append(Check("per_query_label_dp", label_dp.get("epsilon") == eps0,
                                f"per_query_label_dp.epsilon {label_dp.get('epsilon')!r}, eps0 {eps0!r}"))
    elif name == "dp-teacher":
        teacher = block.get("teacher_dp") or {}
        sgd = [event for event in events if event.kind == "poisson_gaussian"]
        stated = (teacher.get("noise_multiplier"), teacher.get("sampling_rate"), teacher.get("steps"))
        matches = len(sgd) == 1 and (sgd[0].parameter, sgd[0].sampling_rate, sgd[0].count) == stated
        checks.append(Check("dp_sgd_parameters", matches,
                            f"teacher_dp (noise_multiplier, sampling_rate, steps) = {stated}, events "
                            f"{[(e.parameter, e.sampling_rate, e.count) for e in sgd]}"))
        if teacher.get("epsilon") is not None:
            checks.append(Check("teacher_epsilon", _close(teacher["epsilon"], block.get("epsilon")),
                                f"teacher_dp.epsilon {teacher['epsilon']!r}, epsilon {block.get('epsilon')!r}"))
    else:
        checks.append(Check("mechanism", False, f"unknown mechanism {name!r}; expected gaussian, noisy-label, "
                                                "gnmax or dp-teacher"))
