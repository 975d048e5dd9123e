"""A Ray actor that holds one model and transcribes the shards it is handed, one row at a time.

It reads its shard's audio itself (the driver ships only row ranges), transcribes it (long form
in 30 s windows where the job asks: `harness.core.longform`) and streams raw rows back as each
utterance finishes (a Ray generator), so a worker that dies loses at most the utterance in
progress. Scoring happens later, on the driver, never here.
"""

from __future__ import annotations

import os
import resource
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

from converters.registry import get_target
from harness.core.decoding import AUTO, DecodingOptions, Dims, Prompt, TooLong, english_only_refusal, tokenizer_for
from harness.core.errors import one_line
from harness.core.longform import transcribe
from harness.core.status import Status
from harness.core.target import DEFAULT_THREADS, Runner, Unavailable
from harness.job.spec import DatasetSpec, ModelCell
from harness.results.schema import row
from harness.results.timing import cpu_description, prepare_worker_threads, warm_up
from harness.run.dataset import Shard, open_dataset, read_shard
from harness.run.node_cache import PublishedArtifact, materialise


@dataclass(frozen=True)
class WorkerSetup:
    cell: ModelCell
    artifact: PublishedArtifact  # never a path: the driver's store is not on this node
    dims: Dims
    prompt: Prompt
    decoding: DecodingOptions
    dataset: DatasetSpec
    threads: int = DEFAULT_THREADS


def _ray_node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"


def peak_rss_mb() -> float:
    """This process's peak resident memory (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if os.uname().sysname == "Darwin" else 2**10)


class Loaded:
    """What the scheduler asks of every kind of worker once it has loaded its models (with
    `run_shard`: `harness.run.actors.ShardWorker`)."""

    node: str  # host/Ray node
    load_s: float  # seconds spent loading

    def ready(self) -> dict[str, Any]:
        """What the driver records of a loaded worker (model load cost, memory, where it runs)."""
        return {"node": self.node, "pid": os.getpid(), "load_s": round(self.load_s, 2), "rss_mb": round(peak_rss_mb())}

    def peak_rss_mb(self) -> float:
        return round(peak_rss_mb())


def load_runner(published: PublishedArtifact, threads: int) -> Runner:
    """The artifact's runner on this node: fetched into its cache, or reused there (checksums checked)."""
    artifact = materialise(published)
    target = get_target(artifact.target)
    runner = target.runner(artifact, threads)
    # what executes it, said in every row: the runner's choice (a board's NPU), else the artifact's label
    runner.runtime = runner.runtime or artifact.manifest.get("runtime") or target.runtime
    return runner


def node_name() -> str:
    return f"{socket.gethostname()}/{_ray_node_id()[:8]}"


class ModelWorker(Loaded):
    """The transcription pass's worker; a plain class, made an actor by the scheduler's cluster
    (`harness.run.actors`), so it is testable without Ray."""

    def __init__(self, setup: WorkerSetup) -> None:
        started = time.perf_counter()
        prepare_worker_threads(setup.threads)
        self.setup = setup
        self.runner = load_runner(setup.artifact, setup.threads)
        self.tokenizer = tokenizer_for(setup.dims, setup.decoding)
        self.node = node_name()
        self.cpu = cpu_description()
        warm_up(self.runner, setup.dims, setup.prompt)
        open_dataset(setup.dataset)
        self.load_s = time.perf_counter() - started

    def options_for(self, language: str | None) -> DecodingOptions:
        """The job's decoding options for an utterance: in its dataset language, when the dataset
        names one and the job does not detect."""
        options = self.setup.decoding
        return replace(options, language=language) if language and options.language != AUTO else options

    def run_shard(self, shard: Shard, skip: int = 0, attempt: int = 0) -> Iterator[dict[str, Any]]:
        """One row per utterance of `shard`, after the first `skip` (a retry's rows already in)."""
        cell, dims = self.setup.cell, self.setup.dims
        for utt in read_shard(self.setup.dataset, Shard(shard.index, shard.start + skip, shard.stop)):
            options = self.options_for(utt.language)
            where = {"node": self.node, "cpu": self.cpu, "runtime": self.runner.runtime, "attempt": attempt}
            where.update(ref_language=utt.language, task=options.task)
            if utt.audio is None:
                yield row(cell, utt.utt_id, utt.text, Status.ERROR, utt.error, **where)
                continue
            if not dims.multilingual and (refused := english_only_refusal(options)):
                why = f"{cell.size} is English-only: it cannot take {refused}"
                yield row(cell, utt.utt_id, utt.text, Status.UNAVAILABLE, why, **where)
                continue
            try:
                out = transcribe(self.runner, utt.audio, dims, options)
            except TooLong as exc:  # short form never trims: the row says how to enable long form
                yield row(cell, utt.utt_id, utt.text, Status.ERROR, str(exc), **where)
                continue
            except Unavailable as exc:  # an engine that decodes by itself, given a long-form item
                yield row(cell, utt.utt_id, utt.text, Status.UNAVAILABLE, str(exc), **where)
                continue
            except Exception as exc:  # one broken utterance must not sink the run: it becomes a row
                yield row(cell, utt.utt_id, utt.text, Status.ERROR, f"decoding failed: {one_line(exc)}", **where)
                continue
            yield row(
                cell,
                utt.utt_id,
                utt.text,
                Status.OK,
                audio_s=utt.audio_s,
                hyp_tokens=list(out.tokens),
                hyp_text=self.tokenizer.decode(list(out.tokens)).strip(),
                **out.costs(),
                **where,
            )
