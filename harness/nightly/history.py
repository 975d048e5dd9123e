"""The history of completed runs: per run, per model and per utterance rows, appended once each.

Where it lives: an embedded SQLite file by default (`history.sqlite` in the results root, or
`$HARNESS_HISTORY`), or the same schema on a PostgreSQL server given a `postgresql://` URL, for
teams whose nightly jobs run on several machines. SQLite because a nightly job on one machine
needs no server to install or keep alive: the history is one file to copy or archive, appends are
transactions, and in WAL mode readers (`history`, `compare`) never block the writer nor see half a
run. Keep that file on a local disk (WAL needs shared memory, which network file systems lack).

A run is appended in one transaction (its `runs` row, its `models` rows, its `utterances` rows):
a writer killed half-way leaves nothing behind, and a second writer waits for the first (SQLite's
write lock, PostgreSQL's row locks). The per-utterance rows make every comparison possible from
the history alone, without the run folders, which may lie on another machine.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pandas as pd

from harness.core.errors import HarnessError
from harness.nightly.history_schema import SCHEMA, TABLES, create, migrate_1_to_2
from harness.results.record import BOOL, INT, JSON, REAL, RUN_COLUMNS, UTTERANCE_HISTORY_COLUMNS, RunRecord

HISTORY_ENV = "HARNESS_HISTORY"
DEFAULT_FILE = "history.sqlite"
RESERVED_REFS = ("latest", "previous")


def location(explicit: str | None, results_root: Path) -> str:
    """Where the history is: `--history`, else `$HARNESS_HISTORY`, else history.sqlite in the results root."""
    return explicit or os.environ.get(HISTORY_ENV) or str(results_root / DEFAULT_FILE)


def is_url(where: str) -> bool:
    return where.startswith(("postgresql://", "postgres://"))


def display(where: str) -> str:
    """The location as printed: a URL's password masked."""
    if not is_url(where):
        return where
    parts = urlsplit(where)
    if parts.password is None:
        return where
    return urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@")))


# ---------------------------------------------------------------------------------------------
# The store


