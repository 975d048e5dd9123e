"""The driver-side actor that serves published artifact files to the nodes, in chunks.

A module of its own with nothing but the standard library: Ray imports an actor's module in the
process it starts for it, and `harness.run.node_cache` pulls in torch and whisper (seconds of imports
every run, before any worker may fetch).
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from collections.abc import Mapping
from typing import Any


class ArtifactServer:
    """Serves published files in chunks from the driver's node; made by `start_server`."""

    def __init__(self) -> None:
        self._fds: dict[tuple[str, str], int] = {}
        self._served: Counter[str] = Counter()
        self._lock = threading.Lock()  # the actor is threaded: nodes fetch at the same time

    def add(self, key: str, paths: Mapping[str, str]) -> None:
        for name, path in paths.items():
            if (key, name) not in self._fds:
                self._fds[key, name] = os.open(path, os.O_RDONLY)

    def read(self, key: str, name: str, offset: int, size: int) -> bytes:
        data = os.pread(self._fds[key, name], size, offset)  # no shared file offset: safe across threads
        with self._lock:
            self._served[key] += len(data)
        return data

    def served(self) -> dict[str, int]:
        """Bytes sent so far per key: what the nodes had to fetch rather than reuse."""
        with self._lock:
            return dict(self._served)


def start_server() -> Any:
    """An ArtifactServer on the driver's own node, where the store's files are. It takes no CPU:
    serving is disk and network, and a CPU here is a worker slot."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(ArtifactServer).options(num_cpus=0, max_concurrency=8, scheduling_strategy=here).remote()
