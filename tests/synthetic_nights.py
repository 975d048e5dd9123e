"""Run folders for the history and gate tests, built by hand: the files a run writes (run.json,
summary.csv, utterances.parquet) for a night of `librispeech_tiny_en` — tiny.en's reference and
torchscript-mtk on the first six embedded utterances, as the real short run (`nightly_run`) has
it — with no model, no Ray and no text normaliser.

Every scored column is stated, not measured: both models transcribe every utterance word for word
and token for token, and a change (`drop_words`, `slower`, `on_cpu`, `without`, `failed`) edits
the rows as scoring would have scored them. summary.csv is the harness's own `summarize` of them.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import pandas as pd

from harness.core.window import FULL_AUDIO_CTX
from harness.job.spec import DatasetSpec, JobSpec, ModelCell
from harness.results.schema import SCHEMA_VERSION, UTTERANCE_COLUMNS
from harness.results.summary import summarize

ROOT = Path(__file__).resolve().parents[1]
EMBEDDED = ROOT / "data" / "librispeech-eval"
JOB = "librispeech_tiny_en"
REFERENCE = ("tiny.en", "reference", "fp32")
MTK = ("tiny.en", "torchscript-mtk", "fp32")
CPU = "Synthetic CPU @ 3.0GHz [avx2]"
UTTERANCES = 6

Change = Callable[[pd.DataFrame], pd.DataFrame]
_INT = ["wer_errors", "substitutions", "deletions", "insertions", "ref_words", "cer_errors", "ref_chars",
        "first_divergence", "n_steps", "n_windows", "n_tokens", "attempt", "audio_ctx"]  # fmt: skip


def _tokens(words: list[str]) -> list[int]:
    """Made-up token ids, one per word between start and end of text."""
    return [50257, *(zlib.crc32(w.encode()) % 50000 for w in words), 50256]


def _transcript(ref_words: list[str], kept: int, tokens_lost: int) -> dict:
    """The scored columns of a hypothesis that is the reference's first `kept` words and its tokens
    less the last `tokens_lost`: the words left out are deletions, nothing else an error."""
    reference, hyp = _tokens(ref_words), " ".join(ref_words[:kept])
    tokens = reference[: len(reference) - tokens_lost]
    ref_norm = " ".join(ref_words)
    return {
        "hyp_text": hyp, "hyp_norm": hyp, "hyp_tokens": tokens, "reference_tokens": reference,
        "wer_errors": len(ref_words) - kept, "substitutions": 0, "deletions": len(ref_words) - kept,
        "insertions": 0, "ref_words": len(ref_words), "cer_errors": len(ref_norm) - len(hyp),
        "ref_chars": len(ref_norm), "exact_match": tokens == reference,
        "first_divergence": None if tokens == reference else len(tokens),
        "token_edit_rate": tokens_lost / len(reference), "n_tokens": len(tokens), "n_steps": len(tokens) - 1,
    }  # fmt: skip


def _rows(run_id: str) -> pd.DataFrame:
    """Both models' rows on the first six embedded utterances, every one transcribed exactly."""
    lines = (EMBEDDED / "metadata.jsonl").read_text().splitlines()[:UTTERANCES]
    rows = []
    for m, model in enumerate((REFERENCE, MTK)):
        for u, item in enumerate(map(json.loads, lines)):
            words = item["text"].lower().split()
            frontend, encode, decode = 5.0 + u, 40.0 * (2 - m) + 3 * u, 4.0 * len(words)
            rows.append(
                dict.fromkeys(UTTERANCE_COLUMNS)
                | {
                    "run_id": run_id, "utt_id": item["id"], "size": model[0], "target": model[1],
                    "quant": model[2], "audio_ctx": FULL_AUDIO_CTX, "ref_text": item["text"],
                    "ref_norm": " ".join(words), **_transcript(words, len(words), 0),
                    "audio_s": item["duration_s"], "frontend_ms": frontend, "encode_ms": encode,
                    "decode_ms": decode, "total_ms": frontend + encode + decode, "n_windows": 1,
                    "decoding": "short form", "task": "transcribe", "language": "en", "scoring_language": "en",
                    "node": "node-0", "cpu": CPU, "attempt": 0, "status": "ok",
                }
            )  # fmt: skip
    return pd.DataFrame(rows, columns=UTTERANCE_COLUMNS)


