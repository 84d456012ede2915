"""The card of a synthetic dataset: Hub YAML metadata plus a Markdown body from cards/.

The YAML carries the Hub's dataset fields (task, size category, annotation creators, source),
the data files of the split, and the generator's privacy facts. The body is rendered from
`cards/dataset_card.md.jinja`, and its Privacy Considerations section restates the generator's
guarantee.
"""

from __future__ import annotations

import os
from pathlib import Path

DATASET_CARD_TEMPLATE = "dataset_card.md.jinja"


def _templates_dir() -> Path:
    from .cards import CARDS_DIR

    folder = Path(os.environ.get("SYNTHGEN_CARDS_DIR") or CARDS_DIR)
    if not (folder / DATASET_CARD_TEMPLATE).is_file():
        raise FileNotFoundError(f"dataset card template {folder / DATASET_CARD_TEMPLATE} not found; set "
                                "SYNTHGEN_CARDS_DIR to the folder that holds synthgen's cards/ templates")
    return folder


def card_metadata(manifest: dict, license: str) -> dict:  # noqa: A002 (the Hub's field name)
    """Return the card's YAML metadata as a dict."""
    from huggingface_hub import DatasetCardData

    settings = manifest["settings"]
    privacy = manifest["privacy"]
    split = settings["split"]
    data = DatasetCardData(
        license=license,
        pretty_name=manifest["name"],
        task_categories=["image-classification"],
        task_ids=["multi-class-image-classification"],
        size_categories=[manifest["size_category"]],
        annotations_creators=["machine-generated"],
        language_creators=["machine-generated"],
        source_datasets=["original"],
        tags=["synthetic", "differential-privacy", "synthgen", f"{privacy['unit']}-level-dp"],
        configs=[{"config_name": "default", "data_files": [{"split": split, "path": f"data/{split}-*.parquet"}]}],
        differential_privacy={
            "inherited_from": settings["generator"],
            "generator_commit": settings["generator_commit"],
            "unit": privacy["unit"],
            "epsilon": privacy["epsilon"],
            "delta": privacy["delta"],
            "accountant": privacy["accountant"],
            "mechanism": privacy["mechanism"],
            "generator_card": privacy["generator_card"],
            "sampling_cost": privacy["sampling_cost"],
        },
    )
    return data.to_dict()


def _format(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def render_dataset_card(manifest: dict, report: dict, repo_id: str | None = None,
                        license: str = "apache-2.0") -> str:  # noqa: A002
    """Render the dataset card (YAML metadata plus Markdown) of a complete build manifest.

    Args:
        manifest: the build manifest (`synthgen_dataset.json`) with its label counts.
        report: the generator's privacy report.
        repo_id: the dataset repository the card is pushed to, if any.
        license: the license identifier in the metadata.
    """
    import jinja2
    import yaml

    settings = manifest["settings"]
    privacy = manifest["privacy"]
    evaluation = report.get("evaluation") or {}
    size_option = (f"--num-samples {settings['num_samples']}" if settings["num_samples"] is not None
                   else f"--per-class {settings['per_class']}")
    revision = f" --revision {settings['generator_commit']}" if settings["generator_kind"] == "hub" else ""
    # Options that change the rows; left out at their defaults, as in the settings.
    extra = "".join(f" --{key} {settings[key]}" for key in ("precision", "augment") if settings.get(key))
    context = {
        "name": manifest["name"],
        "repo_id": repo_id,
        "rows": manifest["rows"],
        "shards": manifest["shards"],
        "split": settings["split"],
        "class_names": manifest["class_names"],
        "label_counts": list(zip(manifest["class_names"], manifest.get("label_counts") or [])),
        "image_shape": manifest["image_shape"],
        "image_mode": "L (8-bit grayscale)" if manifest["image_shape"][0] == 1 else "RGB (8 bits per channel)",
        "generator": settings["generator"],
        "generator_kind": settings["generator_kind"],
        "generator_commit": settings["generator_commit"],
        "seed": settings["seed"],
        "sampler": manifest["sampler"],
        "augment": settings.get("augment"),
        "build_command": (f"synthgen build-dataset {settings['generator']}{revision} {size_option} "
                          f"--seed {settings['seed']} --split {settings['split']}{extra} --out OUT"),
        "unit": privacy["unit"],
        "unit_description": privacy.get("unit_description"),
        "epsilon": _format(privacy["epsilon"]),
        "delta": f"{privacy['delta']:g}",
        "accountant": privacy["accountant"],
        "mechanism": privacy["mechanism"],
        "generator_card": privacy["generator_card"],
        "student_accuracy": (_format(evaluation["student_accuracy"])
                             if evaluation.get("student_accuracy") is not None else None),
        "hyperparameter_note": (report.get("public_facts") or {}).get("hyperparameter_note"),
    }
    environment = jinja2.Environment(loader=jinja2.FileSystemLoader(str(_templates_dir())),
                                     undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                                     keep_trailing_newline=True, autoescape=False)
    body = environment.get_template(DATASET_CARD_TEMPLATE).render(**context)
    front = yaml.safe_dump(card_metadata(manifest, license), sort_keys=False, allow_unicode=True, width=120)
    return f"---\n{front}---\n\n{body.strip()}\n"
