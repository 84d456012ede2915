"""The catalog: one DuckDB file that records runs, ledger spends, releases, datasets and evaluations.

It answers provenance questions with SQL views:

- `dataset_provenance`: which dataset came from which generator, at what (epsilon, delta) and unit;
- `budget_spent`: how much privacy budget each private dataset (example level) or teacher
  (teacher level) has spent over all runs, with its cap, from the privacy ledger;
- `synthetic_rows`: the rows of every local dataset, read in place from its parquet shards
  with `read_parquet` (the shards are never copied into the catalog);
- `class_counts`: rows per dataset and label, over `synthetic_rows`.

The catalog holds local paths and ledger fingerprints: it is for the machine it is on and is never
released. Like the ledger, it is a single-writer DuckDB file: one process opens it at a time.
"""

from __future__ import annotations

import json
import logging
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas

logger = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_dir VARCHAR PRIMARY KEY,
    ledger_run_id VARCHAR,
    ledger VARCHAR,
    scope VARCHAR,
    private_data_fingerprint VARCHAR,
    teacher_fingerprint VARCHAR,
    unit VARCHAR,
    mechanism VARCHAR,
    epsilon DOUBLE,
    delta DOUBLE,
    accountant VARCHAR,
    student_accuracy DOUBLE,
    weights_digest VARCHAR,
    created VARCHAR,
    recorded_at TIMESTAMPTZ NOT NULL
);
CREATE TABLE IF NOT EXISTS releases (
    repo_id VARCHAR NOT NULL,
    commit VARCHAR NOT NULL,
    revision VARCHAR,
    unit VARCHAR,
    mechanism VARCHAR,
    epsilon DOUBLE,
    delta DOUBLE,
    accountant VARCHAR,
    card_url VARCHAR,
    recorded_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (repo_id, commit)
);
CREATE TABLE IF NOT EXISTS datasets (
    dataset_id VARCHAR PRIMARY KEY,
    name VARCHAR,
    path VARCHAR,
    repo_id VARCHAR,
    commit VARCHAR,
    split VARCHAR,
    rows BIGINT,
    shards INTEGER,
    seed BIGINT,
    num_samples BIGINT,
    per_class BIGINT,
    generator VARCHAR,
    generator_kind VARCHAR,
    generator_commit VARCHAR,
    unit VARCHAR,
    epsilon DOUBLE,
    delta DOUBLE,
    mechanism VARCHAR,
    class_names VARCHAR[],
    files VARCHAR[],
    completed VARCHAR,
    recorded_at TIMESTAMPTZ NOT NULL
);
CREATE TABLE IF NOT EXISTS evaluations (
    evaluation_id VARCHAR PRIMARY KEY,
    dataset VARCHAR NOT NULL,
    dataset_id VARCHAR,
    real_test VARCHAR NOT NULL,
    classifier VARCHAR NOT NULL,
    seeds INTEGER NOT NULL,
    epochs INTEGER NOT NULL,
    train_rows BIGINT NOT NULL,
    validation_rows BIGINT NOT NULL,
    test_rows BIGINT NOT NULL,
    validation_accuracy DOUBLE NOT NULL,
    test_accuracy DOUBLE NOT NULL,
    test_accuracy_std DOUBLE,
    unit VARCHAR,
    epsilon DOUBLE,
    delta DOUBLE,
    recorded_at TIMESTAMPTZ NOT NULL
);
CREATE TABLE IF NOT EXISTS ledger_spends (
    ledger VARCHAR NOT NULL,
    run_id VARCHAR NOT NULL,
    step BIGINT NOT NULL,
    dataset_fingerprint VARCHAR NOT NULL,
    teacher_fingerprint VARCHAR NOT NULL,
    unit VARCHAR NOT NULL,
    kind VARCHAR NOT NULL,
    parameter DOUBLE NOT NULL,
    sampling_rate DOUBLE,
    queries BIGINT NOT NULL,
    recorded_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (ledger, run_id, step)
);
CREATE TABLE IF NOT EXISTS ledger_runs (
    ledger VARCHAR NOT NULL,
    run_id VARCHAR NOT NULL,
    dataset_fingerprint VARCHAR NOT NULL,
    teacher_fingerprint VARCHAR NOT NULL,
    unit VARCHAR NOT NULL,
    kind VARCHAR NOT NULL,
    parameter DOUBLE NOT NULL,
    planned_queries BIGINT NOT NULL,
    target_epsilon DOUBLE NOT NULL,
    delta DOUBLE NOT NULL,
    run_dir VARCHAR,
    started_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (ledger, run_id)
);
CREATE TABLE IF NOT EXISTS ledger_scopes (
    ledger VARCHAR NOT NULL,
    scope VARCHAR NOT NULL,
    unit VARCHAR NOT NULL,
    fingerprint VARCHAR NOT NULL,
    delta DOUBLE NOT NULL,
    spent_epsilon DOUBLE NOT NULL,
    budget_epsilon DOUBLE,
    runs BIGINT NOT NULL,
    queries BIGINT NOT NULL,
    synced_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (ledger, scope)
);
"""

_VIEWS = """
CREATE OR REPLACE VIEW dataset_provenance AS
SELECT d.dataset_id, d.name, coalesce(d.path, d.repo_id) AS location, d.repo_id, d.commit, d.split, d.rows,
       d.shards, d.seed, d.generator, d.generator_kind, d.generator_commit, d.unit, d.epsilon, d.delta,
       d.mechanism, r.scope AS privacy_scope, r.private_data_fingerprint, d.completed
