"""Job files: YAML → frozen, typed objects, validated once, every problem reported together.

Each problem names its YAML path (``models.sizes[1]``) so a user fixes the whole file in one go.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from converters.registry import TARGETS

# every official name; any other size must be a path to an openai-whisper .pt
from harness.core.checkpoint import OFFICIAL_NAMES
from harness.core.decoding import DecodingOptions
from harness.core.errors import HarnessError, clip, did_you_mean, quote, some
from harness.core.target import REFERENCE
from harness.job_file import read_job_yaml

# a job name becomes a folder under results/: matched whole, so a trailing newline or "/" cannot slip in
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


@dataclass(frozen=True)
class DatasetSpec:
    """Where utterances come from: a local audiofolder (``path``) or a Hugging Face hub id."""

    path: Path | None = None
    hub: str | None = None
    config: str | None = None
    split: str | None = None  # hub: the dataset split; local: keep rows whose `split` column matches
    streaming: bool = False
    limit: int | None = None
    id_column: str = "id"
    text_column: str = "text"
    audio_column: str = "audio"

    @property
    def label(self) -> str:
        return str(self.path) if self.path is not None else f"hub:{self.hub}"


@dataclass(frozen=True)
class ModelCell:
    """One model to evaluate: the reference or a converted artifact of one size."""

    size: str
    target: str
    quant: str

    @property
    def label(self) -> str:
        return f"{self.size}/{self.target}/{self.quant}"

    def as_tuple(self) -> tuple[str, str, str]:
        return self.size, self.target, self.quant


@dataclass(frozen=True)
class ModelsSpec:
    sizes: tuple[str, ...] = ("base",)
    # target -> quantizations; the reference always runs, since every comparison is against it
    targets: tuple[tuple[str, tuple[str, ...]], ...] = ()
    evaluate_failed: bool = False  # also evaluate artifacts that failed their parity gate

    def cells(self) -> tuple[ModelCell, ...]:
        out = []
        for size in self.sizes:
            out.append(ModelCell(size, REFERENCE, "fp32"))
            out += [ModelCell(size, t, q) for t, quants in self.targets if t != REFERENCE for q in quants]
        return tuple(out)


@dataclass(frozen=True)
class ClusterSpec:
    """Where and how a job runs; none of it changes the results (a resumed run may change it)."""

    address: str | None = None  # None: an embedded local Ray
    slots: int | None = None  # workers at once, over the whole cluster; None: one per CPU / threads
    threads: int = 1  # threads each worker's model uses
    shard_size: int = 4  # utterances per shard: the unit of scheduling, persisting and resuming
    max_attempts: int = 3  # a shard whose worker dies is tried at most this often
    stall_timeout_s: int = 600  # a worker that loads, or decodes one utterance, longer than this is ended
    emulate: bool = False  # run board targets (mtk) on CPUs when no node advertises the board


@dataclass(frozen=True)
class ThresholdsSpec:
    """What the regression gate (`harness/gate.py`) tolerates, per model, candidate vs baseline.

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


@dataclass(frozen=True)
class JobSpec:
    name: str
    dataset: DatasetSpec
    models: ModelsSpec = field(default_factory=ModelsSpec)
    decoding: DecodingOptions = field(default_factory=DecodingOptions)
    cluster: ClusterSpec = field(default_factory=ClusterSpec)
    thresholds: ThresholdsSpec = field(default_factory=ThresholdsSpec)
    source_file: Path | None = None

    def with_overrides(
        self,
        dataset: str | None = None,
        limit: int | None = None,
        slots: int | None = None,
        address: str | None = None,
    ) -> JobSpec:
        """The command line's flags, applied to a validated spec and validated the same way."""
        spec = self
        if dataset is not None:
            as_path = Path(dataset).expanduser()
            ds = (
                DatasetSpec(path=as_path.resolve())
                if as_path.exists() or dataset.startswith((".", "/", "~"))
                else DatasetSpec(hub=dataset, split=self.dataset.split)
            )
            errors: list[str] = []
            _check_dataset(ds, "--dataset", errors)
            _raise(errors, "--dataset")
            spec = replace(spec, dataset=ds)
        if limit is not None:
            _raise([] if limit > 0 else ["--limit: expected a positive integer"], "command line")
            spec = replace(spec, dataset=replace(spec.dataset, limit=limit))
        if slots is not None:
            _raise([] if slots > 0 else ["--slots: expected a positive integer"], "command line")
            spec = replace(spec, cluster=replace(spec.cluster, slots=slots))
        if address is not None:
            spec = replace(spec, cluster=replace(spec.cluster, address=address))
        return spec


# ---------------------------------------------------------------------------------------------
# Loading and validation


MAX_PROBLEMS = 20  # listed in one error message; the rest are counted


