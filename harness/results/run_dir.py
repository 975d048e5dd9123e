"""Results as data: the raw row schema, and a run directory's life cycle (running → complete,
or interrupted / failed and resumable), so finished work is never thrown away.

A run directory `results/<job>/<run id>/` is created when the run starts. Every finished
(model, shard) is persisted at once as `raw/<model>-shard<NNNNN>.parquet` (atomically), and
`state.json` says where the run stands: `running` (with the pid and host that own it),
`interrupted` or `failed` (with the reason: resume it), or `complete` (scored: utterances.parquet,
summary, run.json). A resumed run re-plans only the (model, shard) pairs with no file, after
checking that the job, the dataset and the artifacts are the ones the run started with.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
import uuid
from dataclasses import asdict, dataclass, replace
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.core.errors import HarnessError
from harness.core.files import write_atomic
from harness.core.hashing import file_sha256
from harness.job.spec import DatasetSpec, JobSpec, ModelCell
from harness.results.schema import RAW_COLUMNS

if TYPE_CHECKING:  # frames only where rows are read or written: `runs` lists folders without pandas
    import pandas as pd

STATE = "state.json"
RAW = "raw"


def raw_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Rows as a frame with every raw column, in the declared order and dtypes."""
    import pandas as pd

    frame = pd.DataFrame(rows, columns=list(RAW_COLUMNS))
    return frame.astype({c: t for c, t in RAW_COLUMNS.items() if t != "object"})


def write_parquet_atomic(df: pd.DataFrame, path: Path) -> None:
    write_atomic(path, lambda tmp: df.to_parquet(tmp, index=False))


def write_json_atomic(data: Any, path: Path) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, default=str)))


class RunState(str, Enum):
    RUNNING = "running"
    INTERRUPTED = "interrupted"  # stopped by the user (Ctrl-C, SIGTERM): resume it
    FAILED = "failed"  # stopped by an error: resume it once the cause is fixed
    COMPLETE = "complete"


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
    # thresholds judge results and the report shows them: neither makes them; analyses only add
    # their own tables (a resumed run makes those its job asks for)
    for part in ("cluster", "dataset", "thresholds", "report", "analysis"):
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
    def create(cls, out_root: Path, job: str, fingerprint: dict[str, Any]) -> RunDir:
        run_id = time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
        run = cls(out_root / job / run_id)
        (run.path / RAW).mkdir(parents=True)
        run._write_state(RunState.RUNNING, fingerprint=fingerprint, created=_now())
        return run

    @classmethod
    def find(cls, out_root: Path, job: str, which: str) -> RunDir:
        """A run of `job` by id, or `latest`: the newest that is not complete."""
        folder = out_root / job
        if which == "latest":
            runs = [r for r in list_runs(out_root, job) if r.state()["state"] != RunState.COMPLETE]
            if not runs:
                raise HarnessError(f"--resume latest: {folder} holds no incomplete run of job '{job}'")
            return runs[-1]
        run = cls(folder / which)
        if not (run.path / STATE).is_file():
            raise HarnessError(f"--resume {which}: no run {which} of job '{job}' in {folder}")
        return run

    def state(self) -> dict[str, Any]:
        return json.loads((self.path / STATE).read_text())

    def _write_state(self, state: RunState, **facts: Any) -> None:
        previous = self.state() if (self.path / STATE).is_file() else {}
        owner = {"pid": os.getpid(), "host": socket.gethostname()} if state == RunState.RUNNING else {}
        write_json_atomic(
            {**previous, **facts, "state": state.value, "owner": owner, "updated": _now()}, self.path / STATE
        )

    def resume(self, fingerprint: dict[str, Any]) -> None:
        """Take this run over, refusing it (one line) when it is not the same job on the same data."""
        state = self.state()
        if state["state"] == RunState.COMPLETE:
            raise HarnessError(f"--resume {self.run_id}: the run is complete ({self.path})")
        if state["state"] == RunState.RUNNING and _alive(state.get("owner", {})):
            raise HarnessError(f"--resume {self.run_id}: the run is still running (pid {state['owner']['pid']})")
        for part in ("job", "dataset", "artifacts"):
            if state["fingerprint"].get(part) != fingerprint.get(part):
                was, now = state["fingerprint"].get(part) or {}, fingerprint.get(part) or {}
                keys = sorted(k for k in {*was, *now} if was.get(k) != now.get(k))
                raise HarnessError(
                    f"--resume {self.run_id}: the {part} differs from the run's ({', '.join(keys)}); "
                    "start a new run instead"
                )
        self._write_state(RunState.RUNNING, resumed=[*state.get("resumed", []), _now()])

    # `folder`: RAW for the main pass's rows, or an analysis's own folder (harness.run.divergence_pass)
    def shard_file(self, cell: ModelCell, shard_index: int, folder: str = RAW) -> Path:
        return self.path / folder / f"{cell.label.replace('/', '__')}-shard{shard_index:05d}.parquet"

    def done(self, cell: ModelCell, shard_index: int, folder: str = RAW) -> bool:
        return self.shard_file(cell, shard_index, folder).is_file()

    def write_shard(self, cell: ModelCell, shard_index: int, rows: pd.DataFrame, folder: str = RAW) -> None:
        (self.path / folder).mkdir(exist_ok=True)
        write_parquet_atomic(rows, self.shard_file(cell, shard_index, folder))

    def read_raw(self, folder: str = RAW) -> pd.DataFrame:
        import pandas as pd

        files = sorted((self.path / folder).glob("*.parquet"))
        return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)

    def stop(self, state: RunState, reason: str) -> None:
        self._write_state(state, reason=reason)

    def complete(self) -> None:
        self._write_state(RunState.COMPLETE, reason="")

    def summary_line(self) -> str:
        state = self.state()
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


def _alive(owner: dict[str, Any]) -> bool:
    """Whether the process that owns a running run is alive (only knowable on its own host)."""
    if not owner or owner.get("host") != socket.gethostname():
        return bool(owner)  # another host's run: assume it runs
    try:
        os.kill(owner["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def fingerprint(spec: JobSpec, n_rows: int, artifact_keys: dict[str, str | None]) -> dict[str, Any]:
    """What a resumed run must share with the run it continues: the job, the data, the artifacts
    (model label → artifact key, None where none could be had)."""
    marks = {
        "job": job_fingerprint(spec),
        "dataset": dataset_fingerprint(spec.dataset, n_rows),
        "artifacts": dict(sorted(artifact_keys.items())),
    }
    return json.loads(json.dumps(marks, default=str))  # as state.json holds it (lists, not tuples)
