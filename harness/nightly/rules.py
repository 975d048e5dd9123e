"""The gate's rules (`harness.nightly.gate`): per model, small pure functions of the baseline's and
the candidate's rows and the job's `thresholds:` (`thresholds.ThresholdsSpec`), each giving what
it measured and, past its limit, a regression line; `judge` runs them all, in `RULES`' order.

Before any rule, `unpaired` settles a model there is nothing to compare for: the baseline
decoded nothing (a note), or the candidate lacks the model or decoded nothing with it (a
regression). Then, over the utterances both runs decoded:
- lost utterances: more than `max_lost_utterances` the baseline decoded and the candidate did not;
- ΔWER = WER(candidate) - WER(baseline) with a 95% paired bootstrap interval
  (`scoring.wer_delta`, the same definition the summary's Δwer uses), by its upper bound;
- the share of utterances where the candidate has no more word errors than the baseline;
- the fall in exact match (the share token-identical to each run's own reference model);
- the latency ratio Σcandidate ms / Σbaseline ms with its paired bootstrap interval, by its lower
  bound, only when both ran on the same kind of CPU (rows' `cpu`): a different CPU times, and
  quantizes, differently;
- a latency change point over the history: the median p50 of the last N runs against the runs
  before them (`latency_drift`), so a slow drift is caught, not only a one-night jump.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import pandas as pd

from harness.job.thresholds import ThresholdsSpec
from harness.nightly.verdict import Drift, ModelCheck, pct
from harness.results.summary import paired_bootstrap, wer_delta

MAD_SCALE = 1.4826  # MAD * this estimates a normal distribution's standard deviation
# the utterance columns the rules (and `wer_delta`) read: the gate fetches no other from the history
COLUMNS = ("utt_id", "status", "error", "cpu", "wer_errors", "ref_words", "exact_match", "total_ms", "timed")


@dataclass(frozen=True)
class Evidence:
    """One model's rows in both runs, as the rules read them."""

    base: pd.DataFrame  # the baseline's decoded rows (no error)
    cand: pd.DataFrame  # every candidate row, decoded or not (a lost utterance's error is there)
    cand_ok: pd.DataFrame  # the candidate's decoded rows
    # the model's p50_ms in each run of the job and dataset up to the candidate, oldest first, on
    # the candidate's one kind of CPU; None when its rows ran on several kinds or an unrecorded one
    trend: list[float] | None = None

    @cached_property  # several rules read it: merged once
    def paired(self) -> pd.DataFrame:
        """The utterances both decoded, one row each: the baseline's columns suffixed _b, the candidate's _c."""
        return self.base.merge(self.cand_ok, on="utt_id", suffixes=("_b", "_c"))


@dataclass(frozen=True)
class Finding:
    """What one rule found: the numbers it measured (ModelCheck's fields), a regression, a note."""

    measured: dict[str, Any] = field(default_factory=dict)
    regression: str | None = None
    note: str | None = None


Rule = Callable[[Evidence, ThresholdsSpec], Finding]


def latency_drift(values: list[float], window: int, mads: float, min_ratio: float) -> Drift | None:
    """The last `window` values against the up to 3 * `window` before them; None below 2 * `window`.

    Medians make one noisy night count for little on either side; a step of any size shows once
    `window` runs sit above it, and a slow drift once it has accumulated past the limit.
    """
    if window <= 0 or len(values) < 2 * window:
        return None
    recent, earlier = np.asarray(values[-window:]), np.asarray(values[-4 * window : -window])
    centre = float(np.median(earlier))
    spread = MAD_SCALE * float(np.median(np.abs(earlier - centre)))
    limit = centre + max(mads * spread, (min_ratio - 1) * centre)
    return Drift(float(np.median(recent)), centre, limit, len(recent), len(earlier))


def no_worse_share(candidate_errors: np.ndarray, baseline_errors: np.ndarray) -> float:
    """Share of paired utterances where the candidate has at most the baseline's word errors."""
    return float(np.mean(candidate_errors <= baseline_errors))


def latency_ratio(candidate_ms: np.ndarray, baseline_ms: np.ndarray) -> tuple[float, float, float]:
    """Σcandidate / Σbaseline over paired utterances, with its 95% paired bootstrap interval."""
    return paired_bootstrap(lambda c, b: c.sum(axis=-1) / b.sum(axis=-1), candidate_ms, baseline_ms)


def unpaired(
    model: str,
    base: pd.DataFrame | None,
    cand: pd.DataFrame | None,
    base_status: str,
    cand_status: str | None,
) -> ModelCheck | None:
    """The check of a model with nothing to pair (`base`: its rows in the baseline, at least the
    decoded ones, `cand`: all its rows in the candidate, None when a run has none; the statuses as
    the summary's notes say them); None when the rules can judge it."""
    decoded = 0 if base is None else int(base["error"].isna().sum())
    if not decoded:  # nothing to hold the candidate to
        return ModelCheck(model, notes=(f"no baseline: the baseline decoded nothing ({base_status})",))
    if cand is None or cand_status is None:
        return ModelCheck(model, regressions=(f"missing from the candidate (the baseline decoded {decoded})",))
    if cand["error"].notna().all():
        return ModelCheck(model, regressions=(f"decoded nothing: {cand_status} (the baseline decoded {decoded})",))
    return None


