"""A Ray actor that holds one model and transcribes the shards it is handed.

It reads its shard's audio itself (the driver ships only row ranges), transcribes it — short
utterances `decoding.batch_size` at a time where the runner batches
(`harness.core.decoding.short_form_decode_batch`), the job's latency sample alone (its times are
its own: `harness.job.spec.LatencySpec`), long form in 30 s windows (`harness.core.longform`) —
scores each row (`harness.results.scoring.score_row`: the text metrics need only the row) and
streams the rows back in the shard's order as they finish (a Ray generator), so a worker that dies
loses at most the batch in progress.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from converters.registry import get_target
from harness.core.decoding import (
    AUTO,
    Decoded,
    DecodingOptions,
    Dims,
    Prompt,
    TooLong,
    english_only_refusal,
    short_form_decode_batch,
    tokenizer_for,
)
from harness.core.errors import one_line
from harness.core.longform import transcribe
from harness.core.status import Status
from harness.core.target import DEFAULT_THREADS, Runner, Unavailable
from harness.job.spec import ModelCell
from harness.results.schema import row
from harness.results.scoring import score_row
from harness.results.timing import cpu_description, prepare_worker_threads, warm_up
from harness.run.dataset import Rows, Shard, Utterance
from harness.run.node_cache import PublishedArtifact, materialise


@dataclass(frozen=True)
class WorkerSetup:
    cell: ModelCell
    artifact: PublishedArtifact  # never a path: the driver's store is not on this node
    dims: Dims
    prompt: Prompt
    decoding: DecodingOptions
    rows: Rows
    threads: int = DEFAULT_THREADS
    timed: frozenset[int] | None = None  # the latency sample's rows (positions), decoded alone; None: every row


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
    """The artifact's runner on this node: fetched into its cache, or reused there (checksums
    checked); on the GPU Ray gave this worker, if it gave one (a runner that batches: placement)."""
    artifact = materialise(published)
    target = get_target(artifact.target)
    device = worker_device()
    runner = target.runner(artifact, threads, device=device) if device != "cpu" else target.runner(artifact, threads)
    # what executes it, said in every row: the runner's choice (a board's NPU), else the artifact's label
    runner.runtime = runner.runtime or artifact.manifest.get("runtime") or target.runtime
    return runner


def worker_device() -> str:
    """Where this worker decodes: "cuda" when Ray gave it a GPU (it sets CUDA_VISIBLE_DEVICES to
    that one, so the process sees it as device 0), else "cpu"."""
    import ray

    return "cuda" if ray.is_initialized() and ray.get_gpu_ids() else "cpu"


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
        setup.rows.open()
        self.load_s = time.perf_counter() - started

    def options_for(self, language: str | None) -> DecodingOptions:
        """The job's decoding options for an utterance: in its dataset language, when the dataset
        names one and the job does not detect."""
        options = self.setup.decoding
        return replace(options, language=language) if language and options.language != AUTO else options

    def run_shard(self, shard: Shard, skip: int = 0, attempt: int = 0) -> Iterator[dict[str, Any]]:
        """One scored row per utterance of `shard`, after the first `skip` (a retry's rows already
        in), in the shard's order. Short utterances outside the latency sample are decoded together,
        `decoding.batch_size` at a time, a batch gathering them across the timed and long rows
        between them (the sample is spread over the shard: batching only neighbours would leave
        batches of one or two); every other utterance alone, when its turn comes. Rows read ahead
        of their turn wait (at most a shard's) until the rows before them are out."""
        where = {"node": self.node, "cpu": self.cpu, "runtime": self.runner.runtime, "attempt": attempt}
        waiting: deque[tuple[int, Utterance, DecodingOptions, bool]] = deque()  # read, not yet out
        batch: list[tuple[int, Utterance, DecodingOptions]] = []  # batchable rows waiting for their call
        done: dict[int, dict[str, Any]] = {}  # rows of batches already decoded, by position

        def ready() -> Iterator[dict[str, Any]]:
            """The rows at the front of `waiting` that can go out now, in order."""
            while waiting:
                position, utt, options, timed = waiting[0]
                if position in done:
                    yield done.pop(position)
                elif any(position == p for p, _, _ in batch):
                    return  # its batch is not full yet
                else:
                    yield score_row(self._decode_alone(utt, options, {**_facts(utt, where), "timed": timed}))
                waiting.popleft()

        start = shard.start + skip
        for position, utt in enumerate(self.setup.rows.read(Shard(shard.index, start, shard.stop)), start):
            options = self.options_for(utt.language)
            timed = self.setup.timed is None or position in self.setup.timed
            waiting.append((position, utt, options, timed))
            if not timed and self._batchable(utt, options):
                batch.append((position, utt, options))
                if len(batch) == self.setup.decoding.batch_size:
                    done.update(self._decode_batch(batch, where))
                    batch = []
            yield from ready()
        done.update(self._decode_batch(batch, where))
        batch = []
        yield from ready()

    def _batchable(self, utt: Utterance, options: DecodingOptions) -> bool:
        """Whether `utt` may share decoder calls: audio, one short-form window, a task the model takes."""
        dims = self.setup.dims
        return (
            utt.audio is not None
            and not options.long_form_for(utt.audio.size)
            and utt.audio.size <= dims.window_samples
            and (dims.multilingual or english_only_refusal(options) is None)
        )

    def _decode_batch(
        self, batch: list[tuple[int, Utterance, DecodingOptions]], where: dict
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        """The scored rows of a batch decoded together, by position; should the batch fail, each
        utterance alone, so that one bad utterance fails only its own row."""
        if not batch:
            return
        try:
            outs = short_form_decode_batch(
                self.runner, [u.audio for _, u, _ in batch], self.setup.dims, [o for _, _, o in batch]
            )
        except Exception:
            for position, utt, options in batch:
                yield position, score_row(self._decode_alone(utt, options, _facts(utt, where)))
            return
        for (position, utt, options), out in zip(batch, outs, strict=True):
            yield position, score_row(self._transcript(utt, options, out, _facts(utt, where)))

    def _transcript(self, utt: Utterance, options: DecodingOptions, out: Decoded, facts: dict) -> dict[str, Any]:
        return row(
            self.setup.cell,
            utt.utt_id,
            utt.text,
            Status.OK,
            audio_s=utt.audio_s,
            hyp_tokens=list(out.tokens),
            hyp_text=self.tokenizer.decode(list(out.tokens)).strip(),
            ref_language=utt.language,
            task=options.task,
            **out.costs(),
            **facts,
        )

    def _decode_alone(self, utt: Utterance, options: DecodingOptions, facts: dict) -> dict[str, Any]:
        """The raw row of one utterance decoded by itself (short or long form), or of why it has none."""
        cell, dims = self.setup.cell, self.setup.dims
        failed = {**facts, "ref_language": utt.language, "task": options.task}
        if utt.audio is None:
            return row(cell, utt.utt_id, utt.text, Status.ERROR, utt.error, **failed)
        if not dims.multilingual and (refused := english_only_refusal(options)):
            why = f"{cell.size} is English-only: it cannot take {refused}"
            return row(cell, utt.utt_id, utt.text, Status.UNAVAILABLE, why, **failed)
        try:
            out = transcribe(self.runner, utt.audio, dims, options)
        except TooLong as exc:  # short form never trims: the row says how to enable long form
            return row(cell, utt.utt_id, utt.text, Status.ERROR, str(exc), **failed)
        except Unavailable as exc:  # an engine that decodes by itself, given a long-form item
            return row(cell, utt.utt_id, utt.text, Status.UNAVAILABLE, str(exc), **failed)
        except Exception as exc:  # one broken utterance must not sink the run: it becomes a row
            return row(cell, utt.utt_id, utt.text, Status.ERROR, f"decoding failed: {one_line(exc)}", **failed)
        return self._transcript(utt, options, out, facts)


def _facts(utt: Utterance, where: dict[str, Any]) -> dict[str, Any]:
    """A row's facts of where it ran and which dataset and groups it belongs to."""
    return {**where, "dataset": utt.dataset, "meta": json.dumps(utt.meta, sort_keys=True) if utt.meta else None}


def latency_sample(sizes: tuple[int, ...], sample: int | None, seed: int) -> frozenset[int] | None:
    """The rows (positions among the job's, datasets one after another of `sizes` rows) that every
    model decodes alone and times: `sample` of each dataset drawn with `seed`, the same for every
    model and every run of the job; None (every row) when `sample` is None or covers them all."""
    if sample is None or all(n <= sample for n in sizes):
        return None
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    offset = 0
    for n in sizes:
        picked = range(n) if n <= sample else rng.choice(n, size=sample, replace=False)
        chosen += [offset + int(i) for i in picked]
        offset += n
    return frozenset(chosen)
