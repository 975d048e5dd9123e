"""The regression gate on run folders: synthetic nights (tests/synthetic_nights.py: a night's files
built by hand, then changed on purpose — a model's hypotheses with words dropped, slower timings,
another CPU, a model gone or failed), and, once, nights derived from one real short run
(`nightly_run`, re-scored by the harness: tests/nightly_runs.py). `compare` runs as a real process
where its exit status is the point; the statistics are checked against values worked out by hand,
rule by rule in tests/test_gate_rules.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from harness.core.errors import HarnessError
from harness.exit_codes import ExitCode
from harness.job.spec import load_job
from harness.nightly.gate import compare, record_and_gate, resolve
from harness.nightly.history import History
from harness.results.record import read_run
from tests import nightly_runs
from tests.nightly_runs import harness, in_process
from tests.synthetic_nights import MTK, REFERENCE, as_suite, drop_words, failed, night, on_cpu, slower, without

MODEL = "/".join(MTK)


@pytest.fixture(scope="module")
def nights(tmp_path_factory) -> dict[str, Path]:
    results = tmp_path_factory.mktemp("nights")
    return {
        "base": night(results, 1),
        "same": night(results, 2),
        "degraded": night(results, 3, drop_words(4)),
        "missing": night(results, 4, without()),
        "failed": night(results, 5, failed("RayActorError: The actor died")),
        "slower": night(results, 6, slower(2.0)),
        "other_cpu": night(results, 7, lambda utts: on_cpu("Other CPU [avx2]")(slower(2.0)(utts))),
    }


@pytest.mark.unit
def test_a_suite_is_gated_per_dataset_and_its_pooled_rows_are_not_gated_again(store, tmp_path):
    """Two datasets; the candidate drops words on one utterance of `b` only: the regression is
    `b`'s, `a` passes, and the pooled rows (in the history for the tables) add no check of their own."""

    def worse_in_b(utts: pd.DataFrame) -> pd.DataFrame:
        utts = as_suite(utts)
        b = utts["dataset"] == "b"
        return pd.concat([utts[~b], drop_words(1)(utts[b])]).sort_index()

    base, worse = night(tmp_path, 1, as_suite), night(tmp_path, 2, worse_in_b)
    with History(_history(store, base, worse)) as history:
        assert set(history.models(base.name)["dataset"]) == {"a", "b", "all"}
        result = compare(history, base.name, worse.name)
    assert [c.model for c in result.checks] == [f"{d}: {'/'.join(m)}" for d in ("a", "b") for m in (REFERENCE, MTK)]
    assert [c.model for c in result.regressed] == [f"b: {MODEL}"]
    assert all(c.paired == 3 for c in result.checks)
    # a run of one dataset gates as before, whatever its rows name their dataset
    first, second = night(tmp_path, 3), night(tmp_path, 4)
    with History(_history(str(tmp_path / "one.sqlite"), first, second)) as history:
        assert [c.model for c in compare(history, first.name, second.name).checks] == ["/".join(REFERENCE), MODEL]


def _history(where: str, *run_dirs: Path) -> str:
    with History(where) as history:
        for run_dir in run_dirs:
            history.add(read_run(run_dir))
    return where


def test_a_degraded_model_is_a_regression_named_with_its_numbers(store, nightly_run, tmp_path):
    """The integration: nights derived from a real run, gated by `compare` in a process of its own."""
    base, degraded = (
        nightly_runs.derive_run(nightly_run["run_dir"], tmp_path, 1),
        nightly_runs.derive_run(nightly_run["run_dir"], tmp_path, 3, nightly_runs.drop_words(4)),
    )
    _history(store, base, degraded)
    proc = harness("compare", base.name, degraded.name, "--history", store)
    assert proc.returncode == ExitCode.REGRESSION == 3, proc.stdout + proc.stderr
    (line,) = [line for line in proc.stdout.splitlines() if line.startswith("REGRESSION")]
    # the numbers, from the two folders' rows
    ours, theirs = (pd.read_parquet(d / "utterances.parquet") for d in (base, degraded))
    before, cand = (u[nightly_runs.of_model(u)].set_index("utt_id") for u in (ours, theirs))
    delta = (cand["wer_errors"].sum() - before["wer_errors"].sum()) / cand["ref_words"].sum()
    share = float(np.mean(cand["wer_errors"] <= before.loc[cand.index, "wer_errors"]))
    assert delta > 0.05 and share == pytest.approx(2 / 6)
    assert line.startswith(f"REGRESSION {MODEL}: ΔWER {100 * delta:+.2f}% [95% CI +")
    assert f"no worse on {share:.1%} of 6 utterances, below 90.0%" in line
    assert "exact match 100.0% → 33.3%: down 66.7 points, above 5.0" in line
    assert proc.stdout.rstrip().endswith("gate: 1 of 2 models regressed (exit 3)")


@pytest.mark.unit
def test_a_degraded_synthetic_night_regresses_by_the_numbers_it_was_given(nights, tmp_path):
    """Four of the six utterances (85 words) lose three words each: ΔWER 12 / 85, no worse on 2 of 6."""
    store = _history(str(tmp_path / "h.sqlite"), nights["base"], nights["degraded"])
    code, out, err = in_process("compare", nights["base"].name, nights["degraded"].name, "--history", store)
    assert code == ExitCode.REGRESSION, out + err
    (line,) = [line for line in out.splitlines() if line.startswith("REGRESSION")]
    assert line.startswith(f"REGRESSION {MODEL}: ΔWER {100 * 12 / 85:+.2f}% [95% CI +")
    assert "; no worse on 33.3% of 6 utterances, below 90.0%; exact match 100.0% → 33.3%: down 66.7 points" in line
    assert out.rstrip().endswith("gate: 1 of 2 models regressed (exit 3)")


