"""A history written by schema 1 (before models were keyed on their audio context) or 2 (before
they were keyed on their dataset) is migrated when opened: its rows kept, at the full context, and
later runs gated against them."""

from __future__ import annotations

import pytest

from harness.nightly.dialect import dialect_of
from harness.nightly.gate import compare
from harness.nightly.history import History
from harness.nightly.history_schema import ADDED_IN_2, ADDED_IN_3, SCHEMA, sql_type
from harness.results.record import RunRecord, read_run
from harness.results.schema import TABLES
from tests.synthetic_nights import night

SUITE_COLUMNS = ("dataset", "batch", "timed", "meta")  # utterance columns that came with suites


def _old_store(where: str, record: RunRecord, schema: int = 1) -> None:
    """The tables as schema 1 (or 2) made them, holding `record`'s rows (that schema's columns)."""
    gone = {t: {*ADDED_IN_3.get(t, ()), *(SUITE_COLUMNS if t == "utterances" else ())} for t in TABLES}
    if schema == 1:
        gone = {t: gone[t] | set(ADDED_IN_2.get(t, ())) for t in TABLES}
    old = {t: [c for c in TABLES[t] if c not in gone[t]] for t in TABLES}
    key = '"run_id", "size", "target", "quant"' + (', "audio_ctx"' if schema == 2 else "")
    dialect = dialect_of(where)

    def columns(table: str) -> str:
        return ", ".join(f'"{c}" {sql_type(TABLES[table][c])}' for c in old[table])

    db = dialect.connect(where, "create")  # outside a transaction: each statement commits
    cur = db.cursor()
    cur.execute('CREATE TABLE "meta" ("key" TEXT PRIMARY KEY, "value" TEXT NOT NULL)')
    cur.execute(f'CREATE TABLE "runs" ({columns("runs")}, "added" TEXT NOT NULL, PRIMARY KEY ("run_id"))')
    cur.execute(f'CREATE TABLE "models" ({columns("models")}, PRIMARY KEY ({key}))')
    cur.execute(f'CREATE TABLE "utterances" ({columns("utterances")})')
    cur.execute('CREATE TABLE "pins" ("job" TEXT, "tag" TEXT, "run_id" TEXT, "pinned_at" TEXT)')
    cur.execute(f"""INSERT INTO "meta" VALUES ('schema', '{schema}')""")
    marks = ", ".join("?" * (len(old["runs"]) + 1))
    cur.execute(dialect.sql(f'INSERT INTO "runs" VALUES ({marks})'), (*record.run, "then"))
    utterances = [row for batch in record.utterances for row in batch]
    for table, rows in (("models", record.models), ("utterances", utterances)):
        keep = [i for i, c in enumerate(TABLES[table]) if c in old[table]]
        marks = ", ".join("?" * len(keep))
        cur.executemany(
            dialect.sql(f'INSERT INTO "{table}" VALUES ({marks})'), [tuple(r[i] for i in keep) for r in rows]
        )
    db.close()


@pytest.mark.unit
@pytest.mark.parametrize("schema", [1, 2])
def test_an_older_history_is_migrated_and_gates_on(store, tmp_path, schema):
    first = read_run(night(tmp_path, 1))
    _old_store(store, first, schema)
    with History(store) as history:
        models = history.models(first.run_id)
        wer = list(TABLES["models"]).index("wer")
        assert list(models["audio_ctx"]) == [1500, 1500] and list(models["wer"]) == [m[wer] for m in first.models]
        assert set(history.utterances(first.run_id)["audio_ctx"]) == {1500}
        second = night(tmp_path, 2)
        history.add(read_run(second))
        comparison = compare(history, first.run_id, second.name)
        assert history._schema() == str(SCHEMA)
        assert set(history.models(first.run_id)["dataset"]) == {""}  # its run's one dataset
    assert [c.regressions for c in comparison.checks] == [(), ()]
    History(store).close()  # a migrated store opens as it is
