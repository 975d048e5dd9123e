"""The row schema: the raw rows workers write, the declared columns of utterances.parquet, and the
history's tables with their SQL types — names and types only (no pandas), so that the commands that
list runs or read the history load no data library."""

from __future__ import annotations

from typing import Any

from harness.core.status import Status
from harness.job.spec import ModelCell

# utterances.parquet's schema version. 2: `cpu`; 3: `status` (a harness.core.status.Status
# value) beside `error`, the reason, and `attempt`; 4: `n_windows` (30 s windows decoded: 1 in
# short form) and `decoding` (short or long form, and how); 5: `audio_ctx` (the encoder's audio
# context), `task`, `language` (decoded in), `detected_language` and `language_prob` (the model's
# own detection), `ref_language` (the dataset's), `scoring_language` (whose rules scored it) and
# `language_match` (detection equal to the reference's); the reference every model is compared
# with is the one at the full context; `runtime` per row (what executed it: a board's NPU, a CPU
# interpreter, …). 6: `dataset` (the suite's dataset it comes from), `batch` (utterances that
# shared its decoder calls), `timed` (in the latency sample: decoded alone, its times are its own),
# `meta` (JSON: the metadata columns the job breaks results down by)
SCHEMA_VERSION = 6

# The raw rows workers (and the driver, for models that produced nothing) write: name → dtype.
# `language`: what it was decoded in; `detected_language`/`language_prob`: what the model itself
# detected (multilingual models); `ref_language`: the dataset's language column; `audio_ctx`: the
# encoder's audio context (harness.job.spec.ModelCell); `task`: transcribe or translate
RAW_COLUMNS: dict[str, str] = {
    "size": "string", "target": "string", "quant": "string", "audio_ctx": "Int64", "utt_id": "string",
    "ref_text": "string", "ref_language": "string", "audio_s": "float64", "hyp_text": "string",
    "hyp_tokens": "object", "frontend_ms": "float64", "encode_ms": "float64", "decode_ms": "float64",
    "n_steps": "Int64", "n_windows": "Int64", "decoding": "string", "task": "string", "language": "string",
    "detected_language": "string", "language_prob": "float64",
    "node": "string",
    "cpu": "string", "runtime": "string",
    "status": "string", "error": "string", "attempt": "Int64",
    "dataset": "string", "batch": "Int64", "timed": "boolean", "meta": "string",
}  # fmt: skip

# What a worker's shard file holds: the raw row and its scores (harness.results.scoring.score_row)
SHARD_COLUMNS: dict[str, str] = {
    **RAW_COLUMNS,
    "scoring_language": "string", "ref_norm": "string", "hyp_norm": "string", "substitutions": "Int64",
    "deletions": "Int64", "insertions": "Int64", "ref_words": "Int64", "wer_errors": "Int64", "cer_errors": "Int64",
    "ref_chars": "Int64", "n_tokens": "Int64", "total_ms": "float64",
}  # fmt: skip


def row(cell: ModelCell, utt_id: str, text: str, status: Status, reason: str | None = None, **facts: Any) -> dict:
    """One raw row, for a transcript (`facts`: hyp_text, hyp_tokens, timings, node, cpu, attempt)
    or for an utterance without one (`reason`): the one constructor for both."""
    unknown = set(facts) - set(RAW_COLUMNS)
    assert not unknown, f"not raw columns: {unknown}"
    values = {c: None for c in RAW_COLUMNS}
    values.update(size=cell.size, target=cell.target, quant=cell.quant, audio_ctx=cell.audio_ctx)
    values.update(utt_id=utt_id, ref_text=text)
    values.update({"audio_s": 0.0, "attempt": 0, "batch": 1, "timed": False, **facts})
    values.update(status=Status(status).value, error=reason)
    return values


