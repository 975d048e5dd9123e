"""Results as data: the raw row schema, and a run directory's life cycle (running → complete,
or interrupted / failed and resumable), so finished work is never thrown away.

A run directory `results/<job>/<run id>/` is created when the run starts. Every finished
(model, shard) is persisted at once as `raw/<model>-shard<NNNNN>.parquet` (atomically and durably),
and `state.json` says where the run stands: `running` (with the process that owns it: host, pid,
boot id and the process's start time, so that a pid the system has since given to another process,
or a reboot, does not pass for it), `interrupted` or `failed` (with the reason: resume it), or
`complete` (scored: utterances.parquet, summary, run.json). The process that runs or resumes a run
holds an exclusive lock on its `run.lock` for as long as it does (the system drops it however the
process ends): a second resume is refused, and `runs --clean` leaves the folder alone. A resumed
run re-plans only the (model, shard) pairs without a whole file (`shard_problem`: a power cut can
leave one empty or cut short), after checking that the job, the dataset and the artifacts are the
ones the run started with.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.core.errors import HarnessError, one_line, quote
from harness.core.files import write_atomic
from harness.core.hashing import file_sha256
from harness.job.spec import DatasetSpec, JobSpec, ModelCell
from harness.results.schema import RAW_COLUMNS, SHARD_COLUMNS

if TYPE_CHECKING:  # frames only where rows are read or written: `runs` lists folders without pandas
    import pandas as pd
    import pyarrow as pa

STATE = "state.json"
RAW = "raw"
LOCK = "run.lock"  # held (flock, exclusive) by the process that runs or resumes the run


def raw_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Rows as a frame with every raw column, in the declared order and dtypes."""
    return _frame(rows, RAW_COLUMNS)


