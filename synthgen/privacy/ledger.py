"""The privacy ledger: a DuckDB file that records every spend before its noisy answers are used.

Spends are keyed by the private dataset's fingerprint and the teacher's fingerprint. Under the
teacher-level unit the budget protects one teacher, so its spends are summed per teacher; under
the example-level unit the budget protects the dataset, so its spends are summed per dataset,
whatever teachers were used. A run charges its queries step by step in the same transaction
that stores the noisy answer, so a process killed at any point has charged at least every
answer it could have used, and a resumed run replays stored answers instead of asking again.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from .accounting import PrivacyEvent, pld_epsilon

logger = logging.getLogger(__name__)

TEACHER_UNIT = "teacher"
EXAMPLE_UNIT = "example"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS spends (
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
    PRIMARY KEY (run_id, step)
);
CREATE TABLE IF NOT EXISTS answers (
    run_id VARCHAR NOT NULL,
    step BIGINT NOT NULL,
    payload BLOB NOT NULL,
    PRIMARY KEY (run_id, step)
);
CREATE TABLE IF NOT EXISTS runs (
    run_id VARCHAR PRIMARY KEY,
    dataset_fingerprint VARCHAR NOT NULL,
    teacher_fingerprint VARCHAR NOT NULL,
    unit VARCHAR NOT NULL,
    kind VARCHAR NOT NULL,
    parameter DOUBLE NOT NULL,
    planned_queries BIGINT NOT NULL,
    target_epsilon DOUBLE NOT NULL,
    delta DOUBLE NOT NULL,
    run_dir VARCHAR,
    started_at TIMESTAMPTZ NOT NULL
);
CREATE TABLE IF NOT EXISTS budgets (
    scope VARCHAR PRIMARY KEY,
    epsilon DOUBLE NOT NULL,
    delta DOUBLE NOT NULL,
    set_at TIMESTAMPTZ NOT NULL
);
"""


class BudgetExceededError(RuntimeError):
    """Raised when a request would take the spent budget past the cap."""


class LedgerLockedError(RuntimeError):
    """Raised when another process has the ledger file open, because DuckDB lets only one process write a file."""


def default_ledger_path() -> Path:
    if os.environ.get("SYNTHGEN_LEDGER"):
        return Path(os.environ["SYNTHGEN_LEDGER"])
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "synthgen" / "ledger.duckdb"


@dataclass(frozen=True)
class LedgerKey:
    dataset_fingerprint: str
    teacher_fingerprint: str
    unit: str

    @property
    def scope(self) -> str:
        """The budget's scope: the teacher under the teacher-level unit, else the dataset."""
        if self.unit == TEACHER_UNIT:
            return f"teacher:{self.teacher_fingerprint}"
        return f"dataset:{self.dataset_fingerprint}"


