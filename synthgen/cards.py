"""The privacy datasheet of a release: a Hub model card rendered from a run's privacy report.

The YAML metadata carries the report's facts verbatim (`differential_privacy`, `evaluation`,
`public_facts`), so `synthgen privacy recompute` can check a card from its metadata alone.
The Markdown body is rendered from the Jinja templates in the repository's `cards/` folder;
a section with nothing to say is left out.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

CARD_TEMPLATE = "model_card.md.jinja"
# NOTE: the templates live beside the package, which works in a source checkout (the editable
# install the scripts make). A wheel does not ship them, so there SYNTHGEN_CARDS_DIR must name them.
CARDS_DIR = Path(__file__).resolve().parent.parent / "cards"

# Report keys copied into the card's `differential_privacy` block when the report has them.
PRIVACY_KEYS = (
    "format", "private", "unit", "unit_description", "epsilon", "delta", "target_epsilon", "accountant",
    "rdp_epsilon", "events", "mechanism", "queries", "planned_queries", "steps", "per_query_label_dp",
    "teacher_dp", "transcription_cost", "ledger_total_epsilon", "noise_seed", "accounting_method", "ensemble",
)
RELEASED_FILES = {
    "model_index.json": "the DPSDPipeline layout (diffusers format)",
    "generator/": "the DP generator: config.json and safetensors weights",
    "student/": "the DP student classifier: config.json and safetensors weights",
    "privacy_report.json": "the privacy report written by the run",
    "samples.png": "one row of generated samples per class, labelled by the student",
    "README.md": "this datasheet",
}
AUDIT_FILE_DESCRIPTION = "the empirical privacy audit of the run (`synthgen audit`), measured on private data"


def audit_summary(audit: dict) -> dict:
    """Return the headline numbers of an audit (`synthgen audit`'s audit.json) with its note and settings."""
    from .audit import summarise

    return {"results": summarise(audit), "note": audit.get("note"), "settings": copy.deepcopy(audit.get("settings"))}


def release_facts(report: dict, audit: dict | None = None) -> dict:
    """Return the facts that the card's YAML carries: the privacy report's, copied verbatim, and
    the audit's headline numbers when the run was audited."""
    privacy = {key: copy.deepcopy(report[key]) for key in PRIVACY_KEYS if key in report}
    facts = {"differential_privacy": privacy}
    for key in ("evaluation", "public_facts"):
        if report.get(key) is not None:
            facts[key] = copy.deepcopy(report[key])
    if audit is not None:
        facts["audit"] = audit_summary(audit)
    return facts


def card_metadata(report: dict, repo_id: str | None = None, license: str = "apache-2.0",  # noqa: A002
                  audit: dict | None = None) -> dict:
    """Return the card's YAML metadata: Hub fields, model-index and the report's facts."""
    from huggingface_hub import EvalResult, ModelCardData

    unit = report.get("unit")
    mechanism = (report.get("mechanism") or {}).get("name")
    tags = ["synthgen", "differential-privacy", "dpsd", "synthetic-data", "image-generation"]
    if unit:
        tags.append(f"{unit}-level-dp")
    if mechanism:
        tags.append(f"dp-mechanism-{mechanism}")
    evaluation = report.get("evaluation") or {}
    eval_results = None
    if evaluation.get("student_accuracy") is not None:
        split = evaluation.get("split") or "test"
        eval_results = [EvalResult(
            task_type="image-classification",
            task_name="Student accuracy (evaluation on private data)",
            dataset_type="private",
            dataset_name=f"private {split} split (evaluation only, not covered by the DP guarantee)",
            dataset_split=split,
            metric_type="accuracy",
            metric_name="student accuracy (%) on private data, not covered by the DP guarantee",
            metric_value=evaluation["student_accuracy"],
            verified=False,
        )]
    # library_name: the files are a diffusers pipeline (model_index.json plus one folder per
    # part), but only synthgen's classes load them (see the card's "How to use").
    data = ModelCardData(
        library_name="diffusers",
        pipeline_tag="unconditional-image-generation",
        license=license,
        tags=tags,
        model_name=(repo_id or "synthgen-release").split("/")[-1],
        eval_results=eval_results,
        **release_facts(report, audit),
    )
    return data.to_dict()


def _templates_dir() -> Path:
    folder = Path(os.environ.get("SYNTHGEN_CARDS_DIR") or CARDS_DIR)
    if not (folder / CARD_TEMPLATE).is_file():
        raise FileNotFoundError(f"card template {folder / CARD_TEMPLATE} not found; set SYNTHGEN_CARDS_DIR to the "
                                "folder that holds synthgen's cards/ templates")
    return folder


def _format_number(value) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _rows(mapping: dict, skip: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    return [(key, _format_number(value)) for key, value in mapping.items()
            if key not in skip and not isinstance(value, (dict, list))]


def _audit_rows(summary: dict | None) -> tuple[list[tuple[str, ...]], str | None]:
    """Return one table row per attack and target, and the nearest-neighbour fraction."""
    if not summary:
        return [], None
    rows, fraction = [], None
    for name, metrics in summary["results"].items():
        if not isinstance(metrics, dict):
            fraction = _format_number(metrics)
            continue
        bound = metrics.get("dp_tpr_bound_at_0.01_fpr")
        rows.append((name.replace("/", ", "), _format_number(metrics["auc"]),
                     _format_number(metrics["tpr_at_0.001_fpr"]), _format_number(metrics["tpr_at_0.01_fpr"]),
                     _format_number(bound) if bound is not None else "none (not private)"))
    return rows, fraction


def _context(report: dict, repo_id: str | None, revision: str | None, license: str,  # noqa: A002
             audit: dict | None) -> dict:
    from .recompute import recompute_card

    facts = release_facts(report, audit)
    privacy = facts["differential_privacy"]
    mechanism = privacy.get("mechanism") or {}
    teacher_dp = privacy.get("teacher_dp")
    public = facts.get("public_facts") or {}
    evaluation = facts.get("evaluation") or {}
    recomputation = recompute_card(facts)
    if repo_id:
        target = repo_id + (f" --revision {revision}" if revision and revision != "main" else "")
    else:
        target = "PATH_TO_THIS_README.md"
    total = privacy.get("ledger_total_epsilon")
    audit_rows, audit_fraction = _audit_rows(facts.get("audit"))
    released_files = dict(RELEASED_FILES)
    if audit is not None:
        released_files["audit.json"] = AUDIT_FILE_DESCRIPTION
    return {
        "title": repo_id or "synthgen release",
        "repo_id": repo_id,
        "revision": revision,
        "license": license,
        "unit": privacy.get("unit"),
        "unit_description": privacy.get("unit_description"),
        "epsilon": _format_number(privacy.get("epsilon")),
        "delta": f"{privacy.get('delta'):g}",
        "accountant": privacy.get("accountant") or {},
        "rdp_epsilon": _format_number(privacy["rdp_epsilon"]) if privacy.get("rdp_epsilon") is not None else None,
        "mechanism_name": mechanism.get("name"),
        "mechanism_description": mechanism.get("description"),
        "mechanism_rows": _rows(mechanism, skip=("name", "description")),
        "events": privacy.get("events") or [],
        "queries": privacy.get("queries"),
        "planned_queries": privacy.get("planned_queries"),
        "steps": privacy.get("steps"),
        "teacher_dp": teacher_dp,
        "teacher_dp_rows": _rows(teacher_dp, skip=("verification", "source", "hyperparameter_note", "unit",
                                                   "mechanism")) if teacher_dp else [],
        "add_remove": (teacher_dp or {}).get("add_remove_epsilon"),
        "per_query_label_dp": privacy.get("per_query_label_dp"),
        "transcription_cost": privacy.get("transcription_cost"),
        "ledger_total": _format_number(total) if total is not None and total > privacy["epsilon"] * 1.0001 else None,
        "noise_seed_fixed": str(privacy.get("noise_seed", "")).startswith("fixed"),
        "recompute_command": f"synthgen privacy recompute {target}",
        "recompute": recomputation,
        "pld_recomputed": _format_number(recomputation.pld_epsilon),
        "rdp_recomputed": _format_number(recomputation.rdp_epsilon) if recomputation.rdp_epsilon is not None else None,
        "accuracy": _format_number(evaluation.get("student_accuracy")) if evaluation.get("student_accuracy") is not None else None,
        "eval_split": evaluation.get("split"),
        "class_names": public.get("class_names") or [],
        "image_shape": public.get("image_shape"),
        "generator_config": {k: v for k, v in (public.get("generator") or {}).items() if not k.startswith("_")},
        "student_config": {k: v for k, v in (public.get("student") or {}).items()
                           if not k.startswith("_") and k != "class_names"},
        "hyperparameters": public.get("hyperparameters") or {},
        "hyperparameter_note": public.get("hyperparameter_note"),
        "audit_rows": audit_rows,
        "audit_closer_fraction": audit_fraction,
        "audit_note": (facts.get("audit") or {}).get("note"),
        "released_files": released_files,
    }


def render_card(report: dict, repo_id: str | None = None, revision: str | None = None,
                license: str = "apache-2.0", audit: dict | None = None) -> str:  # noqa: A002
    """Render the model card (YAML metadata plus Markdown) of a run's privacy report.

    Args:
        report: the run's `privacy_report.json`, parsed.
        repo_id: the Hub repository the card is for; it goes into the recompute command.
        revision: the branch the release is pushed to, if not `main`.
        license: the license identifier in the card's metadata.
        audit: the run's `audit.json` from `synthgen audit`, parsed, if the run was audited.

    Raises:
        ValueError: the report is not private (there is no guarantee to describe).
    """
    import jinja2
    import yaml

    if not report.get("private") or report.get("unit") is None:
        raise ValueError("the run is not private (mechanism 'none'): it has no privacy guarantee to publish")
    metadata = card_metadata(report, repo_id, license, audit)
    environment = jinja2.Environment(loader=jinja2.FileSystemLoader(str(_templates_dir())),
                                     undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                                     keep_trailing_newline=True, autoescape=False)
    body = environment.get_template(CARD_TEMPLATE).render(**_context(report, repo_id, revision, license, audit))
    front = yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True, width=120)
    return f"---\n{front}---\n\n{body.strip()}\n"


def parse_card(text: str) -> dict:
    """Return the YAML metadata of a model card, parsed the way huggingface_hub parses it."""
    from huggingface_hub import ModelCard

    card = ModelCard(text)
    metadata = card.data.to_dict()
    if not metadata:
        raise ValueError("the model card has no YAML metadata block")
    return metadata
