"""Data access behind the synthgen app (`synthgen app`, app/synthgen_app.py).

Nothing here imports Streamlit, so every function can be tested on its own. The app only
reads: the catalog is opened read-only, generators are loaded from safetensors with
`synthgen.generator_source.load_generator` (a Hub repository goes through `synthgen.hub.pull`,
the loader of `synthgen pull`), and SQL over a dataset runs in a confined DuckDB connection
(`DatasetSQL`).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import threading
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pandas

    from .generator_source import GeneratorSource

logger = logging.getLogger(__name__)

GENERATOR_COLUMNS = ["kind", "location", "unit", "mechanism", "epsilon", "delta", "student_accuracy", "date",
                     "commit"]
ACCURACY_NOTE = ("Student accuracy is measured on the real test split: evaluation on private data, not covered "
                 "by the DP guarantee.")
# Draws per batch when filling a per-class grid, and the most batches before giving up on a class.
GRID_BATCH_SIZE = 256
GRID_MAX_BATCHES = 8
SQL_MAX_ROWS = 1000
SQL_TIMEOUT_SECONDS = 30.0


class AppDataError(ValueError):
    """Data the app needs is missing or invalid; the message names the value and the fix."""


class QueryRejectedError(AppDataError):
    """A SQL statement was rejected before it ran: it is not a single read-only SELECT."""


class QueryFailedError(AppDataError):
    """A SQL statement failed in DuckDB (syntax, unknown column, file access outside the dataset)."""


# ---------------------------------------------------------------- the catalog


@dataclass
class CatalogSnapshot:
    """The catalog's runs, releases and datasets, read once."""

    path: Path
    exists: bool
    runs: "pandas.DataFrame"
    releases: "pandas.DataFrame"
    datasets: "pandas.DataFrame"


def read_catalog(path: str | os.PathLike | None = None) -> CatalogSnapshot:
    """Read the catalog's tables through a read-only connection; a missing file gives empty tables.

    Raises:
        AppDataError: the file cannot be opened, for example because a build has it open.
    """
    import duckdb
    import pandas

    from .catalog import default_catalog_path

    path = Path(path).expanduser() if path else default_catalog_path()
    tables = {"runs": "SELECT * FROM runs ORDER BY recorded_at DESC",
              "releases": "SELECT * FROM releases ORDER BY recorded_at DESC",
              "datasets": "SELECT * FROM datasets ORDER BY recorded_at DESC"}
    if not path.is_file():
        return CatalogSnapshot(path, False, *(pandas.DataFrame() for _ in tables))
    try:
        connection = duckdb.connect(str(path), read_only=True)
    except duckdb.Error as error:
        raise AppDataError(f"cannot open the catalog {path}: {str(error).splitlines()[0]}. Another process (a "
                           "dataset build or a catalog command) may be writing it; reload the page when it "
                           "has finished") from None
    try:
        frames = {}
        for name, query in tables.items():
            try:
                frames[name] = connection.execute(query).df()
            except duckdb.CatalogException:
                frames[name] = pandas.DataFrame()  # a catalog written by an older synthgen lacks the table
    finally:
        connection.close()
    return CatalogSnapshot(path, True, frames["runs"], frames["releases"], frames["datasets"])


