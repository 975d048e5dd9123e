"""Aggregates over the utterances table, one row per dataset and model, and the table `run` prints.

A model is (size, target, quant, audio_ctx). Each dataset of a suite gets its rows, and a suite
its pooled rows (`POOLED`: Σ errors / Σ words over every dataset's utterances, never a mean of the
datasets' rates). Corpus WER = Σ errors / Σ reference words over the utterances that decoded;
ΔWER against the size's reference at the full audio context with a paired bootstrap interval; the
languages that scored it and its headline figure (`scoring`: CER for languages without spaces);
language-detection agreement with that reference; latency percentiles over the latency sample
only (`timed` rows, decoded alone: `n_timed` says how many) and RTFx over every row (throughput,
batches included; harness.results.timing). `breakdown` makes the same comparison per group of a
metadata column, the language or the duration.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable

import numpy as np
import pandas as pd

from harness.core.status import Status
from harness.core.target import REFERENCE
from harness.core.window import FULL_AUDIO_CTX
from harness.job.spec import DURATION, DURATION_BUCKETS, LANGUAGE, ModelCell
from harness.results.scoring import headline
from harness.results.timing import rtfx

MODEL_KEY = ["size", "target", "quant", "audio_ctx"]
POOLED = "all"  # the dataset column of a suite's pooled rows
BREAKDOWN_FILE = "breakdown.csv"  # a run folder's breakdown tables (`breakdown_table`)
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
    rng, n = np.random.default_rng(seed), len(columns[0])
    # resamples drawn a block at a time (the same stream as all at once): a million rows must not
    # need samples x rows indices in memory at once
    block = max(1, min(BOOTSTRAP_SAMPLES, 2**22 // max(n, 1)))
    values = []
    for done in range(0, BOOTSTRAP_SAMPLES, block):
        idx = rng.integers(0, n, size=(min(block, BOOTSTRAP_SAMPLES - done), n))
        values.append(statistic(*(c[idx] for c in columns)))
    lo, hi = np.percentile(np.concatenate(values), [2.5, 97.5])
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
    # Σ(e_m - e_r) / Σw: one column of differences, so a resample gathers two columns, not three
    d = both["wer_errors"].to_numpy(dtype=float) - both["wer_errors_ref"].to_numpy(dtype=float)
    w = both["ref_words"].to_numpy(dtype=float)

    def delta(d: np.ndarray, w: np.ndarray) -> np.ndarray:
        return d.sum(axis=-1) / np.maximum(w.sum(axis=-1), 1.0)

    return paired_bootstrap(delta, d, w, seed=seed)


def summarize(utts: pd.DataFrame, models: dict[tuple[str, str, str, int], dict] | None = None) -> pd.DataFrame:
    """One row per dataset and (size, target, quant, audio_ctx) over the utterances table (its
    summary columns: `harness.results.aggregate` keeps only those), and for a suite the pooled rows.

    `models` adds facts from each artifact's manifest: `runtime` (what executes it, e.g. a CPU
    emulation of an NPU; the rows' own `runtime`, where workers said, comes first) and
    `artifact_mb`; its order is the order of the rows (the job's) within each dataset.
    `status` is "ok", or the status of the utterances without a transcript, and `reason` why.
    """
    named = utts["dataset"].astype(object).where(utts["dataset"].notna(), "") if "dataset" in utts else None
    datasets = list(dict.fromkeys(named)) if named is not None else [""]
    parts = [(d, utts if len(datasets) == 1 else utts[(named == d).to_numpy()]) for d in datasets]
    if len(datasets) > 1:
        parts.append((POOLED, utts))
    summary = pd.DataFrame(
        [
            {"dataset": dataset, **_model_row(part, key, g, models)}
            for dataset, part in parts
            for key, g in _models(part)
        ]
    )
    if models and len(summary):
        order = {key: i for i, key in enumerate(models)}
        sets = {d: i for i, (d, _) in enumerate(parts)}
        rank = [
            sets[d] * (len(order) + 1) + order.get(key, len(order))
            for d, key in zip(summary["dataset"], zip(*(summary[c] for c in MODEL_KEY), strict=True), strict=True)
        ]
        summary = summary.iloc[np.argsort(rank, kind="stable")].reset_index(drop=True)
    return summary


def _models(utts: pd.DataFrame):
    return utts.groupby(MODEL_KEY, sort=False, observed=True)


def reference_rows(utts: pd.DataFrame, size: str) -> pd.DataFrame:
    """The rows every model of `size` is compared with: its reference at the full audio context."""
    is_reference = (utts["target"] == REFERENCE) & (utts["audio_ctx"] == FULL_AUDIO_CTX) & (utts["size"] == size)
    return utts[is_reference.to_numpy(dtype=bool)]


def _model_row(utts: pd.DataFrame, key: tuple, g: pd.DataFrame, models: dict | None) -> dict:
    size, target, quant, audio_ctx = key
    ok = g[(g["status"] == Status.OK).to_numpy(dtype=bool)]
    compared = target != REFERENCE or audio_ctx != FULL_AUDIO_CTX
    delta, lo, hi = wer_delta(g, reference_rows(utts, size)) if compared else (float("nan"),) * 3
    facts = (models or {}).get((size, target, quant, audio_ctx), {})
    matched = ok["language_match"].dropna()
    words = int(ok["ref_words"].sum())
    errors = int(ok["wer_errors"].sum())
    chars = int(ok["ref_chars"].sum())
    diverged = ok["first_divergence"].dropna()
    timed = ok[_timed(ok)]  # latency: rows decoded alone only
    total = timed["total_ms"].astype(float)
    return {
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
        "n_timed": len(timed),
        "p50_ms": _pct(total, 50),
        "p90_ms": _pct(total, 90),
        "p99_ms": _pct(total, 99),
        "enc_p50_ms": _pct(timed["encode_ms"].astype(float), 50),
        "dec_ms_per_tok": float(timed["decode_ms"].sum() / timed["n_steps"].sum()) if len(timed) else float("nan"),
        # throughput over every row: a batched row's times are its share of its batch's
        "rtfx": rtfx(float(ok["audio_s"].sum()), float(ok["total_ms"].astype(float).sum())),
        "runtime": _runtime(ok, facts.get("runtime", "")),
        "artifact_mb": facts.get("artifact_mb", float("nan")),
        **_status(g[(g["status"] != Status.OK).to_numpy(dtype=bool)]),
    }


def _timed(rows: pd.DataFrame) -> np.ndarray:
    """Which rows are in the latency sample (a row of a run before it, without `timed`: every one)."""
    if "timed" not in rows:
        return np.ones(len(rows), dtype=bool)
    return rows["timed"].astype("boolean").fillna(True).to_numpy(dtype=bool)


def _runtime(ok: pd.DataFrame, label: str) -> str:
    """What executed a model's rows (each worker says, e.g. a board's NPU), else its artifact's label."""
    seen = sorted(set(ok["runtime"].dropna())) if "runtime" in ok else []
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
    reasons = failed["error"].astype(object).value_counts()
    reason = reasons.index[0] if len(reasons) == 1 else f"{len(failed)} errors, e.g. {reasons.index[0]}"
    return {"status": str(failed["status"].astype(object).value_counts().index[0]), "reason": reason}


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
    if "dataset" in shown and shown["dataset"].nunique() == 1:  # one dataset: its name is in the run's facts
        shown = shown.drop(columns=["dataset"])
    for col in ("mean_first_div", "p50_ms", "p90_ms", "p99_ms", "enc_p50_ms", "dec_ms_per_tok", "rtfx", "artifact_mb"):
        shown[col] = shown[col].map(lambda v: f"{v:.1f}" if v == v else "-")
    return shown


