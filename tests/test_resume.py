"""Runs that survive what really happens to them (issue 18): a power cut that leaves a shard file
empty or cut short, a pid the system hands to another process, two resumes at once, a mistyped
--resume, a corrupt state.json, and an interruption whose printed command must resume exactly
that run. Real runs of the CLI (tiny.en, a few utterances), real files, real processes."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import yaml

from harness.cli import _parser
from harness.core.errors import HarnessError
from harness.core.files import write_atomic
from harness.core.status import Status
from harness.job.spec import ModelCell
from harness.results.run_dir import RunDir
from harness.results.schema import row
from harness.run.dataset import plan_shards
from harness.run.execute import TRANSCRIPTION
from tests.conftest import EMBEDDED, ROOT
from tests.nightly_runs import in_process

JOB = "librispeech_tiny_en"
LIMIT = 4  # utterances: one a shard, two models, so 8 shard files in all


def harness(*args: object, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m harness ARGS` as a process of its own (this checkout's, no $HARNESS_HISTORY)."""
    return subprocess.run(_command(*args), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


def started(*args: object) -> subprocess.Popen:
    """The same, left running: its lines arrive as they are printed."""
    return subprocess.Popen(
        _command(*args), cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _command(*args: object) -> list[str]:
    return [sys.executable, "-m", "harness", *map(str, args)]


def _env() -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items() if k != "HARNESS_HISTORY"}
    return keep | {"PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}


def _job(folder: Path, **decoding: object) -> Path:
    job = yaml.safe_load((ROOT / "jobs" / f"{JOB}.yaml").read_text())
    job["dataset"]["path"] = str(EMBEDDED)
    job["cluster"] = {"shard_size": 1}
    if decoding:
        job["decoding"] = {"language": "en", **decoding}
    path = folder / f"job{len(decoding)}.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


@dataclass(frozen=True)
class Stopped:
    """A real run stopped with SIGTERM after a few shards: the flags it was started with."""

    job: Path
    out: Path
    models: Path
    run_dir: Path
    stderr: str

    def args(self, out: Path) -> list[object]:
        """The flags that resume it, its folder copied under `out`."""
        return ["--dataset", EMBEDDED, "--limit", LIMIT, "--slots", 2, "--out", out, "--models", self.models]

    def copy(self, out: Path) -> Path:
        """Its folder, copied under `out` (each test breaks a copy of its own)."""
        return Path(shutil.copytree(self.run_dir, out / JOB / self.run_dir.name))


@pytest.fixture(scope="module")
def stopped(tiny_artifacts, models_root, tmp_path_factory) -> Stopped:
    base = tmp_path_factory.mktemp("resume")
    job, out = _job(base), base / "my results"  # a space: the printed command must quote it
    flags = ["--dataset", EMBEDDED, "--limit", LIMIT, "--slots", 2, "--out", out, "--models", models_root]
    proc = started("run", job, *flags, "--no-progress")
    deadline = time.monotonic() + 500
    while len(list(out.glob(f"{JOB}/*/raw/*.parquet"))) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 5, err[-3000:]
    (run_dir,) = (out / JOB).iterdir()
    assert 3 <= len(list((run_dir / "raw").glob("*.parquet"))) < 2 * LIMIT
    return Stopped(job, out, models_root, run_dir, err)


def _lines(text: str, needle: str) -> list[str]:
    return [line for line in text.splitlines() if needle in line]


# -- 2: a shard file a power cut left empty or cut short is redone, never trusted ---------------


@pytest.mark.unit
def test_an_atomic_write_reaches_the_disk_before_its_rename_and_the_rename_after(tmp_path, monkeypatch):
    """fsync on the temporary file before it is renamed (else the rename can land on disk before
    the data: a whole-looking file of zeros or no bytes after a power cut), and on the folder after
    (else the rename itself can be lost)."""
    target, synced, real = tmp_path / "state.json", [], os.fsync

    def fsync(fd: int) -> None:  # the real fsync, noting what it was given and whether the rename had happened
        synced.append((Path(os.readlink(f"/proc/self/fd/{fd}")), target.exists()))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    write_atomic(target, lambda tmp: tmp.write_text("{}"))
    (file, renamed_before), (folder, renamed_after) = synced
    assert file.parent == tmp_path and file.name.startswith(".state.json.") and not renamed_before
    assert folder == tmp_path and renamed_after and target.read_text() == "{}"


@pytest.mark.unit
def test_a_shard_file_counts_as_done_only_when_whole(tmp_path):
    """Every way a shard file can be wrong is redone, one line each: no bytes, cut short, a row
    short, another model's rows, a declared column missing. The whole one stays."""
    run = RunDir(tmp_path / JOB / "20260101-000000-aaaaaa")
    (run.path / "raw").mkdir(parents=True)
    cell, other = ModelCell("tiny.en", "reference", "fp32"), ModelCell("tiny.en", "torchscript", "fp32")
    shards = plan_shards(12, 2)

    def rows(model: ModelCell, index: int, n: int = 2) -> list[dict]:
        return [row(model, f"u{i}", "", Status.OK) for i in range(shards[index].start, shards[index].start + n)]

    TRANSCRIPTION.persist(run, cell, shards[0], rows(cell, 0))  # whole
    TRANSCRIPTION.persist(run, cell, shards[1], rows(cell, 1, n=1))
    TRANSCRIPTION.persist(run, cell, shards[2], rows(other, 2))
    run.shard_file(cell, 3).write_bytes(b"")
    run.shard_file(cell, 4).write_bytes(run.shard_file(cell, 0).read_bytes()[:300])
    TRANSCRIPTION.frame(rows(cell, 5)).drop(columns="cpu").to_parquet(run.shard_file(cell, 5))
    said: list[str] = []
    todo = TRANSCRIPTION.todo(run, cell, shards, said.append)
    assert [s.index for s in todo] == [1, 2, 3, 4, 5]
    name = "raw/tiny.en__reference__fp32-shard{:05d}.parquet".format
    assert said[0] == f"{name(1)}: rows: 1, expected 2, redone"
    assert said[1] == f"{name(2)}: rows of another model (tiny.en/torchscript/fp32), redone"
    assert said[2] == f"{name(3)}: empty (0 bytes), redone"
    assert said[3].startswith(f"{name(4)}: unreadable (") and said[3].endswith("), redone")
    assert said[4] == f"{name(5)}: columns differ from the declared ones (missing: cpu), redone"
    assert [p.name for p in (run.path / "raw").iterdir()] == [name(0)[4:]]  # the bad ones are gone


def test_an_empty_or_truncated_shard_is_redone_on_resume(stopped, tmp_path):
    run_dir = stopped.copy(tmp_path)
    empty, cut, *_ = sorted((run_dir / "raw").glob("*.parquet"))
    empty.write_bytes(b"")
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    done = harness("run", stopped.job, "--resume", run_dir.name, *stopped.args(tmp_path), "--no-progress")
    assert done.returncode == 0, done.stderr[-3000:]
    assert _lines(done.stdout, "redone") == [
        f"raw/{empty.name}: empty (0 bytes), redone",
        f"raw/{cut.name}: unreadable (ArrowInvalid: Parquet magic bytes not found in footer. Either the file is "
        "corrupted or this is not a parquet file.), redone",
    ]
    utts = pd.read_parquet(run_dir / "utterances.parquet")
    assert len(utts) == 2 * LIMIT and (utts["status"] == "ok").all()
    assert not utts.duplicated(["target", "utt_id"]).any()
    assert json.loads((run_dir / "state.json").read_text())["state"] == "complete"


# -- 3: who owns a run: a pid with its boot and start time, and a lock held while it runs --------


def _start_ticks(pid: int) -> int:
    """/proc/<pid>/stat field 22: when the process started, in clock ticks since boot."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])


def _running_run(out: Path, owner: dict) -> Path:
    """A run folder whose state.json says `running`, owned by `owner`."""
    folder = out / JOB / f"20260101-000000-{uuid.uuid4().hex[:6]}"
    (folder / "raw").mkdir(parents=True)
    state = {"fingerprint": {"job": {}, "dataset": {}, "artifacts": {}}, "created": "2026-01-01T00:00:00Z"}
    state |= {"state": "running", "owner": owner, "updated": "2026-01-01T00:00:00Z"}
    (folder / "state.json").write_text(json.dumps(state))
    return folder


@pytest.mark.unit
def test_a_reused_pid_or_another_boot_does_not_pass_for_the_owner(tmp_path):
    """A state.json naming a live process that is not the one that ran it (its pid reused after a
    crash: another start time; or a reboot since: another boot id) reads as abandoned: resumable,
    and `runs --clean` removes it. The process it names, really: still running."""
    sleeper = subprocess.Popen(["sleep", "300"])
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        real = {"pid": sleeper.pid, "host": socket.gethostname(), "boot": boot, "started": _start_ticks(sleeper.pid)}
        alive = _running_run(tmp_path, real)
        reused = _running_run(tmp_path, real | {"started": real["started"] - 1})
        rebooted = _running_run(tmp_path, real | {"boot": str(uuid.uuid4())})
        code, listed, _ = in_process("runs", "--out", tmp_path)
        assert code == 0
        for folder, shown in ((alive, "running"), (reused, "abandoned"), (rebooted, "abandoned")):
            assert f"{JOB}/{folder.name}  {shown}  " in listed, listed
        with pytest.raises(HarnessError, match=f"the run is still running \\(pid {sleeper.pid}\\)"):
            RunDir(alive).resume({})
        RunDir(reused).resume(RunDir(reused).state()["fingerprint"])  # taken over
        assert RunDir(reused).state()["owner"]["pid"] == os.getpid()
        code, cleaned, _ = in_process("runs", "--out", tmp_path, "--clean")
        assert code == 0 and f"removed {rebooted}" in cleaned and not rebooted.exists()
        assert alive.exists() and sleeper.poll() is None
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_run_holding_its_lock_is_neither_resumed_twice_nor_cleaned(stopped, tmp_path):
    """While a resume owns the run (from the moment it says so, before its state says running),
    a second resume is refused in one line before building anything, and `runs --clean` keeps
    the folder and says why; the first resume then finishes."""
    run_dir = stopped.copy(tmp_path)
    first = started("run", stopped.job, "--resume", run_dir.name, *stopped.args(tmp_path), "--no-progress")
    try:
        said = []
        while not any("resuming" in line for line in said) and (line := first.stdout.readline()):
            said.append(line)
        assert any("resuming" in line for line in said), first.stderr.read()[-3000:]
        models = tmp_path / "no-models"
        second = harness("run", stopped.job, "--resume", run_dir.name, *stopped.args(tmp_path)[:-2], "--models", models)
        assert second.returncode == 2 and second.stderr.count("\n") == 1, second.stderr[-3000:]
        assert f"error: --resume {run_dir.name}: the run is in use by another process (pid {first.pid}" in second.stderr
        assert not models.exists()
        code, cleaned, _ = in_process("runs", "--out", tmp_path, "--clean")
        # the resume holds the lock from its first line; once it has written its state it is also
        # listed as running: either way `--clean` keeps the folder and says why
        in_use = f"kept {run_dir}: in use by another process (pid {first.pid})" in cleaned
        assert code == 0 and (in_use or f"{run_dir.name}  running" in cleaned), cleaned
        assert (run_dir / "state.json").is_file()
        _, err = first.communicate(timeout=600)
        assert first.returncode == 0, err[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()
    assert json.loads((run_dir / "state.json").read_text())["state"] == "complete"


# -- 6: a resume is refused before Ray starts or anything is built -------------------------------


def test_a_mistyped_or_refused_resume_is_refused_before_anything_is_built(stopped, tmp_path):
    models, empty = tmp_path / "no-models", tmp_path / "empty results"
    run_dir = stopped.copy(tmp_path)
    changed = _job(tmp_path, max_new_tokens=20)
    cases = [
        (stopped.job, "nosuch", tmp_path, f"--resume nosuch: no run nosuch of job '{JOB}'"),
        (stopped.job, "latest", empty, f"--resume latest: {empty / JOB} holds no incomplete run"),
        (changed, run_dir.name, tmp_path, f"--resume {run_dir.name}: the job differs from the run's (decoding)"),
    ]
    for job, which, out, refusal in cases:
        begun = time.monotonic()
        done = harness("run", job, "--resume", which, *stopped.args(out)[:-2], "--models", models)
        took = time.monotonic() - begun
        assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr[-3000:]
        assert done.stderr.startswith(f"error: {refusal}"), done.stderr
        assert not models.exists() and took < 60, took  # no artifact built, no Ray started
    assert not empty.exists()


# -- 7: a state.json that cannot be read is one line, never a traceback ---------------------------


def test_a_corrupt_state_file_is_one_line_everywhere(tmp_path):
    folder = tmp_path / JOB / "20260101-000000-bad000"
    (folder / "raw").mkdir(parents=True)
    state = folder / "state.json"
    state.write_text('{"state": "running", "owner": {"pid": 1')  # cut short
    listed = harness("runs", "--out", tmp_path)
    assert listed.returncode == 0 and not listed.stderr, listed.stderr
    (line,) = listed.stdout.splitlines()
    assert line.startswith(f"{JOB}/{folder.name}  unreadable  {state}: not a run's state (JSONDecodeError: ")
    cleaned = harness("runs", "--out", tmp_path, "--clean")
    assert cleaned.returncode == 0 and not cleaned.stderr, cleaned.stderr
    (line,) = cleaned.stdout.splitlines()
    assert line.startswith(f"kept {folder}: {state}: not a run's state (JSONDecodeError: ") and state.is_file()
    models, job = tmp_path / "no-models", _job(tmp_path)
    for which in (folder.name, "latest"):
        refused = harness("run", job, "--limit", LIMIT, "--resume", which, "--out", tmp_path, "--models", models)
        assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr[-3000:]
        assert refused.stderr.startswith(f"error: --resume {which}: {state}: not a run's state (JSONDecodeError: ")
    assert not models.exists()


# -- 8: the printed command resumes exactly this run -------------------------------------------


def test_the_printed_resume_command_resumes_exactly_this_run(stopped):
    (line,) = _lines(stopped.stderr, "resume with: ")
    argv = shlex.split(line.removeprefix("resume with: "))
    assert argv[:3] == ["python", "-m", "harness"]
    args = _parser().parse_args(argv[3:])
    assert (args.command, args.job, args.resume) == ("run", stopped.job, stopped.run_dir.name)
    assert (args.out, args.models, args.dataset, args.limit, args.slots) == (
        stopped.out, stopped.models, str(EMBEDDED), LIMIT, 2
    )  # fmt: skip
    assert args.address is None and args.history is None and args.baseline is None
