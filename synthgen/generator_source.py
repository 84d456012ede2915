"""Find and load the DP generator that a synthetic dataset is sampled from.

A generator is given as one of:

- a finished run folder from `synthgen transcribe` (generator/, student/, privacy_report.json);
- a release or pipeline folder (model_index.json, generator/, student/, privacy_report.json);
- a Hub model repository NAMESPACE/NAME with an optional revision, pulled with `synthgen.hub.pull`.

Every source must carry a privacy report with a DP guarantee, because a synthetic dataset
inherits that guarantee and its card restates it. Weights are loaded from safetensors only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .pipeline import DPSDPipeline

logger = logging.getLogger(__name__)

REPORT_FILE = "privacy_report.json"
MODEL_FILES = ("config.json", "diffusion_pytorch_model.safetensors")
PICKLE_SUFFIXES = (".bin", ".pkl", ".pickle", ".pt", ".pth", ".ckpt")


class GeneratorSourceError(ValueError):
    """The generator cannot be used to build a dataset; the message states why and what to do."""


@dataclass
class GeneratorSource:
    """A loaded generator with the facts a dataset records about where it came from."""

    pipeline: "DPSDPipeline"
    report: dict
    kind: str  # "hub", "release" (local release or pipeline folder) or "run" (local run folder)
    location: str  # Hub repository id, or the absolute path of the local folder
    commit: str  # Hub commit hash, or "sha256:<hex>" over the local model files and report
    revision: str | None  # the revision asked for (Hub only)
    card_url: str | None  # the generator's model card, when there is one
    path: Path  # local folder with the files (the snapshot in the Hugging Face cache for the Hub)

    @property
    def class_names(self) -> list[str]:
        return self.pipeline.class_names

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """Image shape (C, H, W) that the generator produces."""
        config = self.pipeline.generator.config
        return (config.channels, config.image_size, config.image_size)

    def provenance(self) -> dict:
        """Return the facts that identify this generator in a dataset's settings."""
        return {"generator": self.location, "generator_kind": self.kind, "generator_commit": self.commit,
                "generator_revision": self.revision}


def check_privacy_report(report: dict, where: str) -> dict:
    """Raise GeneratorSourceError unless `report` states a DP guarantee with a finite epsilon."""
    if not report.get("private") or report.get("unit") not in ("example", "teacher"):
        name = (report.get("mechanism") or {}).get("name")
        raise GeneratorSourceError(
            f"{where} is not differentially private (unit {report.get('unit')!r}, mechanism {name!r}); synthgen builds "
            "datasets only from DP generators, whose guarantee the dataset inherits")
    for key in ("epsilon", "delta"):
        value = report.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise GeneratorSourceError(f"{where} has an invalid {key} {value!r}; expected a finite number > 0")
    return report


def accountant_name(report: dict) -> str | None:
    """Return the accountant's name from a privacy report, which stores it as a dict or a string."""
    accountant = report.get("accountant")
    return accountant.get("name") if isinstance(accountant, dict) else accountant


def _read_report(folder: Path, where: str) -> dict:
    path = folder / REPORT_FILE
    if not path.is_file():
        raise GeneratorSourceError(
            f"{where} contains no {REPORT_FILE}, so its privacy guarantee is unknown; give a finished run folder from "
            "'synthgen transcribe', a release folder, or a Hub release")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise GeneratorSourceError(f"{path} is not a readable JSON privacy report: {error}") from None
    if not isinstance(report, dict):
        raise GeneratorSourceError(f"{path} must contain a JSON object, got {type(report).__name__}")
    return check_privacy_report(report, where)