def _typed(utts: pd.DataFrame) -> pd.DataFrame:
    """The dtypes scoring gives its columns (nullable integers and booleans, floats)."""
    floats = ["token_edit_rate", "audio_s", "frontend_ms", "encode_ms", "decode_ms", "total_ms", "language_prob"]
    return utts.astype(
        {**dict.fromkeys(_INT, "Int64"), **dict.fromkeys(floats, "float64")}
        | {"exact_match": "boolean", "language_match": "boolean"}
    )


def night(results: Path, n: int, change: Change = lambda utts: utts, limit: int | None = None, job: str = JOB) -> Path:
    """Night `n` of `job` (its run id and start date), its rows passed through `change`, in
    `results/<job>/<run id>/`; `limit`: the dataset's `--limit` (a night has none). Returns the folder."""
    run_id = f"202601{n:02d}-020000-{n:06x}"
    utts = _typed(change(_rows(run_id)).reset_index(drop=True))
    keys = list(dict.fromkeys(zip(utts["size"], utts["target"], utts["quant"], utts["audio_ctx"], strict=True)))
    summary = summarize(utts, {key: {"runtime": key[1], "artifact_mb": 150.0} for key in keys})
    spec = JobSpec(name=job, datasets=(DatasetSpec(path=EMBEDDED, limit=limit),))
    info = {
        "run_id": run_id, "schema_version": SCHEMA_VERSION, "job": asdict(spec), "utterances": UTTERANCES,
        "models": [{"model": ModelCell(*key).label, "artifact": None, "status": "reused"} for key in keys],
        "packages": {"pandas": pd.__version__}, "git_commit": f"{n:02x}" * 20,
        "host": {"hostname": "synthetic", "cpu": CPU}, "started": f"2026-01-{n:02d}T02:00:00Z",
        "finished": f"2026-01-{n:02d}T02:10:00Z",
    }  # fmt: skip
    folder = results / job / run_id
    folder.mkdir(parents=True)
    utts.to_parquet(folder / "utterances.parquet", index=False)
    summary.to_csv(folder / "summary.csv", index=False)
    (folder / "run.json").write_text(json.dumps(info, indent=2, default=str))
    return folder


def as_suite(utts: pd.DataFrame) -> pd.DataFrame:
    """The night as a suite of two datasets: its first three utterances `a`, the rest `b` (ids
    prefixed with them, as a suite's are)."""
    first = utts["utt_id"].isin(utts["utt_id"].drop_duplicates().iloc[:3])
    dataset = first.map({True: "a", False: "b"})
    return utts.assign(dataset=dataset, utt_id=dataset + "/" + utts["utt_id"])


def of_model(utts: pd.DataFrame, model: tuple[str, str, str] = MTK) -> pd.Series:
    return (utts["size"] == model[0]) & (utts["target"] == model[1]) & (utts["quant"] == model[2])


def drop_words(first: int, model: tuple[str, str, str] = MTK) -> Change:
    """The model's first `first` utterances lose their last three words and last five tokens:
    three more deletions each, and no longer token-identical to the reference."""

    def change(utts: pd.DataFrame) -> pd.DataFrame:
        utts = utts.astype(object)
        for i in utts.index[of_model(utts, model)][:first]:
            words = utts.at[i, "ref_norm"].split()
            for col, value in _transcript(words, len(words) - 3, 5).items():
                utts.at[i, col] = value
        return utts

    return change


def slower(factor: float, model: tuple[str, str, str] = MTK) -> Change:
    def change(utts: pd.DataFrame) -> pd.DataFrame:
        for col in ("frontend_ms", "encode_ms", "decode_ms", "total_ms"):
            utts.loc[of_model(utts, model), col] *= factor
        return utts

    return change


def on_cpu(cpu: str) -> Change:
    return lambda utts: utts.assign(cpu=cpu)


def without(model: tuple[str, str, str] = MTK) -> Change:
    return lambda utts: utts[~of_model(utts, model)]


def failed(reason: str, model: tuple[str, str, str] = MTK) -> Change:
    """The model's worker died: its rows carry the reason and no transcript, as scoring leaves them."""
    transcript = ["hyp_text", "hyp_norm", "hyp_tokens", "wer_errors", "substitutions", "deletions", "insertions",
                  "cer_errors", "exact_match", "first_divergence", "token_edit_rate", "n_tokens", "n_steps",
                  "frontend_ms", "encode_ms", "decode_ms", "total_ms", "node", "cpu"]  # fmt: skip

    def change(utts: pd.DataFrame) -> pd.DataFrame:
        utts = utts.astype(object)
        rows = of_model(utts, model)
        utts.loc[rows, transcript] = None
        utts.loc[rows, "status"] = "worker failed"
        utts.loc[rows, "error"] = reason
        return utts

    return change
