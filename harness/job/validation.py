"""How a job file's sections are checked: every problem collected with its YAML path, then raised
together as one bounded line (`harness.job.spec` and `harness.job.thresholds` use these)."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from harness.core.errors import HarnessError, clip, did_you_mean, quote, some

MAX_PROBLEMS = 12  # listed in one error message; the rest are counted


def raise_all(errors: list[str], where: str) -> None:
    """One HarnessError listing the problems found in `where`, at most MAX_PROBLEMS of them."""
    if errors:
        raise HarnessError(f"{where}: " + some(errors, MAX_PROBLEMS))


def unknown_keys(raw: dict, known: set[str], where: str, errors: list[str]) -> None:
    for key in raw:
        if key not in known:
            hint = did_you_mean(str(key), known)
            errors.append(f"{where}{clip(str(key), 60)}: unknown key{hint}; expected one of {', '.join(sorted(known))}")


def type_ok(value: Any, annotation: str) -> bool:
    """Whether a YAML value fits a field annotated as a union of str (a Path reads as one), int, bool, None."""
    kinds = {kind.strip() for kind in annotation.split("|")}
    if value is None:
        return "None" in kinds
    if isinstance(value, bool):
        return "bool" in kinds
    if isinstance(value, int):
        return "int" in kinds
    return isinstance(value, str) and bool(kinds & {"str", "Path"})


def simple(cls: type, raw: Any, where: str, errors: list[str]) -> Any:
    """Build a flat dataclass of str/int/bool/None fields, type-checking each key; a field whose
    metadata names a command-line flag is refused here."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        errors.append(f"{where}: expected a mapping, got {type(raw).__name__}")
        return None
    # a field with a "flag" is the command line's to set (that flag), not a file's
    flags = {f.name: f.metadata["flag"] for f in fields(cls) if "flag" in f.metadata}
    known = {f.name: f for f in fields(cls) if f.name not in flags}
    for key in raw.keys() & flags.keys():
        errors.append(f"{where}.{key}: not for a job file; only the command line's {flags[key]} says it")
    unknown_keys({k: v for k, v in raw.items() if k not in flags}, set(known), f"{where}.", errors)
    kwargs = {}
    for key, value in raw.items():
        f = known.get(key)
        if f is None:
            continue
        annotation = str(f.type)
        if not type_ok(value, annotation):
            errors.append(f"{where}.{key}: expected {annotation.replace(' | ', ' or ')}, got {quote(value)}")
            continue
        kwargs[key] = value
    return cls(**kwargs)