def status_notes(summary: pd.DataFrame) -> list[str]:
    """One line per model (and dataset of a suite) that is not `ok`: its status and the whole reason."""
    several = "dataset" in summary and summary["dataset"].nunique() > 1
    datasets = summary["dataset"] if "dataset" in summary else [""] * len(summary)
    return [
        f"{f'{dataset}: ' if several else ''}{size}/{target}/{quant}{'' if ctx == FULL_AUDIO_CTX else f'@ctx{ctx}'}: "
        f"{status}: {reason}"
        for dataset, size, target, quant, ctx, status, reason in zip(
            datasets, *(summary[c] for c in (*MODEL_KEY, "status", "reason")), strict=True
        )
        if status != Status.OK and (not several or dataset != POOLED)
    ]


def format_summary(summary: pd.DataFrame) -> str:
    from tabulate import tabulate

    notes = [f"- {note}" for note in status_notes(summary)]
    table = tabulate(summary_cells(summary), headers="keys", tablefmt="github", showindex=False)
    return table + ("\n\n" + "\n".join(notes) if notes else "")


# -- breakdowns -------------------------------------------------------------------------------------


def duration_bucket(seconds: float) -> str:
    """The duration group of an utterance of `seconds` (`harness.job.spec.DURATION_BUCKETS`)."""
    edges = (0.0, *DURATION_BUCKETS)
    for low, high in itertools.pairwise(edges):
        if seconds < high:
            return f"{low:g}-{high:g} s"
    return f">={edges[-1]:g} s"


