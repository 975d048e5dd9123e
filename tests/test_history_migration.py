"""A history written by schema 1 (before models were keyed on their audio context) is migrated when
opened: its rows kept, at the full context, and later runs gated against them."""

from __future__ import annotations

import pytest

from harness.nightly.dialect import dialect_of
from harness.nightly.gate import compare
from harness.nightly.history import History
from harness.nightly.history_schema import ADDED_IN_2, SCHEMA, sql_type
from harness.results.record import RunRecord, read_run
from harness.results.schema import TABLES
from tests.synthetic_nights import night


def _schema_1(where: str, record: RunRecord) -> None:
    """The tables as schema 1 made them, holding `record`'s rows (its schema-1 columns)."""
    old = {t: [c for c in TABLES[t] if c not in ADDED_IN_2.get(t, ())] for t in TABLES}
    dialect = dialect_of(where)

    def columns(table: str) -> str:
        return ", ".join(f'"{c}" {sql_type(TABLES[table][c])}' for c in old[table])

    db = dialect.connect(where, "create")  # outside a transaction: each statement commits
    cur = db.cursor()
    cur.execute('CREATE TABLE "meta" ("key" TEXT PRIMARY KEY, "value" TEXT NOT NULL)')
    cur.execute(f'CREATE TABLE "runs" ({columns("runs")}, "added" TEXT NOT NULL, PRIMARY KEY ("run_id"))')
    cur.execute(f'CREATE TABLE "models" ({columns("models")}, PRIMARY KEY ("run_id", "size", "target", "quant"))')
    cur.execute(f'CREATE TABLE "utterances" ({columns("utterances")})')
    cur.execute('CREATE TABLE "pins" ("job" TEXT, "tag" TEXT, "run_id" TEXT, "pinned_at" TEXT)')
    cur.execute("""INSERT INTO "meta" VALUES ('schema', '1')""")
    marks = ", ".join("?" * (len(old["runs"]) + 1))
    cur.execute(dialect.sql(f'INSERT INTO "runs" VALUES ({marks})'), (*record.run, "then"))
    for table, rows in (("models", record.models), ("utterances", record.utterances)):
        keep = [i for i, c in enumerate(TABLES[table]) if c in old[table]]
        marks = ", ".join("?" * len(keep))
        cur.executemany(
            dialect.sql(f'INSERT INTO "{table}" VALUES ({marks})'), [tuple(r[i] for i in keep) for r in rows]
        )
    db.close()


@pytest.mark.unit
def test_a_schema_1_history_is_migrated_and_gates_on(store, tmp_path):
    first = read_run(night(tmp_path, 1))
    _schema_1(store, first)
    with History(store) as history:
        models = history.models(first.run_id)
        wer = list(TABLES["models"]).index("wer")
        assert list(models["audio_ctx"]) == [1500, 1500] and list(models["wer"]) == [m[wer] for m in first.models]
        assert set(history.utterances(first.run_id)["audio_ctx"]) == {1500}
        second = night(tmp_path, 2)
        history.add(read_run(second))
        comparison = compare(history, first.run_id, second.name)
        assert history._schema() == str(SCHEMA)
    assert [c.regressions for c in comparison.checks] == [(), ()]
    History(store).close()  # a migrated store opens as it is
