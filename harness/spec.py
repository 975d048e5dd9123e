"""Job files: YAML → frozen, typed objects, validated once, every problem reported together.

Each problem names its YAML path (``models.sizes[1]``) so a user fixes the whole file in one go.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from converters.registry import REFERENCE, TARGETS
from harness.errors import HarnessError, did_you_mean

# every official name; any other size must be a path to an openai-whisper .pt
from harness.weights import OFFICIAL_NAMES

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


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
class DecodingSpec:
    language: str | None = "en"
    task: str = "transcribe"
    max_new_tokens: int | None = None  # None: openai-whisper's default, n_text_ctx // 2


@dataclass(frozen=True)
class ClusterSpec:
    address: str | None = None  # None: an embedded local Ray
    workers: int = 1  # Ray actors per model
    shard_size: int = 8  # utterances per shard


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
    decoding: DecodingSpec = field(default_factory=DecodingSpec)
    cluster: ClusterSpec = field(default_factory=ClusterSpec)
    thresholds: ThresholdsSpec = field(default_factory=ThresholdsSpec)
    source_file: Path | None = None

    def with_overrides(
        self,
        dataset: str | None = None,
        limit: int | None = None,
        workers: int | None = None,
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
        if workers is not None:
            _raise([] if workers > 0 else ["--workers: expected a positive integer"], "command line")
            spec = replace(spec, cluster=replace(spec.cluster, workers=workers))
        if address is not None:
            spec = replace(spec, cluster=replace(spec.cluster, address=address))
        return spec


# ---------------------------------------------------------------------------------------------
# Loading and validation


def load_job(path: str | Path) -> JobSpec:
    """Parse and validate a job file; raise one HarnessError listing every problem found."""
    path = Path(path)
    if not path.is_file():
        raise HarnessError(f"{path}: no such job file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise HarnessError(f"{path}:{where} is not valid YAML ({getattr(exc, 'problem', exc)})") from None
    errors: list[str] = []
    spec = _job_from_dict(raw, path.parent.resolve(), errors)
    _raise(errors, str(path))
    assert spec is not None
    return replace(spec, source_file=path.resolve())


def _raise(errors: list[str], where: str) -> None:
    if errors:
        raise HarnessError(f"{where}: " + "; ".join(errors))


_SECTIONS = {"name", "dataset", "models", "decoding", "cluster", "thresholds"}


def _job_from_dict(raw: Any, base: Path, errors: list[str]) -> JobSpec | None:
    if not isinstance(raw, dict):
        errors.append(f"expected a mapping with keys {sorted(_SECTIONS)}, got {type(raw).__name__}")
        return None
    _unknown_keys(raw, _SECTIONS, "", errors)
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        errors.append(f"name: expected a name of letters, digits, '.', '_' or '-', got {name!r}")
    dataset = _dataset(raw.get("dataset"), base, errors)
    models = _models(raw.get("models", {}), errors)
    decoding = _simple(DecodingSpec, raw.get("decoding", {}), "decoding", errors)
    if decoding is not None:
        if decoding.task not in ("transcribe", "translate"):
            errors.append(f"decoding.task: expected 'transcribe' or 'translate', got {decoding.task!r}")
        if decoding.max_new_tokens is not None and not 0 < decoding.max_new_tokens <= 448:
            errors.append(f"decoding.max_new_tokens: expected 1..448, got {decoding.max_new_tokens}")
        if decoding.language is not None:
            from whisper.tokenizer import LANGUAGES, TO_LANGUAGE_CODE

            if decoding.language not in LANGUAGES and decoding.language.lower() not in TO_LANGUAGE_CODE:
                hint = did_you_mean(decoding.language, LANGUAGES)
                errors.append(f"decoding.language: unknown language {decoding.language!r}{hint}")
    cluster = _simple(ClusterSpec, raw.get("cluster", {}), "cluster", errors)
    if cluster is not None:
        if cluster.workers < 1:
            errors.append(f"cluster.workers: expected a positive integer, got {cluster.workers}")
        if cluster.shard_size < 1:
            errors.append(f"cluster.shard_size: expected a positive integer, got {cluster.shard_size}")
    thresholds = _thresholds(raw.get("thresholds", {}), "thresholds", errors)
    if errors or dataset is None or models is None or decoding is None or cluster is None or thresholds is None:
        return None
    return JobSpec(name=name, dataset=dataset, models=models, decoding=decoding, cluster=cluster, thresholds=thresholds)


def _unknown_keys(raw: dict, known: set[str], where: str, errors: list[str]) -> None:
    for key in raw:
        if key not in known:
            errors.append(f"{where}{key}: unknown key{did_you_mean(str(key), known)}; expected one of {sorted(known)}")


def _type_ok(value: Any, annotation: str) -> bool:
    optional = "None" in annotation
    if value is None:
        return optional
    if "bool" in annotation:
        return isinstance(value, bool)
    if "int" in annotation:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, str)


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
            errors.append(f"{where}.{key}: expected {annotation.replace(' | ', ' or ')}, got {value!r}")
            continue
        kwargs[key] = value
    return cls(**kwargs)


def _dataset(raw: Any, base: Path, errors: list[str]) -> DatasetSpec | None:
    if raw is None:
        errors.append("dataset: missing; expected {path: <audiofolder>} or {hub: <dataset id>}")
        return None
    if isinstance(raw, dict) and "path" in raw:
        if not isinstance(raw["path"], str):
            errors.append(f"dataset.path: expected a folder path, got {raw['path']!r}")
            return None
        # relative paths are relative to the job file, so a job means the same from any cwd
        raw = {**raw, "path": str((base / Path(raw["path"]).expanduser()).resolve())}
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
            errors.append(f"{where}.path: no such folder {spec.path}")
        elif not any((spec.path / m).is_file() for m in ("metadata.jsonl", "metadata.csv")):
            errors.append(f"{where}.path: {spec.path} has no metadata.jsonl or metadata.csv (audiofolder layout)")
    if spec.limit is not None and spec.limit < 1:
        errors.append(f"{where}.limit: expected a positive integer, got {spec.limit}")


def _models(raw: Any, errors: list[str]) -> ModelsSpec | None:
    if not isinstance(raw, dict):
        errors.append(f"models: expected a mapping with 'sizes' and 'targets', got {type(raw).__name__}")
        return None
    _unknown_keys(raw, {"sizes", "targets", "evaluate_failed"}, "models.", errors)
    evaluate_failed = raw.get("evaluate_failed", False)
    if not isinstance(evaluate_failed, bool):
        errors.append(f"models.evaluate_failed: expected true or false, got {evaluate_failed!r}")
    sizes = raw.get("sizes", ["base"])
    if isinstance(sizes, str):
        sizes = [sizes]
    ok = True
    if not isinstance(sizes, list) or not sizes:
        errors.append(f"models.sizes: expected a non-empty list of model names, got {sizes!r}")
        return None
    for i, size in enumerate(sizes):
        if not isinstance(size, str):
            errors.append(f"models.sizes[{i}]: expected a model name, got {size!r}")
            ok = False
        elif size not in OFFICIAL_NAMES and not size.endswith(".pt"):
            errors.append(f"models.sizes[{i}]: unknown size '{size}'{did_you_mean(size, OFFICIAL_NAMES)}")
            ok = False
        elif size.endswith(".pt") and not Path(size).expanduser().is_file():
            errors.append(f"models.sizes[{i}]: no such checkpoint file {size}")
            ok = False
    targets_raw = raw.get("targets", {})
    if isinstance(targets_raw, list):  # a plain list means fp32 for each
        targets_raw = {key: ["fp32"] for key in targets_raw}
    if not isinstance(targets_raw, dict):
        errors.append(f"models.targets: expected a mapping target -> [quantizations], got {targets_raw!r}")
        return None
    targets = []
    for name, quants in targets_raw.items():
        where = f"models.targets.{name}"
        if name not in TARGETS:
            errors.append(f"{where}: unknown target{did_you_mean(str(name), TARGETS)}; known: {', '.join(TARGETS)}")
            ok = False
            continue
        if quants is None:
            quants = ["fp32"]
        if isinstance(quants, str):
            quants = [quants]
        if not isinstance(quants, list) or not quants:
            errors.append(f"{where}: expected a list of quantizations, got {quants!r}")
            ok = False
            continue
        allowed = TARGETS[name].quants
        for q in quants:
            if q not in allowed:
                hint = did_you_mean(str(q), allowed)
                errors.append(f"{where}: quantization {q!r} is not offered{hint}; offered: {', '.join(allowed)}")
                ok = False
        targets.append((name, tuple(dict.fromkeys(quants))))
    if not ok:
        return None
    return ModelsSpec(
        sizes=tuple(dict.fromkeys(sizes)), targets=tuple(targets), evaluate_failed=evaluate_failed is True
    )


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
            errors.append(f"{where}.{key}: expected {kind}, got {value!r}")
        elif not low <= value <= high:
            bounds = f"at least {low}" if high == float("inf") else f"{low}..{high}"
            errors.append(f"{where}.{key}: expected {bounds}, got {value}")
    return ThresholdsSpec(**raw) if len(errors) == before else None