def load_job(path: str | Path) -> JobSpec:
    """Parse and validate a job file; raise one HarnessError listing every problem found."""
    path = Path(path)
    raw = read_job_yaml(path)
    errors: list[str] = []
    spec = _job_from_dict(raw, path.parent.resolve(), errors)
    _raise(errors, str(path))
    assert spec is not None
    return replace(spec, source_file=path.resolve())


def _raise(errors: list[str], where: str) -> None:
    if errors:
        raise HarnessError(f"{where}: " + some(errors, MAX_PROBLEMS))


_SECTIONS = {"name", "dataset", "models", "decoding", "cluster", "thresholds"}


def _job_from_dict(raw: Any, base: Path, errors: list[str]) -> JobSpec | None:
    if not isinstance(raw, dict):
        errors.append(f"expected a mapping with keys {sorted(_SECTIONS)}, got {type(raw).__name__}")
        return None
    _unknown_keys(raw, _SECTIONS, "", errors)
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        errors.append(f"name: expected a name of at most 100 letters, digits, '.', '_' or '-', got {quote(name)}")
    dataset = _dataset(raw.get("dataset"), base, errors)
    models = _models(raw.get("models", {}), errors)
    decoding = _simple(DecodingOptions, raw.get("decoding", {}), "decoding", errors)
    if decoding is not None:
        if decoding.task not in ("transcribe", "translate"):
            errors.append(f"decoding.task: expected 'transcribe' or 'translate', got {quote(decoding.task)}")
        if isinstance(decoding.long_form, str) and decoding.long_form != "auto":
            errors.append(f"decoding.long_form: expected auto, true or false, got {quote(decoding.long_form)}")
        if decoding.max_new_tokens is not None and not 0 < decoding.max_new_tokens <= 448:
            errors.append(f"decoding.max_new_tokens: expected 1..448, got {quote(decoding.max_new_tokens)}")
        if decoding.language is not None:
            from whisper.tokenizer import LANGUAGES, TO_LANGUAGE_CODE

            if decoding.language not in LANGUAGES and decoding.language.lower() not in TO_LANGUAGE_CODE:
                hint = did_you_mean(decoding.language, LANGUAGES)
                errors.append(f"decoding.language: unknown language {quote(decoding.language)}{hint}")
    cluster = _simple(ClusterSpec, raw.get("cluster", {}), "cluster", errors)
    if cluster is not None:
        for key in ("slots", "threads", "shard_size", "max_attempts", "stall_timeout_s"):
            value = getattr(cluster, key)
            if value is not None and value < 1:
                errors.append(f"cluster.{key}: expected a positive integer, got {quote(value)}")
    thresholds = _thresholds(raw.get("thresholds", {}), "thresholds", errors)
    if errors or dataset is None or models is None or decoding is None or cluster is None or thresholds is None:
        return None
    return JobSpec(name=name, dataset=dataset, models=models, decoding=decoding, cluster=cluster, thresholds=thresholds)


def _unknown_keys(raw: dict, known: set[str], where: str, errors: list[str]) -> None:
    for key in raw:
        if key not in known:
            hint = did_you_mean(str(key), known)
            errors.append(f"{where}{clip(str(key), 60)}: unknown key{hint}; expected one of {sorted(known)}")


def _type_ok(value: Any, annotation: str) -> bool:
    """Whether a YAML value fits a field annotated as a union of str (a Path reads as one), int, bool, None."""
    kinds = {kind.strip() for kind in annotation.split("|")}
    if value is None:
        return "None" in kinds
    if isinstance(value, bool):
        return "bool" in kinds
    if isinstance(value, int):
        return "int" in kinds
    return isinstance(value, str) and bool(kinds & {"str", "Path"})


