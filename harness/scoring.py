"""Scoring, after inference and never on workers: normalise, WER/CER, token divergence, latency.

Text is normalised with openai-whisper's `EnglishTextNormalizer`; corpus WER is
Σ(S + D + I) / Σ reference words (never a mean of per-utterance rates), computed by jiwer, and
the per-utterance counts are kept so anyone can recompute it from `utterances.parquet`.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import jiwer
import numpy as np
import pandas as pd
from rapidfuzz.distance import Levenshtein

from converters.registry import REFERENCE
from harness.timing import rtfx

SCHEMA_VERSION = 2  # 2: `cpu`

# The declared schema of utterances.parquet, in column order.
UTTERANCE_COLUMNS = [
    "run_id", "utt_id", "size", "target", "quant", "ref_text", "hyp_text", "ref_norm", "hyp_norm",
    "hyp_tokens", "reference_tokens", "wer_errors", "substitutions", "deletions", "insertions",
    "ref_words", "cer_errors", "ref_chars", "exact_match", "first_divergence", "token_edit_rate",
    "audio_s", "frontend_ms", "encode_ms", "decode_ms", "n_steps", "n_tokens", "total_ms", "node", "cpu",
    "error",
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
    ok = df["error"].isna()
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
    df["total_ms"] = df["frontend_ms"] + df["encode_ms"] + df["decode_ms"]
    return df[UTTERANCE_COLUMNS]


BOOTSTRAP_SAMPLES = 1000


def paired_bootstrap(
    statistic: Callable[..., np.ndarray], *columns: np.ndarray, seed: int = 0
) -> tuple[float, float, float]:
    """`statistic` over paired per-utterance columns, with its 95% bootstrap interval: the same
    resampled rows from every column. `statistic` reduces the last axis: it gets 1-D columns for the
    estimate and (samples, n) arrays for the resamples. (wer_delta says why utterances are resampled.)
    """
    idx = np.random.default_rng(seed).integers(0, len(columns[0]), size=(BOOTSTRAP_SAMPLES, len(columns[0])))
    lo, hi = np.percentile(statistic(*(c[idx] for c in columns)), [2.5, 97.5])
    return float(statistic(*columns)), float(lo), float(hi)


def wer_delta(model: pd.DataFrame, reference: pd.DataFrame, seed: int = 0) -> tuple[float, float, float]:
    """WER(model) - WER(reference) with a 95% paired bootstrap interval over shared utterances.

    Resampling utterances (not words) keeps each utterance's errors together, and pairing the two
    models on the same resampled set cancels the variance the utterances themselves bring.
    """
    cols = ["utt_id", "wer_errors", "ref_words"]
    both = model.loc[model["error"].isna(), cols].merge(
        reference.loc[reference["error"].isna(), cols[:2]], on="utt_id", suffixes=("", "_ref")
    )
    if both.empty or both["ref_words"].sum() == 0:
        return float("nan"), float("nan"), float("nan")
    e_m, e_r, w = (both[c].to_numpy(dtype=float) for c in ("wer_errors", "wer_errors_ref", "ref_words"))

    def delta(e_m: np.ndarray, e_r: np.ndarray, w: np.ndarray) -> np.ndarray:
        return (e_m.sum(axis=-1) - e_r.sum(axis=-1)) / np.maximum(w.sum(axis=-1), 1.0)

    return paired_bootstrap(delta, e_m, e_r, w, seed=seed)


def summarize(utts: pd.DataFrame, models: dict[tuple[str, str, str], dict] | None = None) -> pd.DataFrame:
    """One row per (size, target, quant) over the utterances table.

    `models` adds facts from each artifact's manifest: `runtime` (what executed it, e.g. a CPU
    emulation of an NPU) and `artifact_mb`; its order is the order of the rows (the job's).
    `status` is "ok", or why utterances have no transcript (the model's own line when none has).
    """
    rows = []
    for (size, target, quant), g in utts.groupby(["size", "target", "quant"], sort=False):
        ok = g[g["error"].isna()]
        reference = utts[(utts["size"] == size) & (utts["target"] == REFERENCE)]
        delta, lo, hi = wer_delta(g, reference) if target != REFERENCE else (float("nan"),) * 3
        words = int(ok["ref_words"].sum())
        errors = int(ok["wer_errors"].sum())
        chars = int(ok["ref_chars"].sum())
        diverged = ok["first_divergence"].dropna()
        total = ok["total_ms"].astype(float)
        rows.append(
            {
                "size": size,
                "target": target,
                "quant": quant,
                "n": len(g),
                "errors": len(g) - len(ok),
                "wer": errors / words if words else float("nan"),
                "wer_delta": delta,
                "wer_delta_lo": lo,
                "wer_delta_hi": hi,
                "sub": int(ok["substitutions"].sum()),
                "del": int(ok["deletions"].sum()),
                "ins": int(ok["insertions"].sum()),
                "cer": int(ok["cer_errors"].sum()) / chars if chars else float("nan"),
                "exact_match": float(ok["exact_match"].astype(float).mean()) if len(ok) else float("nan"),
                "mean_first_div": float(diverged.astype(float).mean()) if len(diverged) else float("nan"),
                "token_edit_rate": float(ok["token_edit_rate"].astype(float).mean()) if len(ok) else float("nan"),
                "p50_ms": _pct(total, 50),
                "p90_ms": _pct(total, 90),
                "p99_ms": _pct(total, 99),
                "enc_p50_ms": _pct(ok["encode_ms"].astype(float), 50),
                "dec_ms_per_tok": float(ok["decode_ms"].sum() / ok["n_steps"].sum()) if len(ok) else float("nan"),
                "rtfx": rtfx(float(ok["audio_s"].sum()), float(total.sum())),
                "runtime": (models or {}).get((size, target, quant), {}).get("runtime", ""),
                "artifact_mb": (models or {}).get((size, target, quant), {}).get("artifact_mb", float("nan")),
                "status": _status(g["error"].dropna()),
            }
        )
    summary = pd.DataFrame(rows)
    if models:
        order = {key: i for i, key in enumerate(models)}
        keys = zip(summary["size"], summary["target"], summary["quant"], strict=True)
        rank = [order.get(key, len(order)) for key in keys]
        summary = summary.iloc[np.argsort(rank, kind="stable")].reset_index(drop=True)
    return summary


def _status(errors: pd.Series) -> str:
    if errors.empty:
        return "ok"
    most = errors.value_counts()
    return most.index[0] if len(most) == 1 else f"{len(errors)} errors, e.g. {most.index[0]}"


def _pct(values: pd.Series, q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else float("nan")