FROM datasets d
LEFT JOIN runs r ON d.generator_kind = 'run' AND r.run_dir = d.generator
ORDER BY d.generator, d.completed;

CREATE OR REPLACE VIEW budget_spent AS
SELECT s.scope,
       CASE s.unit WHEN 'example' THEN 'private dataset' ELSE 'teacher (its training data as one record)' END
           AS protects,
       s.unit, s.fingerprint, s.spent_epsilon, s.delta, s.budget_epsilon,
       s.budget_epsilon - s.spent_epsilon AS remaining_epsilon, s.runs, s.queries,
       (SELECT count(*) FROM datasets d JOIN runs r ON d.generator_kind = 'run' AND d.generator = r.run_dir
        WHERE r.scope = s.scope) AS synthetic_datasets,
       s.ledger, s.synced_at
FROM ledger_scopes s
ORDER BY s.unit, s.spent_epsilon DESC;
"""

# Columns of synthetic_rows; the image column is left out, so that aggregates read only a few columns.
_ROW_COLUMNS = "label, generator, generator_commit, seed, sample_index, confidence"


class CatalogError(ValueError):
    """A catalog operation failed; the message states why and what to do."""


def default_catalog_path() -> Path:
    """Return $SYNTHGEN_CATALOG, or catalog.duckdb in the user's data folder (beside the ledger)."""
    if os.environ.get("SYNTHGEN_CATALOG"):
        return Path(os.environ["SYNTHGEN_CATALOG"]).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "synthgen" / "catalog.duckdb"


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _sql_string(value: str) -> str:
    """Quote `value` as a SQL string literal (for statements that take no parameters)."""
    return "'" + value.replace("'", "''") + "'"