def lost_utterances(evidence: Evidence, limits: ThresholdsSpec) -> Finding:
    lost = sorted(set(evidence.base["utt_id"]) - set(evidence.cand_ok["utt_id"]))
    if len(lost) <= limits.max_lost_utterances:
        return Finding()
    cand = evidence.cand
    why = cand.loc[cand["utt_id"] == lost[0], "error"].dropna()
    example = f", e.g. {lost[0]}: {why.iloc[0]}" if len(why) else ""
    return Finding(regression=f"{len(lost)} of {len(evidence.base)} utterances no longer decoded{example}")


def wer_change(evidence: Evidence, limits: ThresholdsSpec) -> Finding:
    delta = wer_delta(evidence.cand_ok, evidence.base)
    if math.isnan(delta[0]):  # no reference words among the paired utterances
        return Finding()
    above = delta[2] > limits.max_wer_delta
    line = f"ΔWER {pct(delta[0])} [95% CI {pct(delta[1])}, {pct(delta[2])}] above {pct(limits.max_wer_delta)}"
    return Finding({"wer_delta": delta}, line if above else None)


def no_worse(evidence: Evidence, limits: ThresholdsSpec) -> Finding:
    paired = evidence.paired
    if paired.empty:
        return Finding()
    share = no_worse_share(*(paired[f"wer_errors_{s}"].to_numpy(dtype=float) for s in "cb"))
    line = f"no worse on {share:.1%} of {len(paired)} utterances, below {limits.min_no_worse_share:.1%}"
    return Finding({"no_worse": share}, line if share < limits.min_no_worse_share else None)


def exact_match_drop(evidence: Evidence, limits: ThresholdsSpec) -> Finding:
    matched = evidence.paired.dropna(subset=["exact_match_b", "exact_match_c"])
    if matched.empty:
        return Finding()
    b, c = (float(matched[f"exact_match_{s}"].astype(float).mean()) for s in "bc")
    line = (
        f"exact match {b:.1%} → {c:.1%}: down {100 * (b - c):.1f} points, above {100 * limits.max_exact_match_drop:.1f}"
    )
    return Finding({"exact_match": (b, c)}, line if b - c > limits.max_exact_match_drop else None)


def latency_change(evidence: Evidence, limits: ThresholdsSpec) -> Finding:
    base_cpus, cand_cpus = set(evidence.base["cpu"].dropna()), set(evidence.cand_ok["cpu"].dropna())
    if base_cpus != cand_cpus:
        return Finding(
            note=f"latency not compared: baseline ran on {_names(base_cpus)}, candidate on {_names(cand_cpus)}"
        )
    if limits.max_latency_ratio is None:  # latency not gated
        return Finding()
    paired = evidence.paired.dropna(subset=["total_ms_b", "total_ms_c"])
    # the latency sample only: rows both runs decoded alone (a batched row's time is its share of
    # its batch's); a row from before the sample was decoded alone (`timed` NULL)
    alone = np.ones(len(paired), dtype=bool)
    for column in ("timed_b", "timed_c", "timed"):  # `timed` alone: only one run's rows have it
        if column in paired:
            alone &= paired[column].astype("boolean").fillna(True).to_numpy(dtype=bool)
    timed = paired[alone]
    if timed.empty:
        return Finding()
    ratio = latency_ratio(timed["total_ms_c"].to_numpy(float), timed["total_ms_b"].to_numpy(float))
    line = (
        f"latency ratio {ratio[0]:.2f} [95% CI {ratio[1]:.2f}, {ratio[2]:.2f}] above {limits.max_latency_ratio:.2f} "
        f"({len(timed)} utterances timed alone in both runs)"
    )
    return Finding({"latency": ratio}, line if ratio[1] > limits.max_latency_ratio else None)


def latency_trend(evidence: Evidence, limits: ThresholdsSpec) -> Finding:
    if evidence.trend is None:  # a trend means something on one kind of CPU only
        return Finding()
    drift = latency_drift(evidence.trend, limits.drift_window, limits.drift_mads, limits.drift_min_ratio)
    if drift is None or not drift.flagged:
        return Finding({"drift": drift})
    line = (
        f"latency drift: median p50 {drift.recent:.1f} ms over the last {drift.recent_runs} runs, "
        f"{drift.earlier:.1f} ms over the {drift.earlier_runs} before (limit {drift.limit:.1f} ms)"
    )
    return Finding({"drift": drift}, line)


# the order of a model's regression lines and notes
RULES: tuple[Rule, ...] = (lost_utterances, wer_change, no_worse, exact_match_drop, latency_change, latency_trend)


def judge(model: str, evidence: Evidence, limits: ThresholdsSpec, rules: tuple[Rule, ...] = RULES) -> ModelCheck:
    """Every rule on one model's evidence, gathered into its check."""
    findings = [rule(evidence, limits) for rule in rules]
    return ModelCheck(
        model,
        paired=len(evidence.paired),
        **{name: value for finding in findings for name, value in finding.measured.items()},
        regressions=tuple(f.regression for f in findings if f.regression),
        notes=tuple(f.note for f in findings if f.note),
    )


def _names(cpus: set[str]) -> str:
    return " + ".join(sorted(cpus)) or "an unrecorded CPU"
