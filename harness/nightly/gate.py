"""The regression gate: a candidate run against a baseline run, per model, with statistics.

Per model (size/target/quant at its audio context: a model at a trimmed `audio_ctx` is another
model, never gated against the full one), over the utterances both runs decoded:
- ΔWER = WER(candidate) - WER(baseline) with a 95% paired bootstrap interval
  (`scoring.wer_delta`, the same definition the summary's Δwer uses);
- the share of utterances where the candidate has no more word errors than the baseline;
- the fall in exact match (the share token-identical to each run's own reference model);
- the latency ratio Σcandidate ms / Σbaseline ms with its paired bootstrap interval, only when
  both ran on the same kind of CPU (rows' `cpu`): a different CPU times, and quantizes, differently;
- a latency change point over the history: the median p50 of the last N runs against the runs
  before them (`latency_drift`), so a slow drift is caught, not only a one-night jump.
A model the baseline decoded that the candidate lacks, or could not run, is a regression.
The limits come from the job's `thresholds:` (`thresholds.ThresholdsSpec`).

The verdict (`harness.nightly.verdict`) is kept with the candidate run, as `gate.json` in its folder when
that folder is on this machine, for the report (`harness.report.page`) to show.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from harness.core.errors import HarnessError
from harness.exit_codes import ExitCode
from harness.job.spec import ModelCell
from harness.job.thresholds import ThresholdsSpec, thresholds_from_dict
from harness.nightly.history import History, display
from harness.nightly.verdict import Comparison, Drift, ModelCheck, Verdict, format_comparison, pct, save_verdict
from harness.results.record import read_run
from harness.results.summary import paired_bootstrap, wer_delta

MAD_SCALE = 1.4826  # MAD * this estimates a normal distribution's standard deviation


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


def compare(
    history: History, baseline_id: str, candidate_id: str, thresholds: ThresholdsSpec | None = None
) -> Comparison:
    """Check every model of the baseline against the candidate; `thresholds` default to the ones the
    candidate ran with (its job's), else ThresholdsSpec's defaults."""
    baseline, candidate = history.run(baseline_id), history.run(candidate_id)
    if thresholds is None:
        stored = candidate.get("thresholds")
        thresholds = thresholds_from_dict(stored, f"run {candidate_id}") if stored else ThresholdsSpec()
    base_models, cand_models = history.models(baseline_id), history.models(candidate_id)
    base_rows, cand_rows = _by_model(history.utterances(baseline_id)), _by_model(history.utterances(candidate_id))
    cand_status = dict(zip(_keys(cand_models), _status_lines(cand_models), strict=True))
    checks = [
        _check(
            history, candidate, key, base_rows.get(key), cand_rows.get(key), status, cand_status.get(key), thresholds
        )
        for key, status in zip(_keys(base_models), _status_lines(base_models), strict=True)
    ]
    checks += [
        ModelCheck(ModelCell(*key).label, notes=("new: not in the baseline",))
        for key in _keys(cand_models)
        if key not in set(_keys(base_models))
    ]
    return Comparison(baseline, candidate, tuple(checks), thresholds)


def _status_lines(models: pd.DataFrame) -> list[str]:
    """Each model's status with its reason, as the summary's notes say it."""
    reasons = models["reason"] if "reason" in models else [None] * len(models)
    return [f"{s}: {r}" if isinstance(r, str) and r else str(s) for s, r in zip(models["status"], reasons, strict=True)]


def _keys(models: pd.DataFrame) -> list[tuple[str, str, str, int]]:
    return list(zip(models["size"], models["target"], models["quant"], models["audio_ctx"].astype(int), strict=True))


def _by_model(utts: pd.DataFrame) -> dict[tuple[str, str, str, int], pd.DataFrame]:
    return {key: rows for key, rows in utts.groupby(["size", "target", "quant", "audio_ctx"], sort=False)}


def _check(
    history: History,
    candidate: dict[str, Any],
    key: tuple[str, str, str, int],
    base: pd.DataFrame | None,
    cand: pd.DataFrame | None,
    base_status: str,
    cand_status: str | None,
    limits: ThresholdsSpec,
) -> ModelCheck:
    model = ModelCell(*key).label
    base_ok = base[base["error"].isna()] if base is not None else pd.DataFrame()
    if base_ok.empty:  # nothing to hold the candidate to
        return ModelCheck(model, notes=(f"no baseline: the baseline decoded nothing ({base_status})",))
    if cand is None or cand_status is None:
        return ModelCheck(model, regressions=(f"missing from the candidate (the baseline decoded {len(base_ok)})",))
    cand_ok = cand[cand["error"].isna()]
    if cand_ok.empty:
        return ModelCheck(model, regressions=(f"decoded nothing: {cand_status} (the baseline decoded {len(base_ok)})",))
    regressions, notes = [], []
    lost = sorted(set(base_ok["utt_id"]) - set(cand_ok["utt_id"]))
    if len(lost) > limits.max_lost_utterances:
        why = cand.loc[cand["utt_id"] == lost[0], "error"].dropna()
        example = f", e.g. {lost[0]}: {why.iloc[0]}" if len(why) else ""
        regressions.append(f"{len(lost)} of {len(base_ok)} utterances no longer decoded{example}")
    paired = base_ok.merge(cand_ok, on="utt_id", suffixes=("_b", "_c"))
    check: dict[str, Any] = {"paired": len(paired)}

    delta = wer_delta(cand_ok, base_ok)
    if not math.isnan(delta[0]):  # NaN: no reference words among the paired utterances
        check["wer_delta"] = delta
        if delta[2] > limits.max_wer_delta:
            regressions.append(
                f"ΔWER {pct(delta[0])} [95% CI {pct(delta[1])}, {pct(delta[2])}] above {pct(limits.max_wer_delta)}"
            )
    if len(paired):
        share = no_worse_share(*(paired[f"wer_errors_{s}"].to_numpy(dtype=float) for s in "cb"))
        check["no_worse"] = share
        if share < limits.min_no_worse_share:
            regressions.append(
                f"no worse on {share:.1%} of {len(paired)} utterances, below {limits.min_no_worse_share:.1%}"
            )
        matched = paired.dropna(subset=["exact_match_b", "exact_match_c"])
        if len(matched):
            b, c = (float(matched[f"exact_match_{s}"].astype(float).mean()) for s in "bc")
            check["exact_match"] = (b, c)
            if b - c > limits.max_exact_match_drop:
                regressions.append(
                    f"exact match {b:.1%} → {c:.1%}: down {100 * (b - c):.1f} points, "
                    f"above {100 * limits.max_exact_match_drop:.1f}"
                )

    base_cpus, cand_cpus = set(base_ok["cpu"].dropna()), set(cand_ok["cpu"].dropna())
    if base_cpus != cand_cpus:
        notes.append(f"latency not compared: baseline ran on {_names(base_cpus)}, candidate on {_names(cand_cpus)}")
    elif limits.max_latency_ratio is not None and len(paired):
        timed = paired.dropna(subset=["total_ms_b", "total_ms_c"])
        if len(timed):
            ratio = latency_ratio(timed["total_ms_c"].to_numpy(float), timed["total_ms_b"].to_numpy(float))
            check["latency"] = ratio
            if ratio[1] > limits.max_latency_ratio:
                regressions.append(
                    f"latency ratio {ratio[0]:.2f} [95% CI {ratio[1]:.2f}, {ratio[2]:.2f}] "
                    f"above {limits.max_latency_ratio:.2f}"
                )
    if len(cand_cpus) == 1:  # a trend means something on one kind of CPU only
        values = history.latency_trend(candidate, *key, next(iter(cand_cpus))).tolist()
        drift = latency_drift(values, limits.drift_window, limits.drift_mads, limits.drift_min_ratio)
        check["drift"] = drift
        if drift is not None and drift.flagged:
            regressions.append(
                f"latency drift: median p50 {drift.recent:.1f} ms over the last {drift.recent_runs} runs, "
                f"{drift.earlier:.1f} ms over the {drift.earlier_runs} before (limit {drift.limit:.1f} ms)"
            )
    return ModelCheck(model, **check, regressions=tuple(regressions), notes=tuple(notes))


def _names(cpus: set[str]) -> str:
    return " + ".join(sorted(cpus)) or "an unrecorded CPU"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _local_folder(run: dict[str, Any]) -> Path | None:
    """The run's folder when it is on this machine (a history may hold runs made elsewhere)."""
    folder = Path(str(run.get("run_dir") or ""))
    info = folder / "run.json"
    if run.get("run_dir") and info.is_file() and json.loads(info.read_text()).get("run_id") == run["run_id"]:
        return folder
    return None


def gate(
    history: History,
    baseline_id: str,
    candidate_id: str,
    thresholds: ThresholdsSpec | None = None,
    requested: str | None = None,
) -> int:
    """Compare, print, keep the verdict in the candidate's folder (`requested`: the baseline as the
    user named it), and give the exit code: OK within thresholds, REGRESSION otherwise."""
    comparison = compare(history, baseline_id, candidate_id, thresholds)
    print(format_comparison(comparison))
    code = ExitCode.REGRESSION if comparison.regressed else ExitCode.OK
    folder = _local_folder(comparison.candidate)
    if folder is not None:
        save_verdict(Verdict(requested or baseline_id, comparison, int(code), _now()), folder)
    return code


def record_and_gate(run_dir: Path, where: str, baseline: str | None) -> int:
    """What `run` does once its results are written: append the run to the history and, given a
    baseline (`latest`, `previous`, a pinned tag or a run id), gate it. No earlier run of the job
    (a first night) passes with a note; an unknown tag or run id is an error."""
    record = read_run(run_dir)
    with History(where) as history:
        history.add(record)
        print(f"history: {record.run_id} appended to {display(where)}")
        if baseline is None:
            return 0
        baseline_id = history.resolve(baseline, candidate=record.run_id)
        if baseline_id is None:
            note = f"gate: no earlier run of {record.job} in the history: nothing to compare with ({baseline})"
            print(note)
            save_verdict(Verdict(baseline, None, int(ExitCode.OK), _now(), note), run_dir)
            return 0
        return gate(history, baseline_id, record.run_id, requested=baseline)


def resolve_pair(history: History, baseline: str, candidate: str, job: str | None) -> tuple[str, str]:
    """`compare`'s two arguments → run ids; the baseline's `latest`/`previous` are relative to the candidate."""
    candidate_id = history.resolve(candidate, job=job)
    if candidate_id is None:
        raise HarnessError(f"candidate {candidate!r}: no such run in history {display(history.where)}")
    baseline_id = history.resolve(baseline, job=job, candidate=candidate_id)
    if baseline_id is None:
        raise HarnessError(f"baseline {baseline!r}: no run of the job before {candidate_id}")
    return baseline_id, candidate_id