class Catalog:
    """The DuckDB catalog; open it, record or query, and close it (or use it as a context manager).

    Args:
        path: the catalog file; default `default_catalog_path()`. It is created if missing.
    """

    def __init__(self, path: str | os.PathLike | None = None):
        import duckdb

        self.path = Path(path).expanduser() if path else default_catalog_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = duckdb.connect(str(self.path))
        except duckdb.IOException as error:
            first_line = str(error).splitlines()[0]
            if "lock" in first_line.lower():
                hint = "Another process has it open; wait for it to finish"
            else:
                hint = "Give --db a DuckDB catalog file, or a path where a new one may be created"
            raise CatalogError(f"cannot open the catalog {self.path}: {first_line}. {hint}") from None
        self._db.execute(_SCHEMA)
        self._db.execute(_VIEWS)
        self.refresh_row_views()

    def close(self) -> None:
        self._db.close()  # a second call does nothing

    def __enter__(self) -> "Catalog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ queries

    def read_only_sql(self, query: str) -> "pandas.DataFrame":
        """Run one SQL statement on a read-only connection to the catalog file; return its result.

        The catalog is closed first, because DuckDB lets one process open a file either for
        writing or for reading. Statements that would change the catalog fail with CatalogError.
        """
        import duckdb

        self.close()
        try:
            connection = duckdb.connect(str(self.path), read_only=True)
        except duckdb.Error as error:
            raise CatalogError(f"cannot open the catalog {self.path} to read: {str(error).splitlines()[0]}") from None
        try:
            return connection.execute(query).df()
        except duckdb.Error as error:
            message = str(error).strip()
            if "read-only" in message.lower():
                message += ("; 'synthgen catalog sql' only reads the catalog: record with its add- commands, or "
                            "change it with the Python API (synthgen.catalog.Catalog.sql)")
            raise CatalogError(f"query failed: {message}") from None
        finally:
            connection.close()

    def sql(self, query: str, parameters: list | None = None) -> "pandas.DataFrame":
        """Run one SQL statement and return its result as a pandas DataFrame."""
        import duckdb

        try:
            return self._db.execute(query, parameters or []).df()
        except duckdb.Error as error:
            raise CatalogError(f"query failed: {str(error).strip()}") from None

    def datasets(self) -> "pandas.DataFrame":
        return self.sql("SELECT * FROM dataset_provenance")

    def budget(self) -> "pandas.DataFrame":
        return self.sql("SELECT * FROM budget_spent")

    def summary(self) -> dict:
        """Return the number of rows in each table."""
        tables = ("runs", "releases", "datasets", "evaluations", "ledger_spends", "ledger_runs", "ledger_scopes")
        return {name: self._db.execute(f"SELECT count(*) FROM {name}").fetchone()[0] for name in tables}

    # ------------------------------------------------------------ views over parquet

    def refresh_row_views(self) -> None:
        """Point `synthetic_rows` and `class_counts` at the shards of every local dataset that still exists."""
        parts = []
        for dataset_id, path, files in self._db.execute(
                "SELECT dataset_id, path, files FROM datasets WHERE path IS NOT NULL ORDER BY dataset_id").fetchall():
            shard_paths = [str(Path(path) / name) for name in files or []]
            if not shard_paths or not all(Path(p).is_file() for p in shard_paths):
                logger.warning("dataset %s: shards missing under %s; left out of synthetic_rows", dataset_id, path)
                continue
            listing = ", ".join(_sql_string(p) for p in shard_paths)
            parts.append(f"SELECT {_sql_string(dataset_id)} AS dataset_id, {_ROW_COLUMNS} "
                         f"FROM read_parquet([{listing}])")
        if parts:
            body = "\nUNION ALL\n".join(parts)
        else:
            body = ("SELECT NULL::VARCHAR AS dataset_id, NULL::BIGINT AS label, NULL::VARCHAR AS generator, "
                    "NULL::VARCHAR AS generator_commit, NULL::BIGINT AS seed, NULL::BIGINT AS sample_index, "
                    "NULL::FLOAT AS confidence WHERE false")
        self._db.execute(f"CREATE OR REPLACE VIEW synthetic_rows AS {body}")
        self._db.execute("""
            CREATE OR REPLACE VIEW class_counts AS
            SELECT s.dataset_id, s.label, d.class_names[s.label + 1] AS class_name, count(*) AS rows,
                   avg(s.confidence) AS mean_confidence
            FROM synthetic_rows s JOIN datasets d USING (dataset_id)
            GROUP BY ALL ORDER BY s.dataset_id, s.label
        """)

    # ------------------------------------------------------------ records

    def record_run(self, run_dir: str | os.PathLike) -> dict:
        """Record a finished run folder: its privacy report, and its ledger key from private/ (local only)."""
        from .generator_source import accountant_name, local_digest

        run_dir = Path(run_dir).expanduser().resolve()
        report_path = run_dir / "privacy_report.json"
        if not run_dir.is_dir():
            raise CatalogError(f"run folder {run_dir} not found; give the --out folder of a finished transcription")
        if not report_path.is_file():
            raise CatalogError(f"{run_dir} contains no privacy_report.json; give a finished run folder")
        report = json.loads(report_path.read_text(encoding="utf-8"))
        key_path = run_dir / "private" / "ledger_key.json"
        key = json.loads(key_path.read_text(encoding="utf-8")) if key_path.is_file() else {}
        try:
            digest = local_digest(run_dir)
        except OSError:
            digest = None
        row = {
            "run_dir": str(run_dir),
            "ledger_run_id": key.get("run_id"),
            "ledger": key.get("ledger"),
            "scope": key.get("scope"),
            "private_data_fingerprint": key.get("dataset_fingerprint"),
            "teacher_fingerprint": key.get("teacher_fingerprint"),
            "unit": report.get("unit"),
            "mechanism": (report.get("mechanism") or {}).get("name"),
            "epsilon": report.get("epsilon"),
            "delta": report.get("delta"),
            "accountant": accountant_name(report),
            "student_accuracy": (report.get("evaluation") or {}).get("student_accuracy"),
            "weights_digest": digest,
            "created": report.get("created"),
            "recorded_at": _now(),
        }
        self._upsert("runs", row)
        return row

    def record_release(self, repo_id: str, commit: str, report: dict, revision: str | None = None,
                       card_url: str | None = None) -> dict:
        """Record a Hub release (repository, commit) with the privacy facts of its report."""
        from .generator_source import accountant_name

        row = {
            "repo_id": repo_id,
            "commit": commit,
            "revision": revision,
            "unit": report.get("unit"),
            "mechanism": (report.get("mechanism") or {}).get("name"),
            "epsilon": report.get("epsilon"),
            "delta": report.get("delta"),
            "accountant": accountant_name(report),
            "card_url": card_url,
            "recorded_at": _now(),
        }
        self._upsert("releases", row)
        return row

    def record_dataset(self, manifest: dict, path: str | os.PathLike | None = None, repo_id: str | None = None,
                       commit: str | None = None) -> dict:
        """Record a complete dataset from its manifest, at a local path and/or a Hub repository commit."""
        if not manifest.get("complete"):
            raise CatalogError("the dataset's manifest is not complete; finish the build (--resume) first")
        if path is None and repo_id is None:
            raise CatalogError("a dataset needs a local path or a Hub repository to be recorded")
        settings = manifest["settings"]
        privacy = manifest["privacy"]
        local = str(Path(path).expanduser().resolve()) if path is not None else None
        row = {
            "dataset_id": local or f"hub:{repo_id}@{commit}",
            "name": manifest.get("name"),
            "path": local,
            "repo_id": repo_id,
            "commit": commit,
            "split": settings["split"],
            "rows": manifest["rows"],
            "shards": manifest["shards"],
            "seed": settings["seed"],
            "num_samples": settings.get("num_samples"),
            "per_class": settings.get("per_class"),
            "generator": settings["generator"],
            "generator_kind": settings["generator_kind"],
            "generator_commit": settings["generator_commit"],
            "unit": privacy["unit"],
            "epsilon": privacy["epsilon"],
            "delta": privacy["delta"],
            "mechanism": privacy.get("mechanism"),
            "class_names": list(manifest["class_names"]),
            "files": list(manifest.get("files") or []),
            "completed": manifest.get("completed"),
            "recorded_at": _now(),
        }
        if local is not None and repo_id is None:
            # Keep the Hub repository of an earlier push when the same folder is recorded again.
            earlier = self._db.execute("SELECT repo_id, commit FROM datasets WHERE dataset_id = ?", [local]).fetchone()
            if earlier is not None:
                row["repo_id"], row["commit"] = earlier
        self._upsert("datasets", row)
        self.refresh_row_views()
        return row

    def record_dataset_folder(self, folder: str | os.PathLike) -> dict:
        """Record a local dataset folder written by `synthgen build-dataset`."""
        from .build import MANIFEST_FILE

        folder = Path(folder).expanduser().resolve()
        manifest_path = folder / MANIFEST_FILE
        if not folder.is_dir():
            raise CatalogError(f"dataset folder {folder} not found; give the --out folder of 'synthgen build-dataset'")
        if not manifest_path.is_file():
            raise CatalogError(f"{folder} contains no {MANIFEST_FILE}; give a folder written by "
                               "'synthgen build-dataset'")
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        if not manifest.get("complete"):
            raise CatalogError(f"the build in {folder} is not complete; finish it with 'synthgen build-dataset ... "
                               "--resume' first")
        return self.record_dataset(manifest, path=folder)

    def record_evaluation(self, row: dict) -> None:
        self._upsert("evaluations", {**row, "recorded_at": _now()})

    def _upsert(self, table: str, row: dict) -> None:
        names = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        self._db.execute(f"INSERT OR REPLACE INTO {table} ({names}) VALUES ({marks})", list(row.values()))

    # ------------------------------------------------------------ the privacy ledger

    def sync_ledger(self, ledger: str | os.PathLike | None = None, missing_ok: bool = False) -> dict:
        """Copy the spends, runs and budgets of a privacy ledger and compute each scope's spent epsilon.

        The ledger is opened read-only. Epsilon is not additive, so each scope's spends are
        composed with synthgen's PLD accountant at the scope's delta: the delta of its budget cap
        if one is set, else the largest delta its runs were planned at.

        Args:
            ledger: the ledger file; default $SYNTHGEN_LEDGER or ~/.local/share/synthgen/ledger.duckdb.
            missing_ok: return quietly when the ledger file does not exist.

        Returns:
            Counts of the rows copied: {"spends": n, "runs": n, "scopes": n}.
        """
        import duckdb

        from .privacy.ledger import default_ledger_path

        path = Path(ledger).expanduser().resolve() if ledger else default_ledger_path().resolve()
        if not path.is_file():
            if missing_ok:
                return {"spends": 0, "runs": 0, "scopes": 0}
            raise CatalogError(f"privacy ledger {path} not found; pass --ledger PATH")
        source = str(path)
        try:
            self._db.execute(f"ATTACH {_sql_string(source)} AS ledger_file (READ_ONLY)")
        except duckdb.Error as error:
            raise CatalogError(f"cannot read the privacy ledger {path}: {str(error).splitlines()[0]}. A running "
                               "transcription keeps it open; sync again when it has finished") from None
        try:
            self._db.execute("BEGIN TRANSACTION")
            for table, columns in (
                ("ledger_spends", "run_id, step, dataset_fingerprint, teacher_fingerprint, unit, kind, parameter, "
                                  "sampling_rate, queries, recorded_at"),
                ("ledger_runs", "run_id, dataset_fingerprint, teacher_fingerprint, unit, kind, parameter, "
                                "planned_queries, target_epsilon, delta, run_dir, started_at"),
            ):
                source_table = table.removeprefix("ledger_")
                self._db.execute(f"DELETE FROM {table} WHERE ledger = ?", [source])
                self._db.execute(f"INSERT INTO {table} (ledger, {columns}) SELECT ?, {columns} "
                                 f"FROM ledger_file.{source_table}", [source])
            budgets = dict(self._db.execute("SELECT scope, (epsilon, delta) FROM ledger_file.budgets").fetchall())
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        finally:
            self._db.execute("DETACH ledger_file")
        scopes = self._compose_scopes(source, budgets)
        counts = self._db.execute("SELECT (SELECT count(*) FROM ledger_spends WHERE ledger = ?), "
                                  "(SELECT count(*) FROM ledger_runs WHERE ledger = ?)", [source, source]).fetchone()
        logger.info("synced ledger %s: %d spends, %d runs, %d scopes", source, counts[0], counts[1], scopes)
        return {"spends": counts[0], "runs": counts[1], "scopes": scopes}

    def _compose_scopes(self, source: str, budgets: dict) -> int:
        from .privacy.accounting import PrivacyEvent, pld_epsilon

        scope_sql = ("CASE unit WHEN 'teacher' THEN 'teacher:' || teacher_fingerprint "
                     "ELSE 'dataset:' || dataset_fingerprint END")
        rows = self._db.execute(
            f"SELECT {scope_sql} AS scope, unit, kind, parameter, sampling_rate, sum(queries)::BIGINT, "
            "count(DISTINCT run_id) FROM ledger_spends WHERE ledger = ? GROUP BY ALL ORDER BY ALL", [source]
        ).fetchall()
        deltas = dict(self._db.execute(
            f"SELECT {scope_sql} AS scope, max(delta) FROM ledger_runs WHERE ledger = ? GROUP BY ALL", [source]
        ).fetchall())
        run_counts = dict(self._db.execute(
            f"SELECT {scope_sql} AS scope, count(DISTINCT run_id) FROM ledger_spends WHERE ledger = ? GROUP BY ALL",
            [source]).fetchall())
        grouped: dict[str, dict] = {}
        for scope, unit, kind, parameter, rate, queries, _ in rows:
            entry = grouped.setdefault(scope, {"unit": unit, "events": [], "queries": 0})
            entry["events"].append(PrivacyEvent(kind, float(parameter), int(queries),
                                                None if rate is None else float(rate)))
            entry["queries"] += int(queries)
        self._db.execute("DELETE FROM ledger_scopes WHERE ledger = ?", [source])
        for scope, entry in grouped.items():
            cap = budgets.get(scope)
            if cap is None and deltas.get(scope) is None:
                logger.warning("ledger %s: scope %s has spends but no run or budget that states its delta; left out "
                               "of budget_spent", source, scope)
                continue
            delta = float(cap[1]) if cap else float(deltas[scope])
            spent = pld_epsilon(entry["events"], delta)
            self._upsert("ledger_scopes", {
                "ledger": source, "scope": scope, "unit": entry["unit"], "fingerprint": scope.split(":", 1)[1],
                "delta": delta, "spent_epsilon": spent, "budget_epsilon": float(cap[0]) if cap else None,
                "runs": run_counts.get(scope, 0), "queries": entry["queries"], "synced_at": _now(),
            })
        return self._db.execute("SELECT count(*) FROM ledger_scopes WHERE ledger = ?", [source]).fetchone()[0]