def local_digest(folder: Path) -> str:
    """Return "sha256:<hex>" over the model configs, weights and privacy report of a local folder."""
    total = hashlib.sha256()
    names = [f"{part}/{name}" for part in ("generator", "student") for name in MODEL_FILES] + [REPORT_FILE]
    for name in names:
        total.update(name.encode() + b"\0")
        with open(folder / name, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                total.update(hashlib.sha256(chunk).digest())
    return "sha256:" + total.hexdigest()


def _load_run_folder(folder: Path) -> "DPSDPipeline":
    from .models import Classifier, Generator
    from .pipeline import DPSDPipeline

    for part in ("generator", "student"):
        pickles = sorted(p.name for p in (folder / part).glob("*") if p.name.lower().endswith(PICKLE_SUFFIXES))
        if pickles:
            raise GeneratorSourceError(f"{folder / part} contains pickle files {pickles}; synthgen loads safetensors "
                                       "weights only")
        for name in MODEL_FILES:
            if not (folder / part / name).is_file():
                raise GeneratorSourceError(f"{folder / part / name} is missing; the run folder is incomplete")
    return DPSDPipeline(generator=Generator.from_pretrained(folder / "generator", use_safetensors=True),
                        student=Classifier.from_pretrained(folder / "student", use_safetensors=True))


def _load_local(path: Path) -> GeneratorSource:
    folder = path.expanduser().resolve()
    if not folder.is_dir():
        raise GeneratorSourceError(f"generator {path} is a file; give a run, release or pipeline folder")
    report = _read_report(folder, f"generator folder {folder}")
    if (folder / "model_index.json").is_file():
        kind = "release"
        if (folder / "README.md").is_file() and (folder / "samples.png").is_file():
            from .hub import load_release_folder

            pipeline, _ = load_release_folder(folder)
        else:
            # A pipeline saved with save_pretrained plus its privacy report: no card, no samples.
            _check_model_index(folder)
            pipeline = _load_run_folder(folder)
        card = folder / "README.md"
        card_url = card.as_uri() if card.is_file() else (folder / REPORT_FILE).as_uri()
    else:
        kind = "run"
        pipeline = _load_run_folder(folder)
        card_url = (folder / REPORT_FILE).as_uri()
    return GeneratorSource(pipeline, report, kind, str(folder), local_digest(folder), None, card_url, folder)


def _check_model_index(folder: Path) -> None:
    index = json.loads((folder / "model_index.json").read_text())
    expected = {"generator": ["synthgen.models", "Generator"], "student": ["synthgen.models", "Classifier"]}
    declared = {key: value for key, value in index.items() if not key.startswith("_")}
    if index.get("_class_name") != "DPSDPipeline" or declared != expected:
        raise GeneratorSourceError(f"{folder / 'model_index.json'} declares {index.get('_class_name')!r} with parts "
                                   f"{declared}; synthgen loads only DPSDPipeline with {expected}")


def looks_like_repo_id(value: str) -> bool:
    parts = value.split("/")
    return len(parts) == 2 and all(parts) and not value.startswith((".", "/", "~"))


def _load_hub(repo_id: str, revision: str | None) -> GeneratorSource:
    from .hub import HubSettings, pull

    release = pull(repo_id, revision=revision)
    where = f"{repo_id} at commit {release.commit}"
    check_privacy_report(release.report, where)
    endpoint = HubSettings.resolve().endpoint
    card_url = f"{endpoint}/{repo_id}/blob/{release.commit}/README.md"
    return GeneratorSource(release.pipeline, release.report, "hub", repo_id, release.commit, revision or "main",
                           card_url, Path(release.path))


def load_generator(generator: str, revision: str | None = None) -> GeneratorSource:
    """Load a generator from a local folder or a Hub repository (see the module docstring).

    Raises:
        GeneratorSourceError (a ValueError): the folder is not a DP generator.
        synthgen.hub.ReleaseError (a ValueError): the repository or revision cannot be pulled.
        FileNotFoundError: `generator` is neither an existing path nor a repository id.
    """
    path = Path(generator).expanduser()
    if path.exists():
        if revision is not None:
            raise GeneratorSourceError(f"--revision applies to Hub repositories only, but {generator} is a local "
                                       "folder; drop --revision")
        source = _load_local(path)
    elif looks_like_repo_id(generator):
        source = _load_hub(generator, revision)
    else:
        raise FileNotFoundError(f"generator {generator!r} not found: give a run folder, a release folder or a Hub "
                                "repository id NAMESPACE/NAME")
    logger.info("generator %s (%s, %s): %s-level (%.4g, %g)-DP, %d classes, images %s", source.location, source.kind,
                source.commit[:19], source.report["unit"], source.report["epsilon"], source.report["delta"],
                len(source.class_names), "x".join(map(str, source.image_shape)))
    return source
