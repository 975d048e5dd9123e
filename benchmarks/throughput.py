"""Throughput of the harness against plain openai-whisper loops on the same cores, side by side.

Figures (printed, never asserted; the machine's load moves them, their ratios less so):
- A: one openai-whisper greedy loop with torch on all cores' threads (`--threads`, default 2);
- B: `--threads` one-thread loops in parallel processes, each on its share of the utterances
  (what the cores give torch when nothing else is in the way): decoding only, and again from
  each process's start (imports, model load, warm-up);
- C: the harness, reference-only job at its defaults (one slot per CPU, one thread each, shards
  of the default size, `decoding.batch_size` utterances per decoder call, the latency sample
  decoded alone): its workers from ready to their last row (against B's decoding), from their
  start (against B's from start), and the whole run with Ray's start-up and scoring (against B
  from start: whole processes both); and whether its tokens are B's, utterance by utterance;
- D: the harness, reference + torchscript-mtk: makespan against the ideal Σ busy time / slots
  plus start-up (the driver's phases before and after scheduling, a worker's start).
Targets: the whole run C >= 1.25 x B from start (issue 17: batching) with identical tokens, and
D's makespan <= 1.1 x ideal + start-up.

    python benchmarks/throughput.py --size base --utterances 70
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HARNESS_WEIGHTS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "librispeech-eval"


def _audio(n: int) -> tuple[list, list]:
    from harness.job.spec import DatasetSpec
    from harness.run.dataset import Shard, count_rows, read_shard

    spec = DatasetSpec(path=DATA)
    utts = read_shard(spec, Shard(0, 0, min(n, count_rows(spec))))
    return [u.utt_id for u in utts], [u.audio for u in utts]


def _loop(size: str, threads: int, part: int, parts: int, n: int, out: mp.Queue) -> None:
    """Plain openai-whisper: whisper.decode on each utterance's log-mel, greedy, no timestamps."""
    process_start = time.perf_counter()
    import torch
    import whisper

    from harness.core.audio import log_mel
    from harness.core.weights import load_model, resolve_checkpoint

    torch.set_num_threads(threads)
    model = load_model(resolve_checkpoint(size))
    options = whisper.DecodingOptions(language="en", without_timestamps=True, fp16=False)
    ids, audio = (x[part::parts] for x in _audio(n))
    whisper.decode(model, torch.from_numpy(log_mel(audio[0], model.dims.n_mels)[0]), options)  # warm-up
    started = time.perf_counter()
    tokens = {
        u: whisper.decode(model, torch.from_numpy(log_mel(a, model.dims.n_mels)[0]), options).tokens
        for u, a in zip(ids, audio, strict=True)
    }
    now = time.perf_counter()
    out.put((len(audio), now - started, now - process_start, tokens))


def _loops(size: str, processes: int, threads: int, n: int) -> tuple[float, float, dict]:
    """Utterances per second of `processes` loops of `threads` threads, started together: decoding
    only, and from the processes' start; and every utterance's tokens."""
    out: mp.Queue = mp.get_context("spawn").Queue()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_loop, args=(size, threads, i, processes, n, out)) for i in range(processes)]
    for p in procs:
        p.start()
    results = [out.get() for _ in procs]
    for p in procs:
        p.join()
    done = sum(r[0] for r in results)
    tokens = {u: t for r in results for u, t in r[3].items()}
    return done / max(r[1] for r in results), done / max(r[2] for r in results), tokens


def _harness(size: str, n: int, targets: dict[str, list[str]]) -> tuple[float, dict, dict]:
    """Utterances per second of model work (all models) over the whole run, run.json, and the
    reference's tokens per utterance."""
    from harness.job.spec import ClusterSpec, ModelsSpec, load_job
    from harness.run.execute import run_job

    spec = load_job(ROOT / "jobs" / "librispeech_tiny_en.yaml").with_overrides(limit=n)
    models = ModelsSpec(sizes=(size,), targets=tuple((t, tuple(q)) for t, q in targets.items()))
    spec = replace(spec, name=f"bench-{len(targets)}", models=models, cluster=ClusterSpec())  # the defaults
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        result = run_job(spec, Path(out), ROOT / "models", progress=False, log=lambda *a: None)
        wall = time.perf_counter() - started
        info = json.loads((result.run_dir / "run.json").read_text())
        utts = result.utterances
    info["wall_s"] = wall
    reference = utts[utts["target"] == "reference"]
    tokens = {u: list(t) for u, t in zip(reference["utt_id"], reference["hyp_tokens"], strict=True)}
    return len(utts) / wall, info, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="tiny.en")
    parser.add_argument("--utterances", type=int, default=50)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()
    n, cores = args.utterances, args.threads

    a, _, _ = _loops(args.size, 1, cores, n)
    b, b_start, b_tokens = _loops(args.size, cores, 1, n)
    c, one, c_tokens = _harness(args.size, n, {})
    same = sum(b_tokens[u] == c_tokens.get(u) for u in b_tokens)
    steady = n / max(w["alive_s"] - w["ready_s"] for w in one["workers"])  # workers' decoding span
    c_start = n / max(w["alive_s"] for w in one["workers"])  # from the workers' start
    _, two, _ = _harness(args.size, n, {"torchscript-mtk": ["fp32"]})
    busy = sum(w["busy_s"] for w in two["workers"])
    slots = sum(node["slots"] for node in two["nodes"])
    phases = two["phases"]
    driver = phases["total"] - phases["schedule"]  # joining Ray, artifacts, publishing, scoring
    start_up = driver + max(w["ready_s"] for w in two["workers"])
    print(f"\n{args.size}, {n} utterances, {cores} cores")
    print(f"{'A: 1 loop x ' + str(cores) + ' threads':<42} {a:7.2f} utt/s")
    print(f"{'B: ' + str(cores) + ' loops x 1 thread (the bar)':<42} {b:7.2f} utt/s   1.00")
    print(f"{'C: harness, reference only':<42} {steady:7.2f} utt/s   {steady / b:.2f} x B   (target >= 0.95)")
    print(f"{'B from start (imports, load, warm-up)':<42} {b_start:7.2f} utt/s")
    print(f"{'C from the workers start':<42} {c_start:7.2f} utt/s   {c_start / b_start:.2f} x B from start")
    print(f"{'C, the whole run (Ray start-up, scoring)':<42} {c:7.2f} utt/s   {c / b_start:.2f} x B from start"
          f"   (target >= 1.25)")  # fmt: skip
    print(f"   tokens identical to B's: {same} of {len(b_tokens)} utterances")
    print(f"   its phases (s): {_phases(one['phases'])}; worker ready after {_ready(one)} s")
    print(f"{'D: harness, reference + torchscript-mtk':<42} makespan {two['wall_s']:.1f} s; 1.1 x ideal Σ busy/slots "
          f"{1.1 * busy / slots:.1f} s + start-up {start_up:.1f} s = {1.1 * busy / slots + start_up:.1f} s "
          f"(scheduling {phases['schedule']:.1f} s = {phases['schedule'] / (busy / slots):.2f} x ideal)")  # fmt: skip
    workers = ", ".join(f"{w['model'].split('/')[1]} {w['shards']} shards {w['busy_s']:.0f} s" for w in two["workers"])
    print(f"   workers: {workers}")
    print(f"   its phases (s): {_phases(phases)}; workers ready after {_ready(two)} s")


def _phases(phases: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.1f}" for k, v in phases.items())


def _ready(info: dict) -> str:
    return "/".join(f"{w['ready_s']:.1f}" for w in info["workers"])


if __name__ == "__main__":
    main()
