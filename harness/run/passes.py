"""A pass of workers over (model, shard) work, as the transcription (`harness.run.execute`) and the
divergence analysis (`harness.run.divergence_pass`) both run one.

What tells two passes apart is a `Pass`: its worker class, its kind of row, and its folder of the
run directory. Everything else they do the same way, here: the driver's artifact server for the
pass (`serving`), the scheduler run with the job's cluster settings, each finished (model, shard)
persisted at once, atomically, in the pass's folder (so `--resume` re-plans only the shards
without a whole file), and the check that the rows read back are exactly one per model and utterance.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, Generic

import pandas as pd

from converters.registry import get_target
from converters.store import Prepared
from harness.core.decoding import Dims
from harness.core.errors import some
from harness.job.spec import ClusterSpec, ModelCell
from harness.results.run_dir import RunDir, shard_problem
from harness.results.run_info import PassReport
from harness.run.actors import S, WorkerClass
from harness.run.artifact_server import start_server
from harness.run.dataset import Shard
from harness.run.node_cache import PublishedArtifact, publish
from harness.run.scheduler import FailureRow, Index, Scheduler, SchedulerOptions, ShardDone, Work


@dataclass(frozen=True)
class PreparedModel:
    """A model of the job as the driver prepared it: its artifact, or why it has none."""

    cell: ModelCell
    prepared: Prepared

    @property
    def facts(self) -> dict[str, object]:
        """What the summary shows of the artifact: its runtime label and size on disk."""
        art = self.prepared.artifact
        if art is None:
            return {}
        return {"runtime": art.manifest.get("runtime") or get_target(self.cell.target).runtime, "artifact_mb": art.mb}

    @property
    def dims(self) -> Dims:
        """The model's dims at the cell's audio context (a converted artifact was built for it;
        the reference slices its encoder to it)."""
        assert self.prepared.artifact is not None
        return replace(Dims.of(self.prepared.artifact.manifest["dims"]), n_audio_ctx=self.cell.audio_ctx)


class Publisher:
    """The driver's artifact server while a pass runs: the nodes share no filesystem with the
    driver, so they fetch artifacts from it (`harness.run.node_cache`)."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self._published: dict[str, PublishedArtifact] = {}

    def publish(self, model: PreparedModel) -> PublishedArtifact:
        """`model`'s artifact, published once however many workers take it."""
        assert model.prepared.artifact is not None  # only a model with an artifact has workers
        label = model.cell.label
        if label not in self._published:
            self._published[label] = publish(self.server, model.prepared.artifact)
        return self._published[label]


@contextlib.contextmanager
def serving() -> Iterator[Publisher]:
    """An artifact server on the driver's node, ended with the pass."""
    server = start_server()
    try:
        yield Publisher(server)
    finally:
        import ray

        ray.kill(server)


def scheduler_options(cluster: ClusterSpec) -> SchedulerOptions:
    c = cluster
    return SchedulerOptions(c.slots, c.threads, c.max_attempts, float(c.stall_timeout_s), c.emulate)


@dataclass(frozen=True)
class Pass(Generic[S]):
    """One kind of pass: what its workers are and what their rows look like."""

    name: str  # in messages
    folder: str  # the run directory's folder of per-(model, shard) files
    worker: WorkerClass[S]
    frame: Callable[[list[dict[str, Any]]], pd.DataFrame]  # rows as stored: the pass's columns and dtypes
    failure_row: FailureRow  # the row of an utterance no worker could do
    model_columns: tuple[str, ...]  # the columns of a row that name its model
    # rows as written, when faster than `frame` (an Arrow table of the same columns)
    table: Callable[[list[dict[str, Any]]], Any] | None = None

    def todo(
        self, run: RunDir, cell: ModelCell, shards: Sequence[Shard], log: Callable[[str], None] = print
    ) -> tuple[Shard, ...]:
        """The shards of `cell` without a whole file in `run`. A file that is not whole (empty,
        cut short, not the shard's rows or columns: `shard_problem`) is removed and redone, said
        in one line: counted as done, it would fail every later read of the run."""
        columns = list(self.frame([]).columns)
        model = dict(zip(self.model_columns, cell.as_tuple()[: len(self.model_columns)], strict=True))
        todo = []
        for shard in shards:
            file = run.shard_file(cell, shard.index, self.folder)
            if file.is_file() and (problem := shard_problem(file, shard.stop - shard.start, columns, model)):
                file.unlink()
                log(f"{file.relative_to(run.path)}: {problem}, redone")
            if not file.is_file():
                todo.append(shard)
        return tuple(todo)

    def persist(self, run: RunDir, cell: ModelCell, shard: Shard, rows: list[dict[str, Any]]) -> None:
        run.write_shard(cell, shard.index, (self.table or self.frame)(rows), self.folder)

    def schedule(
        self,
        run: RunDir,
        work: Sequence[Work[S]],
        cluster: ClusterSpec,
        index: Index,
        progress: bool,
        log: Callable[[str], None],
        check: ShardDone | None = None,
    ) -> PassReport:
        """Run `work` on the cluster, persisting every shard as it finishes (failed ones as rows),
        after `check` (which stops the pass by raising) when given."""

        def on_shard(cell: ModelCell, shard: Shard, rows: list[dict[str, Any]]) -> None:
            if check is not None:
                check(cell, shard, rows)
            self.persist(run, cell, shard, rows)

        options = scheduler_options(cluster)
        return Scheduler(work, options, self.worker, on_shard, self.failure_row, index, progress, log).run()

    def rows(self, run: RunDir) -> pd.DataFrame:
        """Every row the pass has persisted in `run` (none: an empty frame with its columns)."""
        if not any((run.path / self.folder).glob("*.parquet")):
            return self.frame([])
        return run.read_raw(self.folder)

    def check_complete(self, rows: pd.DataFrame, cells: Sequence[ModelCell], n_rows: int, index: Index) -> None:
        """Exactly one row per model of `cells` and utterance of the dataset's `n_rows`, else a
        RuntimeError naming what is missing, repeated or unexpected: a scheduling bug must never
        pass as a result. (`index` is read only to name missing utterances.)"""
        columns = list(self.model_columns)
        found = {tuple(key): group["utt_id"] for key, group in rows.groupby(columns, sort=False)}
        problems = []
        for cell in cells:
            utts = found.pop(cell.as_tuple()[: len(columns)], None)
            if utts is None:
                problems.append(f"{cell.label}: no rows")
                continue
            repeated = sorted(set(utts[utts.duplicated()]))
            if repeated:
                problems.append(f"{cell.label}: more than one row for {some(repeated, 3, ', ')}")
            if utts.nunique() != n_rows:
                ids, seen = index()[0], set(utts)
                missing, unknown = [u for u in ids if u not in seen], sorted(seen - set(ids))
                if missing:
                    problems.append(
                        f"{cell.label}: {len(missing)} of {n_rows} utterances missing ({some(missing, 3, ', ')})"
                    )
                if unknown:
                    problems.append(f"{cell.label}: utterances not in the dataset ({some(unknown, 3, ', ')})")
        problems += [f"{ModelCell(*key).label}: rows of a model the job does not have" for key in found]
        if problems:
            raise RuntimeError(f"{self.name}: not one row per model and utterance: {'; '.join(problems)}")
