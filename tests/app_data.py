"""A small real catalog for the app tests: two runs, an audited run and a dataset, made once per session.

The tiny test runs give every sample the same label, so the run the app shows first carries
the generator and student of `spread_label_release` (real synthgen models whose student spreads
its labels over the classes): its per-class grid and dataset then cover every class.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from .dataset_builds import build, spread_label_release
from .release_runs import audited_run, release_run

_DATA: dict[str, "AppData"] = {}


@dataclass
class AppData:
    catalog: Path
    run_dir: Path  # the Gaussian test run, as transcribed
    audited_dir: Path  # a copy of it with audit.json
    spread_dir: Path  # a run folder whose generator and student spread labels over all classes
    dataset: Path  # a dataset built from spread_dir, recorded in the catalog
    class_names: list[str]


def spread_run(run_dir: Path, folder: Path) -> Path:
    """Copy a run folder and replace its generator and student with the label-spreading ones."""
    pipeline = spread_label_release(run_dir, folder.parent / "spread-pipeline")
    shutil.copytree(run_dir, folder)
    for part in ("generator", "student"):
        shutil.rmtree(folder / part)
        shutil.copytree(pipeline / part, folder / part)
    return folder


def app_data(small_teacher: Path, mnist_small: Path, tmp_path_factory) -> AppData:
    """Return the session's app catalog, made on first request."""
    import json

    from synthgen.catalog import Catalog

    key = str(tmp_path_factory.getbasetemp())
    if key not in _DATA:
        os.environ.setdefault("TQDM_DISABLE", "1")
        run_dir = release_run("gaussian", small_teacher, mnist_small, tmp_path_factory)
        audited = audited_run(small_teacher, mnist_small, tmp_path_factory)
        folder = tmp_path_factory.mktemp("app-data")
        spread = spread_run(run_dir, folder / "spread-run")
        dataset = folder / "dataset"
        build(spread, dataset, num_samples=300, shard_size=150)
        catalog = folder / "catalog.duckdb"
        with Catalog(catalog) as records:
            # The newest run comes first in the app's generator list, so the spread run is recorded last.
            records.record_run(run_dir)
            records.record_run(audited)
            records.record_run(spread)
            records.record_dataset_folder(dataset)
        names = json.loads((run_dir / "privacy_report.json").read_text())["public_facts"]["class_names"]
        _DATA[key] = AppData(catalog, run_dir, audited, spread, dataset, list(names))
    return _DATA[key]
