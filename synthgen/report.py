"""The privacy report of a run: everything needed to state and recompute its guarantee.

Only public facts and DP outputs go in here: no data paths, dataset size or fingerprints of
the private data or the teacher (those stay in the run's private folder).
"""

from __future__ import annotations

import datetime as _dt
import math
import platform
from importlib import metadata

REPORT_FORMAT = "synthgen-privacy-report/1"

UNIT_DESCRIPTIONS = {
    "teacher": (
        "teacher-level: the guarantee holds between any two teachers, so it protects the teacher as a whole "
        "(and everything it was trained on, as one record). It is not an example-level guarantee."
    ),
    "example": "example-level: the guarantee holds between private datasets that differ in one example (replace-one).",
}


def mechanism_facts(run) -> dict:
    config = run.config
    mechanism = run.setup.mechanism
    facts = {"name": config.mechanism, "num_teachers": run.bank.num_teachers, "top_k": mechanism.top_k,
             "temperature": mechanism.temperature, "neighbouring_relation": "replace-one"}
    if config.mechanism == "dp-teacher":
        facts["description"] = "the DP-SGD teacher's probabilities on the student's top-k classes, without noise"
    if mechanism.mode == "gnmax":
        facts.update({
            "name": "gnmax",
            "l2_sensitivity": math.sqrt(2.0),
            "noise_multiplier": mechanism.noise_multiplier,
            "noise_std": mechanism.noise_multiplier * math.sqrt(2.0),
            "description": "each teacher votes for its most likely class among the student's top-k; the vote "
                           "histogram plus N(0, noise_std^2) per class, and its argmax is the label (GNMax, Papernot "
                           "et al. 2018); one example changes one teacher's vote, so the histogram's L2 sensitivity "
                           "is sqrt(2) under replace-one",
        })
    elif config.mechanism == "gaussian":
        sensitivity = 2.0 * mechanism.clip_norm / run.bank.num_teachers
        facts.update({
            "clip_norm": mechanism.clip_norm,
            "l2_sensitivity": sensitivity,
            "noise_multiplier": mechanism.noise_multiplier,
            "noise_std": mechanism.noise_multiplier * sensitivity,
            "description": "teacher probabilities on the student's top-k classes, scaled to L2 norm clip_norm, "
                           "averaged over teachers, plus N(0, noise_std^2) per coordinate; noise_multiplier = "
                           "noise_std / l2_sensitivity",
        })
    elif config.mechanism == "noisy-label":
        facts.update({
            "eps0": mechanism.eps0,
            "description": "randomized response with the student's prediction as prior (RRWithPrior, Ghazi et al. "
                           "2021); each call is eps0-DP, accounted as binary randomized response",
        })
    return facts


def build_report(run, elapsed_seconds: float) -> dict:
    from .privacy.accounting import accountant_versions, pld_epsilon, rdp_epsilon

    config = run.config
    private = run.setup.unit is not None
    dp_teacher = run.setup.teacher_dp
    events = run.ledger.events(run.key, run.run_id) if run.ledger is not None else []
    report: dict = {
        "format": REPORT_FORMAT,
        "private": private,
        "unit": run.setup.unit,
        "unit_description": UNIT_DESCRIPTIONS.get(run.setup.unit, "none: the teacher was queried without noise"),
    }
    if dp_teacher is not None:
        report.update({
            "epsilon": dp_teacher["epsilon"],
            "delta": dp_teacher["delta"],
            "accountant": dp_teacher.get("accountant"),
            "rdp_epsilon": None,
            "events": dp_teacher.get("events", []),
            "teacher_dp": {k: v for k, v in dp_teacher.items() if k not in ("ledger_run_id",)},
            "transcription_cost": "none: the teacher is DP, and the student and generator are post-processing of it",
        })
    elif private:
        report.update({
            "epsilon": pld_epsilon(events, config.delta),
            "delta": config.delta,
            "target_epsilon": config.epsilon,
            "accountant": {
                "name": "pld",
                "library": "dp_accounting",
                "version": accountant_versions()["dp_accounting"],
                "method": "privacy loss distribution; Gaussian queries composed exactly into one Gaussian, randomized "
                          "response by its exact binomial privacy-loss distribution",
            },
            "rdp_epsilon": rdp_epsilon(events, config.delta),
            "events": [event.to_dict() for event in events],
            "ledger_total_epsilon": run.ledger.spent_epsilon(run.key, config.delta),
            "noise_seed": "fixed by the user (tests only: the guarantee assumes the seed is secret)"
                          if config.noise_seed is not None else "secret, drawn from os.urandom",
        })
        if run.setup.mechanism.mode == "noisy-label":
            report["per_query_label_dp"] = {
                "epsilon": run.setup.mechanism.eps0,
                "note": "each synthetic label is eps0-label-DP on its own; this is not a guarantee about the private "
                        "data, see 'epsilon' for that",
            }
    report["mechanism"] = mechanism_facts(run)
    if private and dp_teacher is None:
        # Every query is charged its full worst-case cost, whatever the teachers answered.
        report["accounting_method"] = "data-independent"
    ensemble_facts = getattr(run.setup.teacher, "privacy_facts", None)
    if ensemble_facts is not None:
        report["ensemble"] = ensemble_facts()
    report.update({
        "queries": run.queries,
        "planned_queries": config.steps * config.batch_size,
        "steps": run.step,
        "teacher_forward_examples": run.bank.forward_examples,
        "replayed_examples": run.replayed_examples,
        "evaluation": {
            "student_accuracy": run.last_accuracy,
            "split": config.eval_split if config.eval_data else None,
            "on_private_data": True,
            "note": "measured on the real test split; evaluation only, not covered by the DP guarantee, and not "
                    "used for early stopping or model selection",
        },
        "public_facts": {
            "class_names": run.class_names,
            "image_shape": list(run.setup.teacher.meta.input_shape),
            "generator": dict(run.generator.config),
            "student": dict(run.student.config),
            "hyperparameters": {name: getattr(config, name) for name in (
                "steps", "batch_size", "student_steps", "generator_steps", "student_lr", "generator_lr", "top_k",
                "clip_norm", "temperature", "replay_size", "replay_batch", "onehot_weight", "entropy_weight",
                "activation_weight", "adversarial_weight", "seed", "student_init", "query_pool", "student_shift",
                "pseudo_label_weight", "pseudo_label_threshold", "procedural_fraction", "stroke_prior_weight",
                "silhouette_prior_weight")},
            "hyperparameter_note": "set by the user; tuning them on the private data is not accounted",
        },
        "wall_seconds": round(elapsed_seconds, 1),
        "software": {"synthgen": metadata.version("synthgen"), "torch": metadata.version("torch"),
                     "python": platform.python_version()},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    })
    return report
