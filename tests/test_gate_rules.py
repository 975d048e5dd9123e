"""The gate's rules (`harness.nightly.rules`), each on a few rows made here, its numbers worked out
by hand: pure functions, no history, no run folder."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from harness.job.thresholds import ThresholdsSpec
from harness.nightly.rules import (
    RULES,
    Evidence,
    exact_match_drop,
    judge,
    latency_change,
    latency_drift,
    latency_ratio,
    latency_trend,
    lost_utterances,
    no_worse,
    no_worse_share,
    unpaired,
    wer_change,
)
from harness.nightly.verdict import ModelCheck
from harness.results.summary import wer_delta

pytestmark = pytest.mark.unit

CPU = "Synthetic CPU [avx2]"
LIMITS = ThresholdsSpec()


def rows(
    errors: list[int],
    words: list[int] | None = None,
    exact: list[bool] | None = None,
    ms: list[float] | None = None,
    cpu: str | None = CPU,
    failed: dict[int, str] | None = None,
) -> pd.DataFrame:
    """One model's utterances u0, u1, ...: word errors, reference words, exact match, total ms;
    `failed`: position → error (no transcript there)."""
    n = len(errors)
    frame = pd.DataFrame(
        {
            "utt_id": [f"u{i}" for i in range(n)],
            "wer_errors": errors,
            "ref_words": words or [10] * n,
            "exact_match": pd.array(exact or [True] * n, dtype="boolean"),
            "total_ms": ms or [100.0] * n,
            "cpu": [cpu] * n,
            "status": ["ok"] * n,
            "error": [None] * n,
        }
    )
    for i, reason in (failed or {}).items():
        frame.loc[i, ["status", "error", "cpu"]] = ["error", reason, None]
    return frame


def evidence(base: pd.DataFrame, cand: pd.DataFrame, trend: list[float] | None = None) -> Evidence:
    return Evidence(base[base["error"].isna()], cand, cand[cand["error"].isna()], trend)


def test_a_model_with_nothing_to_pair_is_settled_before_the_rules():
    base, cand = rows([0, 0]), rows([0, 0])
    nothing = rows([0, 0], failed={0: "bad audio", 1: "bad audio"})
    assert unpaired("m", base, cand, "ok", "ok") is None
    assert unpaired("m", None, cand, "unavailable: no runtime", "ok") == ModelCheck(
        "m", notes=("no baseline: the baseline decoded nothing (unavailable: no runtime)",)
    )
    assert unpaired("m", nothing, cand, "error: bad audio", "ok").notes == (
        "no baseline: the baseline decoded nothing (error: bad audio)",
    )
    assert unpaired("m", base, None, "ok", None) == ModelCheck(
        "m", regressions=("missing from the candidate (the baseline decoded 2)",)
    )
    assert unpaired("m", base, nothing, "ok", "worker failed: died").regressions == (
        "decoded nothing: worker failed: died (the baseline decoded 2)",
    )


def test_lost_utterances_beyond_the_limit_are_a_regression_named_with_one():
    base, cand = rows([0, 0, 0]), rows([0, 0, 0], failed={1: "cannot decode audio"})
    assert lost_utterances(evidence(base, cand), LIMITS).regression == (
        "1 of 3 utterances no longer decoded, e.g. u1: cannot decode audio"
    )
    assert lost_utterances(evidence(base, cand), ThresholdsSpec(max_lost_utterances=1)).regression is None
    # gone without a row: no reason to give
    assert lost_utterances(evidence(base, rows([0, 0])), LIMITS).regression == "1 of 3 utterances no longer decoded"


def test_wer_change_by_its_intervals_upper_end():
    # errors 3 vs 1 in 10 words, 1 vs 1 in 20: (4 - 2) / 30, interval (0.0, 0.2) (test_bootstrap_by_hand)
    base, cand = rows([1, 1], words=[10, 20]), rows([3, 1], words=[10, 20])
    found = wer_change(evidence(base, cand), LIMITS)
    assert found.measured["wer_delta"] == pytest.approx((2 / 30, 0.0, 0.2))
    assert found.regression == "ΔWER +6.67% [95% CI +0.00%, +20.00%] above +1.00%"
    assert wer_change(evidence(base, cand), ThresholdsSpec(max_wer_delta=0.2)).regression is None
    # no reference words: nothing measured
    assert wer_change(evidence(rows([0], words=[0]), rows([0], words=[0])), LIMITS).measured == {}


def test_no_worse_share_below_the_limit_is_a_regression():
    base, cand = rows([2, 2, 1, 0]), rows([2, 1, 3, 0])
    found = no_worse(evidence(base, cand), LIMITS)
    assert found.measured == {"no_worse": 0.75}
    assert found.regression == "no worse on 75.0% of 4 utterances, below 90.0%"
    assert no_worse(evidence(base, cand), ThresholdsSpec(min_no_worse_share=0.75)).regression is None
    assert no_worse(evidence(base, rows([0, 0, 0, 0], failed=dict.fromkeys(range(4), "x"))), LIMITS).measured == {}


def test_exact_match_drop_above_the_limit_is_a_regression():
    base, cand = rows([0] * 4), rows([0] * 4, exact=[True, True, True, False])
    found = exact_match_drop(evidence(base, cand), LIMITS)
    assert found.measured == {"exact_match": (1.0, 0.75)}
    assert found.regression == "exact match 100.0% → 75.0%: down 25.0 points, above 5.0"
    assert exact_match_drop(evidence(base, cand), ThresholdsSpec(max_exact_match_drop=0.25)).regression is None


def test_latency_ratio_by_its_intervals_lower_end_on_one_kind_of_cpu_only():
    # a 100 → 150 ms, b 300 → 300 ms: 1.125 [1.0, 1.5] (test_bootstrap_by_hand): within 1.25 by its lower end
    base, cand = rows([0, 0], ms=[100.0, 300.0]), rows([0, 0], ms=[150.0, 300.0])
    found = latency_change(evidence(base, cand), LIMITS)
    assert found.measured == {"latency": (1.125, 1.0, 1.5)} and found.regression is None
    doubled = latency_change(evidence(base, rows([0, 0], ms=[200.0, 600.0])), LIMITS)
    assert (
        doubled.regression
        == "latency ratio 2.00 [95% CI 2.00, 2.00] above 1.25 (2 utterances timed alone in both runs)"
    )
    # a row decoded in a batch (not in the latency sample) in either run is left out
    sample = latency_change(evidence(base, rows([0, 0], ms=[200.0, 900.0]).assign(timed=[True, False])), LIMITS)
    assert sample.measured == {"latency": (2.0, 2.0, 2.0)} and "(1 utterances timed alone" in sample.regression
    assert latency_change(evidence(base, cand), ThresholdsSpec(max_latency_ratio=None)).measured == {}
    elsewhere = latency_change(evidence(base, rows([0, 0], ms=[900.0, 900.0], cpu="Other CPU")), LIMITS)
    assert elsewhere.measured == {} and elsewhere.regression is None
    assert elsewhere.note == f"latency not compared: baseline ran on {CPU}, candidate on Other CPU"
    unrecorded = latency_change(evidence(base, rows([0, 0], cpu=None)), LIMITS)
    assert unrecorded.note == f"latency not compared: baseline ran on {CPU}, candidate on an unrecorded CPU"


def test_latency_drift_over_the_history_is_a_regression():
    base = cand = rows([0])
    step = [100.0] * 5 + [104, 108, 112, 116, 120]  # medians 112 vs 100; MAD 0, so the limit is 110
    found = latency_trend(evidence(base, cand, step), LIMITS)
    assert found.regression == (
        "latency drift: median p50 112.0 ms over the last 5 runs, 100.0 ms over the 5 before (limit 110.0 ms)"
    )
    quiet = latency_trend(evidence(base, cand, [100.0] * 10), LIMITS)
    assert quiet.regression is None and quiet.measured["drift"].recent == 100.0
    assert latency_trend(evidence(base, cand, [100.0] * 9), LIMITS).measured == {"drift": None}  # too few runs
    assert latency_trend(evidence(base, cand, None), LIMITS).measured == {}  # several kinds of CPU: no trend


def test_judge_runs_every_rule_and_keeps_their_order():
    base = rows([0, 0, 0, 0], ms=[100.0] * 4)
    cand = rows([3, 3, 3, 0], exact=[False, False, False, True], ms=[300.0] * 4, failed={3: "bad audio"})
    check = judge("m", evidence(base, cand, [100.0] * 5 + [200.0] * 5), LIMITS)
    assert check.model == "m" and check.paired == 3 and check.no_worse == 0.0 and check.exact_match == (1.0, 0.0)
    assert check.latency == (3.0, 3.0, 3.0) and check.drift is not None and check.drift.flagged
    assert [line.split(" ")[0] for line in check.regressions] == ["1", "ΔWER", "no", "exact", "latency", "latency"]
    assert check.notes == ()
    assert [rule.__name__ for rule in RULES] == [
        "lost_utterances", "wer_change", "no_worse", "exact_match_drop", "latency_change", "latency_trend"
    ]  # fmt: skip
    assert judge("m", evidence(base, rows([0, 0, 0, 0])), LIMITS) == ModelCheck(
        "m", paired=4, wer_delta=(0.0, 0.0, 0.0), no_worse=1.0, exact_match=(1.0, 1.0), latency=(1.0, 1.0, 1.0)
    )


def test_bootstrap_interval_and_no_worse_share_by_hand():
    """Two utterances: a resample is (a, a), (a, b), (b, a) or (b, b), each a quarter of 1000
    draws, so the 2.5th and 97.5th percentiles are the statistic on (a, a) and (b, b) exactly."""
    # latency: a 100 → 150 ms, b 300 → 300 ms; Σ 450 / 400; (a, a) 300 / 200; (b, b) 600 / 600
    assert latency_ratio(np.array([150.0, 300.0]), np.array([100.0, 300.0])) == (1.125, 1.0, 1.5)
    # ΔWER: errors 3 vs 1 in 10 words, 1 vs 1 in 20: (4 - 2) / 30; (a, a) (6 - 2) / 20; (b, b) 0 / 40
    both = {"utt_id": ["a", "b"], "ref_words": [10, 20], "status": ["ok", "ok"]}
    delta = wer_delta(pd.DataFrame({**both, "wer_errors": [3, 1]}), pd.DataFrame({**both, "wer_errors": [1, 1]}))
    assert delta == pytest.approx((2 / 30, 0.0, 0.2))
    # no worse: 2 ≤ 2, 1 ≤ 2, 3 > 1, 0 ≤ 0
    assert no_worse_share(np.array([2, 1, 3, 0]), np.array([2, 2, 1, 0])) == 0.75


def test_latency_drift_by_hand():
    step = latency_drift([100.0] * 5 + [104, 108, 112, 116, 120], window=5, mads=4.0, min_ratio=1.1)
    # medians 112 vs 100; MAD 0, so the limit is 100 * 1.1
    assert (step.recent, step.earlier, step.limit, step.earlier_runs) == pytest.approx((112, 100, 110, 5))
    assert step.flagged
    noisy = latency_drift([100.0, 90, 110, 95, 105] + [120] * 5, window=5, mads=4.0, min_ratio=1.1)
    # MAD = median(0, 10, 10, 5, 5) = 5 → limit 100 + 4 * 1.4826 * 5 = 129.65: 120 is within the noise
    assert noisy.limit == pytest.approx(129.652) and not noisy.flagged
    assert latency_drift([100.0] * 9, 5, 4.0, 1.1) is None  # fewer than 2 windows of history
    assert latency_drift([100.0] * 20, 0, 4.0, 1.1) is None  # off