class Ledger:
    """A DuckDB privacy ledger; open one per process and close it when done."""

    def __init__(self, path: str | os.PathLike | None = None):
        import duckdb

        self.path = Path(path) if path is not None else default_ledger_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = duckdb.connect(str(self.path))
        except duckdb.IOException as error:
            if "Could not set lock" not in str(error):
                raise
            holder = re.search(r"\(PID (\d+)\)", str(error))
            process = f"another process (PID {holder.group(1)})" if holder else "another process"
            raise LedgerLockedError(
                f"the privacy ledger {self.path} is locked by {process}, most likely another synthgen run; wait for "
                "it to finish and run again, or pass --ledger FILE to use a separate ledger (spends in separate "
                "ledgers are not added up)"
            ) from None
        self._db.execute(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "Ledger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ reads

    def _scope_filter(self, key: LedgerKey) -> tuple[str, list]:
        if key.unit == TEACHER_UNIT:
            return "unit = ? AND teacher_fingerprint = ?", [TEACHER_UNIT, key.teacher_fingerprint]
        return "unit = ? AND dataset_fingerprint = ?", [EXAMPLE_UNIT, key.dataset_fingerprint]

    def events(self, key: LedgerKey, run_id: str | None = None) -> list[PrivacyEvent]:
        """Return the charged queries in the key's scope (of one run, if `run_id` is given)."""
        where, params = self._scope_filter(key)
        if run_id is not None:
            where += " AND run_id = ?"
            params.append(run_id)
        rows = self._db.execute(
            f"SELECT kind, parameter, sampling_rate, SUM(queries) FROM spends WHERE {where} "
            "GROUP BY kind, parameter, sampling_rate ORDER BY ALL", params
        ).fetchall()
        return [PrivacyEvent(kind, float(parameter), int(count), None if rate is None else float(rate))
                for kind, parameter, rate, count in rows]

    def spent_epsilon(self, key: LedgerKey, delta: float) -> float:
        return pld_epsilon(self.events(key), delta)

    def charged_queries(self, run_id: str) -> int:
        (count,) = self._db.execute("SELECT COALESCE(SUM(queries), 0) FROM spends WHERE run_id = ?", [run_id]).fetchone()
        return int(count)

    def last_charged_step(self, run_id: str) -> int:
        (step,) = self._db.execute("SELECT COALESCE(MAX(step), -1) FROM spends WHERE run_id = ?", [run_id]).fetchone()
        return int(step)

    def stored_answer(self, run_id: str, step: int) -> bytes | None:
        row = self._db.execute("SELECT payload FROM answers WHERE run_id = ? AND step = ?", [run_id, step]).fetchone()
        return None if row is None else bytes(row[0])

    def budget(self, key: LedgerKey) -> tuple[float, float] | None:
        row = self._db.execute("SELECT epsilon, delta FROM budgets WHERE scope = ?", [key.scope]).fetchone()
        return None if row is None else (float(row[0]), float(row[1]))

    # ------------------------------------------------------------ writes

    def set_budget(self, key: LedgerKey, epsilon: float, delta: float) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO budgets VALUES (?, ?, ?, ?)", [key.scope, epsilon, delta, datetime.now(timezone.utc)]
        )

    def check_budget(self, key: LedgerKey, planned: list[PrivacyEvent], delta: float, cap: float | None) -> float:
        """Raise BudgetExceededError unless the spent budget plus `planned` stays within the cap.

        The cap is the smaller of `cap` and any cap stored for the scope. Returns the epsilon that
        will have been spent, at `delta`, once the planned queries are charged.
        """
        stored = self.budget(key)
        caps = [c for c in (cap, stored[0] if stored else None) if c is not None]
        spent = self.spent_epsilon(key, delta)
        total = pld_epsilon(self.events(key) + planned, delta)
        if caps and total > min(caps) * (1 + 1e-9):
            raise BudgetExceededError(
                f"budget of {key.scope} exceeded: already spent epsilon {spent:.4g} at delta {delta:g}; this run "
                f"would bring it to {total:.4g}, above the cap of {min(caps):g}. Lower --epsilon, or raise the cap "
                "with 'synthgen ledger set-budget' if the data owner allows it"
            )
        return total

    def register_run(self, run_id: str, key: LedgerKey, event: PrivacyEvent, target_epsilon: float, delta: float, run_dir: str) -> None:
        self._db.execute(
            "INSERT OR IGNORE INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [run_id, key.dataset_fingerprint, key.teacher_fingerprint, key.unit, event.kind, event.parameter,
             event.count, target_epsilon, delta, run_dir, datetime.now(timezone.utc)],
        )

    def charge(self, run_id: str, step: int, key: LedgerKey, event: PrivacyEvent, payload: bytes) -> None:
        """Record `event` and the noisy answer it paid for in one durable transaction."""
        now = datetime.now(timezone.utc)
        self._db.execute("BEGIN TRANSACTION")
        try:
            self._db.execute(
                "INSERT INTO spends VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [run_id, step, key.dataset_fingerprint, key.teacher_fingerprint, key.unit, event.kind,
                 event.parameter, event.sampling_rate, event.count, now],
            )
            self._db.execute("INSERT INTO answers VALUES (?, ?, ?)", [run_id, step, payload])
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def prune_answers(self, run_id: str, through_step: int) -> None:
        """Drop stored answers up to a step that a checkpoint now covers."""
        self._db.execute("DELETE FROM answers WHERE run_id = ? AND step <= ?", [run_id, through_step])

    def drop_answers(self, run_id: str) -> None:
        self._db.execute("DELETE FROM answers WHERE run_id = ?", [run_id])

    def summary(self) -> list[dict]:
        rows = self._db.execute(
            "SELECT unit, dataset_fingerprint, teacher_fingerprint, kind, parameter, COUNT(DISTINCT run_id), SUM(queries) "
            "FROM spends GROUP BY ALL ORDER BY ALL"
        ).fetchall()
        names = ["unit", "dataset_fingerprint", "teacher_fingerprint", "kind", "parameter", "runs", "queries"]
        return [dict(zip(names, row)) for row in rows]
