"""Run folders for the history and gate tests, derived from one real short run.

A real run costs a minute; the gate needs many. So each derived folder starts from the real run's
utterances.parquet rows (real transcripts, tokens and timings), changes them on purpose (words
dropped from a model's hypotheses, slower timings, another CPU, a model gone), and is re-scored
with `harness.results.scoring.score_rows` / `summarize` and written like `run_job` writes: every file
schema-valid, every number recomputed by the harness's own scoring.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from harness.job.spec import ModelCell
from harness.results.schema import RAW_COLUMNS  # what workers return (score_rows derives the rest)
from harness.results.scoring import score_rows
from harness.results.summary import format_summary, summarize

MTK = ("tiny.en", "torchscript-mtk", "fp32")
ROOT = Path(__file__).resolve().parents[1]


def in_process(*args: object) -> tuple[int, str, str]:
    """`python -m harness ARGS` in this process: its exit status and what it printed."""
    from harness.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(map(str, args)))
    return code, out.getvalue(), err.getvalue()


def harness(*args: str, wait: bool = True) -> subprocess.CompletedProcess | subprocess.Popen:
    """`python -m harness ARGS` as a process of its own, this checkout's harness, no $HARNESS_HISTORY."""
    env = {k: v for k, v in os.environ.items() if k != "HARNESS_HISTORY"} | {"PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "harness", *map(str, args)]
    if not wait:
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def derive_run(
    source: Path,
    results: Path,
    night: int,
    change: Callable[[pd.DataFrame], pd.DataFrame] = lambda raw: raw,
    suffix: str = "",
) -> Path:
    """A copy of the run folder `source` as night `night` (its run id and start date), its raw
    rows passed through `change` and scored again; returns the new folder."""
    info = json.loads((source / "run.json").read_text())
    run_id = f"202601{night:02d}-020000-{night:04x}{suffix or 'aa'}"
    raw = pd.read_parquet(source / "utterances.parquet")[list(RAW_COLUMNS)].assign(run_id=run_id)
    utts = score_rows(change(raw.copy()))
    facts = pd.read_csv(source / "summary.csv").set_index(["size", "target", "quant"])
    kept = list(dict.fromkeys(zip(utts["size"], utts["target"], utts["quant"], utts["audio_ctx"], strict=True)))
    summary = summarize(utts, {key: facts.loc[key[:3], ["runtime", "artifact_mb"]].to_dict() for key in kept})
    labels = {ModelCell(*key).label for key in kept}
    info.update(
        run_id=run_id,
        started=f"2026-01-{night:02d}T02:00:00Z",
        finished=f"2026-01-{night:02d}T02:10:00Z",
        models=[m for m in info["models"] if m["model"] in labels],
    )
    folder = results / info["job"]["name"] / run_id
    folder.mkdir(parents=True)
    utts.to_parquet(folder / "utterances.parquet", index=False)
    summary.to_csv(folder / "summary.csv", index=False)
    (folder / "summary.md").write_text(format_summary(summary) + "\n")
    (folder / "run.json").write_text(json.dumps(info, indent=2))
    return folder


def of_model(raw: pd.DataFrame, model: tuple[str, str, str] = MTK) -> pd.Series:
    return (raw["size"] == model[0]) & (raw["target"] == model[1]) & (raw["quant"] == model[2])


def drop_words(first: int, model: tuple[str, str, str] = MTK) -> Callable[[pd.DataFrame], pd.DataFrame]:
    """The model's hypotheses of its first `first` utterances lose their last three words and
    last five tokens: more deletions, and no longer token-identical to the reference."""

    def change(raw: pd.DataFrame) -> pd.DataFrame:
        rows = raw.index[of_model(raw, model)][:first]
        raw.loc[rows, "hyp_text"] = raw.loc[rows, "hyp_text"].map(lambda t: " ".join(t.split()[:-3]))
        raw["hyp_tokens"] = [
            list(t)[:-5] if i in rows else t for i, t in zip(raw.index, raw["hyp_tokens"], strict=True)
        ]
        return raw

    return change


def slower(factor: float, model: tuple[str, str, str] = MTK) -> Callable[[pd.DataFrame], pd.DataFrame]:
    def change(raw: pd.DataFrame) -> pd.DataFrame:
        for col in ("frontend_ms", "encode_ms", "decode_ms"):
            raw.loc[of_model(raw, model), col] *= factor
        return raw

    return change


def on_cpu(cpu: str) -> Callable[[pd.DataFrame], pd.DataFrame]:
    return lambda raw: raw.assign(cpu=cpu)


def without(model: tuple[str, str, str] = MTK) -> Callable[[pd.DataFrame], pd.DataFrame]:
    return lambda raw: raw[~of_model(raw, model)]


def failed(reason: str, model: tuple[str, str, str] = MTK) -> Callable[[pd.DataFrame], pd.DataFrame]:
    """The model's worker died: its rows carry the reason and nothing else, as the scheduler writes them."""

    def change(raw: pd.DataFrame) -> pd.DataFrame:
        rows = of_model(raw, model)
        for col in ("hyp_text", "hyp_tokens", "frontend_ms", "encode_ms", "decode_ms", "n_steps", "node", "cpu"):
            raw[col] = raw[col].astype(object)
            raw.loc[rows, col] = None
        raw.loc[rows, "error"] = reason
        raw.loc[rows, "status"] = "worker failed"
        return raw

    return change


# the reference alone on a few utterances, with a report: the smallest real run that reaches the
# history, the gate and the report (the history tests that make a run fail there use it)
REFERENCE_JOB = """name: tiny_reference
dataset: {{path: {data}}}
models: {{sizes: [tiny.en], targets: {{}}}}
cluster: {{shard_size: 2}}
report: true
"""


def reference_run(tmp_path: Path, models_root: Path, history: str) -> tuple[int, str, str, Path]:
    """`run` of REFERENCE_JOB on two utterances in this process against `history`, gated on the
    previous night: its exit status, what it printed and its run folder."""
    from tests.conftest import EMBEDDED, embedded_ray

    job = tmp_path / "job.yaml"
    job.write_text(REFERENCE_JOB.format(data=EMBEDDED))
    embedded_ray()
    code, out, err = in_process(
        "run", job, "--limit", 2, "--out", tmp_path / "results", "--models", models_root, "--no-progress",
        "--history", history, "--baseline", "previous",
    )  # fmt: skip
    (run_dir,) = (tmp_path / "results" / "tiny_reference").iterdir()
    return code, out, err, run_dir
