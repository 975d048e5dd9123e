"""The history of completed runs: per run, per model and per utterance rows, appended once each.

Where it lives: an embedded SQLite file by default (`history.sqlite` in the results root, or
`$HARNESS_HISTORY`), or the same schema on a PostgreSQL server given a `postgresql://` URL, for
teams whose nightly jobs run on several machines. SQLite because a nightly job on one machine
needs no server to install or keep alive: the history is one file to copy or archive, appends are
transactions, and in WAL mode readers (`history`, `compare`) never block the writer nor see half a
run. Keep that file on a local disk (WAL needs shared memory, which network file systems lack).

A run is appended in one transaction (its `runs` row, its `models` rows, its `utterances` rows):
a writer killed half-way leaves nothing behind, and a second writer waits for the first (SQLite's
write lock, PostgreSQL's row locks), for a few seconds at most (`dialect.LOCK_WAIT_S`). The
per-utterance rows make every comparison possible from the history alone, without the run
folders, which may lie on another machine. Only appending (`run`, `history add`) and pinning
write; the commands that read open the store read-only and refuse one that is not a history.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.core.errors import HarnessError
from harness.nightly.dialect import LOCK_WAIT_ENV, Access, Dialect, HistoryError, NotAHistory, dialect_of, masked
from harness.nightly.history_schema import MIGRATIONS, SCHEMA, TABLES, create, sql_type
from harness.results.schema import BOOL, INT, JSON, REAL, RUN_COLUMNS, UTTERANCE_HISTORY_COLUMNS

if TYPE_CHECKING:  # both load pandas: listing runs (`history`) needs neither, so they are imported where used
    import pandas as pd

    from harness.results.record import RunRecord

HISTORY_ENV = "HARNESS_HISTORY"
# rows of a run's utterances fetched and typed at a time (`History.utterances`)
FETCH_ROWS = 50_000
DEFAULT_FILE = "history.sqlite"
# the gate's relative baselines (`harness.nightly.gate.resolve`): no tag may take these names
RESERVED_REFS = ("latest", "previous")


def location(explicit: str | None, results_root: Path) -> str:
    """Where the history is: `--history`, else `$HARNESS_HISTORY`, else history.sqlite in the results root."""
    return explicit or os.environ.get(HISTORY_ENV) or str(results_root / DEFAULT_FILE)


# ---------------------------------------------------------------------------------------------
# The store


class History:
    """A connection to one history (SQLite file or PostgreSQL database), its schema checked.
    Its `dialect`, chosen here once, holds every way the two databases differ.

    `access`: "read" for the commands that only read (`history`, `compare`, `report`): read-only,
    and a store that is no history, or one an older harness wrote, is refused, never changed;
    "write" for `history pin` (an existing history, migrated if older); "create" for what appends
    runs (`run`, `history add`), which makes the file and the tables when missing."""

    def __init__(self, where: str, access: Access = "create") -> None:
        self.where = where
        self.dialect: Dialect = dialect_of(where)
        with self._errors():
            self._conn: Any = self.dialect.connect(where, access)
        try:
            if access == "read":
                self._check_schema()
            else:
                self._ensure_schema(may_create=access == "create")
                with self._errors():
                    self.dialect.ready_to_write(self._conn)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> History:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def shown(self) -> str:
        """The location as printed: its password masked."""
        return masked(self.where)

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """A database error becomes one line naming the store (its password masked, in the driver's
        message too); anything else keeps its traceback."""
        try:
            yield
        except self.dialect.driver.Error as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            if self.dialect.waited_for_a_lock(exc):
                first += (
                    f" (waited {self.dialect.lock_wait_s:g} s for another connection's lock; "
                    f"${LOCK_WAIT_ENV} sets how long)"
                )
            kind = NotAHistory if self.dialect.not_a_database(exc) else HistoryError
            said = f"not a history ({first})" if kind is NotAHistory else first
            raise kind(f"history {self.shown}: {masked(said, self.where)}") from exc

    @contextmanager
    def _transaction(self) -> Iterator[Any]:
        with self._errors(), self.dialect.transaction(self._conn) as cur:
            yield cur

    def _fetch(self, on: Any, sql: str, params: Sequence[Any] = ()) -> tuple[list[str], list[Sequence[Any]]]:
        """A statement's column names and rows, run on the connection or on a transaction's cursor."""
        cur = on.execute(self.dialect.sql(sql), tuple(params))
        return [d[0] for d in cur.description], cur.fetchall()

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """A statement's rows as plain dicts (NULL: None): the catalogue's small queries, no pandas."""
        with self._errors():
            names, rows = self._fetch(self._conn, sql, params)
        return [dict(zip(names, row, strict=True)) for row in rows]

    def _frame(self, sql: str, params: Sequence[Any] = ()) -> pd.DataFrame:
        """A statement's rows as a DataFrame: the bulk tables (a run's models and utterances)."""
        import pandas as pd

        with self._errors():
            names, rows = self._fetch(self._conn, sql, params)
        # object columns: NULL stays None (pandas would make it NaN in a column of text)
        return pd.DataFrame(rows, columns=names, dtype=object)

    def _check_schema(self) -> None:
        """A reader's check: the store is a history of this harness's schema, with every column it
        reads. Nothing is created, migrated or added: an older store waits for its next writer."""
        if not self._has_schema():
            raise NotAHistory(f"history {self.shown}: not a history (no harness tables in it; a run creates them)")
        found = self._schema()
        older = found in MIGRATIONS or (found == str(SCHEMA) and self._missing_columns(self._conn))
        if older:
            raise HistoryError(
                f"history {self.shown}: written by an older harness (schema {found}"
                f"{'' if found in MIGRATIONS else ', without columns this one reads'}): "
                "the next `run` or `history add` to it upgrades it"
            )
        self._refuse_other(found)

    def _ensure_schema(self, may_create: bool) -> None:
        """A writer's schema: the tables created on first use (when `may_create`), a store of an older
        schema migrated step by step (`MIGRATIONS`), new columns added; a store of another schema
        refused. Only a new or older store takes the write lock here, so readers of an up-to-date
        one never wait for a writer."""
        if not self._has_schema():
            if not may_create:
                raise NotAHistory(f"history {self.shown}: not a history (no harness tables in it; a run creates them)")
            with self._transaction() as cur:
                self.dialect.lock_schema(cur)
                # checked again under the lock: CREATE INDEX locks its table even when the index
                # exists, which would deadlock against a writer that created the schema and appends
                if not self._has_schema():
                    for statement in create():
                        cur.execute(statement)
                    cur.execute(self.dialect.sql('INSERT INTO "meta" VALUES (?, ?)'), ("schema", str(SCHEMA)))
        found = self._schema()
        while found in MIGRATIONS:  # one step after another, each in its own transaction
            with self._transaction() as cur:
                self.dialect.lock_schema(cur)
                cur.execute('SELECT "value" FROM "meta" WHERE "key" = \'schema\'')
                if cur.fetchone()[0] == found:  # checked again under the write lock: another may have migrated
                    for statement in MIGRATIONS[found]():
                        cur.execute(statement)
            found = self._schema()
        self._refuse_other(found)
        self._add_new_columns()

    def _refuse_other(self, found: str | None) -> None:
        if found is None:
            raise NotAHistory(f'history {self.shown}: not a history (its "meta" table is not the harness\'s)')
        if found != str(SCHEMA):
            raise HistoryError(f"history {self.shown}: schema {found}, this harness writes schema {SCHEMA}")

    def _add_new_columns(self) -> None:
        """Add the columns a newer harness declares and this store lacks (older runs: NULL there).
        An added column is not a new schema: every reader of the old columns reads them as before."""
        with self._errors():
            if not self._missing_columns(self._conn):
                return
        with self._transaction() as cur:
            self.dialect.lock_schema(cur)
            for table, column in self._missing_columns(cur):  # under the lock: another may have added them
                cur.execute(f'ALTER TABLE "{table}" ADD COLUMN "{column}" {sql_type(TABLES[table][column])}')

    def _missing_columns(self, on: Any) -> list[tuple[str, str]]:
        missing = []
        for table, columns in TABLES.items():
            names, rows = self._fetch(on, self.dialect.columns_sql, (table,))
            have = {row[names.index("name")] for row in rows}
            missing += [(table, c) for c in columns if c not in have]
        return missing

    def _schema(self) -> str | None:
        """The schema version the `meta` table names; None when that table is another program's
        (other columns, or no schema row)."""
        columns = {row["name"] for row in self._rows(self.dialect.columns_sql, ("meta",))}
        if not {"key", "value"} <= columns:
            return None
        rows = self._rows('SELECT "value" FROM "meta" WHERE "key" = ?', ("schema",))
        return str(rows[0]["value"]) if rows else None

    def _has_schema(self) -> bool:
        return any(self._rows(self.dialect.has_schema_sql)[0].values())  # one row, one cell

    # -- writing

    def add(self, record: RunRecord) -> bool:
        """Append a run in one transaction; False (and nothing written) when it is already there.
        Its utterance rows go in batch by batch as `record.utterances` reads them, so a run of a
        million rows never has them all in memory, and still appears whole or not at all."""
        with self._transaction() as cur:
            names = ", ".join(f'"{c}"' for c in RUN_COLUMNS)
            marks = ", ".join("?" * (len(RUN_COLUMNS) + 1))
            # ON CONFLICT: a concurrent writer of the same run waits for the first, then adds nothing
            cur.execute(
                self.dialect.sql(f'INSERT INTO "runs" ({names}, "added") VALUES ({marks}) ON CONFLICT DO NOTHING'),
                (*record.run, _now()),
            )
            if cur.rowcount != 1:
                return False
            self._insert(cur, "models", record.models)
            for batch in record.utterances:
                self._insert(cur, "utterances", batch)
        return True

    def _insert(self, cur: Any, table: str, rows: list[tuple]) -> None:
        names = ", ".join(f'"{c}"' for c in TABLES[table])
        marks = ", ".join("?" * len(TABLES[table]))
        cur.executemany(self.dialect.sql(f'INSERT INTO "{table}" ({names}) VALUES ({marks})'), rows)

    def pin(self, run_id: str, tag: str) -> str | None:
        """Name a run `tag` within its job (moving the tag if it named another run); the run it named."""
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_.-]*", tag) or tag in RESERVED_REFS:
            raise HarnessError(
                f"--tag {tag!r}: expected a name starting with a letter (letters, digits, '.', '_', '-'), "
                f"not {' or '.join(RESERVED_REFS)}"
            )
        job = self.run(run_id)["job"]
        with self._transaction() as cur:
            cur.execute(self.dialect.sql('SELECT "run_id" FROM "pins" WHERE "job" = ? AND "tag" = ?'), (job, tag))
            before = cur.fetchone()
            cur.execute(
                self.dialect.sql(
                    'INSERT INTO "pins" VALUES (?, ?, ?, ?) ON CONFLICT ("job", "tag") '
                    'DO UPDATE SET "run_id" = excluded."run_id", "pinned_at" = excluded."pinned_at"'
                ),
                (job, tag, run_id, _now()),
            )
        return before[0] if before else None

    # -- reading

    def run(self, run_id: str) -> dict[str, Any]:
        rows = self._rows('SELECT * FROM "runs" WHERE "run_id" = ?', (run_id,))
        if not rows:
            raise HarnessError(f"run {run_id}: not in history {self.shown}")
        row = rows[0]
        return {k: json.loads(v) if RUN_COLUMNS.get(k) == JSON and v is not None else v for k, v in row.items()}

    def runs(self, job: str | None = None, last: int | None = None) -> list[dict[str, Any]]:
        """Runs, oldest first (the last `last` of them): their `runs` rows as stored (JSON as its
        text), with `models` (how many) and `tags` (the tags pinned to each, comma-separated)."""
        where, params = ('WHERE "job" = ?', (job,)) if job else ("", ())
        runs = self._rows(f'SELECT * FROM "runs" {where} ORDER BY "started", "run_id"', params)
        if last:
            runs = runs[-last:]
        counts = self._rows('SELECT "run_id", COUNT(*) AS "models" FROM "models" GROUP BY "run_id"')
        models = {row["run_id"]: int(row["models"]) for row in counts}
        tags: dict[str, list[str]] = {}
        for pin in self._rows('SELECT "run_id", "tag" FROM "pins" ORDER BY "tag"'):
            tags.setdefault(pin["run_id"], []).append(pin["tag"])
        return [
            {**run, "models": models.get(run["run_id"], 0), "tags": ", ".join(tags.get(run["run_id"], ()))}
            for run in runs
        ]

    def models(self, run_id: str) -> pd.DataFrame:
        return self._frame('SELECT * FROM "models" WHERE "run_id" = ? ORDER BY "position"', (run_id,))

    def utterances(self, run_id: str, columns: Sequence[str] | None = None, decoded_only: bool = False) -> pd.DataFrame:
        """A run's per-utterance rows as utterances.parquet has them (tokens as lists, pandas dtypes):
        every column, or only `columns` (in the table's order); every row, or with `decoded_only`
        those with a transcript (no `error`). A run may have a million rows: what a reader does not
        need is never fetched, and what it does is typed FETCH_ROWS rows at a time (never a million
        rows of Python objects at once)."""
        import pandas as pd

        kinds = {c: k for c, k in UTTERANCE_HISTORY_COLUMNS.items() if columns is None or c in columns}
        names = ", ".join(f'"{c}"' for c in kinds)
        decoded = ' AND "error" IS NULL' if decoded_only else ""
        sql = f'SELECT {names} FROM "utterances" WHERE "run_id" = ?{decoded} ORDER BY "position"'
        # each column's chunks, from an empty one of its dtype: a run without rows still has its columns
        chunks = {c: [pd.Series([], dtype=_DTYPES.get(k, object))] for c, k in kinds.items()}
        with self._errors():
            cur = self._conn.execute(self.dialect.sql(sql), (run_id,))
            while rows := cur.fetchmany(FETCH_ROWS):
                for (col, kind), values in zip(kinds.items(), zip(*rows, strict=True), strict=True):
                    chunks[col].append(_typed(values, kind))
        return pd.DataFrame({col: pd.concat(parts, ignore_index=True) for col, parts in chunks.items()})

    def latency_trend(
        self, run: dict[str, Any], dataset: str | None, size: str, target: str, quant: str, audio_ctx: int, cpu: str
    ) -> pd.Series:
        """A model's median latency (p50_ms) in each run of `run`'s job and data on `cpu`, oldest
        first, up to and including `run`: on one dataset of a suite (`dataset`), or on the run's one
        dataset (None: whatever its rows are named; runs from before suites have no name)."""
        on_dataset = "" if dataset is None else 'AND m."dataset" = ? '
        rows = self._frame(
            'SELECT r."run_id", m."p50_ms" FROM "models" m JOIN "runs" r ON r."run_id" = m."run_id" '
            'WHERE r."job" = ? AND r."dataset" = ? AND m."size" = ? AND m."target" = ? AND m."quant" = ? '
            f'AND m."audio_ctx" = ? AND m."cpu" = ? AND m."p50_ms" IS NOT NULL AND r."started" <= ? {on_dataset}'
            'ORDER BY r."started", r."run_id"',
            (
                run["job"], run["dataset"], size, target, quant, int(audio_ctx), cpu, run["started"],
                *(() if dataset is None else (dataset,)),
            ),
        )  # fmt: skip
        return rows.set_index("run_id")["p50_ms"].astype(float)

    def has_run(self, run_id: str) -> bool:
        return bool(self._rows('SELECT 1 FROM "runs" WHERE "run_id" = ?', (run_id,)))

    def pinned(self, tag: str) -> list[dict[str, Any]]:
        """The runs `tag` names, one per job it is pinned in, by job: dicts of job, run_id."""
        return self._rows('SELECT "job", "run_id" FROM "pins" WHERE "tag" = ? ORDER BY "job"', (tag,))

    def jobs(self) -> list[str]:
        """The jobs with runs in the history, by name."""
        return [row["job"] for row in self._rows('SELECT DISTINCT "job" FROM "runs" ORDER BY "job"')]


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# the pandas dtype of each kind of utterance column but text and JSON (Python objects: None for NULL)
_DTYPES = {INT: "Int64", BOOL: "boolean", REAL: "float64"}


def _typed(values: tuple, kind: str) -> pd.Series:
    """A chunk of one fetched column as the frame holds it. Text repeated down the column (a
    model's name, a status, a CPU) is kept once per chunk, not once per row as the driver hands it."""
    import pandas as pd

    if kind == JSON:
        return pd.Series([None if v is None else json.loads(v) for v in values], dtype=object)
    if kind == BOOL:  # SQLite keeps booleans as 0/1
        return pd.Series([None if v is None else bool(v) for v in values], dtype="boolean")
    if kind in _DTYPES:
        return pd.Series(values, dtype=_DTYPES[kind])
    seen: dict[Any, Any] = {}
    return pd.Series([seen.setdefault(v, v) for v in values], dtype=object)


def format_runs(runs: list[dict[str, Any]]) -> str:
    """`History.runs` as the `history` command prints it."""
    from tabulate import tabulate

    shown = [
        {
            "run_id": run["run_id"],
            "job": run["job"],
            "started": run["started"],
            "commit": (run["git_commit"] or "")[:10],
            "dataset": run["dataset"] if len(run["dataset"]) <= 40 else "…" + run["dataset"][-39:],
            "utterances": run["utterances"],
            "models": run["models"],
            "cpu": "" if run["cpu"] is None else run["cpu"],
            "tags": run["tags"],
        }
        for run in runs
    ]
    return tabulate(shown, headers="keys", tablefmt="github")
