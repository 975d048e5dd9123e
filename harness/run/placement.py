"""The cluster's nodes as the scheduler sees them: slots, board resources, GPUs, failures, placement.

The scheduler places every worker itself (Ray's node affinity, hard), so it knows at once when no
node can run a model, and can set aside a node whose workers keep dying. A node's GPUs (Ray's `GPU`
resource) are offered to the models whose runners batch: such a worker goes where a GPU is free,
holds one (Ray hands it that device) and decodes on it; other workers never hold a GPU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from harness.results.run_info import NodeReport
from harness.run.actors import GPU, Cluster

NODE_FAILURES_TO_SET_ASIDE = 2
NODES_EVERY_S = 10.0  # how often the cluster's nodes are looked at again (joins, departures)


@dataclass
class NodeInfo:
    node_id: str
    host: str
    resources: dict[str, float]
    slots: int
    used: int = 0
    boards_used: dict[str, int] = field(default_factory=dict)
    failures: int = 0
    set_aside: bool = False
    shards: int = 0
    busy_s: float = 0.0

    @property
    def usable(self) -> bool:
        return not self.set_aside and self.slots > 0

    def board_free(self, resource: str) -> bool:
        return self.boards_used.get(resource, 0) < self.resources.get(resource, 0)

    def boards_free(self, resources: set[str]) -> int:
        """Units of `resources` on this node no worker holds."""
        return sum(int(self.resources.get(r, 0)) - self.boards_used.get(r, 0) for r in resources)


class Nodes:
    def __init__(self, cluster: Cluster, threads: int, slots: int | None, log: Callable[[str], None]) -> None:
        self.cluster, self.threads, self.cap, self.log = cluster, threads, slots, log
        self.nodes: dict[str, NodeInfo] = {}
        self.seen = 0.0
        self.refresh()

    def refresh(self) -> None:
        """Nodes that left are set aside; nodes that joined offer their slots."""
        alive = {
            n.node_id: NodeInfo(n.node_id, n.host, dict(n.resources), int(n.resources.get("CPU", 0)) // self.threads)
            for n in self.cluster.nodes()
        }
        for node_id, node in self.nodes.items():
            if node_id not in alive and not node.set_aside:
                node.set_aside = True
                self.log(f"node {node.host}: left the cluster")
        for node_id, node in alive.items():
            self.nodes.setdefault(node_id, node)
        self.seen = self.cluster.time()

    def refresh_if_due(self) -> None:
        if self.cluster.time() - self.seen > NODES_EVERY_S:
            self.refresh()

    def free_slots(self, workers: int) -> int:
        free = sum(max(n.slots - n.used, 0) for n in self.nodes.values() if not n.set_aside)
        return free if self.cap is None else min(free, self.cap - workers)

    def has_board(self, resource: str) -> bool:
        return any(n.resources.get(resource, 0) > 0 for n in self.nodes.values() if not n.set_aside)

    def unrunnable(self, resource: str | None, emulate: bool) -> str | None:
        """Why no node may run a worker needing `resource` (None: any CPU), or None."""
        if resource and not self.has_board(resource) and not emulate:
            return (
                f"no node advertises the '{resource}' resource (a board joins with "
                f"ray start --resources='{{\"{resource}\": 1}}'); cluster.emulate: true runs it on CPUs"
            )
        if not any(n.usable for n in self.nodes.values()):
            return f"no node of the cluster has a CPU for a {self.threads}-thread worker"
        return None

    def place(self, resource: str | None, wanted: set[str] = frozenset(), gpu: bool = False) -> NodeInfo | None:
        """The freest node a new worker may go to: a board's node when it needs one and one exists;
        for a worker that can use a GPU (`gpu`), a node with a GPU free first. Slots a board node
        needs for the boards of `wanted` resources (models waiting for one) are kept for them, so a
        CPU model cannot take the only slot of a board a board model waits for."""
        candidates = [n for n in self.nodes.values() if not n.set_aside and n.used < n.slots]
        if resource and self.has_board(resource):
            candidates = [n for n in candidates if n.board_free(resource)]
            return max(candidates, key=lambda n: n.slots - n.used, default=None)
        spare = {n.node_id: n.slots - n.used - n.boards_free(wanted) for n in candidates}
        fits = [n for n in candidates if spare[n.node_id] > 0]
        if gpu and (with_gpu := [n for n in fits if n.board_free(GPU)]):
            fits = with_gpu
        return max(fits, key=lambda n: spare[n.node_id], default=None)

    def take(self, node: NodeInfo, resource: str | None, gpu: bool = False) -> dict[str, float]:
        """Book a slot (and a board, or a GPU for a worker that can use one) on `node`; the Ray
        resources the worker asks for."""
        node.used += 1
        held = {}
        if resource and node.resources.get(resource, 0) > 0:
            held[resource] = 1
        elif gpu and node.board_free(GPU):
            held[GPU] = 1
        for key in held:
            node.boards_used[key] = node.boards_used.get(key, 0) + 1
        return held

    def release(self, node_id: str, resources: dict[str, float], busy_s: float) -> None:
        node = self.nodes.get(node_id)
        if node is None:
            return
        node.used -= 1
        node.busy_s += busy_s
        for key in resources:
            node.boards_used[key] -= 1

    def failed(self, node_id: str) -> str:
        """Record a worker death on `node_id` (setting the node aside the second time); its host."""
        self.refresh()  # a node that died is the likeliest cause
        node = self.nodes.get(node_id)
        if node is None:
            return node_id
        node.failures += 1
        if node.failures >= NODE_FAILURES_TO_SET_ASIDE and not node.set_aside:
            node.set_aside = True
            name = f"{node.host}/{node.node_id[:8]}"
            self.log(f"node {name}: set aside for the rest of the run after {node.failures} worker deaths")
        return node.host

    def host(self, node_id: str) -> str:
        node = self.nodes.get(node_id)
        return node.host if node else node_id

    def shard_done(self, node_id: str) -> None:
        if node_id in self.nodes:
            self.nodes[node_id].shards += 1

    def report(self) -> tuple[NodeReport, ...]:
        """Per node: its resources, slots, shards, failures and busy time (for run.json)."""
        return tuple(
            NodeReport(
                node=n.host,
                node_id=n.node_id,
                resources=n.resources,
                slots=n.slots,
                shards=n.shards,
                failures=n.failures,
                set_aside=n.set_aside,
                busy_s=round(n.busy_s, 2),
            )
            for n in self.nodes.values()
        )