def cached_release_report(repo_id: str, commit: str) -> dict | None:
    """Return the privacy report of a release from the Hugging Face cache, without any request."""
    from huggingface_hub import try_to_load_from_cache

    from .hub import HubSettings, REPORT_FILE

    cached = try_to_load_from_cache(repo_id, REPORT_FILE, cache_dir=HubSettings.resolve().cache_dir,
                                    revision=commit)
    if not isinstance(cached, str):
        return None
    try:
        return json.loads(Path(cached).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        logger.warning("cannot read the cached privacy report of %s at %s: %s", repo_id, commit, error)
        return None


def generators_table(snapshot: CatalogSnapshot) -> "pandas.DataFrame":
    """Return one row per catalog run and release with its privacy facts (GENERATOR_COLUMNS).

    For a run, date is when the run finished and commit is the sha256 of its weights and report.
    For a release, date is when it was recorded and commit is its Hub commit. A release's student
    accuracy comes from its cached privacy report, so it is known only when it was pulled here.
    """
    import pandas

    rows = []
    for run in snapshot.runs.to_dict("records"):
        rows.append({"kind": "run", "location": run["run_dir"], "unit": run["unit"], "mechanism": run["mechanism"],
                     "epsilon": run["epsilon"], "delta": run["delta"], "student_accuracy": run["student_accuracy"],
                     "date": run["created"] or str(run["recorded_at"]), "commit": run["weights_digest"]})
    for release in snapshot.releases.to_dict("records"):
        report = cached_release_report(release["repo_id"], release["commit"]) or {}
        rows.append({"kind": "release", "location": release["repo_id"], "unit": release["unit"],
                     "mechanism": release["mechanism"], "epsilon": release["epsilon"], "delta": release["delta"],
                     "student_accuracy": (report.get("evaluation") or {}).get("student_accuracy"),
                     "date": str(release["recorded_at"]), "commit": release["commit"]})
    return pandas.DataFrame(rows, columns=GENERATOR_COLUMNS)


# ---------------------------------------------------------------- generators


@dataclass(frozen=True)
class GeneratorChoice:
    """A generator the app can load: a local run or release folder, or a Hub repository at a revision."""

    kind: str  # "run" or "folder" (local), "release" or "hub" (a Hub repository)
    location: str  # folder path or repository id NAMESPACE/NAME
    revision: str | None = None  # Hub branch, tag or commit

    @property
    def is_hub(self) -> bool:
        return self.kind in ("release", "hub")

    @property
    def key(self) -> str:
        return f"{self.kind}|{self.location}|{self.revision or ''}"

    @classmethod
    def from_key(cls, key: str) -> "GeneratorChoice":
        kind, location, revision = key.split("|", 2)
        return cls(kind, location, revision or None)

    @property
    def label(self) -> str:
        if self.is_hub:
            return f"{self.location} @ {(self.revision or 'main')[:12]}"
        return f"{self.kind}: {self.location}"


def catalog_choices(snapshot: CatalogSnapshot) -> list[GeneratorChoice]:
    """Return the catalog's runs and releases as generator choices, newest first."""
    choices = [GeneratorChoice("run", str(run_dir)) for run_dir in snapshot.runs.get("run_dir", [])]
    for release in snapshot.releases.to_dict("records"):
        choices.append(GeneratorChoice("release", release["repo_id"], release["commit"]))
    return choices


def local_stamp(choice: GeneratorChoice) -> str:
    """Return a value that changes when a local generator's files change (empty for the Hub)."""
    if choice.is_hub:
        return ""
    folder = Path(choice.location)
    stamps = []
    for name in ("privacy_report.json", "generator/diffusion_pytorch_model.safetensors",
                 "student/diffusion_pytorch_model.safetensors"):
        try:
            stamps.append(str((folder / name).stat().st_mtime_ns))
        except OSError:
            stamps.append("missing")
    return "/".join(stamps)


def load_choice(choice: GeneratorChoice) -> "GeneratorSource":
    """Load a generator from safetensors; a Hub repository is pulled as `synthgen pull` does.

    Raises:
        ValueError (synthgen.hub.ReleaseError, GeneratorSourceError) or FileNotFoundError, with a
        message that names the fix.
    """
    from .generator_source import load_generator

    if choice.is_hub:
        from .generator_source import looks_like_repo_id

        if not looks_like_repo_id(choice.location):
            raise AppDataError(f"repository id must be NAMESPACE/NAME, got {choice.location!r}")
        source = load_generator(choice.location, revision=choice.revision)
    else:
        if not Path(choice.location).expanduser().is_dir():
            raise AppDataError(f"generator folder {choice.location} not found; it may have been moved or deleted. "
                               "Give an existing run or release folder")
        source = load_generator(choice.location)
    source.pipeline.set_progress_bar_config(disable=True)
    return source


# ---------------------------------------------------------------- sample grids


@dataclass
class SampleGrid:
    """Per-class samples: row r contains the images the student labelled as class `classes[r]`."""

    class_names: list[str]
    classes: list[int]
    per_class: int
    seed: int
    images: list[np.ndarray]  # per row: uint8 (n, C, H, W), n <= per_class
    confidences: list[np.ndarray]  # per row: float32 (n,)
    drawn: int  # images generated to fill the grid

    @property
    def missing(self) -> dict[str, int]:
        """Images still missing per class name, for classes the generator rarely produced."""
        return {self.class_names[c]: self.per_class - len(row)
                for c, row in zip(self.classes, self.images) if len(row) < self.per_class}

    def summary(self) -> "pandas.DataFrame":
        import pandas

        return pandas.DataFrame({
            "class": [self.class_names[c] for c in self.classes],
            "images": [len(row) for row in self.images],
            "mean confidence": [float(row.mean()) if len(row) else math.nan for row in self.confidences],
        })


def sample_grid(pipeline, seed: int, per_class: int, classes: list[int], batch_size: int = GRID_BATCH_SIZE,
                max_batches: int = GRID_MAX_BATCHES) -> SampleGrid:
    """Draw images until each class in `classes` has `per_class` of them, by the student's label.

    Batches come from one CPU torch.Generator seeded with `seed`, so a seed gives the same grid
    on every call. A class the generator rarely produces keeps fewer images after `max_batches`
    batches (see `SampleGrid.missing`). Sampling is post-processing of the DP release.
    """
    import torch

    names = pipeline.class_names
    if not isinstance(per_class, int) or per_class < 1:
        raise AppDataError(f"images per class must be an integer >= 1, got {per_class!r}")
    if not classes:
        raise AppDataError("choose at least one class")
    for index in classes:
        if not 0 <= index < len(names):
            raise AppDataError(f"class index {index} is not one of the student's classes 0 to {len(names) - 1}")
    rng = torch.Generator(device="cpu").manual_seed(int(seed))
    images: dict[int, list[np.ndarray]] = {c: [] for c in classes}
    confidences: dict[int, list[float]] = {c: [] for c in classes}
    drawn = 0
    for _ in range(max_batches):
        output = pipeline(num_images=batch_size, generator=rng, output_type="pt", batch_size=batch_size)
        drawn += batch_size
        # The pipeline returns multiples of 1/255, so this recovers the 8-bit pixels the student saw.
        pixels = (output.images * 255).round().to(torch.uint8).numpy()  # (B, C, H, W)
        for offset, label in enumerate(output.labels.tolist()):
            if label in images and len(images[label]) < per_class:
                images[label].append(pixels[offset])
                confidences[label].append(float(output.confidences[offset]))
        if all(len(images[c]) >= per_class for c in classes):
            break
    shape = tuple(pipeline.generator.config[key] for key in ("channels", "image_size", "image_size"))
    return SampleGrid(
        class_names=names, classes=list(classes), per_class=per_class, seed=int(seed),
        images=[np.stack(images[c]) if images[c] else np.zeros((0, *shape), np.uint8) for c in classes],
        confidences=[np.asarray(confidences[c], dtype=np.float32) for c in classes], drawn=drawn)


def _tile(pixels: np.ndarray, scale: int):
    from PIL import Image

    array = pixels[0] if pixels.shape[0] == 1 else np.transpose(pixels, (1, 2, 0))
    tile = Image.fromarray(array).convert("RGB")
    return tile.resize((tile.width * scale, tile.height * scale), Image.NEAREST)


def grid_png(grid: SampleGrid, scale: int = 3) -> bytes:
    """Render the grid as PNG: one row per class, its name on the left, the student's confidence under each image."""
    from PIL import Image, ImageDraw

    channels, height, width = grid.images[0].shape[1:] if grid.images else (1, 28, 28)
    label_width, caption_height, gap = 90, 14, 4
    cell_w, cell_h = width * scale + gap, height * scale + caption_height + gap
    canvas = Image.new("RGB", (label_width + grid.per_class * cell_w, max(1, len(grid.classes)) * cell_h), "white")
    draw = ImageDraw.Draw(canvas)
    for row, (label, pixels, confidence) in enumerate(zip(grid.classes, grid.images, grid.confidences)):
        top = row * cell_h
        draw.text((4, top + height * scale // 2 - 6), str(grid.class_names[label])[:14], fill="black")
        for column in range(len(pixels)):
            left = label_width + column * cell_w
            canvas.paste(_tile(pixels[column], scale), (left, top))
            draw.text((left + 2, top + height * scale + 1), f"{confidence[column]:.2f}", fill=(60, 60, 60))
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()


def _grid_rows(grid: SampleGrid):
    from .data import encode_png

    number = 0
    for label, pixels, confidences in zip(grid.classes, grid.images, grid.confidences):
        for image, confidence in zip(pixels, confidences):
            yield number, label, grid.class_names[label], float(confidence), encode_png(image)
            number += 1


def samples_zip(grid: SampleGrid) -> bytes:
    """Pack the grid's images as PNG files plus labels.csv (file, label, class_name, confidence, seed)."""
    buffer = io.BytesIO()
    table = io.StringIO()
    writer = csv.writer(table)
    writer.writerow(["file", "label", "class_name", "confidence", "seed"])
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for number, label, name, confidence, png in _grid_rows(grid):
            filename = f"images/{number:04d}_label{label}.png"
            archive.writestr(filename, png)
            writer.writerow([filename, label, name, f"{confidence:.6f}", grid.seed])
        archive.writestr("labels.csv", table.getvalue())
    return buffer.getvalue()


def samples_parquet(grid: SampleGrid) -> bytes:
    """Write the grid's images as parquet: image (struct of PNG bytes and path, as `datasets` stores it),
    label, class_name, confidence and seed."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = list(_grid_rows(grid))
    table = pa.table({
        "image": pa.array([{"bytes": png, "path": None} for *_, png in rows],
                          type=pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
        "label": pa.array([row[1] for row in rows], type=pa.int64()),
        "class_name": pa.array([row[2] for row in rows], type=pa.string()),
        "confidence": pa.array([row[3] for row in rows], type=pa.float32()),
        "seed": pa.array([grid.seed] * len(rows), type=pa.int64()),
    })
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


# ---------------------------------------------------------------- privacy cards


@dataclass
class CardView:
    """A generator's privacy datasheet: the card text, its parsed YAML and where it came from."""

    text: str
    body: str  # the Markdown without the YAML front matter
    metadata: dict
    source: str
    audit: dict | None = None  # the audit's headline numbers, when the generator was audited


def load_card(folder: str | os.PathLike, report: dict) -> CardView:
    """Read the released card (README.md) of a folder, or render it from the privacy report.

    A run folder has no card, so its card is rendered from privacy_report.json and audit.json
    as `synthgen push` would render it.
    """
    from .cards import audit_summary, parse_card, render_card
    from .hub import AUDIT_FILE, CARD_FILE

    folder = Path(folder)
    audit = None
    if (folder / AUDIT_FILE).is_file():
        audit = json.loads((folder / AUDIT_FILE).read_text(encoding="utf-8"))
    if (folder / CARD_FILE).is_file():
        text, source = (folder / CARD_FILE).read_text(encoding="utf-8"), str(folder / CARD_FILE)
    else:
        text, source = render_card(report, audit=audit), f"rendered from {folder / 'privacy_report.json'}"
    metadata = parse_card(text)
    body = text.split("\n---\n", 1)[1] if text.startswith("---\n") and "\n---\n" in text else text
    summary = metadata.get("audit") or (audit_summary(audit) if audit is not None else None)
    return CardView(text, body.strip(), metadata, source, summary)


def facts_table(block: dict) -> "pandas.DataFrame":
    """Flatten the card's `differential_privacy` block into (fact, value) rows; events are left out."""
    import pandas

    rows: list[tuple[str, str]] = []

    def visit(prefix: str, node) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                visit(f"{prefix}.{key}" if prefix else str(key), value)
        elif isinstance(node, list):
            rows.append((prefix, json.dumps(node)))
        else:
            rows.append((prefix, _format_value(node)))

    visit("", {key: value for key, value in block.items() if key != "events"})
    return pandas.DataFrame(rows, columns=["fact", "value"])


def _format_value(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else str(value)


def events_table(block: dict) -> "pandas.DataFrame":
    import pandas

    return pandas.DataFrame(block.get("events") or [])


@dataclass
class RecomputeOutcome:
    """The result of recomputing a card's epsilon, for display."""

    passed: bool
    card_epsilon: float
    recomputed_epsilon: float
    delta: float
    rdp_epsilon: float | None
    accountant_version: str
    card_accountant_version: str | None
    failed: list[tuple[str, str]] = field(default_factory=list)  # (check, detail)

    @property
    def difference(self) -> float:
        return self.card_epsilon - self.recomputed_epsilon

    @property
    def relative_difference(self) -> float:
        return abs(self.difference) / self.recomputed_epsilon if self.recomputed_epsilon else math.inf


def recompute(metadata: dict) -> RecomputeOutcome:
    """Recompute epsilon from the card's YAML with `synthgen privacy recompute`'s checks.

    Raises:
        ValueError: the card has no usable `differential_privacy` block.
    """
    from .recompute import recompute_card

    result = recompute_card(metadata)
    return RecomputeOutcome(
        passed=result.passed, card_epsilon=result.card_epsilon, recomputed_epsilon=result.pld_epsilon,
        delta=result.delta, rdp_epsilon=result.rdp_epsilon, accountant_version=result.accountant_version,
        card_accountant_version=result.card_accountant_version,
        failed=[(check.name, check.detail) for check in result.checks if not check.passed])


def audit_table(summary: dict | None) -> "pandas.DataFrame | None":
    """Return one row per attack and target from an audit summary (cards.audit_summary), or None."""
    import pandas

    if not summary or not isinstance(summary.get("results"), dict):
        return None
    rows = []
    for name, metrics in summary["results"].items():
        if isinstance(metrics, dict):
            rows.append({"attack / target": name, "AUC": metrics.get("auc"),
                         "TPR at 0.1% FPR": metrics.get("tpr_at_0.001_fpr"),
                         "TPR at 1% FPR": metrics.get("tpr_at_0.01_fpr"),
                         "DP bound on TPR at 1% FPR": metrics.get("dp_tpr_bound_at_0.01_fpr")})
        else:
            rows.append({"attack / target": name, "AUC": metrics})
    return pandas.DataFrame(rows)


# ---------------------------------------------------------------- datasets


def read_dataset_manifest(folder: str | os.PathLike) -> dict:
    """Return the manifest of a complete local dataset folder written by `synthgen build-dataset`.

    Raises:
        AppDataError: the folder, its manifest or one of its shards is missing, or the build is unfinished.
    """
    from .build import MANIFEST_FILE

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise AppDataError(f"dataset folder {folder} not found; it may have been moved or deleted. Build it again "
                           "with 'synthgen build-dataset' or record its new place with 'synthgen catalog add-dataset'")
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise AppDataError(f"{folder} contains no {MANIFEST_FILE}; give a folder written by 'synthgen build-dataset'")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise AppDataError(f"{path} is not a readable JSON manifest: {error}") from None
    if not manifest.get("complete"):
        raise AppDataError(f"the dataset build in {folder} is unfinished; finish it with 'synthgen build-dataset "
                           "--resume'")
    missing = [name for name in manifest.get("files") or [] if not (folder / name).is_file()]
    if missing or not manifest.get("files"):
        raise AppDataError(f"dataset {folder} lacks the parquet shards {missing or ['(none listed)']}; build it "
                           "again with 'synthgen build-dataset --overwrite'")
    return manifest


class DatasetSQL:
    """Read-only SQL over one dataset's parquet shards, in a DuckDB connection confined to them.

    The connection is in memory. The view `dataset` reads the shards (columns image, label,
    generator, generator_commit, seed, sample_index, confidence, probabilities in builds of
    synthgen-dataset/2) and the view `classes` maps
    label to class_name. Two layers keep a query from writing or reading anything else:

    1. A statement is parsed by DuckDB and must be exactly one SELECT, so COPY, ATTACH, INSTALL,
       LOAD, CREATE, INSERT, UPDATE, DELETE, PRAGMA, SET and several statements are rejected
       before they run.
    2. External access is off except for the shard files themselves (DuckDB's `allowed_paths`),
       and the configuration is locked, so a SELECT that calls read_csv, read_text, glob or
       read_parquet on any other path or URL fails in DuckDB.
    """

    def __init__(self, folder: str | os.PathLike, manifest: dict | None = None, timeout: float = SQL_TIMEOUT_SECONDS):
        import duckdb

        self.folder = Path(folder).expanduser().resolve()
        self.manifest = manifest if manifest is not None else read_dataset_manifest(self.folder)
        self.class_names = list(self.manifest["class_names"])
        self.timeout = timeout
        self.files = [str(self.folder / name) for name in self.manifest["files"]]
        self._lock = threading.Lock()
        self._connection = duckdb.connect(":memory:")
        listing = ", ".join(_sql_string(path) for path in self.files)
        self._connection.execute(f"CREATE VIEW dataset AS SELECT * FROM read_parquet([{listing}])")
        names = ", ".join(f"({index}, {_sql_string(name)})" for index, name in enumerate(self.class_names))
        self._connection.execute(f"CREATE VIEW classes AS SELECT * FROM (VALUES {names}) AS t(label, class_name)")
        self._connection.execute("SET allowed_paths = ?", [self.files])
        self._connection.execute("SET enable_external_access = false")
        self._connection.execute("SET autoinstall_known_extensions = false")
        self._connection.execute("SET autoload_known_extensions = false")
        self._connection.execute("SET lock_configuration = true")

    def close(self) -> None:
        self._connection.close()

    def __enter__(self) -> "DatasetSQL":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def connection(self):
        """The confined DuckDB connection (exposed so tests can check the second layer alone)."""
        return self._connection

    def check(self, query: str) -> None:
        """Raise QueryRejectedError unless `query` is exactly one SELECT statement."""
        import duckdb

        if not isinstance(query, str) or not query.strip():
            raise QueryRejectedError("the query is empty; write one SELECT statement, for example "
                                     "SELECT label, count(*) FROM dataset GROUP BY label")
        try:
            statements = self._connection.extract_statements(query)
        except duckdb.Error as error:
            raise QueryFailedError(f"the query is not valid SQL: {str(error).strip()}") from None
        if len(statements) != 1:
            raise QueryRejectedError(f"the query contains {len(statements)} statements; run one SELECT statement at "
                                     "a time")
        kind = statements[0].type
        if kind != duckdb.StatementType.SELECT:
            first_word = statements[0].query.split(None, 1)[0].upper()
            raise QueryRejectedError(f"{kind.name} statements are rejected (this one starts with {first_word}): the "
                                     "SQL box is read-only and runs one SELECT over the views dataset and classes")

    def run(self, query: str, max_rows: int = SQL_MAX_ROWS) -> tuple["pandas.DataFrame", bool]:
        """Run one SELECT and return at most `max_rows` rows, and whether more rows were left out.

        PNG bytes (the image column) are shown as their size, not as data.

        Raises:
            QueryRejectedError: the statement is not one SELECT.
            QueryFailedError: DuckDB failed, timed out or refused a file outside the dataset.
        """
        import pandas

        self.check(query)
        columns, rows = self._execute(query, [], max_rows + 1)
        truncated = len(rows) > max_rows
        frame = pandas.DataFrame([[_display_cell(cell) for cell in row] for row in rows[:max_rows]],
                                 columns=_unique(columns))
        return frame, truncated

    def _execute(self, query: str, parameters: list, max_rows: int) -> tuple[list[str], list[tuple]]:
        import duckdb

        with self._lock:  # one DuckDB connection serves one query at a time
            timer = threading.Timer(self.timeout, self._connection.interrupt)
            timer.start()
            try:
                cursor = self._connection.execute(query, parameters)
                columns = [column[0] for column in cursor.description or []]
                rows = cursor.fetchmany(max_rows)
            except duckdb.InterruptException:
                raise QueryFailedError(f"the query ran longer than {self.timeout:g} s and was stopped; add a "
                                       "LIMIT or a narrower WHERE") from None
            except duckdb.PermissionException as error:
                raise QueryFailedError(f"the query was rejected by DuckDB: {str(error).splitlines()[0]}. Only the dataset's "
                                       "shards are readable, through the views dataset and classes") from None
            except duckdb.Error as error:
                raise QueryFailedError(f"the query failed: {str(error).strip()}") from None
            finally:
                timer.cancel()
        return columns, rows

    def class_histogram(self) -> "pandas.DataFrame":
        """Return rows per class (label, class_name, rows), every class included."""
        import pandas

        _, rows = self._execute("SELECT c.label, c.class_name, count(d.label) AS rows FROM classes c "
                                "LEFT JOIN dataset d USING (label) GROUP BY ALL ORDER BY c.label", [],
                                len(self.class_names))
        return pandas.DataFrame(rows, columns=["label", "class_name", "rows"])

    def row_count(self) -> int:
        _, rows = self._execute("SELECT count(*) FROM dataset", [], 1)
        return int(rows[0][0])

    def image_page(self, offset: int, limit: int) -> list[dict]:
        """Return rows offset..offset+limit-1 in sample order: png, label, class_name, confidence, sample_index."""
        _, rows = self._execute(
            "SELECT d.image.bytes, d.label, c.class_name, d.confidence, d.sample_index FROM dataset d "
            "LEFT JOIN classes c USING (label) ORDER BY d.sample_index LIMIT ? OFFSET ?",
            [int(limit), int(offset)], int(limit))
        return [{"png": png, "label": label, "class_name": name, "confidence": confidence, "sample_index": index}
                for png, label, name, confidence, index in rows]


def _sql_string(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _unique(columns: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    names = []
    for name in columns:
        seen[name] = seen.get(name, 0) + 1
        names.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return names


def _display_cell(cell):
    if isinstance(cell, (bytes, bytearray)):
        return f"<{len(cell)} bytes>"
    if isinstance(cell, dict) and isinstance(cell.get("bytes"), (bytes, bytearray)):
        return f"<PNG, {len(cell['bytes'])} bytes>"
    return cell


# ---------------------------------------------------------------- runs


def run_metrics(run_dir: str | os.PathLike) -> "pandas.DataFrame":
    """Return the evaluations a run logged in metrics.jsonl (step, epsilon_spent, student_accuracy, losses).

    Raises:
        AppDataError: the run folder or its metrics.jsonl is missing.
    """
    import pandas

    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise AppDataError(f"{path} not found; the run folder was moved or deleted, or the run logged no "
                           "evaluation (eval_every 0)")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            logger.warning("%s line %d is not JSON; skipped", path, number)
    return pandas.DataFrame(records)


def privacy_utility_points(snapshot: CatalogSnapshot) -> "pandas.DataFrame":
    """Return one point per run and release with an accuracy: epsilon, student_accuracy, unit, mechanism."""
    table = generators_table(snapshot)
    points = table.dropna(subset=["epsilon", "student_accuracy"]).copy()
    points["unit and mechanism"] = points["unit"].astype(str) + " / " + points["mechanism"].astype(str)
    return points