def _simple(cls: type, raw: Any, where: str, errors: list[str]) -> Any:
    """Build a flat dataclass of str/int/bool/None fields, type-checking each key."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        errors.append(f"{where}: expected a mapping, got {type(raw).__name__}")
        return None
    known = {f.name: f for f in fields(cls)}
    _unknown_keys(raw, set(known), f"{where}.", errors)
    kwargs = {}
    for key, value in raw.items():
        f = known.get(key)
        if f is None:
            continue
        annotation = str(f.type)
        if not _type_ok(value, annotation):
            errors.append(f"{where}.{key}: expected {annotation.replace(' | ', ' or ')}, got {quote(value)}")
            continue
        kwargs[key] = value
    return cls(**kwargs)


def _dataset(raw: Any, base: Path, errors: list[str]) -> DatasetSpec | None:
    if raw is None:
        errors.append("dataset: missing; expected {path: <audiofolder>} or {hub: <dataset id>}")
        return None
    if isinstance(raw, dict) and "path" in raw:
        if not isinstance(raw["path"], str):
            errors.append(f"dataset.path: expected a folder path, got {quote(raw['path'])}")
            return None
        # relative paths are relative to the job file, so a job means the same from any cwd
        try:
            raw = {**raw, "path": str((base / Path(raw["path"]).expanduser()).resolve())}
        except (RuntimeError, ValueError, OSError) as exc:  # an unknown ~user, a NUL byte, a symlink loop
            errors.append(f"dataset.path: not a usable folder path {quote(raw['path'])} ({exc})")
            return None
    spec = _simple(DatasetSpec, raw, "dataset", errors)
    if spec is None:
        return None
    if spec.path is not None:
        spec = replace(spec, path=Path(spec.path))
    _check_dataset(spec, "dataset", errors)
    return spec


def _check_dataset(spec: DatasetSpec, where: str, errors: list[str]) -> None:
    if (spec.path is None) == (spec.hub is None):
        errors.append(f"{where}: expected exactly one of 'path' (a local audiofolder) or 'hub' (a dataset id)")
    elif spec.path is not None:
        if not spec.path.is_dir():
            errors.append(f"{where}.path: no such folder {clip(str(spec.path))}")
        elif not any((spec.path / m).is_file() for m in ("metadata.jsonl", "metadata.csv")):
            folder = clip(str(spec.path))
            errors.append(f"{where}.path: {folder} has no metadata.jsonl or metadata.csv (audiofolder layout)")
    if spec.limit is not None and spec.limit < 1:
        errors.append(f"{where}.limit: expected a positive integer, got {quote(spec.limit)}")


def _models(raw: Any, errors: list[str]) -> ModelsSpec | None:
    if not isinstance(raw, dict):
        errors.append(f"models: expected a mapping with 'sizes' and 'targets', got {type(raw).__name__}")
        return None
    _unknown_keys(raw, {"sizes", "targets", "evaluate_failed"}, "models.", errors)
    evaluate_failed = raw.get("evaluate_failed", False)
    if not isinstance(evaluate_failed, bool):
        errors.append(f"models.evaluate_failed: expected true or false, got {quote(evaluate_failed)}")
    sizes = raw.get("sizes", ["base"])
    if isinstance(sizes, str):
        sizes = [sizes]
    ok = True
    if not isinstance(sizes, list) or not sizes:
        errors.append(f"models.sizes: expected a non-empty list of model names, got {quote(sizes)}")
        return None
    for i, size in enumerate(sizes):
        if not isinstance(size, str):
            errors.append(f"models.sizes[{i}]: expected a model name, got {quote(size)}")
            ok = False
        elif size not in OFFICIAL_NAMES and not size.endswith(".pt"):
            errors.append(f"models.sizes[{i}]: unknown size {quote(size)}{did_you_mean(size, OFFICIAL_NAMES)}")
            ok = False
        elif size.endswith(".pt") and not _is_file(size):
            errors.append(f"models.sizes[{i}]: no such checkpoint file {clip(size)}")
            ok = False
    targets_raw = raw.get("targets", {})
    if isinstance(targets_raw, list) and all(isinstance(key, str) for key in targets_raw):  # fp32 for each
        targets_raw = {key: ["fp32"] for key in targets_raw}
    if not isinstance(targets_raw, dict):
        errors.append(f"models.targets: expected a mapping target -> [quantizations], got {quote(targets_raw)}")
        return None
    targets = []
    for name, quants in targets_raw.items():
        where = f"models.targets.{clip(str(name), 60)}"
        if name not in TARGETS:
            errors.append(f"{where}: unknown target{did_you_mean(str(name), TARGETS)}; known: {', '.join(TARGETS)}")
            ok = False
            continue
        if quants is None:
            quants = ["fp32"]
        if isinstance(quants, str):
            quants = [quants]
        if not isinstance(quants, list) or not quants:
            errors.append(f"{where}: expected a list of quantizations, got {quote(quants)}")
            ok = False
            continue
        allowed = TARGETS[name].quants
        for q in quants:
            if q not in allowed:
                hint = did_you_mean(str(q), allowed)
                errors.append(f"{where}: quantization {quote(q)} is not offered{hint}; offered: {', '.join(allowed)}")
                ok = False
        if ok:  # a refused quantization may not even be hashable (a list)
            targets.append((name, tuple(dict.fromkeys(quants))))
    if not ok:
        return None
    return ModelsSpec(
        sizes=tuple(dict.fromkeys(sizes)), targets=tuple(targets), evaluate_failed=evaluate_failed is True
    )


def _is_file(path: str) -> bool:
    try:
        return Path(path).expanduser().is_file()
    except RuntimeError:  # `~user` of an unknown user
        return False


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
    spec = _thresholds(raw, "thresholds", errors)
    _raise(errors, source)
    assert spec is not None
    return spec


def _thresholds(raw: Any, where: str, errors: list[str]) -> ThresholdsSpec | None:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        errors.append(f"{where}: expected a mapping, got {type(raw).__name__}")
        return None
    before = len(errors)
    _unknown_keys(raw, set(_THRESHOLD_RANGES), f"{where}.", errors)
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
