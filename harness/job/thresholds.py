"""The `thresholds:` section of a job: what the regression gate tolerates, validated here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from harness.core.errors import quote
from harness.job.validation import raise_all, unknown_keys


@dataclass(frozen=True)
class ThresholdsSpec:
    """What the regression gate (`harness/nightly/gate.py`) tolerates, per model, candidate vs baseline.

    Word errors of a deterministic decode do not vary from night to night, so a WER interval above
    the limit is a real change (non-inferiority: the upper end must stay below). Latency does vary
    with the machine's load, so it regresses only when even the lower end is above the limit.
    """

    max_wer_delta: float = 0.01  # upper end of ΔWER's 95% paired-bootstrap interval (0.01 = 1 point)
    min_no_worse_share: float = 0.9  # utterances with no more word errors than in the baseline
    max_exact_match_drop: float = 0.05  # fall in the share token-identical to the run's own reference
    max_latency_ratio: float | None = 1.25  # lower end of Σcandidate ms / Σbaseline ms's interval; null: off
    max_lost_utterances: int = 0  # utterances the baseline decoded and the candidate did not
    drift_window: int = 5  # latency change point: the last N runs vs the runs before them; 0: off
    drift_mads: float = 4.0  # ... by more than this many scaled MADs of the earlier runs
    drift_min_ratio: float = 1.1  # ... and by at least this ratio (a quiet history has a MAD near 0)


# (low, high, whether null turns the check off) for each threshold; every one is a number
_THRESHOLD_RANGES: dict[str, tuple[float, float, bool]] = {
    "max_wer_delta": (0.0, 1.0, False),
    "min_no_worse_share": (0.0, 1.0, False),
    "max_exact_match_drop": (0.0, 1.0, False),
    "max_latency_ratio": (1.0, float("inf"), True),
    "max_lost_utterances": (0, float("inf"), False),
    "drift_window": (0, 1000, False),
    "drift_mads": (0.0, float("inf"), False),
    "drift_min_ratio": (1.0, float("inf"), False),
}


def thresholds_from_dict(raw: Any, source: str) -> ThresholdsSpec:
    """A `thresholds:` mapping stored with a run (its resolved job) → ThresholdsSpec, or one error
    naming `source`."""
    errors: list[str] = []
    spec = parse_thresholds(raw, "thresholds", errors)
    raise_all(errors, source)
    assert spec is not None
    return spec


def parse_thresholds(raw: Any, where: str, errors: list[str]) -> ThresholdsSpec | None:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        errors.append(f"{where}: expected a mapping, got {type(raw).__name__}")
        return None
    before = len(errors)
    unknown_keys(raw, set(_THRESHOLD_RANGES), f"{where}.", errors)
    for key, value in raw.items():
        if key not in _THRESHOLD_RANGES:
            continue
        low, high, nullable = _THRESHOLD_RANGES[key]
        integral = ThresholdsSpec.__dataclass_fields__[key].type == "int"
        if value is None and nullable:
            continue
        if isinstance(value, bool) or not isinstance(value, int if integral else (int, float)):
            kind = "an integer" if integral else "a number" + (" or null" if nullable else "")
            errors.append(f"{where}.{key}: expected {kind}, got {quote(value)}")
        elif not low <= value <= high:
            bounds = f"at least {low}" if high == float("inf") else f"{low}..{high}"
            errors.append(f"{where}.{key}: expected {bounds}, got {value}")
    return ThresholdsSpec(**raw) if len(errors) == before else None
