"""Aggregates over the utterances table, one row per model, and the table `run` prints.

A model is (size, target, quant, audio_ctx). Corpus WER = Σ errors / Σ reference words over the
utterances that decoded; ΔWER against the size's reference at the full audio context with a
paired bootstrap interval; the languages that scored it and its headline figure (`scoring`:
CER for languages without spaces); language-detection agreement with that reference; latency
percentiles and RTFx (harness.results.timing).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd

from harness.core.status import Status
from harness.core.target import REFERENCE
from harness.core.window import FULL_AUDIO_CTX
from harness.results.scoring import headline
from harness.results.timing import rtfx

MODEL_KEY = ["size", "target", "quant", "audio_ctx"]
LISTED_LANGUAGES = 3  # a model scored in more languages shows their count

BOOTSTRAP_SAMPLES = 1000
DELTA_COLUMN = "Δwer [95% CI]"  # the shown column of wer_delta and its interval


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
    both = model.loc[model["status"] == Status.OK, cols].merge(
        reference.loc[reference["status"] == Status.OK, cols[:2]], on="utt_id", suffixes=("", "_ref")
    )
    if both.empty or both["ref_words"].sum() == 0:
        return float("nan"), float("nan"), float("nan")
    e_m, e_r, w = (both[c].to_numpy(dtype=float) for c in ("wer_errors", "wer_errors_ref", "ref_words"))

    def delta(e_m: np.ndarray, e_r: np.ndarray, w: np.ndarray) -> np.ndarray:
        return (e_m.sum(axis=-1) - e_r.sum(axis=-1)) / np.maximum(w.sum(axis=-1), 1.0)

    return paired_bootstrap(delta, e_m, e_r, w, seed=seed)


def summarize(utts: pd.DataFrame, models: dict[tuple[str, str, str, int], dict] | None = None) -> pd.DataFrame:
    """One row per (size, target, quant, audio_ctx) over the utterances table.

    `models` adds facts from each artifact's manifest: `runtime` (what executes it, e.g. a CPU
    emulation of an NPU; the rows' own `runtime`, where workers said, comes first) and
    `artifact_mb`; its order is the order of the rows (the job's).
    `status` is "ok", or the status of the utterances without a transcript, and `reason` why.
    """
    rows = []
    for (size, target, quant, audio_ctx), g in utts.groupby(MODEL_KEY, sort=False):
        ok = g[g["status"] == Status.OK]
        is_reference = (utts["target"] == REFERENCE) & (utts["audio_ctx"] == FULL_AUDIO_CTX)
        reference = utts[(utts["size"] == size) & is_reference]
        compared = target != REFERENCE or audio_ctx != FULL_AUDIO_CTX
        delta, lo, hi = wer_delta(g, reference) if compared else (float("nan"),) * 3
        facts = (models or {}).get((size, target, quant, audio_ctx), {})
        matched = ok["language_match"].dropna()
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
                "audio_ctx": int(audio_ctx),
                **_languages(g),
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
                "lang_agreement": float(matched.astype(float).mean()) if len(matched) else float("nan"),
                "p50_ms": _pct(total, 50),
                "p90_ms": _pct(total, 90),
                "p99_ms": _pct(total, 99),
                "enc_p50_ms": _pct(ok["encode_ms"].astype(float), 50),
                "dec_ms_per_tok": float(ok["decode_ms"].sum() / ok["n_steps"].sum()) if len(ok) else float("nan"),
                "rtfx": rtfx(float(ok["audio_s"].sum()), float(total.sum())),
                "runtime": _runtime(ok, facts.get("runtime", "")),
                "artifact_mb": facts.get("artifact_mb", float("nan")),
                **_status(g[g["status"] != Status.OK]),
            }
        )
    summary = pd.DataFrame(rows)
    if models:
        order = {key: i for i, key in enumerate(models)}
        keys = zip(*(summary[c] for c in MODEL_KEY), strict=True)
        rank = [order.get(key, len(order)) for key in keys]
        summary = summary.iloc[np.argsort(rank, kind="stable")].reset_index(drop=True)
    return summary


def _runtime(ok: pd.DataFrame, label: str) -> str:
    """What executed a model's rows (each worker says, e.g. a board's NPU), else its artifact's label."""
    seen = sorted(ok["runtime"].dropna().unique()) if "runtime" in ok else []
    return " + ".join(seen) or label


def _languages(rows: pd.DataFrame) -> dict[str, str]:
    """The languages whose rules scored a model's utterances and its headline figure: `wer`,
    `cer` (languages without spaces), or `wer+cer` for a set that mixes both kinds."""
    languages = sorted(set(rows["scoring_language"].dropna()))
    shown = "+".join(languages) if len(languages) <= LISTED_LANGUAGES else f"{len(languages)} languages"
    kinds = sorted({headline(language) for language in languages}, reverse=True)
    return {"language": shown, "headline": "+".join(kinds)}


def _status(failed: pd.DataFrame) -> dict[str, str]:
    """A model's status and reason from its rows without a transcript: the most common of each."""
    if failed.empty:
        return {"status": Status.OK.value, "reason": ""}
    reasons = failed["error"].value_counts()
    reason = reasons.index[0] if len(reasons) == 1 else f"{len(failed)} errors, e.g. {reasons.index[0]}"
    return {"status": failed["status"].value_counts().index[0], "reason": reason}


def _pct(values: pd.Series, q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else float("nan")


def summary_cells(summary: pd.DataFrame) -> pd.DataFrame:
    """The summary as every table shows it (`run`'s, the report's): rates and times as strings, Δwer with
    its interval in one column, the reason left out (the tables list it under themselves)."""
    shown = summary.copy()
    shown.insert(
        shown.columns.get_loc("wer") + 1,
        DELTA_COLUMN,
        [
            f"{100 * d:+.2f}% [{100 * lo:+.2f}, {100 * hi:+.2f}]" if d == d else "-"
            for d, lo, hi in zip(shown["wer_delta"], shown["wer_delta_lo"], shown["wer_delta_hi"], strict=True)
        ],
    )
    shown = shown.drop(columns=["wer_delta", "wer_delta_lo", "wer_delta_hi", "reason"])
    for col in ("wer", "cer", "exact_match", "token_edit_rate", "lang_agreement"):
        shown[col] = shown[col].map(lambda v: f"{100 * v:.2f}%" if v == v else "-")
    for col in ("mean_first_div", "p50_ms", "p90_ms", "p99_ms", "enc_p50_ms", "dec_ms_per_tok", "rtfx", "artifact_mb"):
        shown[col] = shown[col].map(lambda v: f"{v:.1f}" if v == v else "-")
    return shown


def status_notes(summary: pd.DataFrame) -> list[str]:
    """One line per model that is not `ok`: its status and the whole reason."""
    return [
        f"{size}/{target}/{quant}{'' if ctx == FULL_AUDIO_CTX else f'@ctx{ctx}'}: {status}: {reason}"
        for size, target, quant, ctx, status, reason in zip(
            *(summary[c] for c in (*MODEL_KEY, "status", "reason")), strict=True
        )
        if status != Status.OK
    ]


def format_summary(summary: pd.DataFrame) -> str:
    from tabulate import tabulate

    notes = [f"- {note}" for note in status_notes(summary)]
    table = tabulate(summary_cells(summary), headers="keys", tablefmt="github", showindex=False)
    return table + ("\n\n" + "\n".join(notes) if notes else "")