class History:
    """A connection to one history (SQLite file or PostgreSQL database), its schema ensured."""

    def __init__(self, where: str, create: bool = True) -> None:
        self.where = where
        self.postgres = is_url(where)
        if not self.postgres and "://" in where:
            raise HarnessError(f"history {where}: expected a file path or a postgresql:// URL")
        if self.postgres:
            try:
                import psycopg
            except ImportError:
                raise HarnessError(f"history {display(where)}: PostgreSQL needs the psycopg package") from None
            self._driver: Any = psycopg
            with self._errors():
                # autocommit: reads hold no transaction open; writes open one explicitly
                self._conn: Any = psycopg.connect(where, autocommit=True, connect_timeout=10)
        else:
            path = Path(where)
            if not create and not path.is_file():
                raise HarnessError(f"history {where}: no such file (a run appends to it when it completes)")
            path.parent.mkdir(parents=True, exist_ok=True)
            self._driver = sqlite3
            with self._errors():
                # isolation_level=None: no implicit transactions, so BEGIN IMMEDIATE below is the only one;
                # timeout: a second writer waits up to a minute for the first one's lock
                self._conn = sqlite3.connect(path, timeout=60, isolation_level=None)
                self._conn.execute("PRAGMA journal_mode=WAL")
                self._conn.execute("PRAGMA synchronous=FULL")  # a committed night survives a power cut
                self._conn.execute("PRAGMA foreign_keys=ON")
        self._ensure_schema()

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> History:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """A database error becomes one line naming the store; anything else keeps its traceback."""
        try:
            yield
        except self._driver.Error as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise HarnessError(f"history {display(self.where)}: {first}") from exc

    @contextmanager
    def _transaction(self) -> Iterator[Any]:
        with self._errors():
            if self.postgres:
                with self._conn.transaction():
                    yield self._conn.cursor()
                return
            # IMMEDIATE: take the write lock now, so two writers queue instead of failing at commit
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn.cursor()
            except BaseException:
                self._conn.rollback()
                raise
            self._conn.commit()

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s") if self.postgres else sql

    def _query(self, sql: str, params: Sequence[Any] = ()) -> pd.DataFrame:
        with self._errors():
            cur = self._conn.execute(self._sql(sql), tuple(params))
            # object columns: NULL stays None (pandas would make it NaN in a column of text)
            return pd.DataFrame(cur.fetchall(), columns=[d[0] for d in cur.description], dtype=object)

    def _ensure_schema(self) -> None:
        """Create the tables on first use; refuse a store of another schema. Only a new store takes
        the write lock here, so readers of an existing one never wait for a writer."""
        if not self._has_schema():
            with self._transaction() as cur:
                if self.postgres:  # one creator at a time: concurrent CREATE TABLEs collide in the catalog
                    cur.execute("SELECT pg_advisory_xact_lock(7246168)")
                # checked again under the lock: CREATE INDEX locks its table even when the index
                # exists, which would deadlock against a writer that created the schema and appends
                if not self._has_schema():
                    for statement in create():
                        cur.execute(statement)
                    cur.execute(self._sql('INSERT INTO "meta" VALUES (?, ?)'), ("schema", str(SCHEMA)))
        found = self._schema()
        if found == "1":
            with self._transaction() as cur:
                if self.postgres:  # one migrator at a time (the creator's lock)
                    cur.execute("SELECT pg_advisory_xact_lock(7246168)")
                cur.execute('SELECT "value" FROM "meta" WHERE "key" = \'schema\'')
                if cur.fetchone()[0] == "1":  # checked again under the write lock: another may have migrated
                    for statement in migrate_1_to_2():
                        cur.execute(statement)
            found = self._schema()
        if found != str(SCHEMA):
            self.close()
            raise HarnessError(f"history {display(self.where)}: schema {found}, this harness writes schema {SCHEMA}")
        self._add_new_columns()

    def _add_new_columns(self) -> None:
        """Add the columns a newer harness declares and this store lacks (older runs: NULL there).
        An added column is not a new schema: every reader of the old columns reads them as before."""
        if not self._missing_columns(self._query):
            return
        with self._transaction() as cur:
            if self.postgres:
                cur.execute("SELECT pg_advisory_xact_lock(7246168)")

            def query(sql: str, params: Sequence[Any] = ()) -> pd.DataFrame:  # under the lock: checked again
                cur.execute(self._sql(sql), tuple(params))
                return pd.DataFrame(cur.fetchall(), columns=[d[0] for d in cur.description], dtype=object)

            for table, column in self._missing_columns(query):
                kind = TABLES[table][column]
                cur.execute(f'ALTER TABLE "{table}" ADD COLUMN "{column}" {"TEXT" if kind == JSON else kind}')

    def _missing_columns(self, query: Callable[..., pd.DataFrame]) -> list[tuple[str, str]]:
        missing = []
        for table, columns in TABLES.items():
            if self.postgres:
                sql = "SELECT column_name FROM information_schema.columns WHERE table_schema = current_schema() "
                have = set(query(sql + "AND table_name = ?", (table,))["column_name"])
            else:
                have = set(query("SELECT name FROM pragma_table_info(?)", (table,))["name"])
            missing += [(table, c) for c in columns if c not in have]
        return missing

    def _schema(self) -> str:
        return self._query('SELECT "value" FROM "meta" WHERE "key" = ?', ("schema",))["value"].iloc[0]

    def _has_schema(self) -> bool:
        if self.postgres:  # pg_tables, read with this statement's snapshot: to_regclass may answer from
            # a cache that still says "no such table" inside a transaction begun before the creator committed
            found = "SELECT EXISTS (SELECT 1 FROM pg_tables WHERE schemaname = current_schema() AND tablename = 'meta')"
            return bool(self._query(found).iloc[0, 0])
        return not self._query("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").empty

    # -- writing

    def add(self, record: RunRecord) -> bool:
        """Append a run in one transaction; False (and nothing written) when it is already there."""
        with self._transaction() as cur:
            names = ", ".join(f'"{c}"' for c in RUN_COLUMNS)
            marks = ", ".join("?" * (len(RUN_COLUMNS) + 1))
            # ON CONFLICT: a concurrent writer of the same run waits for the first, then adds nothing
            cur.execute(
                self._sql(f'INSERT INTO "runs" ({names}, "added") VALUES ({marks}) ON CONFLICT DO NOTHING'),
                (*record.run, _now()),
            )
            if cur.rowcount != 1:
                return False
            for table, rows in (("models", record.models), ("utterances", record.utterances)):
                self._insert(cur, table, rows)
        return True

    def _insert(self, cur: Any, table: str, rows: list[tuple]) -> None:
        names = ", ".join(f'"{c}"' for c in TABLES[table])
        marks = ", ".join("?" * len(TABLES[table]))
        cur.executemany(self._sql(f'INSERT INTO "{table}" ({names}) VALUES ({marks})'), rows)

    def pin(self, run_id: str, tag: str) -> str | None:
        """Name a run `tag` within its job (moving the tag if it named another run); the run it named."""
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_.-]*", tag) or tag in RESERVED_REFS:
            raise HarnessError(
                f"--tag {tag!r}: expected a name starting with a letter (letters, digits, '.', '_', '-'), "
                f"not {' or '.join(RESERVED_REFS)}"
            )
        job = self.run(run_id)["job"]
        with self._transaction() as cur:
            cur.execute(self._sql('SELECT "run_id" FROM "pins" WHERE "job" = ? AND "tag" = ?'), (job, tag))
            before = cur.fetchone()
            cur.execute(
                self._sql(
                    'INSERT INTO "pins" VALUES (?, ?, ?, ?) ON CONFLICT ("job", "tag") '
                    'DO UPDATE SET "run_id" = excluded."run_id", "pinned_at" = excluded."pinned_at"'
                ),
                (job, tag, run_id, _now()),
            )
        return before[0] if before else None

    # -- reading

    def run(self, run_id: str) -> dict[str, Any]:
        rows = self._query('SELECT * FROM "runs" WHERE "run_id" = ?', (run_id,))
        if rows.empty:
            raise HarnessError(f"run {run_id}: not in history {display(self.where)}")
        row = rows.iloc[0].to_dict()
        return {k: json.loads(v) if RUN_COLUMNS.get(k) == JSON and v is not None else v for k, v in row.items()}

    def runs(self, job: str | None = None, last: int | None = None) -> pd.DataFrame:
        """Runs, oldest first (the last `last` of them), with their model count and pinned tags."""
        where, params = ('WHERE "job" = ?', (job,)) if job else ("", ())
        runs = self._query(f'SELECT * FROM "runs" {where} ORDER BY "started", "run_id"', params)
        if last:
            runs = runs.tail(last)
        counts = self._query('SELECT "run_id", COUNT(*) AS "models" FROM "models" GROUP BY "run_id"')
        pins = self._query('SELECT "run_id", "tag" FROM "pins" ORDER BY "tag"')
        models = dict(zip(counts["run_id"], counts["models"], strict=True))
        tags = pins.groupby("run_id")["tag"].agg(", ".join).to_dict() if len(pins) else {}
        runs["models"] = [int(models.get(r, 0)) for r in runs["run_id"]]
        runs["tags"] = [tags.get(r, "") for r in runs["run_id"]]
        return runs.reset_index(drop=True)

    def models(self, run_id: str) -> pd.DataFrame:
        return self._query('SELECT * FROM "models" WHERE "run_id" = ? ORDER BY "position"', (run_id,))

    def utterances(self, run_id: str) -> pd.DataFrame:
        """A run's per-utterance rows as utterances.parquet has them (tokens as lists, pandas dtypes)."""
        names = ", ".join(f'"{c}"' for c in UTTERANCE_HISTORY_COLUMNS)
        df = self._query(f'SELECT {names} FROM "utterances" WHERE "run_id" = ? ORDER BY "position"', (run_id,))
        for col, kind in UTTERANCE_HISTORY_COLUMNS.items():
            if kind == JSON:
                df[col] = [None if v is None else json.loads(v) for v in df[col]]
            elif kind == INT:
                df[col] = pd.array(df[col], dtype="Int64")
            elif kind == BOOL:  # SQLite keeps booleans as 0/1
                df[col] = pd.array([None if v is None else bool(v) for v in df[col]], dtype="boolean")
            elif kind == REAL:
                df[col] = pd.to_numeric(df[col]).astype(float)
        return df

    def latency_trend(
        self, run: dict[str, Any], size: str, target: str, quant: str, audio_ctx: int, cpu: str
    ) -> pd.Series:
        """A model's median latency (p50_ms) in each run of `run`'s job and dataset on `cpu`, oldest
        first, up to and including `run`."""
        rows = self._query(
            'SELECT r."run_id", m."p50_ms" FROM "models" m JOIN "runs" r ON r."run_id" = m."run_id" '
            'WHERE r."job" = ? AND r."dataset" = ? AND m."size" = ? AND m."target" = ? AND m."quant" = ? '
            'AND m."audio_ctx" = ? AND m."cpu" = ? AND m."p50_ms" IS NOT NULL AND r."started" <= ? '
            'ORDER BY r."started", r."run_id"',
            (run["job"], run["dataset"], size, target, quant, int(audio_ctx), cpu, run["started"]),
        )
        return rows.set_index("run_id")["p50_ms"].astype(float)

    def resolve(self, ref: str, job: str | None = None, candidate: str | None = None) -> str | None:
        """A run id, a tag pinned with `history pin`, `latest` or `previous` → a run id.

        Relative to a `candidate`: `latest` is the newest other run of its job on its dataset,
        `previous` the newest such run started before it (an ad-hoc `--limit` run is not a
        baseline for a full night). Without one: the job's newest and second-newest runs. None
        when there is no such run yet (a first night); an unknown id or tag is an error.
        """
        if ref not in RESERVED_REFS:
            if not self._query('SELECT 1 FROM "runs" WHERE "run_id" = ?', (ref,)).empty:
                return ref
            job = job or (self.run(candidate)["job"] if candidate else None)
            pins = self._query('SELECT "job", "run_id" FROM "pins" WHERE "tag" = ?', (ref,))
            if job:
                pins = pins[pins["job"] == job]
            if len(pins) > 1:
                raise HarnessError(f"tag {ref!r} is pinned in jobs {', '.join(pins['job'])}: name one with --job")
            if pins.empty:
                raise HarnessError(
                    f"{ref!r}: no such run id or tag{f' of job {job}' if job else ''} in history {display(self.where)}"
                )
            return str(pins["run_id"].iloc[0])
        if candidate:
            this = self.run(candidate)
            runs = self.runs(this["job"])
            runs = runs[(runs["run_id"] != candidate) & (runs["dataset"] == this["dataset"])]
            if ref == "previous":
                runs = runs[runs["started"] < this["started"]]
            return str(runs["run_id"].iloc[-1]) if len(runs) else None
        if job is None:
            jobs = self._query('SELECT DISTINCT "job" FROM "runs" ORDER BY "job"')["job"].tolist()
            if len(jobs) > 1:
                raise HarnessError(f"'{ref}': the history holds runs of {', '.join(jobs)}: name one with --job")
        ids = self.runs(job)["run_id"]
        chosen = ids.iloc[-1:] if ref == "latest" else ids.iloc[-2:-1]
        return str(chosen.iloc[0]) if len(chosen) else None


def _now() -> str:
    return pd.Timestamp.now(tz="UTC").strftime("%Y-%m-%dT%H:%M:%SZ")


def format_runs(runs: pd.DataFrame) -> str:
    from tabulate import tabulate

    shown = pd.DataFrame(
        {
            "run_id": runs["run_id"],
            "job": runs["job"],
            "started": runs["started"],
            "commit": runs["git_commit"].fillna("").str[:10],
            "dataset": runs["dataset"].map(lambda d: d if len(d) <= 40 else "…" + d[-39:]),
            "utterances": runs["utterances"],
            "models": runs["models"],
            "cpu": runs["cpu"].fillna(""),
            "tags": runs["tags"],
        }
    )
    return tabulate(shown, headers="keys", tablefmt="github", showindex=False)
