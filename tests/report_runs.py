"""Run folders for the report tests that no short real run gives: a 15-model, 70-utterance run
(the size budget), and the divergence analysis's two files, as fixture frames with its columns.

The synthetic run goes through the harness's own path from raw rows on: `results.row` builds each
worker row (real utterance ids and reference texts, made-up hypotheses, tokens and timings),
`scoring.score_rows` and `summary.summarize` derive every column, so the folder is schema-valid.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd

from converters.registry import TARGETS
from harness.core.status import Status
from harness.core.target import REFERENCE
from harness.job.spec import DatasetSpec, JobSpec, ModelCell
from harness.results.run_dir import raw_frame
from harness.results.schema import SCHEMA_VERSION, row
from harness.results.scoring import score_rows
from harness.results.summary import summarize

# what a hostile dataset may put in a transcript: markup, an attribute breaker, a closing tag
HOSTILE = '<script>alert("owned")</script> </td></table> <img src=x onerror=alert(1)> & "quoted" \'single\''
SYNTHETIC_CPU = "Synthetic CPU @ 3.0GHz [avx2]"


def _tokens(words: list[str]) -> list[int]:
    return [50257, *(zlib.crc32(w.encode()) % 50000 for w in words), 50256]


def synthetic_run(results: Path, n_models: int = 15, n_utts: int = 70, seed: int = 0) -> Path:
    """A complete run folder of base's reference and 14 converted forms on the embedded utterances:
    model i drops or swaps a word in about i in 20 utterances (their speeds in another order, so
    some trade accuracy for speed), the last model is unavailable, one utterance of the second
    model failed, the first utterance's text is hostile markup."""
    root = Path(__file__).resolve().parents[1]
    meta = [json.loads(line) for line in (root / "data/librispeech-eval/metadata.jsonl").read_text().splitlines()]
    cells = [ModelCell("base", t, q) for t in TARGETS for q in TARGETS[t].quants][:n_models]
    assert cells[0].target == REFERENCE and len(cells) == n_models
    rng = np.random.default_rng(seed)
    run_id = f"20261201-020000-{seed:06x}"
    rows = []
    for m, cell in enumerate(cells):
        for u, item in enumerate(meta[:n_utts]):
            text = f"{HOSTILE} {item['text']}" if u == 0 else item["text"]
            if m == n_models - 1:
                rows.append(row(cell, item["id"], text, Status.UNAVAILABLE, "runtime <not> installed & unusable"))
                continue
            if m == 1 and u == 3:
                rows.append(row(cell, item["id"], text, Status.ERROR, 'cannot decode audio: "</td>" <b>bad</b>'))
                continue
            words = text.lower().split()
            if m and rng.random() < m / 20:
                at = int(rng.integers(len(words)))
                words = words[:at] + words[at + 1 :] if rng.random() < 0.5 else [*words[:at], "uh", *words[at + 1 :]]
            tokens = _tokens(words)
            audio = float(item["duration_s"])
            speed = 20 + 8 * ((7 * m + 3) % n_models)
            rows.append(
                row(
                    cell, item["id"], text, Status.OK, hyp_text=" ".join(words), hyp_tokens=tokens, audio_s=audio,
                    frontend_ms=5.0 + rng.random(), encode_ms=audio * speed * (1 + 0.1 * rng.random()),
                    decode_ms=len(tokens) * (4 + m), n_steps=len(tokens) - 1, n_windows=1, decoding="short form",
                    node="node-0", cpu=SYNTHETIC_CPU,
                )
            )  # fmt: skip
    utts = score_rows(raw_frame(rows).assign(run_id=run_id))
    facts = {c.as_tuple(): {"runtime": c.target, "artifact_mb": 75.0 * (1 + i)} for i, c in enumerate(cells)}
    summary = summarize(utts, facts)
    job = JobSpec(name="synthetic", datasets=(DatasetSpec(path=root / "data/librispeech-eval"),))
    info = {
        "run_id": run_id, "schema_version": SCHEMA_VERSION, "job": asdict(job), "utterances": n_utts,
        "models": [{"model": c.label, "artifact": None, "status": "reused", "reason": None} for c in cells],
        "packages": {"numpy": np.__version__}, "git_commit": "0" * 40,
        "host": {"hostname": "synthetic", "cpu": SYNTHETIC_CPU}, "started": "2026-12-01T02:00:00Z",
        "finished": "2026-12-01T02:30:00Z",
    }  # fmt: skip
    folder = results / job.name / run_id
    folder.mkdir(parents=True)
    utts.to_parquet(folder / "utterances.parquet", index=False)
    summary.to_csv(folder / "summary.csv", index=False)
    (folder / "run.json").write_text(json.dumps(info, indent=2, default=str))
    return folder


