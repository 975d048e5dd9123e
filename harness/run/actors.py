"""Workers as the scheduler starts, watches and ends them: the contracts (`Setup`, `ShardWorker`,
`WorkerClass`), the little the scheduler asks of a cluster (`Cluster`, `Actor`), and Ray's
implementation of it (`RayCluster`), the default.

Every Ray call and Ray exception of the scheduling is here, turned into the three ways a worker
fails that the policy tells apart (`WorkerDied`, `LoadFailed`, `ShardFailed`), each with the
worker's own error on one line. So the policy (`harness.run.scheduler`, `harness.run.placement`)
runs the same on an in-process cluster, which is how its tests drive it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from harness.core.errors import one_line
from harness.job.spec import ModelCell
from harness.run.dataset import Shard

GPU = "GPU"  # Ray's resource for a node's GPUs (a worker asks for them as num_gpus)


class Setup(Protocol):
    """What a worker is made with (a WorkerSetup, the analysis's AnalysisSetup): it names its model."""

    @property
    def cell(self) -> ModelCell: ...


S = TypeVar("S", bound=Setup)
S_contra = TypeVar("S_contra", bound=Setup, contravariant=True)


class ShardWorker(Protocol):
    """A worker once made (`harness.run.worker.Loaded` gives the first two): it holds its model(s)."""

    def ready(self) -> dict[str, Any]:
        """What the driver records of it: `node`, `load_s`, `rss_mb`."""
        ...

    def peak_rss_mb(self) -> float: ...

    def run_shard(self, shard: Shard, skip: int = 0, attempt: int = 0) -> Iterator[dict[str, Any]]:
        """One row per utterance of `shard`, after the first `skip` (a retry's rows already in)."""
        ...


class WorkerClass(Protocol[S_contra]):
    """A worker class: made with its setup in a process of its own (plain, so testable without Ray)."""

    def __call__(self, setup: S_contra) -> ShardWorker: ...


@dataclass(frozen=True)
class NodeSeen:
    """An alive node of the cluster."""

    node_id: str
    host: str
    resources: Mapping[str, float]  # CPU, and a board's resource (`mediatek`) where one is attached


class WorkerDied(Exception):
    """The worker's process or its node died (or was ended): its shard may go on elsewhere."""


class LoadFailed(Exception):
    """The worker's constructor raised: loading again would fail the same way."""


class ShardFailed(Exception):
    """The worker's loop raised: a bug, not a dead process; retrying would fail the same way."""


class Actor(Protocol):
    """A started worker as the driver holds it. It is loading until `loaded` answers, then streams
    the rows of the shard it was last given; `Cluster.wait` says when either has something."""

    def loaded(self) -> dict[str, Any]:
        """Its `ready()`; raises LoadFailed or WorkerDied."""
        ...

    def run_shard(self, shard: Shard, skip: int, attempt: int) -> None: ...

    def next_row(self) -> dict[str, Any] | None:
        """Its shard's next row, None once the shard is done; raises WorkerDied or ShardFailed."""
        ...

    def peak_rss_mb(self) -> float | None:
        """Its peak memory, or None when it does not answer in time."""
        ...

    def kill(self) -> None: ...


class Cluster(Protocol):
    """What the scheduler asks of a cluster."""

    def nodes(self) -> list[NodeSeen]:
        """The alive nodes, now."""
        ...

    def start(self, worker: WorkerClass[S], setup: S, node_id: str, cpus: int, resources: Mapping[str, float]) -> Actor:
        """A worker on that node (never another), holding `cpus` CPUs and `resources`."""
        ...

    def wait(self, actors: Sequence[Actor], timeout: float) -> list[Actor]:
        """Those of `actors` with something to take (loaded, or a row or the end of a shard), after
        at most `timeout` seconds."""
        ...

    # The scheduler's back-off and stall timers run on the cluster's clock, so that an
    # in-process cluster can run them in simulated time.
    def time(self) -> float: ...

    def sleep(self, seconds: float) -> None: ...


class RayCluster:
    """The Ray cluster this process joined (`harness.run.cluster.connect`)."""

    def __init__(self) -> None:
        import ray

        self.ray = ray
        self._remote: dict[Any, Any] = {}  # per worker class: made remote once, not per worker

    def nodes(self) -> list[NodeSeen]:
        return [
            NodeSeen(n["NodeID"], n.get("NodeManagerHostname", "?"), dict(n["Resources"]))
            for n in self.ray.nodes()
            if n.get("Alive")
        ]

    def start(self, worker: WorkerClass[S], setup: S, node_id: str, cpus: int, resources: Mapping[str, float]) -> Actor:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        if worker not in self._remote:
            self._remote[worker] = self.ray.remote(worker)
        others = {k: v for k, v in resources.items() if k != GPU}  # Ray takes GPUs as num_gpus only
        handle = (
            self._remote[worker]
            .options(
                num_cpus=cpus,
                num_gpus=resources.get(GPU, 0),
                resources=others,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
            )
            .remote(setup)
        )
        return _RayActor(self.ray, handle)

    def wait(self, actors: Sequence[Actor], timeout: float) -> list[Actor]:
        waiting = {a.pending: a for a in actors if isinstance(a, _RayActor) and a.pending is not None}
        if not waiting:
            return []
        done, _ = self.ray.wait(list(waiting), num_returns=1, timeout=timeout)
        return [waiting[ref] for ref in done]

    def time(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class _RayActor:
    def __init__(self, ray: Any, handle: Any) -> None:
        self.ray, self.handle = ray, handle
        self._ready: Any = handle.ready.remote()
        self._stream: Any = None  # the ObjectRefGenerator of the running shard

    @property
    def pending(self) -> Any:
        """What `ray.wait` watches: the `ready` call while loading, then the shard's stream."""
        return self._ready if self._ready is not None else self._stream

    def loaded(self) -> dict[str, Any]:
        ref, self._ready = self._ready, None  # answered once; from now on it streams shards
        try:
            return self.ray.get(ref)
        except self.ray.exceptions.RayActorError as exc:
            if exc.actor_init_failed:
                raise LoadFailed(worker_error(exc)) from exc
            raise WorkerDied(worker_error(exc)) from exc

    def run_shard(self, shard: Shard, skip: int, attempt: int) -> None:
        self._stream = self.handle.run_shard.remote(shard, skip, attempt)

    def next_row(self) -> dict[str, Any] | None:
        ray = self.ray
        try:
            ref = next(self._stream)
            return ray.get(ref)
        except StopIteration:
            self._stream = None
            return None
        except ray.exceptions.RayActorError as exc:
            raise WorkerDied(worker_error(exc)) from exc
        except ray.exceptions.RayTaskError as exc:
            raise ShardFailed(worker_error(exc)) from exc

    def peak_rss_mb(self) -> float | None:
        try:
            return self.ray.get(self.handle.peak_rss_mb.remote(), timeout=10)
        except (self.ray.exceptions.RayError, TimeoutError):
            return None

    def kill(self) -> None:
        self.ray.kill(self.handle)


def worker_error(exc: BaseException) -> str:
    """The worker's own exception as `Type: first line`; Ray wraps it in pages of traceback (for a
    failed `__init__` only as text), or says in its first line why a process died."""
    import ray

    if isinstance(exc, ray.exceptions.RayTaskError) and exc.cause is not None:
        return one_line(exc.cause)
    if not isinstance(exc, ray.exceptions.RayError):
        return one_line(exc)
    lines = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).splitlines()
    frames = [i for i, line in enumerate(lines) if line.lstrip().startswith('File "')]
    after = [line for line in lines[frames[-1] + 1 :] if line[:1].strip()] if frames else []
    if after:  # the traceback's last line names the exception: `module.Type: message`
        name, _, message = after[0].partition(": ")
        return f"{name.rsplit('.', 1)[-1]}: {message}".strip()
    return lines[0].strip() if lines else type(exc).__name__