# The declared schema of utterances.parquet, in column order.
UTTERANCE_COLUMNS = [
    "run_id", "dataset", "utt_id", "size", "target", "quant", "audio_ctx", "ref_text", "hyp_text", "ref_norm",
    "hyp_norm", "hyp_tokens", "reference_tokens", "wer_errors", "substitutions", "deletions", "insertions",
    "ref_words", "cer_errors", "ref_chars", "exact_match", "first_divergence", "token_edit_rate",
    "audio_s", "frontend_ms", "encode_ms", "decode_ms", "n_steps", "n_windows", "n_tokens", "total_ms", "batch",
    "timed", "decoding", "task", "language", "detected_language", "language_prob", "ref_language",
    "scoring_language", "language_match", "meta", "node", "cpu", "runtime", "attempt", "status", "error",
]  # fmt: skip
# their pandas dtypes (what the driver adds to a shard's rows: run_id, the reference comparison)
UTTERANCE_DTYPES: dict[str, str] = {
    c: t
    for c, t in {
        **SHARD_COLUMNS, "run_id": "string", "exact_match": "boolean", "first_divergence": "Int64",
        "token_edit_rate": "Float64", "language_match": "boolean",
    }.items()
    if c in UTTERANCE_COLUMNS and t != "object"
}  # fmt: skip

# The history's tables (harness.nightly.history): each column's SQL type.
TEXT, INT, REAL, BOOL, JSON = "TEXT", "BIGINT", "DOUBLE PRECISION", "BOOLEAN", "JSON"  # JSON: stored as TEXT

RUN_COLUMNS = {
    "run_id": TEXT, "job": TEXT, "started": TEXT, "finished": TEXT, "git_commit": TEXT, "dataset": TEXT,
    "utterances": INT, "cpu": TEXT, "hostname": TEXT, "packages": JSON, "thresholds": JSON,
    "schema_version": INT, "run_dir": TEXT,
}  # fmt: skip
# per model: its place in the summary, its artifact (key, the toolchain that built it), summary.csv's columns
MODEL_COLUMNS = {
    "run_id": TEXT, "position": INT, "dataset": TEXT, "size": TEXT, "target": TEXT, "quant": TEXT, "audio_ctx": INT,
    "language": TEXT, "headline": TEXT, "lang_agreement": REAL, "artifact_key": TEXT,
    "artifact": TEXT, "toolchain": JSON, "prepared": TEXT, "cpu": TEXT, "n": INT, "errors": INT, "wer": REAL,
    "wer_delta": REAL, "wer_delta_lo": REAL, "wer_delta_hi": REAL, "sub": INT, "del": INT, "ins": INT, "cer": REAL,
    "exact_match": REAL, "mean_first_div": REAL, "token_edit_rate": REAL, "n_timed": INT, "p50_ms": REAL,
    "p90_ms": REAL, "p99_ms": REAL, "enc_p50_ms": REAL, "dec_ms_per_tok": REAL, "rtfx": REAL, "runtime": TEXT,
    "artifact_mb": REAL, "status": TEXT, "reason": TEXT,
}  # fmt: skip
_UTTERANCE_TYPES = {
    **dict.fromkeys(("run_id", "utt_id", "size", "target", "quant", "ref_text", "hyp_text", "ref_norm",
                     "hyp_norm", "node", "cpu", "runtime", "status", "error", "decoding", "task", "language",
                     "detected_language", "ref_language", "scoring_language", "dataset"), TEXT),
    **dict.fromkeys(("hyp_tokens", "reference_tokens"), JSON),
    "meta": TEXT,  # already JSON text in utterances.parquet
    **dict.fromkeys(("wer_errors", "substitutions", "deletions", "insertions", "ref_words", "cer_errors",
                     "ref_chars", "first_divergence", "n_steps", "n_windows", "n_tokens", "attempt", "audio_ctx",
                     "batch"), INT),
    **dict.fromkeys(("token_edit_rate", "audio_s", "frontend_ms", "encode_ms", "decode_ms", "total_ms",
                     "language_prob"), REAL),
    **dict.fromkeys(("exact_match", "language_match", "timed"), BOOL),
}  # fmt: skip
# utterances.parquet's declared columns, each with its SQL type (a KeyError here: a new column needs one)
UTTERANCE_HISTORY_COLUMNS = {c: _UTTERANCE_TYPES[c] for c in UTTERANCE_COLUMNS}
# `position`: the row's place in utterances.parquet, so the rows read back in the order written
TABLES = {"runs": RUN_COLUMNS, "models": MODEL_COLUMNS, "utterances": {**UTTERANCE_HISTORY_COLUMNS, "position": INT}}
