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
"""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from harness.core.status import Status
from harness.job.spec import ModelCell
from harness.results.run_dir import row
from harness.run.dataset import Shard
from harness.run.placement import Nodes
from harness.run.worker import ModelWorker, worker_error

PROGRESS_EVERY_S = 30.0  # one line of progress this often when stderr is not a terminal


@dataclass(frozen=True)
class Work:
    """One model to evaluate and the shards it still has to do."""

    setup: Any  # what its worker is made with: a WorkerSetup, or the analysis pass's setup; has `.cell`
    shards: tuple[Shard, ...]
    resource: str | None  # a board resource its workers need (None: any CPU)

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
    ready: Any = None  # the `ready` call's ref while loading
    info: dict[str, Any] = field(default_factory=dict)
    task: Task | None = None
    stream: Any = None  # the ObjectRefGenerator of the running shard
    last_seen: float = 0.0
    busy_s: float = 0.0
    shards: int = 0
    resources: dict[str, float] = field(default_factory=dict)  # the board it holds, if any


ShardDone = Callable[[ModelCell, Shard, list[dict[str, Any]]], None]
# the row of an utterance no worker decoded: (model, utt id, reference text, status, reason, attempt)
FailureRow = Callable[[ModelCell, str, str, Status, str, int], dict[str, Any]]


def raw_failure_row(cell: ModelCell, utt_id: str, text: str, status: Status, reason: str, attempt: int) -> dict:
    return row(cell, utt_id, text, status, reason, attempt=attempt)


class Scheduler:
    def __init__(
        self,
        work: list[Work],
        options: SchedulerOptions,
        on_shard: ShardDone,
        index: Callable[[], tuple[list[str], list[str]]],
        progress: bool,
        log: Callable[[str], None] = print,
        worker: type = ModelWorker,
        failure_row: FailureRow = raw_failure_row,
    ) -> None:
        """`worker`: the actor class, made with a `Work.setup`, with `ready`, `peak_rss_mb` and a
        `run_shard(shard, skip, attempt)` generator of rows; `failure_row` makes its kind of row
        for the utterances it could not do."""
        import ray

        self.ray = ray
        self.options, self.on_shard, self.index, self.log = options, on_shard, index, log
        self.failure_row = failure_row
        self.work = {w.cell.label: w for w in work}
        self.pending = {w.cell.label: deque(Task(s) for s in w.shards) for w in work}
        self.remaining = {w.cell.label: sum(s.stop - s.start for s in w.shards) for w in work}
        self.seconds_per_utt: dict[str, float] = {}
        self.workers: dict[Any, Worker] = {}
        self.failures: list[dict[str, Any]] = []
        self.finished_workers: list[dict[str, Any]] = []
        self.nodes = Nodes(options.threads, options.slots, log)
        self.remote = ray.remote(worker)
        self.progress = progress
        self.bars = self._bars(progress)
        self.last_line = time.monotonic()

    def runnable_here(self, work: Work) -> str | None:
        """Why no node of this cluster may run `work`, or None."""
        return self.nodes.unrunnable(work.resource, self.options.emulate)

    # -- the loop --------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
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
        now = time.monotonic()
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
                if node := self.nodes.place(self.work[label].resource, wanted):
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

    def _start(self, label: str, node: Any) -> None:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        work = self.work[label]
        resources = self.nodes.take(node, work.resource)
        actor = self.remote.options(
            num_cpus=self.options.threads,
            resources=resources,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node.node_id, soft=False),
        ).remote(work.setup)
        now = time.monotonic()
        self.workers[actor] = Worker(
            work, node.node_id, now, ready=actor.ready.remote(), last_seen=now, resources=resources
        )

    def _step(self) -> None:
        waiting = {}
        for actor, w in self.workers.items():
            ref = w.ready if w.ready is not None else w.stream
            if ref is not None:
                waiting[ref] = actor
        if not waiting:
            time.sleep(0.2)  # only back-off timers are running
            return
        done, _ = self.ray.wait(list(waiting), num_returns=1, timeout=1.0)
        for ref in done:
            actor = waiting[ref]
            worker = self.workers[actor]
            if worker.ready is not None:
                self._on_ready(actor, worker)
            else:
                self._on_row(actor, worker)

    def _on_ready(self, actor: Any, worker: Worker) -> None:
        ray = self.ray
        try:
            worker.info = ray.get(worker.ready)
        except ray.exceptions.RayActorError as exc:
            worker.ready = None
            if exc.actor_init_failed:  # the model cannot be loaded: retrying would fail the same way
                self._end(actor)
                self._give_up(worker.work.cell.label, Status.WORKER_FAILED, worker_error(exc))
            else:
                self._died(actor, worker, exc)
            return
        worker.ready, worker.last_seen = None, time.monotonic()
        # from the request to a loaded, warmed model: process start and imports too, not only `load_s`
        worker.info["ready_s"] = round(worker.last_seen - worker.started, 2)
        self._next_task(actor, worker)

    def _next_task(self, actor: Any, worker: Worker) -> None:
        queue = self.pending[worker.work.cell.label]
        now = time.monotonic()
        if not queue or queue[0].not_before > now:
            self._end(actor, graceful=True)  # its slot goes to the model with the most work left
            return
        task = queue.popleft()
        worker.task, worker.last_seen = task, now
        worker.stream = actor.run_shard.remote(task.shard, len(task.rows), task.attempt)

    def _on_row(self, actor: Any, worker: Worker) -> None:
        ray = self.ray
        task = worker.task
        assert task is not None
        try:
            ref = next(worker.stream)
        except StopIteration:
            self._shard_done(actor, worker)
            return
        except ray.exceptions.RayActorError as exc:
            self._died(actor, worker, exc)
            return
        try:
            values = ray.get(ref)
        except ray.exceptions.RayActorError as exc:
            self._died(actor, worker, exc)
            return
        except ray.exceptions.RayTaskError as exc:  # a bug in the worker's loop: not a dead process
            self._end(actor)
            self._fail_task(worker.work.cell.label, task, Status.WORKER_FAILED, worker_error(exc))
            return
        now = time.monotonic()
        label = worker.work.cell.label
        took = now - worker.last_seen
        worker.busy_s += took
        self.seconds_per_utt[label] = 0.8 * self.seconds_per_utt.get(label, took) + 0.2 * took
        worker.last_seen = now
        task.rows.append(values)
        self.remaining[label] -= 1
        if label in self.bars:
            self.bars[label].update(1)

    def _shard_done(self, actor: Any, worker: Worker) -> None:
        task = worker.task
        assert task is not None
        worker.shards += 1
        self.nodes.shard_done(worker.node_id)
        self.on_shard(worker.work.cell, task.shard, task.rows)
        worker.task = worker.stream = None
        self._next_task(actor, worker)

    def _died(self, actor: Any, worker: Worker, exc: BaseException) -> None:
        """A worker process (or its node) died: its shard's remaining utterances go back in the queue."""
        label, reason = worker.work.cell.label, worker_error(exc)
        host = self.nodes.failed(worker.node_id)
        self.failures.append({"model": label, "node": host, "node_id": worker.node_id, "reason": reason, "at": _now()})
        task = worker.task
        self._end(actor)
        if task is None:  # died while loading: the model may still load elsewhere
            self._retry_load(label, reason)
            return
        task.attempt += 1
        if task.attempt >= self.options.max_attempts:
            self._fail_task(label, task, Status.WORKER_FAILED, f"{reason} (after {task.attempt} attempts)")
            return
        task.not_before = time.monotonic() + 2.0**task.attempt
        self.pending[label].appendleft(task)

    def _retry_load(self, label: str, reason: str) -> None:
        deaths = sum(1 for f in self.failures if f["model"] == label)
        if deaths >= self.options.max_attempts:
            self._give_up(label, Status.WORKER_FAILED, f"{reason} (after {deaths} attempts)")

    def _reap_stalled(self) -> None:
        now = time.monotonic()
        for actor, worker in list(self.workers.items()):
            if now - worker.last_seen > self.options.stall_timeout_s:
                what = "loading its model" if worker.ready is not None else "on one utterance"
                self.log(f"{worker.work.cell.label}: a worker spent over {self.options.stall_timeout_s:.0f} s {what}")
                self.ray.kill(actor)
                self._died(actor, worker, TimeoutError(f"no progress for {self.options.stall_timeout_s:.0f} s {what}"))

    def _end(self, actor: Any, graceful: bool = False) -> None:
        worker = self.workers.pop(actor, None)
        if worker is None:
            return
        if graceful:  # its peak memory over the whole run, not only at load
            try:
                worker.info["rss_mb"] = self.ray.get(actor.peak_rss_mb.remote(), timeout=10)
            except (self.ray.exceptions.RayError, TimeoutError):
                pass  # the figure taken at load stays
        self.ray.kill(actor)
        self.nodes.release(worker.node_id, worker.resources, worker.busy_s)
        self.finished_workers.append(
            {
                "model": worker.work.cell.label,
                "node": worker.info.get("node") or self.nodes.host(worker.node_id),
                **{k: worker.info[k] for k in ("load_s", "ready_s", "rss_mb") if k in worker.info},
                "shards": worker.shards,
                "busy_s": round(worker.busy_s, 2),
                "alive_s": round(time.monotonic() - worker.started, 2),
            }
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
        now = time.monotonic()
        if not self.progress or self.bars or now - self.last_line < PROGRESS_EVERY_S:
            return
        self.last_line = now
        done = ", ".join(f"{label} {self.remaining[label]} left" for label in self.work)
        nodes = len({w.node_id for w in self.workers.values()})
        print(f"progress: {done}; {len(self.workers)} workers on {nodes} nodes", file=sys.stderr, flush=True)

    def report(self) -> dict[str, Any]:
        """For run.json: per node its resources, shards, failures and busy time; per worker its model
        load time, peak memory and work."""
        return {
            "nodes": self.nodes.report(),
            "workers": self.finished_workers,
            "failures": self.failures,
        }


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