@pytest.mark.unit
def test_equivalent_runs_pass(store, nights):
    _history(store, nights["base"], nights["same"])
    code, out, err = in_process("compare", "previous", "latest", "--history", store)
    assert code == 0, out + err
    assert f"baseline:  {nights['base'].name}" in out and f"candidate: {nights['same'].name}" in out
    assert "REGRESSION" not in out and out.rstrip().endswith("gate: ok, 2 models within thresholds")


@pytest.mark.unit
def test_a_model_missing_from_the_candidate_is_a_regression(nights, tmp_path):
    store = _history(str(tmp_path / "h.sqlite"), nights["base"], nights["missing"])
    code, out, err = in_process("compare", nights["base"].name, nights["missing"].name, "--history", store)
    assert code == 3, out + err
    assert f"REGRESSION {MODEL}: missing from the candidate (the baseline decoded 6)" in out.splitlines()


@pytest.mark.unit
def test_a_model_that_decoded_nothing_is_a_regression(nights, tmp_path):
    with History(_history(str(tmp_path / "h.sqlite"), nights["base"], nights["failed"])) as history:
        result = compare(history, nights["base"].name, nights["failed"].name)
    assert [c.model for c in result.regressed] == [MODEL]
    assert result.regressed[0].regressions == (
        "decoded nothing: worker failed: RayActorError: The actor died (the baseline decoded 6)",
    )


@pytest.mark.unit
def test_latency_is_compared_on_one_kind_of_cpu_only(nights, tmp_path):
    store = _history(str(tmp_path / "h.sqlite"), nights["base"], nights["slower"], nights["other_cpu"])
    with History(store) as history:
        slower_run = compare(history, nights["base"].name, nights["slower"].name)
        elsewhere = compare(history, nights["base"].name, nights["other_cpu"].name)
    assert [c.regressions for c in slower_run.regressed] == [
        ("latency ratio 2.00 [95% CI 2.00, 2.00] above 1.25 (6 utterances timed alone in both runs)",)
    ]
    assert not elsewhere.regressed  # twice as slow, but on another CPU: refused, and said
    cpu = pd.read_parquet(nights["base"] / "utterances.parquet")["cpu"].iloc[0]
    assert all(
        c.notes == (f"latency not compared: baseline ran on {cpu}, candidate on Other CPU [avx2]",)
        and c.latency is None
        for c in elsewhere.checks
    )


@pytest.mark.unit
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


@pytest.mark.unit
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


@pytest.mark.unit
def test_a_slow_drift_is_flagged_though_each_night_passes(tmp_path):
    """Ten nights, the last five each 4% slower than the one before: no night-to-night ratio
    reaches 1.25, the change point does."""
    factors = [1.0] * 5 + [1.04, 1.08, 1.12, 1.16, 1.20]
    runs = [night(tmp_path / "results", 10 + i, slower(f)) for i, f in enumerate(factors)]
    with History(_history(str(tmp_path / "h.sqlite"), *runs)) as history:
        result = compare(history, runs[-2].name, runs[-1].name)
    (regressed,) = result.regressed
    assert regressed.model == MODEL and regressed.latency[0] == pytest.approx(1.20 / 1.16)
    p50 = pd.read_csv(runs[0] / "summary.csv").set_index("target").loc["torchscript-mtk", "p50_ms"]
    drift = regressed.drift
    assert (drift.recent, drift.earlier, drift.limit) == pytest.approx((1.12 * p50, p50, 1.1 * p50))
    (line,) = regressed.regressions
    assert line.startswith(f"latency drift: median p50 {drift.recent:.1f} ms over the last 5 runs, {p50:.1f} ms")


@pytest.mark.unit
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


@pytest.mark.unit
def test_latest_and_previous_are_runs_of_the_same_job_on_the_same_dataset(store, nights, tmp_path):
    """An ad-hoc run on fewer utterances (`--limit 3`) between two nights is no baseline for them."""
    adhoc, later = night(tmp_path, 8, limit=3), night(tmp_path, 9)
    with History(_history(store, nights["base"], adhoc, later)) as history:
        assert resolve(history, "latest") == later.name and resolve(history, "previous") == adhoc.name
        assert resolve(history, "previous", candidate=later.name) == nights["base"].name
        assert resolve(history, "latest", candidate=nights["base"].name) == later.name
        assert resolve(history, "previous", candidate=nights["base"].name) is None  # its first night
        assert resolve(history, adhoc.name) == adhoc.name


@pytest.mark.unit
def test_a_baseline_named_in_a_history_of_several_jobs(store, nights, tmp_path):
    """A tag or `latest` that could mean a run of either job is refused with one line; the job
    (given, or the candidate's) settles it."""
    other = night(tmp_path, 8, job="other_job")
    with History(_history(store, nights["base"], nights["same"], other)) as history:
        for run_id in (nights["base"].name, other.name):
            history.pin(run_id, "stable")
        with pytest.raises(HarnessError, match=r"^'latest': the history holds runs of librispeech_tiny_en, other_job"):
            resolve(history, "latest")
        with pytest.raises(HarnessError, match=r"^tag 'stable' is pinned in jobs librispeech_tiny_en, other_job: name"):
            resolve(history, "stable")
        assert resolve(history, "latest", job="other_job") == other.name
        assert resolve(history, "stable", job="other_job") == other.name
        assert resolve(history, "stable", candidate=nights["same"].name) == nights["base"].name
        with pytest.raises(HarnessError, match=r"^'nightly': no such run id or tag in history "):
            resolve(history, "nightly")
