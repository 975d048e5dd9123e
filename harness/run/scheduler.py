"""Elastic scheduling of (model, shard) work over a Ray cluster's slots, surviving dead workers.

- Slots: every alive node offers `CPU // threads` slots (at most `slots` in all, when the job caps
  them). A worker holds one slot, loads its model once, and pulls its model's shards one at a
  time. When its model has no shard left, the slot goes to the model with the most work left, so
  no core idles while another model still has utterances; faster nodes simply pull more.
- Placement: the scheduler picks each worker's node itself (Ray's node affinity, hard). A target
  that needs a board's resource (e.g. `mediatek`) goes only to nodes advertising it, one worker
  per board unit; without such a node it runs in emulation only when the job allows it, else its
  rows say unavailable at once. A node whose workers died twice is set aside for the run.
- Faults: rows stream back one utterance at a time (a Ray generator). A worker process or node
  that dies mid-shard costs the utterance in progress: the rest of the shard is retried on
  another worker, up to `max_attempts` in all, with back-off; each row records its `attempt`. A
  worker that sends nothing for `stall_timeout_s` is ended and treated as dead. A model that
  cannot be loaded (its constructor raised: a refused artifact, an unsupported op) is not retried:
  its utterances become `worker failed` rows with the reason.

The policy is all here and in `harness.run.placement`; what it does to the cluster (start a worker
on a node, wait for rows, list nodes) goes through `harness.run.actors.Cluster`, Ray's by default.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic

from harness.core.status import Status
from harness.job.spec import ModelCell
from harness.results.run_info import Failure, PassReport, WorkerReport
from harness.run.actors import Actor, Cluster, LoadFailed, RayCluster, S, ShardFailed, WorkerClass, WorkerDied
from harness.run.dataset import Shard
from harness.run.placement import NodeInfo, Nodes

PROGRESS_EVERY_S = 30.0  # one line of progress this often when stderr is not a terminal


@dataclass(frozen=True)
class Work(Generic[S]):
    """One model to evaluate and the shards it still has to do."""

    setup: S  # what its worker is made with
    shards: tuple[Shard, ...]
    resource: str | None  # a board resource its workers need (None: any CPU)
    gpu: bool = False  # its runner batches: a worker placed where a GPU is free runs on it

    @property
    def cell(self) -> ModelCell:
        return self.setup.cell


@dataclass(frozen=True)
class SchedulerOptions:
    slots: int | None = None  # None: every CPU of the cluster
    threads: int = 1
    max_attempts: int = 3  # a shard is tried at most this often (2 retries)
    stall_timeout_s: float = 600.0  # a worker silent this long (loading, or on one utterance) is ended
    emulate: bool = False  # run board targets on CPUs when no board has joined


@dataclass
class Task:
    shard: Shard
    attempt: int = 0
    rows: list[dict[str, Any]] = field(default_factory=list)  # streamed so far, earlier attempts included
    not_before: float = 0.0  # back-off after a failure


@dataclass
class Worker:
    work: Work
    node_id: str
    started: float
    loading: bool = True  # until its model is loaded
    info: dict[str, Any] = field(default_factory=dict)  # its `ready()`, and `ready_s`
    task: Task | None = None
    last_seen: float = 0.0
    busy_s: float = 0.0
    shards: int = 0
    resources: dict[str, float] = field(default_factory=dict)  # the board it holds, if any


ShardDone = Callable[[ModelCell, Shard, list[dict[str, Any]]], None]
# the row of an utterance no worker decoded: (model, utt id, reference text, status, reason, attempt)
FailureRow = Callable[[ModelCell, str, str, Status, str, int], dict[str, Any]]
Index = Callable[[], tuple[list[str], list[str]]]  # the dataset's utterance ids and reference texts


class Scheduler(Generic[S]):
    def __init__(
        self,
        work: Sequence[Work[S]],
        options: SchedulerOptions,
        worker: WorkerClass[S],
        on_shard: ShardDone,
        failure_row: FailureRow,
        index: Index,
        progress: bool,
        log: Callable[[str], None] = print,
        cluster: Cluster | None = None,
    ) -> None:
        """`worker` is made with each `Work.setup`; every finished shard's rows go to `on_shard`,
        those of utterances no worker could do made by `failure_row` (`index` gives their ids and
        texts). `cluster`: the one this process joined, unless given."""
        self.cluster = cluster or RayCluster()
        self.options, self.worker, self.on_shard, self.index, self.log = options, worker, on_shard, index, log
        self.failure_row = failure_row
        self.work = {w.cell.label: w for w in work}
        self.pending = {w.cell.label: deque(Task(s) for s in w.shards) for w in work}
        self.remaining = {w.cell.label: sum(s.stop - s.start for s in w.shards) for w in work}
        self.seconds_per_utt: dict[str, float] = {}
        self.workers: dict[Actor, Worker] = {}
        self.failures: list[Failure] = []
        self.finished_workers: list[WorkerReport] = []
        self.nodes = Nodes(self.cluster, options.threads, options.slots, log)
        self.progress = progress
        self.bars = self._bars(progress)
        self.last_line = self.cluster.time()

    def runnable_here(self, work: Work) -> str | None:
        """Why no node of this cluster may run `work`, or None."""
        return self.nodes.unrunnable(work.resource, self.options.emulate)

    # -- the loop --------------------------------------------------------------------------------

    def run(self) -> PassReport:
        for label, work in self.work.items():
            if reason := self.runnable_here(work):
                self._give_up(label, Status.UNAVAILABLE, reason)
        try:
            while any(self.pending.values()) or self.workers:
                self._fill()
                self._step()
                self._reap_stalled()
                self._report_progress()
        finally:
            for actor in list(self.workers):
                self._end(actor)
            for bar in self.bars.values():
                bar.close()
        return self.report()

    def _fill(self) -> None:
        """Start workers on free slots, each for the model with the most work left per worker."""
        now = self.cluster.time()
        self.nodes.refresh_if_due()
        for label, queue in self.pending.items():
            if queue and not self._workers_of(label) and (reason := self.runnable_here(self.work[label])):
                self._give_up(label, Status.UNAVAILABLE, reason)
        while self.nodes.free_slots(len(self.workers)) > 0:
            waiting = [
                label
                for label, queue in self.pending.items()
                if queue and queue[0].not_before <= now and self._unclaimed(label) > 0
            ]
            if not waiting:
                return
            # boards that models with work waiting need: a CPU model does not take their slots
            wanted = {r for m in waiting if (r := self.work[m].resource) and self.nodes.has_board(r)}
            for label in sorted(waiting, key=lambda m: self._work_left(m) / (1 + self._workers_of(m)), reverse=True):
                if node := self.nodes.place(self.work[label].resource, wanted, self.work[label].gpu):
                    self._start(label, node)
                    break
            else:
                return  # no waiting model fits a free slot

    def _unclaimed(self, label: str) -> int:
        """Pending shards of a model beyond those its idle-or-loading workers will take next."""
        waiting_workers = sum(1 for w in self.workers.values() if w.work.cell.label == label and w.task is None)
        return len(self.pending[label]) - waiting_workers

    def _workers_of(self, label: str) -> int:
        return sum(1 for w in self.workers.values() if w.work.cell.label == label)

    def _work_left(self, label: str) -> float:
        """Seconds of work a model has left (utterances times its measured pace)."""
        # a model not yet measured (just started, or resumed) is taken to be as slow as the others
        # so far: a small guess would leave it for last, behind models it may be slower than
        paces = self.seconds_per_utt.values()
        return self.remaining[label] * self.seconds_per_utt.get(label, sum(paces) / len(paces) if paces else 1.0)

    def _start(self, label: str, node: NodeInfo) -> None:
        work = self.work[label]
        resources = self.nodes.take(node, work.resource, work.gpu)
        actor = self.cluster.start(self.worker, work.setup, node.node_id, self.options.threads, resources)
        now = self.cluster.time()
        self.workers[actor] = Worker(work, node.node_id, now, last_seen=now, resources=resources)

    def _step(self) -> None:
        if not self.workers:
            self.cluster.sleep(0.2)  # only back-off timers are running
            return
        for actor in self.cluster.wait(list(self.workers), timeout=1.0):
            worker = self.workers[actor]
            if worker.loading:
                self._on_ready(actor, worker)
            else:
                self._on_row(actor, worker)

    def _on_ready(self, actor: Actor, worker: Worker) -> None:
        worker.loading = False
        try:
            worker.info = actor.loaded()
        except LoadFailed as exc:  # the model cannot be loaded: retrying would fail the same way
            self._end(actor)
            self._give_up(worker.work.cell.label, Status.WORKER_FAILED, str(exc))
            return
        except WorkerDied as exc:
            self._died(actor, worker, str(exc))
            return
        worker.last_seen = self.cluster.time()
        # from the request to a loaded, warmed model: process start and imports too, not only `load_s`
        worker.info["ready_s"] = round(worker.last_seen - worker.started, 2)
        self._next_task(actor, worker)

    def _next_task(self, actor: Actor, worker: Worker) -> None:
        queue = self.pending[worker.work.cell.label]
        now = self.cluster.time()
        if not queue or queue[0].not_before > now:
            self._end(actor, graceful=True)  # its slot goes to the model with the most work left
            return
        task = queue.popleft()
        worker.task, worker.last_seen = task, now
        actor.run_shard(task.shard, len(task.rows), task.attempt)

    def _on_row(self, actor: Actor, worker: Worker) -> None:
        task = worker.task
        assert task is not None
        try:
            values = actor.next_row()
        except WorkerDied as exc:
            self._died(actor, worker, str(exc))
            return
        except ShardFailed as exc:
            self._end(actor)
            self._fail_task(worker.work.cell.label, task, Status.WORKER_FAILED, str(exc))
            return
        if values is None:
            self._shard_done(actor, worker)
            return
        now = self.cluster.time()
        label = worker.work.cell.label
        took = now - worker.last_seen
        worker.busy_s += took
        self.seconds_per_utt[label] = 0.8 * self.seconds_per_utt.get(label, took) + 0.2 * took
        worker.last_seen = now
        task.rows.append(values)
        self.remaining[label] -= 1
        if label in self.bars:
            self.bars[label].update(1)

    def _shard_done(self, actor: Actor, worker: Worker) -> None:
        task = worker.task
        assert task is not None
        worker.shards += 1
        self.nodes.shard_done(worker.node_id)
        self.on_shard(worker.work.cell, task.shard, task.rows)
        worker.task = None
        self._next_task(actor, worker)

    def _died(self, actor: Actor, worker: Worker, reason: str) -> None:
        """A worker process (or its node) died: its shard's remaining utterances go back in the queue."""
        label = worker.work.cell.label
        host = self.nodes.failed(worker.node_id)
        self.failures.append(Failure(model=label, node=host, node_id=worker.node_id, reason=reason, at=_now()))
        task = worker.task
        self._end(actor)
        if task is None:  # died while loading: the model may still load elsewhere
            self._retry_load(label, reason)
            return
        task.attempt += 1
        if task.attempt >= self.options.max_attempts:
            self._fail_task(label, task, Status.WORKER_FAILED, f"{reason} (after {task.attempt} attempts)")
            return
        task.not_before = self.cluster.time() + 2.0**task.attempt
        self.pending[label].appendleft(task)

    def _retry_load(self, label: str, reason: str) -> None:
        deaths = sum(1 for f in self.failures if f.model == label)
        if deaths >= self.options.max_attempts:
            self._give_up(label, Status.WORKER_FAILED, f"{reason} (after {deaths} attempts)")

    def _reap_stalled(self) -> None:
        now = self.cluster.time()
        for actor, worker in list(self.workers.items()):
            if now - worker.last_seen > self.options.stall_timeout_s:
                what = "loading its model" if worker.loading else "on one utterance"
                self.log(f"{worker.work.cell.label}: a worker spent over {self.options.stall_timeout_s:.0f} s {what}")
                actor.kill()
                self._died(actor, worker, f"TimeoutError: no progress for {self.options.stall_timeout_s:.0f} s {what}")

    def _end(self, actor: Actor, graceful: bool = False) -> None:
        worker = self.workers.pop(actor, None)
        if worker is None:
            return
        if graceful and (peak := actor.peak_rss_mb()) is not None:  # over the whole run, not only at load
            worker.info["rss_mb"] = peak
        actor.kill()
        self.nodes.release(worker.node_id, worker.resources, worker.busy_s)
        self.finished_workers.append(
            WorkerReport(
                model=worker.work.cell.label,
                node=worker.info.get("node") or self.nodes.host(worker.node_id),
                load_s=worker.info.get("load_s"),
                ready_s=worker.info.get("ready_s"),
                rss_mb=worker.info.get("rss_mb"),
                shards=worker.shards,
                busy_s=round(worker.busy_s, 2),
                alive_s=round(self.cluster.time() - worker.started, 2),
            )
        )

    # -- failures as rows ------------------------------------------------------------------------

    def _fail_task(self, label: str, task: Task, status: Status, reason: str) -> None:
        """The task's remaining utterances become rows with the reason; its streamed rows stay."""
        ids, texts = self.index()
        start = task.shard.start + len(task.rows)
        cell = self.work[label].cell
        rows = task.rows + [
            self.failure_row(cell, ids[i], texts[i], status, reason, task.attempt)
            for i in range(start, task.shard.stop)
        ]
        self.remaining[label] -= task.shard.stop - start
        self.on_shard(cell, task.shard, rows)

    def _give_up(self, label: str, status: Status, reason: str) -> None:
        """No worker will run this model: every pending shard becomes rows with the reason."""
        queue = self.pending[label]
        while queue:
            self._fail_task(label, queue.popleft(), status, reason)

    # -- progress and report ---------------------------------------------------------------------

    def _bars(self, progress: bool) -> dict[str, Any]:
        if not (progress and sys.stderr.isatty()):
            return {}
        from tqdm import tqdm

        return {
            label: tqdm(total=self.remaining[label], desc=label, unit="utt", position=i)
            for i, label in enumerate(self.work)
        }

    def _report_progress(self) -> None:
        now = self.cluster.time()
        if not self.progress or self.bars or now - self.last_line < PROGRESS_EVERY_S:
            return
        self.last_line = now
        done = ", ".join(f"{label} {self.remaining[label]} left" for label in self.work)
        nodes = len({w.node_id for w in self.workers.values()})
        print(f"progress: {done}; {len(self.workers)} workers on {nodes} nodes", file=sys.stderr, flush=True)

    def report(self) -> PassReport:
        """For run.json: per node its resources, shards, failures and busy time; per worker its model
        load time, peak memory and work."""
        return PassReport(
            nodes=self.nodes.report(), workers=tuple(self.finished_workers), failures=tuple(self.failures)
        )


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