def scored_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Scored rows (a shard file's: `harness.results.scoring.score_row`) as a frame, declared order and dtypes."""
    return _frame(rows, SHARD_COLUMNS)


def scored_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Scored rows as an Arrow table of the shard files' schema: what the driver writes for each
    finished (model, shard), a few times faster than a typed frame (`scored_frame` reads them back)."""
    import pyarrow as pa

    return pa.Table.from_pylist(rows, schema=arrow_schema(SHARD_COLUMNS))


def arrow_schema(columns: dict[str, str]) -> pa.Schema:
    """The Arrow schema of columns declared as pandas dtypes (an `object` column holds token ids)."""
    import pyarrow as pa

    types = {"string": pa.string(), "Int64": pa.int64(), "float64": pa.float64(), "Float64": pa.float64(),
             "boolean": pa.bool_(), "object": pa.list_(pa.int64())}  # fmt: skip
    return pa.schema([pa.field(c, types[t]) for c, t in columns.items()])


def _frame(rows: list[dict[str, Any]] | pd.DataFrame, columns: dict[str, str]) -> pd.DataFrame:
    import pandas as pd

    frame = rows[list(columns)] if isinstance(rows, pd.DataFrame) else pd.DataFrame(rows, columns=list(columns))
    return frame.astype({c: t for c, t in columns.items() if t != "object"})


def write_parquet_atomic(df: pd.DataFrame, path: Path) -> None:
    write_atomic(path, lambda tmp: df.to_parquet(tmp, index=False))


def write_json_atomic(data: Any, path: Path) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, default=str)))


class RunState(str, Enum):
    RUNNING = "running"
    INTERRUPTED = "interrupted"  # stopped by the user (Ctrl-C, SIGTERM): resume it
    FAILED = "failed"  # stopped by an error: resume it once the cause is fixed
    COMPLETE = "complete"


class InUse(HarnessError):
    """Another process runs or resumes the run: it holds the run's lock."""

    def __init__(self, lock: Path, holder: str) -> None:
        super().__init__(f"the run is in use by another process (pid {holder}, which holds {lock})")
        self.holder = holder


def dataset_fingerprint(spec: DatasetSpec, n_rows: int) -> dict[str, Any]:
    """What identifies the utterances a run evaluates: their metadata's bytes, or the hub id."""
    facts: dict[str, Any] = {"split": spec.split, "limit": spec.limit, "rows": n_rows}
    if spec.language_column is not None:  # it decides what each utterance is decoded in
        facts["language_column"] = spec.language_column
    if spec.path is not None:
        meta = next(p for p in (spec.path / "metadata.jsonl", spec.path / "metadata.csv") if p.is_file())
        facts["metadata_sha256"] = file_sha256(meta)
    else:
        facts.update(hub=spec.hub, config=spec.config)
    return facts


def job_fingerprint(spec: JobSpec) -> dict[str, Any]:
    """The parts of a job that decide its results: not where or how fast it runs (cluster), nor the
    dataset's location (the dataset fingerprint names its contents)."""
    job = asdict(replace(spec, source_file=None))
    # thresholds judge results and the report shows them: neither makes them; analyses and
    # breakdowns only add their own tables (a resumed run makes those its job asks for)
    for part in ("cluster", "datasets", "thresholds", "report", "analysis", "breakdown"):
        job.pop(part)
    return {**job, "shard_size": spec.cluster.shard_size}


@dataclass(frozen=True)
class RunDir:
    path: Path

    @property
    def run_id(self) -> str:
        return self.path.name

    @property
    def job(self) -> str:
        return self.path.parent.name

    @classmethod
    def create(cls, out_root: Path, job: str) -> RunDir:
        """A new run's folder, without a state until `start` (which its owner calls under `lock`)."""
        run_id = time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
        run = cls(out_root / job / run_id)
        (run.path / RAW).mkdir(parents=True)
        return run

    @classmethod
    def find(cls, out_root: Path, job: str, which: str) -> RunDir:
        """A run of `job` by id, or `latest`: the newest that is not complete (refused, one line,
        when that newest run's state cannot be read: it may be the one meant)."""
        folder = out_root / job
        if which == "latest":
            for run in reversed(list_runs(out_root, job)):
                try:
                    state = run.state()
                except HarnessError as exc:
                    raise HarnessError(f"--resume latest: {exc}") from None
                if state["state"] != RunState.COMPLETE:
                    return run
            raise HarnessError(f"--resume latest: {folder} holds no incomplete run of job '{job}'")
        run = cls(folder / which)
        if not (run.path / STATE).is_file():
            raise HarnessError(f"--resume {which}: no run {which} of job '{job}' in {folder}")
        return run

    def state(self) -> dict[str, Any]:
        """state.json, checked as far as it is used; one line naming the file when it cannot be."""
        file = self.path / STATE
        try:
            state = json.loads(file.read_text())
        except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise HarnessError(f"{file}: not a run's state ({one_line(exc)})") from None
        if problem := _state_problem(state):
            raise HarnessError(f"{file}: not a run's state ({problem})")
        return state

    def _write_state(self, state: RunState, **facts: Any) -> None:
        previous = self.state() if (self.path / STATE).is_file() else {}
        owner = _this_process() if state == RunState.RUNNING else {}
        write_json_atomic(
            {**previous, **facts, "state": state.value, "owner": owner, "updated": _now()}, self.path / STATE
        )

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Own the folder for as long as the context lasts: an exclusive lock on its lock file,
        which the system drops when the process ends, however it ends. InUse when another process
        holds it (the pid it wrote there named)."""
        path = self.path / LOCK
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:  # `runs --clean` removed it since it was found
            raise HarnessError(f"{self.path}: the run's folder is gone") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise InUse(path, os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            yield
        finally:
            os.close(fd)  # releases the lock; the file stays (removing it would let two processes lock two files)

    def start(self, fingerprint: dict[str, Any]) -> None:
        """A new run's state: running, owned by this process."""
        self._write_state(RunState.RUNNING, fingerprint=fingerprint, created=_now())

    def check(self, fingerprint: dict[str, Any]) -> dict[str, Any]:
        """This run's state, if this process may take it over; else one line saying why not: its
        state cannot be read, it is complete or still running, or a part of `fingerprint` differs
        from the run's (the job and the dataset before anything is built, the artifacts once built)."""
        try:
            state = self.state()
        except HarnessError as exc:
            raise HarnessError(f"--resume {self.run_id}: {exc}") from None
        if state["state"] == RunState.COMPLETE:
            raise HarnessError(f"--resume {self.run_id}: the run is complete ({self.path})")
        if state["state"] == RunState.RUNNING and _alive(state.get("owner", {})):
            raise HarnessError(f"--resume {self.run_id}: the run is still running (pid {state['owner']['pid']})")
        for part in fingerprint:
            if state["fingerprint"].get(part) != fingerprint[part]:
                was, now = state["fingerprint"].get(part) or {}, fingerprint[part] or {}
                keys = sorted(k for k in {*was, *now} if was.get(k) != now.get(k))
                raise HarnessError(
                    f"--resume {self.run_id}: the {part} differs from the run's ({', '.join(keys)}); "
                    "start a new run instead"
                )
        return state

    def resume(self, fingerprint: dict[str, Any]) -> None:
        """Take this run over (`check`, then running, owned by this process)."""
        state = self.check(fingerprint)
        self._write_state(RunState.RUNNING, resumed=[*state.get("resumed", []), _now()])

    # `folder`: RAW for the main pass's rows, or an analysis's own folder (harness.run.divergence_pass)
    def shard_file(self, cell: ModelCell, shard_index: int, folder: str = RAW) -> Path:
        return self.path / folder / f"{cell.label.replace('/', '__')}-shard{shard_index:05d}.parquet"

    def write_shard(self, cell: ModelCell, shard_index: int, rows: pd.DataFrame | pa.Table, folder: str = RAW) -> None:
        (self.path / folder).mkdir(exist_ok=True)
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = self.shard_file(cell, shard_index, folder)
        if isinstance(rows, pa.Table):
            write_atomic(path, lambda tmp: pq.write_table(rows, tmp))
        else:
            write_parquet_atomic(rows, path)

    def read_raw(self, folder: str = RAW) -> pd.DataFrame:
        """Every row of a pass's folder; the main pass's with their declared dtypes."""
        import pandas as pd

        files = sorted((self.path / folder).glob("*.parquet"))
        rows = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
        return _frame(rows, SHARD_COLUMNS) if folder == RAW else rows

    def stop(self, state: RunState, reason: str) -> None:
        self._write_state(state, reason=reason)

    def complete(self) -> None:
        self._write_state(RunState.COMPLETE, reason="")

    def summary_line(self) -> str:
        try:
            state = self.state()
        except HarnessError as exc:
            return f"{self.job}/{self.run_id}  unreadable  {exc}"
        shown = state["state"]
        if shown == RunState.RUNNING and not _alive(state.get("owner", {})):
            shown = "abandoned"  # its process is gone without a word (SIGKILL, a crash, a reboot)
        files = len(list((self.path / RAW).glob("*.parquet")))
        reason = f": {state['reason']}" if state.get("reason") else ""
        return f"{self.job}/{self.run_id}  {shown}  {files} shard files  updated {state['updated']}{reason}"

    def abandoned(self) -> bool:
        state = self.state()
        if state["state"] == RunState.COMPLETE:
            return False
        return state["state"] != RunState.RUNNING or not _alive(state.get("owner", {}))

    def remove(self) -> None:
        shutil.rmtree(self.path)


def list_runs(out_root: Path, job: str | None = None) -> list[RunDir]:
    """Runs under `out_root` (of `job`, or every job), oldest first (run ids start with the time)."""
    folders = (
        [out_root / job] if job else sorted(p for p in out_root.iterdir() if p.is_dir()) if out_root.is_dir() else []
    )
    runs = [RunDir(p.parent) for f in folders if f.is_dir() for p in f.glob(f"*/{STATE}")]
    return sorted(runs, key=lambda r: r.run_id)


def shard_problem(path: Path, n_rows: int, columns: Sequence[str], model: dict[str, Any]) -> str | None:
    """Why a (model, shard) file cannot count as done, or None: it must be a readable parquet file
    with the declared `columns` and the shard's `n_rows` rows, every one of `model` (column → value).
    A power cut can leave a file empty or cut short; a half-written one never gets the name."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.stat().st_size == 0:
        return "empty (0 bytes)"
    try:
        table = pq.ParquetFile(path).read()  # not read_table: its message repeats the path, which the line names
    except (pa.ArrowException, OSError) as exc:
        return f"unreadable ({one_line(exc)})"
    differ = {
        "missing": [c for c in columns if c not in table.column_names],
        "unexpected": [c for c in table.column_names if c not in columns],
    }
    if any(differ.values()):
        named = "; ".join(f"{what}: {', '.join(names)}" for what, names in differ.items() if names)
        return f"columns differ from the declared ones ({named})"
    if table.num_rows != n_rows:
        return f"rows: {table.num_rows}, expected {n_rows}"
    others = {tuple(r.values()) for r in table.select(list(model)).to_pylist()} - {tuple(model.values())}
    if others:
        return f"rows of another model ({', '.join(sorted(ModelCell(*key).label for key in others))})"
    return None


def _state_problem(state: Any) -> str | None:
    """What in a parsed state.json is not as this module writes it (None: nothing)."""
    if not isinstance(state, dict):
        return f"expected a JSON object, got {type(state).__name__}"
    if state.get("state") not in {s.value for s in RunState}:
        return f"'state' is {quote(state.get('state'))}"
    for key, kind in (("fingerprint", dict), ("owner", dict), ("updated", str)):
        if not isinstance(state.get(key), kind):
            return f"'{key}' is {quote(state.get(key))}"
    return None


BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def _this_process() -> dict[str, Any]:
    """The owner a running run records: this process, named so that nothing else passes for it."""
    pid = os.getpid()
    return {"pid": pid, "host": socket.gethostname(), "boot": _boot_id(), "started": _started(pid)}


def _alive(owner: dict[str, Any]) -> bool:
    """Whether the process that owns a running run is alive (only knowable on its own host): the
    same pid, started at the same time, since the same boot. A pid alone would do neither: after a
    crash the system may give it to any other process, and a reboot starts them all again."""
    if not owner or owner.get("host") != socket.gethostname():
        return bool(owner)  # another host's run: assume it runs
    if not BOOT_ID.is_file():  # no /proc (macOS): the pid is all there is to go by
        try:
            os.kill(owner["pid"], 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    started = _started(owner["pid"])
    return started is not None and (owner.get("boot"), owner.get("started")) == (_boot_id(), started)


def _boot_id() -> str | None:
    """This boot's id (Linux): another after every reboot."""
    return BOOT_ID.read_text().strip() if BOOT_ID.is_file() else None


def _started(pid: int) -> int | None:
    """When process `pid` started, in clock ticks since boot (/proc/<pid>/stat field 22; None: no
    such process, or no /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # fields from 3 on follow the name, which may hold ") "


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def fingerprint(
    spec: JobSpec, sizes: Sequence[int], artifact_keys: dict[str, str | None] | None = None
) -> dict[str, Any]:
    """What a resumed run must share with the run it continues: the job, the data (each dataset of
    a suite, with its `sizes` rows), the artifacts (model label → artifact key, None where none
    could be had; left out before they are built)."""
    datasets = [dataset_fingerprint(d, n) for d, n in zip(spec.datasets, sizes, strict=True)]
    data = datasets[0] if len(datasets) == 1 else {d.title: f for d, f in zip(spec.datasets, datasets, strict=True)}
    marks: dict[str, Any] = {"job": job_fingerprint(spec), "dataset": data}
    if artifact_keys is not None:
        marks["artifacts"] = dict(sorted(artifact_keys.items()))
    return json.loads(json.dumps(marks, default=str))  # as state.json holds it (lists, not tuples)
