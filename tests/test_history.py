"""The history: what a run appends, the `history` command, and appends that stay whole under a
writer killed with SIGKILL and under two writers at once, on a SQLite file and on a PostgreSQL
server (real processes, no mocks).

One real short run (`nightly_run`, tests/conftest.py) checks what a run appends; the other tests
use synthetic nights, a run's files built by hand (tests/synthetic_nights.py)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from harness.core.errors import HarnessError
from harness.job.thresholds import ThresholdsSpec
from harness.nightly.dialect import SQLite
from harness.nightly.history import History
from harness.results.record import read_run
from harness.results.schema import BOOL, TABLES, UTTERANCE_COLUMNS
from tests.nightly_runs import harness, in_process
from tests.synthetic_nights import CPU, REFERENCE, drop_words, failed, night


def _plain(value):
    """A cell as plain Python, so rows from parquet and from the database compare equal."""
    if isinstance(value, (list, np.ndarray)):
        return [int(v) for v in value]
    if value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value)):
        return None
    return value.item() if isinstance(value, np.generic) else value


def test_a_run_appends_itself_and_a_first_night_passes(nightly_run):
    run_dir = nightly_run["run_dir"]
    assert nightly_run["exit_code"] == 0, nightly_run["stdout"]
    assert f"history: {run_dir.name} appended to {nightly_run['history']}" in nightly_run["stdout"]
    assert (
        "gate: no earlier run of librispeech_tiny_en in the history: nothing to compare with (previous)"
        in (nightly_run["stdout"])
    )
    info = json.loads((run_dir / "run.json").read_text())
    with History(str(nightly_run["history"]), access="read") as history:
        run = history.run(run_dir.name)
        models = history.models(run_dir.name).set_index("target")
        stored = history.utterances(run_dir.name)
    assert (run["job"], run["started"], run["git_commit"]) == (
        "librispeech_tiny_en",
        info["started"],
        info["git_commit"],
    )
    assert run["cpu"] == info["host"]["cpu"] and run["packages"] == info["packages"]
    assert run["dataset"].endswith("librispeech-eval limit=6") and run["utterances"] == 6
    assert run["thresholds"] == asdict(ThresholdsSpec())  # the job's, here its defaults
    for model in info["models"]:  # the artifact's key and toolchain, from its manifest
        manifest = json.loads((Path(model["artifact"]) / "manifest.json").read_text())
        target = model["model"].split("/")[1]
        assert models.loc[target, "artifact_key"] == manifest["key"] and len(manifest["key"]) == 16
        assert json.loads(models.loc[target, "toolchain"]) == manifest["toolchain"]
        assert models.loc[target, "cpu"] == info["host"]["cpu"]
    summary = pd.read_csv(run_dir / "summary.csv").set_index("target")
    for col in ("n", "wer", "cer", "exact_match", "p50_ms", "rtfx", "status"):
        assert models[col].tolist() == summary.loc[models.index, col].tolist(), col
    written = pd.read_parquet(run_dir / "utterances.parquet")
    assert len(stored) == len(written) == 12 and list(stored.columns) == UTTERANCE_COLUMNS
    for col in UTTERANCE_COLUMNS:  # every cell, as written
        assert [_plain(v) for v in stored[col]] == [_plain(v) for v in written[col]], col


@pytest.mark.unit
def test_history_command_adds_lists_and_pins(tmp_path, monkeypatch):
    monkeypatch.delenv("HARNESS_HISTORY", raising=False)
    results = tmp_path / "results"
    first, second = night(results, 1), night(results, 2)
    run_id, store = first.name, tmp_path / "h.sqlite"
    assert in_process("history", "add", first, second, "--history", store)[:2] == (
        0,
        f"{run_id}: appended to {store}\n{second.name}: appended to {store}\n",
    )
    assert in_process("history", "add", first, "--history", store)[1] == f"{run_id}: already in {store}\n"
    # without --history: the history in the run's own results root, where `run` appends it
    assert in_process("history", "add", first)[1] == f"{run_id}: appended to {results / 'history.sqlite'}\n"
    monkeypatch.setenv("HARNESS_HISTORY", str(store))
    assert in_process("history", "pin", second.name, "--tag", "stable")[1] == f"stable -> {second.name}\n"
    moved = in_process("history", "pin", run_id, "--tag", "stable")[1]
    assert moved == f"stable -> {run_id} (moved from {second.name})\n"
    code, listed, _ = in_process("history", "--job", "librispeech_tiny_en", "--last", "1")
    assert code == 0 and [line for line in listed.splitlines() if line.startswith("| 2")] == [
        line for line in listed.splitlines() if second.name in line
    ]
    everything = in_process("history", "--last", "0")[1].splitlines()
    rows = {d.name: next(line for line in everything if d.name in line) for d in (first, second)}
    assert "stable" in rows[run_id] and "stable" not in rows[second.name]
    assert in_process("history", "--job", "other_job")[1] == f"no runs of other_job in {store}\n"
    for args, message in (
        (("history", "pin", run_id, "--tag", "latest"), "error: --tag 'latest': expected a name"),
        (("history", "pin", "20990101-000000-000000", "--tag", "x"), "error: run 20990101-000000-000000: not in"),
        (("history", "--history", tmp_path / "none.sqlite"), "error: history"),
        (("history", "add", tmp_path), f"error: {tmp_path}: not a complete run folder (no run.json"),
    ):
        code, _, err = in_process(*args)
        assert code == 2 and err.startswith(message) and err.count("\n") == 1, err


# The killed writer: a real process appending with the real History, stopped after every row of
# the run is inserted and before the commit, then killed with SIGKILL.
WRITER = """
import sys, time
from pathlib import Path
from harness.nightly.history import History
from harness.results.record import read_run

