"""A history written by schema 1 (before models were keyed on their audio context) is migrated when
opened: its rows kept, at the full context, and later runs gated against them."""

from __future__ import annotations

import sqlite3

from harness.nightly.gate import compare
from harness.nightly.history import History
from harness.nightly.history_schema import ADDED_IN_2, SCHEMA
from harness.results.record import JSON, TABLES, read_run
from tests.nightly_runs import derive_run


def _schema_1(path: str, record) -> None:
    """The tables as schema 1 made them, holding `record`'s rows (its schema-1 columns)."""
    old = {t: [c for c in TABLES[t] if c not in ADDED_IN_2.get(t, ())] for t in TABLES}

    def columns(table: str) -> str:
        return ", ".join(f'"{c}" {"TEXT" if TABLES[table][c] == JSON else TABLES[table][c]}' for c in old[table])

    with sqlite3.connect(path) as db:
        db.execute('CREATE TABLE "meta" ("key" TEXT PRIMARY KEY, "value" TEXT NOT NULL)')
        db.execute(f'CREATE TABLE "runs" ({columns("runs")}, "added" TEXT NOT NULL, PRIMARY KEY ("run_id"))')
        db.execute(f'CREATE TABLE "models" ({columns("models")}, PRIMARY KEY ("run_id", "size", "target", "quant"))')
        db.execute(f'CREATE TABLE "utterances" ({columns("utterances")})')
        db.execute('CREATE TABLE "pins" ("job" TEXT, "tag" TEXT, "run_id" TEXT, "pinned_at" TEXT)')
        db.execute("""INSERT INTO "meta" VALUES ('schema', '1')""")
        db.execute(f'INSERT INTO "runs" VALUES ({", ".join("?" * (len(old["runs"]) + 1))})', (*record.run, "then"))
        for table, rows in (("models", record.models), ("utterances", record.utterances)):
            keep = [i for i, c in enumerate(TABLES[table]) if c in old[table]]
            marks = ", ".join("?" * len(keep))
            db.executemany(f'INSERT INTO "{table}" VALUES ({marks})', [tuple(r[i] for i in keep) for r in rows])


def test_a_schema_1_history_is_migrated_and_gates_on(nightly_run, tmp_path):
    where = str(tmp_path / "old.sqlite")
    first = read_run(derive_run(nightly_run["run_dir"], tmp_path, 1))
    _schema_1(where, first)
    with History(where) as history:
        models = history.models(first.run_id)
        wer = list(TABLES["models"]).index("wer")
        assert list(models["audio_ctx"]) == [1500, 1500] and list(models["wer"]) == [m[wer] for m in first.models]
        assert set(history.utterances(first.run_id)["audio_ctx"]) == {1500}
        second = derive_run(nightly_run["run_dir"], tmp_path, 2)
        history.add(read_run(second))
        comparison = compare(history, first.run_id, second.name)
    assert [c.regressions for c in comparison.checks] == [(), ()]
    with sqlite3.connect(where) as db:
        assert db.execute("""SELECT "value" FROM "meta" WHERE "key" = 'schema'""").fetchone() == (str(SCHEMA),)
    History(where).close()  # a migrated store opens as it is
