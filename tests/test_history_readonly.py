"""`history`, `compare` and `report` only read the history: pointed at a file or database that is not
a history they refuse it with one line (exit 2) and leave it as it was, byte for byte and with no
file beside it; a history an older harness wrote is refused by them and upgraded by a writer
(`history add`, `run`). Real SQLite files and a real PostgreSQL server."""

from __future__ import annotations

import sqlite3
from hashlib import sha256
from pathlib import Path

import pytest

from harness.exit_codes import ExitCode
from harness.nightly.history import History
from harness.results.record import read_run
from tests.nightly_runs import in_process
from tests.synthetic_nights import night

RUN_ID = "20260101-020000-000001"  # night 1's


def _folder(folder: Path) -> dict[str, str]:
    """Every file in the folder (the store's own, and any -wal, -shm or -journal beside it) by its sha256."""
    return {p.name: sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _foreign(path: Path, kind: str) -> Path:
    """A file that is not a history: `kind` says what it is instead."""
    path.parent.mkdir(parents=True)
    if kind == "empty":
        path.touch()
    elif kind == "text":
        path.write_text("run_id,wer\n20260101,0.1\n" * 100)
    else:
        db = sqlite3.connect(path)  # a rollback journal, as most SQLite files have it
        db.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")
        db.execute("INSERT INTO notes VALUES (1, 'kept')")
        if kind == "meta of its own":
            db.execute("CREATE TABLE meta (id INTEGER PRIMARY KEY, name TEXT)")
        elif kind == "meta without a schema":
            db.execute('CREATE TABLE "meta" ("key" TEXT PRIMARY KEY, "value" TEXT NOT NULL)')
            db.execute("INSERT INTO meta VALUES ('owner', 'someone else')")
        db.commit()
        db.close()
    return path


READERS = (("history",), ("compare", "previous", "latest"), ("report", "RUN_DIR", "--out", "PAGE"))


@pytest.mark.unit
@pytest.mark.parametrize("kind", ["tables", "meta of its own", "meta without a schema", "empty", "text"])
def test_a_file_that_is_not_a_history_is_refused_and_left_as_it_was(kind, tmp_path):
    store = _foreign(tmp_path / "store" / "history.sqlite", kind)
    before = _folder(store.parent)
    run_dir, page = night(tmp_path / "results", 1), tmp_path / "report.html"
    for args in (*READERS, ("history", "pin", RUN_ID, "--tag", "stable")):
        args = [run_dir if a == "RUN_DIR" else page if a == "PAGE" else a for a in args]
        code, out, err = in_process(*args, "--history", store)
        assert code == ExitCode.BAD_INPUT and out == "", (args, out, err)
        assert err.startswith(f"error: history {store}: not a history") and err.count("\n") == 1, (args, err)
        assert _folder(store.parent) == before, args  # not a byte changed, no -wal, -shm or -journal
    assert not page.exists()


@pytest.mark.unit
def test_a_writer_refuses_a_meta_table_of_another_kind_with_one_line(tmp_path):
    for kind in ("meta of its own", "meta without a schema"):
        store = _foreign(tmp_path / kind / "history.sqlite", kind)
        code, _, err = in_process("history", "add", night(tmp_path / kind / "results", 1), "--history", store)
        assert code == ExitCode.BAD_INPUT and err.startswith(f"error: history {store}: not a history"), err
        assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.unit
def test_reading_a_history_leaves_its_file_as_it_was(tmp_path):
    results = tmp_path / "results"
    store = tmp_path / "store" / "history.sqlite"
    store.parent.mkdir()
    second = night(results, 2)
    assert in_process("history", "add", night(results, 1), second, "--history", store)[0] == 0
    before = sha256(store.read_bytes()).hexdigest()
    for args in (("history",), ("compare", "previous", "latest"), ("report", second, "--out", tmp_path / "r.html")):
        code, out, err = in_process(*args, "--history", store)
        assert code == 0, (args, out, err)
        assert sha256(store.read_bytes()).hexdigest() == before, args


def _tables(where: str) -> list[str]:
    import psycopg

    with psycopg.connect(where) as conn:
        return [r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")]


@pytest.mark.parametrize("meta", [False, True])
def test_a_postgresql_database_that_is_not_a_history_is_refused_and_left_as_it_was(postgres_url, meta, tmp_path):
    import psycopg

    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")
        if meta:
            conn.execute("CREATE TABLE meta (id INTEGER PRIMARY KEY, name TEXT)")
    before = _tables(postgres_url)
    run_dir, page = night(tmp_path / "results", 1), tmp_path / "report.html"
    for args in READERS:
        args = [run_dir if a == "RUN_DIR" else page if a == "PAGE" else a for a in args]
        code, out, err = in_process(*args, "--history", postgres_url)
        assert code == ExitCode.BAD_INPUT and out == "", (args, out, err)
        assert err.startswith(f"error: history {postgres_url}: not a history") and err.count("\n") == 1, err
        assert _tables(postgres_url) == before, args
    if meta:  # a writer too: it creates a history in a database, never beside a `meta` table of another kind
        code, _, err = in_process("history", "add", run_dir, "--history", postgres_url)
        assert code == ExitCode.BAD_INPUT and "not a history" in err and err.count("\n") == 1, err
        assert _tables(postgres_url) == before


def test_a_history_from_an_older_harness_is_read_by_no_reader_and_upgraded_by_a_writer(store, tmp_path):
    """A store without a column this harness declares: readers refuse it and add nothing, the
    next writer adds the column, and then readers read it."""
    results = tmp_path / "results"
    with History(store) as history:
        history.add(read_run(night(results, 1)))
        history._conn.execute('ALTER TABLE "models" DROP COLUMN "runtime"')
    columns = _model_columns(store)
    for args in (("history",), ("compare", "previous", "latest")):
        code, out, err = in_process(*args, "--history", store)
        assert code == ExitCode.BAD_INPUT and out == "", (args, out, err)
        assert err.startswith("error: history ") and "older harness" in err and err.count("\n") == 1, err
        assert _model_columns(store) == columns  # nothing added
    assert in_process("history", "add", night(results, 2), "--history", store)[0] == 0
    assert "runtime" in _model_columns(store)
    code, out, _ = in_process("history", "--history", store)
    assert code == 0 and RUN_ID in out


def _model_columns(where: str) -> list[str]:
    if where.startswith("postgresql"):
        import psycopg

        with psycopg.connect(where) as conn:
            sql = "SELECT column_name FROM information_schema.columns WHERE table_name = 'models' ORDER BY 1"
            return [r[0] for r in conn.execute(sql)]
    with sqlite3.connect(where) as conn:
        return sorted(r[0] for r in conn.execute("SELECT name FROM pragma_table_info('models')"))