history = History(sys.argv[1])
insert = history._insert

def insert_then_hang(cur, table, rows):
    insert(cur, table, rows)
    if table == "utterances":  # the last table: everything written, nothing committed
        Path(sys.argv[3]).touch()
        time.sleep(600)

history._insert = insert_then_hang
history.add(read_run(Path(sys.argv[2])))
"""


def _counts(store: str, run_id: str) -> tuple[int, int, int]:
    with History(store) as history:
        runs = sum(run["run_id"] == run_id for run in history.runs())
        return runs, len(history.models(run_id)), len(history.utterances(run_id))


def test_a_killed_writer_leaves_no_trace(store, tmp_path):
    import subprocess

    killed, later = (night(tmp_path / "results", n) for n in (1, 2))
    History(store).close()  # the schema exists, as it would on any night but the first
    marker = tmp_path / "inside-the-transaction"
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, store, str(killed), str(marker)], cwd=Path(__file__).parents[1]
    )
    deadline = time.time() + 120
    while not marker.exists():
        assert writer.poll() is None and time.time() < deadline, "the writer never reached its last insert"
        time.sleep(0.05)
    os.kill(writer.pid, signal.SIGKILL)
    assert writer.wait(timeout=30) == -signal.SIGKILL
    assert _counts(store, killed.name) == (0, 0, 0)  # nothing of the killed run, not even its runs row
    if not store.startswith("postgresql"):
        assert sqlite3.connect(store).execute("PRAGMA integrity_check").fetchone() == ("ok",)
    proc = harness("history", "add", later, killed, "--history", store)  # later appends work, the killed run's too
    assert proc.returncode == 0 and proc.stdout.count("appended") == 2, proc.stdout + proc.stderr
    assert _counts(store, later.name) == _counts(store, killed.name) == (1, 2, 12)


def test_two_writers_at_once(store, tmp_path):
    """Two processes append four runs each, the first one the same run, to a store neither has
    created yet: each run is whole and there once, and exactly one process appended the shared run."""
    results = tmp_path / "results"
    shared = night(results, 1)
    mine = [[night(results, 10 * w + n) for n in range(1, 4)] for w in (1, 2)]
    writers = [harness("history", "add", shared, *dirs, "--history", store, wait=False) for dirs in mine]
    outputs = [w.communicate(timeout=180) for w in writers]
    assert [w.returncode for w in writers] == [0, 0], outputs
    said = [out.splitlines()[0] for out, _ in outputs]
    assert sorted(said) == sorted([f"{shared.name}: appended to {store}", f"{shared.name}: already in {store}"])
    for run_dir in (shared, *mine[0], *mine[1]):
        assert _counts(store, run_dir.name) == (1, 2, 12)
    with History(store) as history:
        assert len(history.runs()) == 7


@pytest.mark.unit
@pytest.mark.parametrize("where", ["mysql://host/db", "/"])
def test_an_unusable_history_is_one_error_line(where):
    code, _, err = in_process("history", "--history", where)
    assert code == 2 and err.startswith("error: history ") and err.count("\n") == 1, err


@pytest.mark.unit
def test_a_server_that_does_not_answer_is_one_line_with_its_password_masked():
    pytest.importorskip("psycopg")
    where = "postgresql://nightly:s3cret@127.0.0.1:1/history"  # port 1: nothing listens, refused at once
    with pytest.raises(HarnessError) as exc:
        History(where)
    assert str(exc.value).startswith("history postgresql://nightly:***@127.0.0.1:1/history: ")
    assert "s3cret" not in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.unit
def test_a_store_from_before_a_new_column_gets_it_and_keeps_its_runs(store, tmp_path):
    """A column a newer harness declares (here `runtime`, schema 5 of utterances.parquet) is added
    to an existing store; the runs already there read back with it empty."""
    run_dir = night(tmp_path, 1)
    with History(store) as history:
        history.add(read_run(run_dir))
        history._conn.execute('ALTER TABLE "utterances" DROP COLUMN "runtime"')  # as a store of schema 4 had it
        history._conn.execute('ALTER TABLE "models" DROP COLUMN "runtime"')
    with History(store) as history:
        old = history.utterances(run_dir.name)
        assert old["runtime"].isna().all() and len(old) == 12
        assert history.models(run_dir.name)["runtime"].isna().all()
        assert (history.models(run_dir.name)["target"] == ["reference", "torchscript-mtk"]).all()


@pytest.mark.unit
def test_a_history_reads_back_every_cell_it_was_given(store, tmp_path):
    """A synthetic night appended and read back: its rows as utterances.parquet has them, its
    models as summary.csv, on either database; the plain queries the gate chooses baselines with."""
    run_dir = night(tmp_path, 1)
    with History(store) as history:
        assert history.add(read_run(run_dir)) and not history.add(read_run(run_dir))
        stored, models = history.utterances(run_dir.name), history.models(run_dir.name)
        assert history.has_run(run_dir.name) and not history.has_run("20990101-000000-000000")
        assert history.jobs() == ["librispeech_tiny_en"] and history.pinned("stable") == []
        history.pin(run_dir.name, "stable")
        assert history.pinned("stable") == [{"job": "librispeech_tiny_en", "run_id": run_dir.name}]
        (listed,) = history.runs()  # its runs row, with its model count and tags
        assert (listed["run_id"], listed["models"], listed["tags"]) == (run_dir.name, 2, "stable")
        assert isinstance(history.dialect, SQLite) == (not store.startswith("postgresql"))
    written = pd.read_parquet(run_dir / "utterances.parquet")
    assert list(stored.columns) == UTTERANCE_COLUMNS
    for col in UTTERANCE_COLUMNS:
        assert [_plain(v) for v in stored[col]] == [_plain(v) for v in written[col]], col
    summary = pd.read_csv(run_dir / "summary.csv")
    for col in ("n", "wer", "exact_match", "p50_ms", "status"):
        assert models[col].tolist() == summary[col].tolist(), col


def _stored_rows(history: History, run_id: str) -> list[tuple]:
    """A run's utterance rows as the database holds them, in the table's column order, booleans
    as booleans (SQLite keeps them as 0/1)."""
    kinds = list(TABLES["utterances"].values())
    names = ", ".join(f'"{c}"' for c in TABLES["utterances"])
    cur = history._conn.execute(
        history.dialect.sql(f'SELECT {names} FROM "utterances" WHERE "run_id" = ? ORDER BY "position"'), (run_id,)
    )
    return [tuple(v if v is None or k != BOOL else bool(v) for v, k in zip(row, kinds, strict=True)) for row in cur]


@pytest.mark.unit
def test_a_run_read_in_several_batches_is_stored_as_one_read(store, tmp_path):
    """utterances.parquet read five rows at a time (a night's 12 rows: three batches, the last one
    short) is stored with exactly the rows and values of the same file read in one batch: every
    cell, in order, through the one transaction. Rows with words dropped, and failed rows (no
    transcript, no timings), so the batches hold every kind of value and missing ones."""
    run_dir = night(tmp_path, 1, lambda utts: failed("worker died: <oom>")(drop_words(2, REFERENCE)(utts)))
    whole, batched = read_run(run_dir), read_run(run_dir, batch_rows=5)
    assert [len(batch) for batch in whole.utterances] == [12]
    assert [len(batch) for batch in batched.utterances] == [5, 5, 2]  # read anew each time it is iterated
    with History(store) as history:
        assert history.add(batched)
        stored = _stored_rows(history, run_dir.name)
    (one_batch,) = whole.utterances
    assert stored == one_batch
    assert [row[-1] for row in stored] == list(range(12))  # `position`: each row's place in the file


@pytest.mark.unit
def test_columns_of_other_types_are_stored_as_their_cells_always_were(tmp_path):
    """A file whose columns another writer typed otherwise (counts as floats with NaN, a text
    column as categories, token lists of floats, a real column of integers, an empty list) is
    converted column by column to exactly what the cell-by-cell conversion gave for each cell
    (`_to_sql` over pandas' reading), whatever the batch."""
    from harness.results.record import _row

    run_dir = night(tmp_path, 1, failed("worker died"))
    path = run_dir / "utterances.parquet"
    utts = pd.read_parquet(path)
    utts["wer_errors"] = utts["wer_errors"].astype("float64")  # NaN where the model failed
    utts["cpu"] = utts["cpu"].astype("category")
    utts["hyp_tokens"] = [None if t is None else [float(v) for v in t] for t in utts["hyp_tokens"]]
    utts["reference_tokens"] = [[] if i == 0 else list(t) for i, t in enumerate(utts["reference_tokens"])]
    utts["audio_s"] = utts["audio_s"].round().astype("int64")  # a REAL column of integers
    utts.to_parquet(path, index=False)
    read = pd.read_parquet(path).to_dict("records")
    cells = [_row({**u, "position": i}, TABLES["utterances"]) for i, u in enumerate(read)]
    record = read_run(run_dir, batch_rows=7)

    def typed(rows: list[tuple]) -> list[list[tuple]]:  # 3 == 3.0 in Python: the types must match too
        return [[(type(v).__name__, v) for v in row] for row in rows]

    assert typed([row for batch in record.utterances for row in batch]) == typed(cells)
    # each model's CPU, from the categorical column, over its decoded rows (the failed model has none)
    assert [m[list(TABLES["models"]).index("cpu")] for m in record.models] == [CPU, None]
    assert cells[0][UTTERANCE_COLUMNS.index("reference_tokens")] == "[]"
    assert cells[0][UTTERANCE_COLUMNS.index("hyp_tokens")].startswith("[50257.0, ")
