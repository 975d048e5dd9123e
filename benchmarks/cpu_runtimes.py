"""The CPU runtimes side by side: ExecuTorch (XNNPACK) fp32 and int8 against the PyTorch reference,
LiteRT and the other CPU engines, on the same utterances at the same threads.

Per runner, one utterance decoded untimed first (first-call allocations), then every utterance
one at a time (`short_form_decode`, greedy, no timestamps): median encoder ms, decoder ms per
step (Σ decode ms / Σ steps), the process CPU seconds of the whole pass (the work done, whatever
else the machine runs), corpus WER (jiwer over openai-whisper's English normaliser, Σ errors /
Σ words) and the share of utterances whose tokens equal the reference's. Speed columns are
ratios to the reference's in the same run.

Targets (issue 19): ExecuTorch fp32 within 1.1x of the fastest fp32 CPU runtime here (encoder and
decoder ms/step); ExecuTorch int8 >= 1.4x the reference (encoder + decoder time) with WER within
0.3 points of it.

    python benchmarks/cpu_runtimes.py [--size tiny.en] [--utterances 20] [--threads 1]
                                      [--runners reference:fp32,executorch:fp32,...] [--models DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from batching import utterances  # the first utterances of one window (run as a script: benchmarks/ on the path)

os.environ.setdefault("HARNESS_WEIGHTS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
RUNNERS = (
    "reference:fp32",
    "executorch:fp32",
    "executorch:int8",
    "tflite:fp32",
    "tflite:int8-dynamic",
    "onnx:fp32",
    "ctranslate2:fp32",
)


def measure(size: str, target: str, quant: str, n: int, threads: int, models: Path) -> dict:
    """One runner's pass over the utterances: its timings, transcripts and tokens."""
    from converters.registry import get_target
    from converters.store import ensure
    from harness.core.decoding import DecodingOptions, Dims, short_form_decode, tokenizer_for
    from harness.core.weights import resolve_checkpoint

    artifact = ensure(resolve_checkpoint(size), size, target, quant, models)[0]
    if artifact.manifest["status"] != "ok":
        failures = artifact.manifest.get("parity_failures")
        raise SystemExit(f"{size} {target} {quant}: {artifact.manifest['status']} {failures}")
    runner = get_target(target).runner(artifact, threads)
    dims, options = Dims.of(artifact.manifest["dims"]), DecodingOptions()
    utts = utterances(n, dims)
    short_form_decode(runner, utts[0].audio, dims, options)  # warm-up
    cpu = time.process_time()
    decoded = [short_form_decode(runner, u.audio, dims, options) for u in utts]
    cpu = time.process_time() - cpu
    tokenizer = tokenizer_for(dims, options)
    return {
        "runner": f"{target} {quant}",
        "runtime": runner.runtime or artifact.manifest.get("runtime") or get_target(target).runtime,
        "encoder_ms": statistics.median(d.encode_ms for d in decoded),
        "step_ms": sum(d.decode_ms for d in decoded) / sum(d.n_steps for d in decoded),
        "total_ms": sum(d.encode_ms + d.decode_ms for d in decoded),
        "cpu_s": cpu,
        "tokens": [d.tokens for d in decoded],
        "refs": [u.text for u in utts],
        "hyps": [tokenizer.decode(list(d.tokens)).strip() for d in decoded],
    }


def wer(refs: list[str], hyps: list[str]) -> float:
    """Corpus WER in points: jiwer over openai-whisper's English normaliser (Σ errors / Σ words)."""
    import jiwer
    from whisper.normalizers import EnglishTextNormalizer

    normalise = EnglishTextNormalizer()
    return 100 * jiwer.wer([normalise(r) for r in refs], [normalise(h) for h in hyps])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="tiny.en")
    parser.add_argument("--utterances", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runners", default=",".join(RUNNERS), help="TARGET:QUANT, comma-separated; first: the bar")
    parser.add_argument("--models", type=Path, default=ROOT / "models")
    args = parser.parse_args()

    import torch
    from tabulate import tabulate

    torch.set_num_threads(args.threads)
    results = []
    for spec in args.runners.split(","):
        target, _, quant = spec.partition(":")
        results.append(measure(args.size, target, quant or "fp32", args.utterances, args.threads, args.models))
        print(f"{spec}: done", flush=True)
    bar = results[0]
    rows = [
        [
            r["runner"],
            r["runtime"],
            round(r["encoder_ms"], 1),
            round(r["step_ms"], 2),
            round(bar["encoder_ms"] / r["encoder_ms"], 2),
            round(bar["step_ms"] / r["step_ms"], 2),
            round(bar["total_ms"] / r["total_ms"], 2),
            round(r["cpu_s"], 1),
            round(wer(r["refs"], r["hyps"]), 2),
            f"{sum(a == b for a, b in zip(r['tokens'], bar['tokens'], strict=True))}/{len(bar['tokens'])}",
        ]
        for r in results
    ]
    headers = ["runner", "runtime", "enc_ms p50", "dec_ms/step", "enc x", "step x", "total x", "cpu_s", "WER %",
               f"tokens = {bar['runner']}"]  # fmt: skip
    print(f"\n{args.size}, {args.utterances} utterances, {args.threads} thread(s); x: the bar's time / this row's")
    print(tabulate(rows, headers, tablefmt="github"))


if __name__ == "__main__":
    main()
