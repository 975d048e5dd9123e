"""A history another process holds locked: a run that finished keeps its results and its report and
says in one line that the history failed (exit 6, not 2), after a short wait, not a minute. The
lock is a real second process's write transaction on a real SQLite file."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.exit_codes import ExitCode
from harness.nightly.history import History, HistoryError
from harness.results.record import read_run
from tests.conftest import EMBEDDED, ROOT
from tests.nightly_runs import REFERENCE_JOB, in_process, reference_run
from tests.synthetic_nights import night

# holds the write lock of the file it is given until it is killed
LOCKER = """
import sqlite3, sys, time
from pathlib import Path
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN IMMEDIATE")
Path(sys.argv[2]).touch()
time.sleep(600)
"""


@pytest.fixture
def locked(tmp_path) -> Iterator[Path]:
    """A history with one night in it, its write lock held by another process."""
    store = tmp_path / "history" / "history.sqlite"
    store.parent.mkdir()
    with History(str(store)) as history:
        history.add(read_run(night(tmp_path / "nights", 1)))
    marker = tmp_path / "locked"
    locker = subprocess.Popen([sys.executable, "-c", LOCKER, str(store), str(marker)], cwd=ROOT)
    deadline = time.time() + 60
    while not marker.exists():
        assert locker.poll() is None and time.time() < deadline, "the locker never took the lock"
        time.sleep(0.05)
    yield store
    locker.kill()
    locker.wait(timeout=30)


def test_a_locked_history_keeps_the_run_and_its_report(locked, models_root, tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_HISTORY_LOCK_WAIT", "1")
    code, out, err, run_dir = reference_run(tmp_path, models_root, locked)
    assert code == ExitCode.HISTORY == 6, out + err
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert line.startswith(f"error: history {locked}: database is locked"), err
    assert "waited 1 s" in line
    # the run's own results, complete, and its report, which says why it has no trends and no verdict
    assert json.loads((run_dir / "state.json").read_text())["state"] == "complete"
    assert all((run_dir / f).is_file() for f in ("run.json", "summary.csv", "utterances.parquet"))
    assert f"results: {run_dir}" in out and out.rstrip().endswith(f"report: {run_dir / 'report.html'}")
    html = (run_dir / "report.html").read_text()
    assert f"no trends: history {locked}: database is locked" in html
    assert f"not gated: history {locked}: database is locked" in html
    assert not (run_dir / "gate.json").exists()


@pytest.mark.unit
def test_a_writer_waits_a_few_seconds_for_a_lock_not_a_minute(locked, tmp_path, monkeypatch):
    monkeypatch.delenv("HARNESS_HISTORY_LOCK_WAIT", raising=False)
    record = read_run(night(tmp_path / "more", 2))
    started = time.monotonic()
    with pytest.raises(HistoryError, match=r"database is locked \(waited 5 s"), History(str(locked)) as history:
        history.add(record)
    assert 4.5 < time.monotonic() - started < 15


@pytest.mark.unit
def test_the_lock_wait_is_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_HISTORY_LOCK_WAIT", "soon")
    code, _, err = in_process("history", "add", night(tmp_path / "results", 1), "--history", tmp_path / "h.sqlite")
    assert code == ExitCode.BAD_INPUT
    assert err == "error: $HARNESS_HISTORY_LOCK_WAIT: expected seconds (a number, 0 or more), got 'soon'\n"


@pytest.mark.unit
@pytest.mark.parametrize(
    ("history", "wait", "said"),
    [
        ("mysql://nightly:s3cret@db/h", None, "error: history mysql://nightly:***@db/h: expected a file path or"),
        ("h.sqlite", "soon", "error: $HARNESS_HISTORY_LOCK_WAIT: expected seconds"),
    ],
)
def test_a_history_the_harness_cannot_use_is_bad_input_found_before_the_run(history, wait, said, tmp_path, monkeypatch):
    """Not exit 6 after a night's work: a history location (or lock wait) that can never work is
    refused before anything runs."""
    if wait is None:
        monkeypatch.delenv("HARNESS_HISTORY_LOCK_WAIT", raising=False)
    else:
        monkeypatch.setenv("HARNESS_HISTORY_LOCK_WAIT", wait)
    job = tmp_path / "job.yaml"
    job.write_text(REFERENCE_JOB.format(data=EMBEDDED))
    out = tmp_path / "results"
    code, _, err = in_process("run", job, "--out", out, "--models", tmp_path / "models", "--history", history)
    assert code == ExitCode.BAD_INPUT and err.startswith(said) and err.count("\n") == 1, err
    assert not out.exists() and not (tmp_path / "models").exists()  # nothing ran, nothing was built
