"""An in-process cluster for the scheduling policy's unit tests: a test double of Ray (it implements
`harness.run.actors.Cluster`), never of the scheduler under test.

Nodes are described by hand. A worker is made in this process from the worker class the scheduler
is given, and runs its real `run_shard`; a `Crash` it raises (in its constructor or in its rows)
is the death of its process, any other exception what Ray would report of it. Time is simulated:
a setup may say how long its worker takes to load (`load_s`) and to give each row (`row_s`), inf
for never, and `wait` moves the clock to the next thing that happens, so back-offs and stall
timeouts cost no real time.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from harness.core.errors import one_line
from harness.run.actors import Actor, LoadFailed, NodeSeen, S, ShardFailed, WorkerClass, WorkerDied
from harness.run.dataset import Shard


class Crash(Exception):
    """Raised by a test worker to die as a killed process does."""


@dataclass(frozen=True)
class Started:
    """A worker the scheduler started: where, for which model, holding what, when."""

    node_id: str
    model: str
    cpus: int
    resources: dict[str, float]
    at: float


class FakeCluster:
    def __init__(self, nodes: Mapping[str, Mapping[str, float]]) -> None:
        """`nodes`: node id → its resources (`{"CPU": 2}`, `{"CPU": 1, "mediatek": 1}`)."""
        self.alive = [NodeSeen(node_id, f"host-{node_id}", dict(r)) for node_id, r in nodes.items()]
        self.now = 0.0
        self.started: list[Started] = []
        self.actors: list[FakeActor] = []

    def nodes(self) -> list[NodeSeen]:
        return list(self.alive)

    def start(self, worker: WorkerClass[S], setup: S, node_id: str, cpus: int, resources: Mapping[str, float]) -> Actor:
        node = next(n for n in self.alive if n.node_id == node_id)
        held = [s for s, a in zip(self.started, self.actors, strict=True) if s.node_id == node_id and not a.killed]
        # what Ray would refuse (or queue for ever): more CPUs or board units than the node has
        assert sum(s.cpus for s in held) + cpus <= node.resources.get("CPU", 0), f"{node_id}: no CPU left"
        for r, n in resources.items():
            assert sum(s.resources.get(r, 0) for s in held) + n <= node.resources.get(r, 0), f"{node_id}: no {r}"
        self.started.append(Started(node_id, setup.cell.label, cpus, dict(resources), self.now))
        actor = FakeActor(self, worker, setup)
        self.actors.append(actor)
        return actor

    def wait(self, actors: Sequence[Actor], timeout: float) -> list[Actor]:
        waiting = [a for a in actors if isinstance(a, FakeActor)]
        first = min(waiting, key=lambda a: a.due, default=None)
        if first is None or first.due > self.now + timeout:
            self.now += timeout
            return []
        self.now = max(self.now, first.due)
        return [first]

    def time(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class FakeActor:
    def __init__(self, cluster: FakeCluster, worker: WorkerClass[Any], setup: Any) -> None:
        self.cluster, self.killed, self.ended = cluster, False, math.inf
        self.row_s = getattr(setup, "row_s", 0.0)
        self.due = cluster.now + getattr(setup, "load_s", 0.0)  # when it next has something to take
        self.error: Exception | None = None
        try:
            self.worker = worker(setup)
        except Exception as exc:
            self.error = exc
        self.stream: Any = None

    def loaded(self) -> dict[str, Any]:
        assert not self.killed
        self.due = math.inf  # nothing more until it is given a shard
        if isinstance(self.error, Crash):
            raise WorkerDied(f"ActorDiedError: the actor died unexpectedly ({self.error})")
        if self.error is not None:
            raise LoadFailed(one_line(self.error))
        return self.worker.ready()

    def run_shard(self, shard: Shard, skip: int, attempt: int) -> None:
        assert not self.killed
        self.stream = self.worker.run_shard(shard, skip, attempt)
        self.due = self.cluster.now + self.row_s

    def next_row(self) -> dict[str, Any] | None:
        assert not self.killed
        try:
            row = next(self.stream)
        except StopIteration:
            self.due = math.inf
            return None
        except Crash as exc:
            raise WorkerDied(f"ActorDiedError: the actor died unexpectedly ({exc})") from exc
        except Exception as exc:
            raise ShardFailed(one_line(exc)) from exc
        self.due = self.cluster.now + self.row_s
        return row

    def peak_rss_mb(self) -> float | None:
        return self.worker.peak_rss_mb()

    def kill(self) -> None:
        self.killed, self.due, self.ended = True, math.inf, self.cluster.now
