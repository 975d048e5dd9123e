"""A Ray actor that holds one model and transcribes the shards it is handed.

It reads its shard's audio itself (the driver ships only row ranges) and returns raw rows:
tokens, text, timings, windows and a status. Scoring happens later, on the driver, never here.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from converters.registry import get_target
from converters.store import load_artifact, verify
from harness.core.decoding import DecodingOptions, Dims, Prompt, TooLong, tokenizer_for
from harness.core.errors import one_line
from harness.core.longform import transcribe
from harness.core.status import Status
from harness.core.target import DEFAULT_THREADS, Unavailable
from harness.data import Shard, read_shard
from harness.spec import DatasetSpec
from harness.timing import cpu_description, prepare_worker_threads, warm_up


@dataclass(frozen=True)
class WorkerSetup:
    artifact_path: Path
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
        artifact = load_artifact(setup.artifact_path)
        verify(artifact)  # the checksums, again, on the node that will run it
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
                out = transcribe(self.runner, utt.audio, self.setup.dims, self.setup.decoding)
            except TooLong as exc:  # short form never trims: the row says how to enable long form
                rows.append({**row, "status": Status.ERROR.value, "error": str(exc)})
                continue
            except Unavailable as exc:  # an engine that decodes by itself, given a long-form item
                rows.append({**row, "status": Status.UNAVAILABLE.value, "error": str(exc)})
                continue
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
                    "n_windows": out.n_windows,
                    "decoding": out.mode,
                    "status": Status.OK.value,
                    "error": None,
                }
            )
        return rows
