"""A Ray actor that holds one model and transcribes the shards it is handed.

It reads its shard's audio itself (the driver ships only row ranges) and returns raw rows:
tokens, text, timings and a status. Scoring happens later, on the driver, never here.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any

from converters.registry import get_target
from harness.core.decoding import DecodingOptions, Dims, Prompt, greedy_decode, tokenizer_for
from harness.core.errors import one_line
from harness.core.status import Status
from harness.core.target import DEFAULT_THREADS
from harness.data import Shard, read_shard
from harness.node_cache import PublishedArtifact, materialise
from harness.spec import DatasetSpec
from harness.timing import cpu_description, prepare_worker_threads, warm_up


@dataclass(frozen=True)
class WorkerSetup:
    artifact: PublishedArtifact  # never a path: the driver's store is not on this node
    dims: Dims
    prompt: Prompt
    decoding: DecodingOptions
    dataset: DatasetSpec
    threads: int = DEFAULT_THREADS


def _ray_node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"


class ModelWorker:
    """Wrapped with ray.remote by the driver; plain class so it is testable without Ray."""

    def __init__(self, setup: WorkerSetup) -> None:
        prepare_worker_threads(setup.threads)
        artifact = materialise(setup.artifact)  # into this node's cache, or reused there: checksums checked
        self.setup = setup
        self.runner = get_target(artifact.target).runner(artifact, setup.threads)
        self.tokenizer = tokenizer_for(setup.dims, setup.decoding)
        self.node = f"{socket.gethostname()}/{_ray_node_id()[:8]}"
        self.cpu = cpu_description()
        warm_up(self.runner, setup.dims, setup.prompt)

    def run_shard(self, shard: Shard) -> list[dict[str, Any]]:
        rows = []
        for utt in read_shard(self.setup.dataset, shard):
            row: dict[str, Any] = {
                "utt_id": utt.utt_id,
                "ref_text": utt.text,
                "audio_s": utt.audio_s,
                "node": self.node,
                "cpu": self.cpu,
            }
            if utt.audio is None:
                rows.append({**row, "status": Status.ERROR.value, "error": utt.error})
                continue
            try:
                out = greedy_decode(self.runner, utt.audio, self.setup.dims, self.setup.prompt)
            except Exception as exc:  # one broken utterance must not sink the run: it becomes a row
                rows.append({**row, "status": Status.ERROR.value, "error": f"decoding failed: {one_line(exc)}"})
                continue
            rows.append(
                {
                    **row,
                    "hyp_tokens": list(out.tokens),
                    "hyp_text": self.tokenizer.decode(list(out.tokens)).strip(),
                    "frontend_ms": out.frontend_ms,
                    "encode_ms": out.encode_ms,
                    "decode_ms": out.decode_ms,
                    "n_steps": out.n_steps,
                    "status": Status.OK.value,
                    "error": None,
                }
            )
        return rows
