"""A gate's verdict: what comparing a candidate run with a baseline found, per model
(`harness.nightly.gate` decides it), how it reads (the table and lines `compare` prints, which the report
shows too), and how it is kept: `gate.json` in the candidate's run folder.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from harness.exit_codes import ExitCode
from harness.job.thresholds import ThresholdsSpec
from harness.results.run_dir import write_json_atomic

GATE_FILE = "gate.json"  # the verdict, in the candidate's run folder


@dataclass(frozen=True)
class Drift:
    """Latency change point: the median of the last `recent_runs` runs against the earlier ones'."""

    recent: float
    earlier: float
    limit: float  # earlier + max(drift_mads * scaled MAD, (drift_min_ratio - 1) * earlier)
    recent_runs: int
    earlier_runs: int

    @property
    def flagged(self) -> bool:
        return self.recent > self.limit


@dataclass(frozen=True)
class ModelCheck:
    model: str
    paired: int = 0
    wer_delta: tuple[float, float, float] | None = None
    no_worse: float | None = None
    exact_match: tuple[float, float] | None = None  # (baseline, candidate) over paired utterances
    latency: tuple[float, float, float] | None = None
    drift: Drift | None = None
    regressions: tuple[str, ...] = ()  # what, and by how much
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Comparison:
    baseline: dict[str, Any]
    candidate: dict[str, Any]
    checks: tuple[ModelCheck, ...]
    thresholds: ThresholdsSpec

    @property
    def regressed(self) -> list[ModelCheck]:
        return [c for c in self.checks if c.regressions]


def pct(value: float) -> str:
    return f"{100 * value:+.2f}%"


def comparison_rows(comparison: Comparison) -> list[dict[str, Any]]:
    """Every model's numbers as the gate's table shows them (the report shows the same)."""

    def interval(v: tuple[float, float, float] | None, fmt) -> str:
        return "-" if v is None else f"{fmt(v[0])} [{fmt(v[1])}, {fmt(v[2])}]"

    return [
        {
            "model": c.model,
            "paired": c.paired,
            "Δwer [95% CI]": interval(c.wer_delta, pct),
            "no worse": "-" if c.no_worse is None else f"{c.no_worse:.1%}",
            "exact match": "-" if c.exact_match is None else f"{c.exact_match[0]:.1%} → {c.exact_match[1]:.1%}",
            "latency ratio [95% CI]": interval(c.latency, lambda x: f"{x:.2f}"),
            "p50 drift": "-" if c.drift is None else f"{c.drift.recent:.0f} vs {c.drift.earlier:.0f} ms",
            "verdict": "REGRESSION" if c.regressions else "ok",
        }
        for c in comparison.checks
    ]


def describe_run(run: dict[str, Any]) -> str:
    return f"{run['run_id']} ({run['job']}, {run['started']}, commit {str(run['git_commit'])[:10]})"


def verdict_lines(comparison: Comparison) -> list[str]:
    """The notes, one line per regressed model (what, and by how much), and the verdict."""
    lines = [f"note {check.model}: {note}" for check in comparison.checks for note in check.notes]
    lines += [f"REGRESSION {check.model}: {'; '.join(check.regressions)}" for check in comparison.regressed]
    n, bad = len(comparison.checks), len(comparison.regressed)
    lines.append(
        f"gate: {bad} of {n} models regressed (exit {ExitCode.REGRESSION.value})"
        if bad
        else f"gate: ok, {n} models within thresholds"
    )
    return lines


def format_comparison(comparison: Comparison) -> str:
    """The table of every model's numbers, then one line per regressed model, then the verdict."""
    from tabulate import tabulate

    lines = [
        f"baseline:  {describe_run(comparison.baseline)}",
        f"candidate: {describe_run(comparison.candidate)}",
        "",
        tabulate(comparison_rows(comparison), headers="keys", tablefmt="github"),
        "",
    ]
    return "\n".join(lines + verdict_lines(comparison))


@dataclass(frozen=True)
class Verdict:
    """What gate.json holds: the baseline asked for, the comparison (None: no earlier run to compare
    with, see `note`), the exit code the gate gave, and when."""

    requested: str
    comparison: Comparison | None
    exit_code: int
    gated: str
    note: str = ""


def save_verdict(verdict: Verdict, run_dir: Path) -> None:
    write_json_atomic(asdict(verdict), run_dir / GATE_FILE)


def read_verdict(run_dir: Path) -> Verdict | None:
    """The run's gate.json as written by `save_verdict`; None when the run was never gated."""
    path = run_dir / GATE_FILE
    if not path.is_file():
        return None
    raw = json.loads(path.read_text())
    comparison = raw["comparison"]
    if comparison is not None:
        checks = tuple(
            ModelCheck(
                **{
                    **check,
                    **{k: tuple(check[k]) for k in ("wer_delta", "exact_match", "latency") if check[k] is not None},
                    "drift": Drift(**check["drift"]) if check["drift"] else None,
                    "regressions": tuple(check["regressions"]),
                    "notes": tuple(check["notes"]),
                }
            )
            for check in comparison["checks"]
        )
        comparison = Comparison(
            comparison["baseline"], comparison["candidate"], checks, ThresholdsSpec(**comparison["thresholds"])
        )
    return replace(Verdict(**raw), comparison=comparison)
