"""The harness's own cost per row: synthetic worker rows through the driver's real path, at 10 k,
100 k and 1 M rows, each size in a fresh process (its peak memory is its own).

    python benchmarks/scale.py [--rows 10000 100000 1000000] [--shard-size 128]

The rows are what workers hand the driver (`harness.results.scoring.score_row` already applied:
scoring happens where rows are decoded), made before the clock starts from a pool of real-looking
utterances: four models (the reference and three converted forms that drift by a word now and
then), ~20 tokens and ~100 characters a transcript, a speaker and a language in each row's
metadata. The driver's path, timed phase by phase: `persist` (each finished (model, shard) written
atomically, as the scheduler hands it over), `aggregate` (`harness.results.aggregate.finalise`:
every shard compared with its reference and streamed to utterances.parquet), `summary`
(per-dataset summary and breakdown tables with their bootstrap intervals), `history`
(`harness.nightly.history.History.add` on SQLite) and `report` (report.html).

Targets (issue 17): ≤ 0.05 ms of driver time per row, ≤ 1.5 GB peak driver RSS at 1 M rows.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = (("reference", "fp32"), ("onnx", "fp32"), ("onnx", "int8"), ("ctranslate2", "int8"))
WORDS = "the of and to a in that he was it his is with as for had you not be her on at by which have or".split()


def _pool(n: int, seed: int = 0) -> list[tuple[str, list[str]]]:
    """`n` reference texts, each with a hypothesis per model (a word dropped now and then)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    pool = []
    for _ in range(n):
        words = [WORDS[i] for i in rng.integers(0, len(WORDS), size=int(rng.integers(12, 30)))]
        hyps = [" ".join(w for w in words if rng.random() > (0.0 if m == 0 else 0.03)) for m in range(len(MODELS))]
        pool.append((" ".join(words), hyps))
    return pool


def measure(n_rows: int, shard_size: int, folder: Path) -> dict[str, float]:
    """One size, in this process: seconds per phase, and the process's peak RSS."""
    import resource

    from harness.core.status import Status
    from harness.job.spec import DatasetSpec, JobSpec, ModelCell, ModelsSpec
    from harness.nightly.history import History
    from harness.report.page import write_report
    from harness.results.aggregate import Part, finalise
    from harness.results.run_dir import RunDir
    from harness.results.run_info import RUN_JSON, RunInfo, job_json
    from harness.results.schema import SCHEMA_VERSION, row
    from harness.results.scoring import score_row
    from harness.results.summary import breakdown_table, format_summary, summarize
    from harness.run.dataset import plan_shards
    from harness.run.execute import TRANSCRIPTION

    n_utts = n_rows // len(MODELS)
    cells = [ModelCell("base", t, q) for t, q in MODELS]
    pool = _pool(512)
    # each pool entry scored once per model; rows are copies with their own ids (made before timing)
    scored = [
        [
            score_row(
                row(cells[m], "u", ref, Status.OK, hyp_text=hyps[m], hyp_tokens=list(range(20)), task="transcribe",
                    language="en", ref_language="en", audio_s=9.5, frontend_ms=4.0, encode_ms=80.0, decode_ms=200.0,
                    n_steps=21, n_windows=1, batch=8, runtime="cpu", node="n", cpu="x86")
            )
            for m in range(len(MODELS))
        ]
        for ref, hyps in pool
    ]  # fmt: skip
    ids = [f"{1000 + i % 40}-{i:07d}" for i in range(n_utts)]
    shards = plan_shards(n_utts, shard_size)
    timed = set(range(0, n_utts, max(1, n_utts // 100)))  # the latency sample: 100 utterances

    def rows_of(m: int, shard) -> list[dict]:
        return [
            {**scored[i % len(scored)][m], "utt_id": ids[i], "timed": i in timed, "batch": 1 if i in timed else 8,
             "meta": json.dumps({"speaker_id": ids[i][:4]}), "dataset": "synthetic"}
            for i in range(shard.start, shard.stop)
        ]  # fmt: skip

    spec = JobSpec(
        name="scale",
        datasets=(DatasetSpec(path=ROOT / "data" / "librispeech-eval"),),
        models=ModelsSpec(sizes=("base",), targets=tuple((t, (q,)) for t, q in MODELS[1:])),
    )
    run = RunDir.create(folder, "scale")
    phases = dict.fromkeys(("persist", "aggregate", "summary", "history", "report"), 0.0)
    for shard in shards:
        batch = [rows_of(m, shard) for m in range(len(MODELS))]  # the workers' rows, not timed
        started = time.perf_counter()
        for cell, rows in zip(cells, batch, strict=True):
            TRANSCRIPTION.persist(run, cell, shard, rows)
        phases["persist"] += time.perf_counter() - started

    started = time.perf_counter()
    parts = [Part(s.index, "synthetic", ids[s.start : s.stop]) for s in shards]
    kept = finalise(run, cells, parts, run.path / "utterances.parquet")
    phases["aggregate"] = time.perf_counter() - started

    started = time.perf_counter()
    summary = summarize(kept, {c.as_tuple(): {"runtime": "cpu", "artifact_mb": 100.0} for c in cells})
    breakdown = breakdown_table(kept, ("language", "duration"))
    del kept
    summary.to_csv(run.path / "summary.csv", index=False)
    breakdown.to_csv(run.path / "breakdown.csv", index=False)
    (run.path / "summary.md").write_text(format_summary(summary) + "\n")
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    RunInfo(
        run_id=run.run_id, schema_version=SCHEMA_VERSION, job=job_json(spec), utterances=n_utts, started=stamp,
        finished=stamp,
    ).write(run.path / RUN_JSON)  # fmt: skip
    run.complete()
    phases["summary"] = time.perf_counter() - started

    from harness.results.record import read_run

    history = folder / "history.sqlite"
    started = time.perf_counter()
    with History(str(history)) as store:
        store.add(read_run(run.path))
    phases["history"] = time.perf_counter() - started

    started = time.perf_counter()
    write_report(run.path, str(history))
    phases["report"] = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {**phases, "rows": n_utts * len(MODELS), "peak_mb": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--shard-size", type=int, default=128)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # a child process: measure one size
    args = parser.parse_args()
    if args.one:
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(measure(args.one, args.shard_size, Path(tmp))))
        return
    from tabulate import tabulate

    table = []
    for n in args.rows:
        out = subprocess.run(
            [sys.executable, __file__, "--one", str(n), "--shard-size", str(args.shard_size)],
            capture_output=True, text=True, check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        m = json.loads(out.stdout.strip().splitlines()[-1])
        total = sum(m[p] for p in ("persist", "aggregate", "summary", "history", "report"))
        table.append(
            [f"{m['rows']:,}", *(f"{m[p]:.1f}" for p in ("persist", "aggregate", "summary", "history", "report")),
             f"{total:.1f}", f"{1e3 * total / m['rows']:.4f}", f"{m['peak_mb']:.0f}"]
        )  # fmt: skip
        print(tabulate(table[-1:], tablefmt="plain"), file=sys.stderr, flush=True)
    headers = ["rows", "persist s", "aggregate s", "summary s", "history s", "report s", "driver s", "ms/row",
               "peak RSS MB"]  # fmt: skip
    print(f"shard size {args.shard_size}, {len(MODELS)} models; targets: ≤ 0.05 ms/row, ≤ 1500 MB at 1 M rows")
    print(tabulate(table, headers=headers, tablefmt="github"))


if __name__ == "__main__":
    main()
