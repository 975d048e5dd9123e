"""Scoring, after inference and never on workers: normalise, WER/CER, token divergence, per utterance.

Text is normalised with openai-whisper's `EnglishTextNormalizer`; corpus WER is
Σ(S + D + I) / Σ reference words (never a mean of per-utterance rates), computed by jiwer, and
the per-utterance counts are kept so anyone can recompute it from `utterances.parquet`.
"""

from __future__ import annotations

from functools import lru_cache

import jiwer
import numpy as np
import pandas as pd
from rapidfuzz.distance import Levenshtein

from harness.core.status import Status
from harness.core.target import REFERENCE

# 2: `cpu`; 3: `status` (a harness.core.status.Status value) beside `error`, the reason, and
# `attempt`; 4: `n_windows` (30 s windows decoded: 1 in short form) and `decoding` (short or long
# form, and how); 5: `runtime` per row (what executed it: a board's NPU, a CPU interpreter, …)
SCHEMA_VERSION = 5

# The declared schema of utterances.parquet, in column order.
UTTERANCE_COLUMNS = [
    "run_id", "utt_id", "size", "target", "quant", "ref_text", "hyp_text", "ref_norm", "hyp_norm",
    "hyp_tokens", "reference_tokens", "wer_errors", "substitutions", "deletions", "insertions",
    "ref_words", "cer_errors", "ref_chars", "exact_match", "first_divergence", "token_edit_rate",
    "audio_s", "frontend_ms", "encode_ms", "decode_ms", "n_steps", "n_windows", "n_tokens", "total_ms", "decoding",
    "node", "cpu", "runtime", "attempt", "status", "error",
]  # fmt: skip


@lru_cache(maxsize=1)
def normalizer():  # -> whisper.normalizers.EnglishTextNormalizer
    from whisper.normalizers import EnglishTextNormalizer

    return EnglishTextNormalizer()


def normalize(text: str) -> str:
    return normalizer()(text or "")


def _edit_counts(ref: str, hyp: str) -> tuple[int, int, int, int]:
    """(substitutions, deletions, insertions, reference words) between two normalised texts."""
    if not ref.split():  # jiwer refuses an empty reference: every hypothesis word is inserted
        return 0, 0, len(hyp.split()), 0
    out = jiwer.process_words(ref, hyp)
    return out.substitutions, out.deletions, out.insertions, len(ref.split())


def _char_errors(ref: str, hyp: str) -> tuple[int, int]:
    if not ref:
        return len(hyp), 0
    out = jiwer.process_characters(ref, hyp)
    return out.substitutions + out.deletions + out.insertions, len(ref)


def first_divergence(hyp: list[int], ref: list[int]) -> int | None:
    """Index of the first token where hyp and ref differ; None when they are identical."""
    for i, (a, b) in enumerate(zip(hyp, ref, strict=False)):
        if a != b:
            return i
    return None if len(hyp) == len(ref) else min(len(hyp), len(ref))


def score_rows(raw: pd.DataFrame) -> pd.DataFrame:
    """Raw worker rows (all models) → the utterances table with every per-utterance metric."""
    df = raw.copy()
    ok = df["status"] == Status.OK
    reference = df[(df["target"] == REFERENCE) & ok].set_index(["size", "utt_id"])["hyp_tokens"]
    df["reference_tokens"] = [reference.get((s, u)) for s, u in zip(df["size"], df["utt_id"], strict=True)]
    df["ref_norm"] = df["ref_text"].map(normalize)
    df["hyp_norm"] = df["hyp_text"].where(ok, None).map(lambda t: normalize(t) if isinstance(t, str) else None)
    counts = [
        _edit_counts(r, h) if isinstance(h, str) else (None, None, None, len(r.split()))
        for r, h in zip(df["ref_norm"], df["hyp_norm"], strict=True)
    ]
    df[["substitutions", "deletions", "insertions", "ref_words"]] = pd.DataFrame(counts, index=df.index, dtype="Int64")
    df["wer_errors"] = df["substitutions"] + df["deletions"] + df["insertions"]
    chars = [
        _char_errors(r, h) if isinstance(h, str) else (None, len(r))
        for r, h in zip(df["ref_norm"], df["hyp_norm"], strict=True)
    ]
    df[["cer_errors", "ref_chars"]] = pd.DataFrame(chars, index=df.index, dtype="Int64")

    def divergence(hyp, ref):
        if not isinstance(hyp, (list, np.ndarray)) or not isinstance(ref, (list, np.ndarray)):
            return None, None, None
        hyp, ref = list(hyp), list(ref)
        return hyp == ref, first_divergence(hyp, ref), Levenshtein.distance(hyp, ref) / max(len(ref), 1)

    div = [divergence(h, r) for h, r in zip(df["hyp_tokens"], df["reference_tokens"], strict=True)]
    df["exact_match"] = pd.array([d[0] for d in div], dtype="boolean")
    df["first_divergence"] = pd.array([d[1] for d in div], dtype="Int64")
    df["token_edit_rate"] = pd.array([d[2] for d in div], dtype="Float64")
    df["n_tokens"] = pd.array(
        [len(t) if isinstance(t, (list, np.ndarray)) else None for t in df["hyp_tokens"]], dtype="Int64"
    )
    df["n_windows"] = pd.array(df["n_windows"], dtype="Int64")
    df["total_ms"] = df["frontend_ms"] + df["encode_ms"] + df["decode_ms"]
    return df[UTTERANCE_COLUMNS]
