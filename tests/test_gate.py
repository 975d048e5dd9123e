"""The regression gate, on run folders derived from one real short run (`nightly_run`): the same
rows again, and rows changed on purpose — a model's hypotheses with words dropped, slower timings,
another CPU, a model gone or failed — re-scored by harness.results.scoring (tests/nightly_runs.py).
`compare` runs as a real process where its exit status is the point; the statistics are checked
against values worked out by hand."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from harness.core.errors import HarnessError
from harness.exit_codes import ExitCode
from harness.job.spec import load_job
from harness.nightly.gate import compare, latency_drift, latency_ratio, no_worse_share, record_and_gate
from harness.nightly.history import History
from harness.results.record import read_run
from harness.results.summary import wer_delta
from tests.nightly_runs import (
    MTK,
    derive_run,
    drop_words,
    failed,
    harness,
    in_process,
    of_model,
    on_cpu,
    slower,
    without,
)

MODEL = "/".join(MTK)


@pytest.fixture(scope="module")
def nights(nightly_run, tmp_path_factory) -> dict[str, Path]:
    results = tmp_path_factory.mktemp("nights")
    source = nightly_run["run_dir"]
    return {
        "base": derive_run(source, results, 1),
        "same": derive_run(source, results, 2),
        "degraded": derive_run(source, results, 3, drop_words(4)),
        "missing": derive_run(source, results, 4, without()),
        "failed": derive_run(source, results, 5, failed("RayActorError: The actor died")),
        "slower": derive_run(source, results, 6, slower(2.0)),
        "other_cpu": derive_run(source, results, 7, lambda raw: on_cpu("Other CPU [avx2]")(slower(2.0)(raw))),
    }


def _history(where: str, *run_dirs: Path) -> str:
    with History(where) as history:
        for run_dir in run_dirs:
            history.add(read_run(run_dir))
    return where


def _rows(run_dir: Path) -> pd.DataFrame:
    utts = pd.read_parquet(run_dir / "utterances.parquet")
    return utts[of_model(utts)].set_index("utt_id")


def test_a_degraded_model_is_a_regression_named_with_its_numbers(store, nights):
    _history(store, nights["base"], nights["degraded"])
    proc = harness("compare", nights["base"].name, nights["degraded"].name, "--history", store)
    assert proc.returncode == ExitCode.REGRESSION == 3, proc.stdout + proc.stderr
    (line,) = [line for line in proc.stdout.splitlines() if line.startswith("REGRESSION")]
    # the numbers, from the two folders' rows
    base, cand = _rows(nights["base"]), _rows(nights["degraded"])
    delta = (cand["wer_errors"].sum() - base["wer_errors"].sum()) / cand["ref_words"].sum()
    share = float(np.mean(cand["wer_errors"] <= base.loc[cand.index, "wer_errors"]))
    assert delta > 0.05 and share == pytest.approx(2 / 6)
    assert line.startswith(f"REGRESSION {MODEL}: ΔWER {100 * delta:+.2f}% [95% CI +")
    assert f"no worse on {share:.1%} of 6 utterances, below 90.0%" in line
    assert "exact match 100.0% → 33.3%: down 66.7 points, above 5.0" in line
    assert proc.stdout.rstrip().endswith("gate: 1 of 2 models regressed (exit 3)")


def test_equivalent_runs_pass(nights, tmp_path):
    store = _history(str(tmp_path / "h.sqlite"), nights["base"], nights["same"])
    proc = harness("compare", "previous", "latest", "--history", store)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"baseline:  {nights['base'].name}" in proc.stdout and f"candidate: {nights['same'].name}" in proc.stdout
    assert "REGRESSION" not in proc.stdout and proc.stdout.rstrip().endswith("gate: ok, 2 models within thresholds")


def test_a_model_missing_from_the_candidate_is_a_regression(nights, tmp_path):
    store = _history(str(tmp_path / "h.sqlite"), nights["base"], nights["missing"])
    code, out, err = in_process("compare", nights["base"].name, nights["missing"].name, "--history", store)
    assert code == 3, out + err
    assert f"REGRESSION {MODEL}: missing from the candidate (the baseline decoded 6)" in out.splitlines()


def test_a_model_that_decoded_nothing_is_a_regression(nights, tmp_path):
    with History(_history(str(tmp_path / "h.sqlite"), nights["base"], nights["failed"])) as history:
        result = compare(history, nights["base"].name, nights["failed"].name)
    assert [c.model for c in result.regressed] == [MODEL]
    assert result.regressed[0].regressions == (
        "decoded nothing: worker failed: RayActorError: The actor died (the baseline decoded 6)",
    )


def test_latency_is_compared_on_one_kind_of_cpu_only(nights, tmp_path):
    store = _history(str(tmp_path / "h.sqlite"), nights["base"], nights["slower"], nights["other_cpu"])
    with History(store) as history:
        slower_run = compare(history, nights["base"].name, nights["slower"].name)
        elsewhere = compare(history, nights["base"].name, nights["other_cpu"].name)
    assert [c.regressions for c in slower_run.regressed] == [("latency ratio 2.00 [95% CI 2.00, 2.00] above 1.25",)]
    assert not elsewhere.regressed  # twice as slow, but on another CPU: refused, and said
    cpu = pd.read_parquet(nights["base"] / "utterances.parquet")["cpu"].iloc[0]
    assert all(
        c.notes == (f"latency not compared: baseline ran on {cpu}, candidate on Other CPU [avx2]",)
        and c.latency is None
        for c in elsewhere.checks
    )


def test_thresholds_come_from_the_job(nights, tmp_path):
    store = _history(str(tmp_path / "h.sqlite"), nights["base"], nights["degraded"])
    job = Path(__file__).parents[1] / "jobs" / "librispeech_tiny_en.yaml"
    loose = tmp_path / "loose.yaml"
    loose.write_text(
        job.read_text().replace("../data", str(job.parents[1] / "data"))
        + "thresholds: {max_wer_delta: 0.5, min_no_worse_share: 0.3, max_exact_match_drop: 0.7}\n"
    )
    assert in_process("compare", "previous", "latest", "--history", store, "--thresholds", loose)[0] == 0
    loose.write_text(loose.read_text().replace("max_wer_delta: 0.5", "max_wer_delta: half"))
    code, _, err = in_process("compare", "previous", "latest", "--history", store, "--thresholds", loose)
    assert code == 2 and err == f"error: {loose}: thresholds.max_wer_delta: expected a number, got 'half'\n"


def test_bad_thresholds_are_reported_with_their_paths(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text(
        f"name: j\ndataset: {{path: {Path(__file__).parents[1] / 'data' / 'librispeech-eval'}}}\n"
        "thresholds: {max_wer_delt: 0.1, min_no_worse_share: 1.5, drift_window: 2.5, max_latency_ratio: null}\n"
    )
    with pytest.raises(HarnessError) as exc:
        load_job(job)
    for expected in (
        "thresholds.max_wer_delt: unknown key (did you mean 'max_wer_delta'?)",
        "thresholds.min_no_worse_share: expected 0.0..1.0, got 1.5",
        "thresholds.drift_window: expected an integer, got 2.5",
    ):
        assert expected in str(exc.value)
    assert "thresholds.max_latency_ratio" not in str(exc.value)  # null: latency not gated


def test_bootstrap_interval_and_no_worse_share_by_hand():
    """Two utterances: a resample is (a, a), (a, b), (b, a) or (b, b), each a quarter of 1000
    draws, so the 2.5th and 97.5th percentiles are the statistic on (a, a) and (b, b) exactly."""
    # latency: a 100 → 150 ms, b 300 → 300 ms; Σ 450 / 400; (a, a) 300 / 200; (b, b) 600 / 600
    assert latency_ratio(np.array([150.0, 300.0]), np.array([100.0, 300.0])) == (1.125, 1.0, 1.5)
    # ΔWER: errors 3 vs 1 in 10 words, 1 vs 1 in 20: (4 - 2) / 30; (a, a) (6 - 2) / 20; (b, b) 0 / 40
    rows = {"utt_id": ["a", "b"], "ref_words": [10, 20], "status": ["ok", "ok"]}
    delta = wer_delta(pd.DataFrame({**rows, "wer_errors": [3, 1]}), pd.DataFrame({**rows, "wer_errors": [1, 1]}))
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


def test_a_slow_drift_is_flagged_though_each_night_passes(nightly_run, tmp_path):
    """Ten nights, the last five each 4% slower than the one before: no night-to-night ratio
    reaches 1.25, the change point does."""
    factors = [1.0] * 5 + [1.04, 1.08, 1.12, 1.16, 1.20]
    runs = [derive_run(nightly_run["run_dir"], tmp_path / "results", 10 + i, slower(f)) for i, f in enumerate(factors)]
    with History(_history(str(tmp_path / "h.sqlite"), *runs)) as history:
        result = compare(history, runs[-2].name, runs[-1].name)
    (regressed,) = result.regressed
    assert regressed.model == MODEL and regressed.latency[0] == pytest.approx(1.20 / 1.16)
    p50 = pd.read_csv(runs[0] / "summary.csv").set_index("target").loc["torchscript-mtk", "p50_ms"]
    drift = regressed.drift
    assert (drift.recent, drift.earlier, drift.limit) == pytest.approx((1.12 * p50, p50, 1.1 * p50))
    (line,) = regressed.regressions
    assert line.startswith(f"latency drift: median p50 {drift.recent:.1f} ms over the last 5 runs, {p50:.1f} ms")


def test_run_baseline_gates_each_new_run(nights, tmp_path, capsys):
    """What `run --baseline` calls once a run is written: append, then gate against the baseline."""
    store = str(tmp_path / "h.sqlite")
    assert record_and_gate(nights["base"], store, "previous") == 0  # a first night
    assert record_and_gate(nights["degraded"], store, "previous") == ExitCode.REGRESSION
    assert f"REGRESSION {MODEL}: ΔWER" in capsys.readouterr().out
    assert in_process("history", "pin", nights["base"].name, "--tag", "stable", "--history", store)[0] == 0
    assert record_and_gate(nights["same"], store, "stable") == 0  # the pinned run, not the degraded one
    assert f"baseline:  {nights['base'].name}" in capsys.readouterr().out
    with pytest.raises(HarnessError, match="'release-9': no such run id or tag of job librispeech_tiny_en"):
        record_and_gate(nights["slower"], store, "release-9")


def test_latest_and_previous_are_runs_of_the_same_job_on_the_same_dataset(nights, tmp_path):
    """An ad-hoc run on fewer utterances (`--limit 3`) between two nights is no baseline for them."""
    adhoc = derive_run(nights["base"], tmp_path / "results", 8)
    info = json.loads((adhoc / "run.json").read_text())
    info["job"]["dataset"]["limit"] = 3
    (adhoc / "run.json").write_text(json.dumps(info))
    night = derive_run(nights["base"], tmp_path / "results", 9)
    with History(_history(str(tmp_path / "h.sqlite"), nights["base"], adhoc, night)) as history:
        assert history.resolve("latest") == night.name and history.resolve("previous") == adhoc.name
        assert history.resolve("previous", candidate=night.name) == nights["base"].name
        assert history.resolve("latest", candidate=nights["base"].name) == night.name
        assert history.resolve("previous", candidate=nights["base"].name) is None  # its first night
