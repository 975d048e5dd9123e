"""Batched short-form decoding against one utterance at a time, per runner that batches: what
`decoding.batch_size` buys, and that it changes no token.

For each size and each runner that batches, on the same real utterances (the first of
data/librispeech-eval that fit one window), one thread (torch's, and the runtime's own): the
seconds to decode them all one at a time (`short_form_decode`), then through
`short_form_decode_batch` at each batch size; each figure's speed-up over one at a time, and
whether every utterance's tokens, decoder steps and language equal its one-at-a-time ones.
Seconds are the process's CPU time (one thread: the work done, whatever else the machine runs);
the wall-clock seconds are printed beside them. Each runner decodes one utterance, untimed, first
(first-call allocations).

    python benchmarks/batching.py [--sizes tiny.en,base] [--targets reference,transformers,...]
                                  [--utterances 32] [--batches 2,4,8,16] [--models DIR]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HARNESS_WEIGHTS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "librispeech-eval"
TARGETS = ("reference", "transformers", "ctranslate2", "onnx")


def utterances(n: int, dims) -> list:
    from harness.core.decoding import too_long
    from harness.job.spec import DatasetSpec
    from harness.run.dataset import Shard, count_rows, read_shard

    spec = DatasetSpec(path=DATA)
    every = read_shard(spec, Shard(0, 0, count_rows(spec)))
    short = [u for u in every if too_long(u.audio, dims) is None]
    if len(short) < n:
        raise SystemExit(f"{DATA} has {len(short)} utterances of one window, not {n}")
    return short[:n]


def facts(d) -> tuple:
    """What batching must not change: tokens, decoder steps, language."""
    return d.tokens, d.n_steps, d.language


def timed(decode) -> tuple[list, float, float]:
    """`decode()`'s transcripts, its CPU seconds and its wall-clock seconds."""
    cpu, wall = time.process_time(), time.perf_counter()
    out = decode()
    return out, time.process_time() - cpu, time.perf_counter() - wall


def measure(size: str, target: str, quant: str, n: int, batches: list[int], models: Path) -> list[list]:
    """One table row per way of decoding: one at a time, then each batch size."""
    from converters.registry import get_target
    from converters.store import ensure
    from harness.core.decoding import DecodingOptions, Dims, short_form_decode, short_form_decode_batch
    from harness.core.weights import resolve_checkpoint

    artifact = ensure(resolve_checkpoint(size), size, target, quant, models)[0]
    runner = get_target(target).runner(artifact, 1)
    dims = Dims.of(artifact.manifest["dims"])
    utts = utterances(n, dims)
    audios = [u.audio for u in utts]
    short_form_decode(runner, audios[0], dims, DecodingOptions())  # warm-up
    alone, cpu1, wall1 = timed(lambda: [short_form_decode(runner, a, dims, DecodingOptions()) for a in audios])
    rows = [[size, f"{target} {quant}", 1, round(cpu1, 1), 1.0, round(wall1, 1), "-", sum(d.n_steps for d in alone)]]
    for b in batches:
        options = [DecodingOptions(batch_size=b)] * n
        out, cpu, wall = timed(lambda options=options: short_form_decode_batch(runner, audios, dims, options))
        same = sum(facts(d) == facts(a) for d, a in zip(out, alone, strict=True))
        rows.append([size, f"{target} {quant}", b, round(cpu, 1), round(cpu1 / cpu, 2), round(wall, 1), f"{same}/{n}",
                     sum(d.n_steps for d in out)])  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="tiny.en,base")
    parser.add_argument("--targets", default=",".join(TARGETS), help="TARGET or TARGET:QUANT, comma-separated")
    parser.add_argument("--utterances", type=int, default=32)
    parser.add_argument("--batches", default="2,4,8,16")
    parser.add_argument("--models", type=Path, default=ROOT / "models")
    args = parser.parse_args()

    import torch
    from tabulate import tabulate

    torch.set_num_threads(1)  # what a worker runs with (harness.results.timing)
    batches = [int(b) for b in args.batches.split(",")]
    headers = ["size", "runner", "batch", "cpu_s", "speed-up", "wall_s", "tokens_equal", "steps"]
    rows = []
    for size in args.sizes.split(","):
        for spec in args.targets.split(","):
            target, _, quant = spec.partition(":")
            rows += measure(size, target, quant or "fp32", args.utterances, batches, args.models)
            print(tabulate(rows[-len(batches) - 1 :], headers, tablefmt="github"), flush=True)
    print(f"\n{args.utterances} utterances, 1 thread; speed-up: one at a time's CPU s / this row's")
    print(tabulate(rows, headers, tablefmt="github"))


if __name__ == "__main__":
    main()
