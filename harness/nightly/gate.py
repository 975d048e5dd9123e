"""The regression gate: a candidate run against a baseline run, per model, with statistics.

Per model (size/target/quant at its audio context: a model at a trimmed `audio_ctx` is another
model, never gated against the full one) and, in a suite, per dataset (its pooled rows are a sum
of those, not gated again), the rules of `harness.nightly.rules` over the utterances both runs
decoded: ΔWER with its paired bootstrap interval, the no-worse share, the fall in exact
match, the latency ratio on one kind of CPU, latency drift over the history, lost utterances.
A model the baseline decoded that the candidate lacks, or could not run, is a regression.
The limits come from the job's `thresholds:` (`thresholds.ThresholdsSpec`).

Which run is the baseline is decided here too (`resolve`): a run id, a tag pinned with `history
pin`, `latest` or `previous`, from the history's plain queries.

The verdict (`harness.nightly.verdict`) is kept with the candidate run, as `gate.json` in its folder when
that folder is on this machine, for the report (`harness.report.page`) to show.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pandas as pd

from harness.core.errors import HarnessError
from harness.exit_codes import ExitCode
from harness.job.spec import ModelCell
from harness.job.thresholds import ThresholdsSpec, thresholds_from_dict
from harness.nightly.history import RESERVED_REFS, History, masked
from harness.nightly.rules import COLUMNS, Evidence, judge, unpaired
from harness.nightly.verdict import Comparison, ModelCheck, Verdict, format_comparison, save_verdict
from harness.results.record import read_run
from harness.results.summary import MODEL_KEY, POOLED


def compare(
    history: History, baseline_id: str, candidate_id: str, thresholds: ThresholdsSpec | None = None
) -> Comparison:
    """Check every model of the baseline against the candidate; `thresholds` default to the ones the
    candidate ran with (its job's), else ThresholdsSpec's defaults."""
    baseline, candidate = history.run(baseline_id), history.run(candidate_id)
    if thresholds is None:
        stored = candidate.get("thresholds")
        thresholds = thresholds_from_dict(stored, f"run {candidate_id}") if stored else ThresholdsSpec()
    base_models, cand_models = _gated(history.models(baseline_id)), _gated(history.models(candidate_id))
    # only the columns the rules read; of the baseline, only its decoded rows (the rules hold the
    # candidate to those alone), of the candidate every row (its lost utterances say why)
    columns = ["dataset", *MODEL_KEY, *COLUMNS]
    base_rows = _by_model(history.utterances(baseline_id, columns, decoded_only=True), _suite(base_models))
    cand_rows = _by_model(history.utterances(candidate_id, columns), _suite(cand_models))
    cand_status = dict(zip(_keys(cand_models), _status_lines(cand_models), strict=True))
    checks = [
        _check(
            history, candidate, key, base_rows.get(key), cand_rows.get(key), status, cand_status.get(key), thresholds
        )
        for key, status in zip(_keys(base_models), _status_lines(base_models), strict=True)
    ]
    checks += [
        ModelCheck(_label(key), notes=("new: not in the baseline",))
        for key in _keys(cand_models)
        if key not in set(_keys(base_models))
    ]
    return Comparison(baseline, candidate, tuple(checks), thresholds)


Key = tuple[str, str, str, str, int]  # (dataset, size, target, quant, audio_ctx); dataset "" outside suites


def _gated(models: pd.DataFrame) -> pd.DataFrame:
    """A run's model rows the gate checks: every dataset's, not a suite's pooled rows. A run of one
    dataset has its rows under the name "" (as runs from before suites do), so that it gates
    against any earlier run on that dataset."""
    datasets = models["dataset"].fillna("").astype(str) if "dataset" in models else pd.Series([""] * len(models))
    kept = models[(datasets != POOLED).to_numpy()].copy()
    named = datasets[(datasets != POOLED).to_numpy()]
    kept["dataset"] = named.to_numpy() if named.nunique() > 1 else ""
    return kept


def _suite(models: pd.DataFrame) -> bool:
    return models["dataset"].nunique() > 1


def _label(key: Key) -> str:
    dataset, *model = key
    return f"{dataset}: {ModelCell(*model).label}" if dataset else ModelCell(*model).label


def _status_lines(models: pd.DataFrame) -> list[str]:
    """Each model's status with its reason, as the summary's notes say it."""
    reasons = models["reason"] if "reason" in models else [None] * len(models)
    return [f"{s}: {r}" if isinstance(r, str) and r else str(s) for s, r in zip(models["status"], reasons, strict=True)]


def _keys(models: pd.DataFrame) -> list[Key]:
    return list(
        zip(
            models["dataset"],
            models["size"],
            models["target"],
            models["quant"],
            models["audio_ctx"].astype(int),
            strict=True,
        )
    )


def _by_model(utts: pd.DataFrame, suite: bool) -> dict[Key, pd.DataFrame]:
    """Each model's rows (and each dataset's, in a suite)."""
    utts = utts.assign(dataset=utts["dataset"].fillna("").astype(str) if suite else "")
    return {key: rows for key, rows in utts.groupby(["dataset", *MODEL_KEY], sort=False)}


def _check(
    history: History,
    candidate: dict[str, Any],
    key: Key,
    base: pd.DataFrame | None,
    cand: pd.DataFrame | None,
    base_status: str,
    cand_status: str | None,
    limits: ThresholdsSpec,
) -> ModelCheck:
    """One model's check: the rules on its rows (`base`: the baseline's decoded ones, `cand`: all
    the candidate's), and its latency trend from the history."""
    model = _label(key)
    settled = unpaired(model, base, cand, base_status, cand_status)
    if settled is not None:
        return settled
    assert base is not None and cand is not None  # `unpaired` settles a model either run lacks
    cand_ok = cand[cand["error"].isna()]
    cpus = set(cand_ok["cpu"].dropna())
    dataset, *cell = key
    trend = (
        history.latency_trend(candidate, dataset or None, *cell, next(iter(cpus))).tolist() if len(cpus) == 1 else None
    )
    return judge(model, Evidence(base, cand, cand_ok, trend), limits)


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
        print(f"history: {record.run_id} appended to {masked(where)}")
        if baseline is None:
            return 0
        baseline_id = resolve(history, baseline, candidate=record.run_id)
        if baseline_id is None:
            note = f"gate: no earlier run of {record.job} in the history: nothing to compare with ({baseline})"
            print(note)
            save_verdict(Verdict(baseline, None, int(ExitCode.OK), _now(), note), run_dir)
            return 0
        return gate(history, baseline_id, record.run_id, requested=baseline)