def later_night(folder: Path, night: int, slower: float) -> Path:
    """A copy of a run folder as a later night whose every model ran `slower` times as long."""
    info = json.loads((folder / "run.json").read_text())
    run_id = f"{info['run_id'][:-6]}{night:06x}"
    info.update(run_id=run_id, started=f"2026-12-01T02:{night:02d}:00Z")
    copy = folder.parent / run_id
    copy.mkdir()
    utts = pd.read_parquet(folder / "utterances.parquet").assign(run_id=run_id)
    utts["total_ms"] *= slower
    summary = pd.read_csv(folder / "summary.csv")
    for col in ("p50_ms", "p90_ms", "p99_ms"):
        summary[col] *= slower
    utts.to_parquet(copy / "utterances.parquet", index=False)
    summary.to_csv(copy / "summary.csv", index=False)
    (copy / "run.json").write_text(json.dumps(info))
    return copy


def _token(words: list[str], at: int) -> str:
    """The word at a divergence as a token's text reads (its leading space); past the end, EOT."""
    return f" {words[at]}" if at < len(words) else "<|endoftext|>"


def _top5(words: list[str]) -> list[dict]:
    """As the analysis writes a top-5: likeliest first, each its id, text and probability."""
    return [{"id": zlib.crc32(w.encode()) % 50000, "token": f" {w}", "p": 0.9 / (k + 1)} for k, w in enumerate(words)]


def write_divergence(folder: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """divergence.csv (a row per converted model) and divergence.parquet (a row per utterance) for
    the run in `folder`, with the columns the divergence analysis writes; values made up, except
    where the texts part, taken from the two models' hypotheses."""
    utts = pd.read_parquet(folder / "utterances.parquet")
    reference = utts[utts["target"] == REFERENCE].set_index(["size", "utt_id"])["hyp_text"]
    rows = []
    for i, u in enumerate(utts[utts["target"] != REFERENCE].to_dict("records")):
        ref_words = str(reference.get((u["size"], u["utt_id"])) or "").split()
        cand_words = str(u["hyp_text"] or "").split()
        at = next((k for k, (a, b) in enumerate(zip(ref_words, cand_words, strict=False)) if a != b), None)
        at = min(len(ref_words), len(cand_words)) if at is None and ref_words != cand_words else at
        div = u["first_divergence"]
        rows.append(
            {
                **{k: u[k] for k in ("run_id", "utt_id", "size", "target", "quant", "status", "error")},
                "note": "hybrids not run: the runner's features cannot be swapped" if i == 1 else None,
                "encoder_snr_db": float("inf") if i == 2 else 38.0 - i % 7, "tf_steps": u["n_steps"],
                "tf_top1_agreement": 1 - (i % 5) / 50,
                "tf_max_abs_dlogit": 0.1 * (1 + i % 4), "tf_mean_kl": 1e-4 * (1 + i % 3),
                "tf_max_kl": 1e-3 * (1 + i % 3),
                "exact_match": u["exact_match"], "hybrid_cand_encoder_exact": bool(i % 2),
                "hybrid_cand_decoder_exact": u["exact_match"], "first_divergence": div,
                "ref_token": None if pd.isna(div) else _token(ref_words, at),
                "cand_token": None if pd.isna(div) else _token(cand_words, at),
                "ref_top5": None if pd.isna(div) else _top5(ref_words[at : at + 5]),
                "cand_top5": None if pd.isna(div) else _top5(cand_words[at : at + 5]),
                # as text decoded from tokens reads: a continuation starts with its word's space
                "common_prefix_text": None if at is None else " ".join(ref_words[:at]),
                "ref_continuation": None if at is None else " " * (at > 0) + " ".join(ref_words[at:]),
                "cand_continuation": None if at is None else " " * (at > 0) + " ".join(cand_words[at:]),
            }
        )  # fmt: skip
    per_utt = pd.DataFrame(rows).astype({"first_divergence": "Int64", "tf_steps": "Int64"})
    per_model = (
        per_utt.groupby(["size", "target", "quant"], sort=False)
        .agg(
            n=("utt_id", "size"), encoder_snr_mean_db=("encoder_snr_db", "mean"),
            encoder_snr_min_db=("encoder_snr_db", "min"), tf_top1_agreement=("tf_top1_agreement", "mean"),
            tf_max_abs_dlogit=("tf_max_abs_dlogit", "max"), tf_mean_kl=("tf_mean_kl", "mean"),
            exact_match=("exact_match", "mean"), exact_cand_encoder=("hybrid_cand_encoder_exact", "mean"),
            exact_cand_decoder=("hybrid_cand_decoder_exact", "mean"),
        )
        .reset_index()
    )  # fmt: skip
    exact = per_model["exact_match"].astype(float)
    per_model["verdict"] = np.where(exact.isna(), "-", np.where(exact < 1, "decoder", "none"))
    per_model.to_csv(folder / "divergence.csv", index=False)
    per_utt.to_parquet(folder / "divergence.parquet", index=False)
    return per_model, per_utt