def group_values(utts: pd.DataFrame, name: str) -> pd.Series:
    """Each row's group in the breakdown `name`: the language that scored it, its duration bucket,
    or the metadata column's value (`meta`; "-" where its dataset has no such column)."""
    if name == LANGUAGE:
        return utts["scoring_language"].astype(object)
    if name == DURATION:
        return utts["audio_s"].astype(float).map(duration_bucket)
    meta = utts["meta"].astype("category") if "meta" in utts else pd.Series([None] * len(utts), dtype="category")
    values = {m: json.loads(m).get(name, "-") for m in meta.cat.categories}
    return meta.cat.rename_categories(values).astype(object).fillna("-") if values else meta.astype(object).fillna("-")


def breakdown_table(utts: pd.DataFrame, names: tuple[str, ...]) -> pd.DataFrame:
    """Per breakdown, group and model (over every dataset of the run): utterances, errors, the
    headline rate, WER, CER and ΔWER against the size's reference on the same group's utterances
    with its paired bootstrap interval."""
    rows = []
    for name in names:
        groups = group_values(utts, name).to_numpy()
        for group in sorted(set(groups), key=_group_order):
            part = utts[groups == group]
            for key, g in _models(part):
                full = _model_row(part, key, g, None)
                rows.append(
                    {
                        "breakdown": name,
                        "group": str(group),
                        **{c: full[c] for c in (*MODEL_KEY, "n", "errors", "headline", "wer", "cer")},
                        **{c: full[c] for c in ("wer_delta", "wer_delta_lo", "wer_delta_hi", "exact_match")},
                    }
                )
    return pd.DataFrame(rows, columns=BREAKDOWN_COLUMNS)


def _group_order(group: object) -> tuple:
    """Groups in a table's order: duration buckets by their length, anything else by its text."""
    text = str(group)
    head = text.lstrip(">=").split("-")[0].split(" ")[0]
    try:
        return (0, float(head), text)
    except ValueError:
        return (1, 0.0, text)


BREAKDOWN_COLUMNS = [
    "breakdown", "group", *MODEL_KEY, "n", "errors", "headline", "wer", "cer", "wer_delta", "wer_delta_lo",
    "wer_delta_hi", "exact_match",
]  # fmt: skip


def breakdown_cells(rows: pd.DataFrame) -> pd.DataFrame:
    """One breakdown's rows as every view shows them (the terminal's, the report's): a row per
    group, its utterances `n`, and a column per model: its headline rate (CER where the group's
    words are characters) and, for a compared model, Δ with its 95% interval."""
    labels = [ModelCell(*key).label for key in zip(*(rows[k] for k in MODEL_KEY), strict=True)]
    cells = [
        _rate(r) + ("" if r.wer_delta != r.wer_delta else f" ({100 * r.wer_delta:+.2f} "
                    f"[{100 * r.wer_delta_lo:+.2f}, {100 * r.wer_delta_hi:+.2f}])")
        for r in rows.itertuples()
    ]  # fmt: skip
    wide = (
        rows.assign(model=labels, cell=cells)
        .pivot_table(index="group", columns="model", values="cell", aggfunc="first", sort=False)
        .reindex(columns=list(dict.fromkeys(labels)))
    )
    wide.insert(0, "n", rows.groupby("group", sort=False)["n"].max().reindex(wide.index))
    return wide.fillna("-")


def format_breakdown(table: pd.DataFrame) -> str:
    """The breakdown tables, compact, one after another."""
    from tabulate import tabulate

    return "\n\n".join(
        f"by {name}:\n" + tabulate(breakdown_cells(rows), headers="keys", tablefmt="github")
        for name, rows in table.groupby("breakdown", sort=False)
    )


def _rate(row) -> str:
    value = row.cer if row.headline == "cer" else row.wer
    return "-" if value != value else f"{100 * value:.2f}%" + (" cer" if row.headline == "cer" else "")