def resolve(history: History, ref: str, job: str | None = None, candidate: str | None = None) -> str | None:
    """A run id, a tag pinned with `history pin`, `latest` or `previous` → a run id.

    Relative to a `candidate`: `latest` is the newest other run of its job on its dataset,
    `previous` the newest such run started before it (an ad-hoc `--limit` run is not a
    baseline for a full night). Without one: the job's newest and second-newest runs. None
    when there is no such run yet (a first night); an unknown id or tag is an error.
    """
    if ref not in RESERVED_REFS:
        if history.has_run(ref):
            return ref
        job = job or (history.run(candidate)["job"] if candidate else None)
        pins = [pin for pin in history.pinned(ref) if not job or pin["job"] == job]
        if len(pins) > 1:
            raise HarnessError(
                f"tag {ref!r} is pinned in jobs {', '.join(p['job'] for p in pins)}: name one with --job"
            )
        if not pins:
            raise HarnessError(
                f"{ref!r}: no such run id or tag{f' of job {job}' if job else ''} in history {history.shown}"
            )
        return str(pins[0]["run_id"])
    if candidate:
        this = history.run(candidate)
        others = [
            run["run_id"]
            for run in history.runs(this["job"])
            if run["run_id"] != candidate
            and run["dataset"] == this["dataset"]
            and (ref != "previous" or run["started"] < this["started"])
        ]
        return str(others[-1]) if others else None
    if job is None:
        jobs = history.jobs()
        if len(jobs) > 1:
            raise HarnessError(f"'{ref}': the history holds runs of {', '.join(jobs)}: name one with --job")
    ids = [run["run_id"] for run in history.runs(job)]
    chosen = ids[-1:] if ref == "latest" else ids[-2:-1]
    return str(chosen[0]) if chosen else None


def resolve_pair(history: History, baseline: str, candidate: str, job: str | None) -> tuple[str, str]:
    """`compare`'s two arguments → run ids; the baseline's `latest`/`previous` are relative to the candidate."""
    candidate_id = resolve(history, candidate, job=job)
    if candidate_id is None:
        raise HarnessError(f"candidate {candidate!r}: no such run in history {history.shown}")
    baseline_id = resolve(history, baseline, job=job, candidate=candidate_id)
    if baseline_id is None:
        raise HarnessError(f"baseline {baseline!r}: no run of the job before {candidate_id}")
    return baseline_id, candidate_id
