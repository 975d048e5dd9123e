"""Job files: YAML → frozen, typed objects, validated once, every problem reported together.

Each problem names its YAML path (``models.sizes[1]``) so a user fixes the whole file in one go.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from converters.registry import TARGETS
from harness.core.checkpoint import OFFICIAL_NAMES
from harness.core.decoding import AUTO, DecodingOptions, english_only_refusal
from harness.core.errors import clip, did_you_mean, quote
from harness.core.languages import LANGUAGES, TO_LANGUAGE_CODE
from harness.core.target import REFERENCE

# every official name; any other size must be a path to an openai-whisper .pt
from harness.core.window import FULL_AUDIO_CTX
from harness.job.file import read_job_yaml
from harness.job.thresholds import ThresholdsSpec, parse_thresholds
from harness.job.validation import raise_all, simple, unknown_keys

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
    # metadata column naming each utterance's language (code or name): decoded in it (unless
    # decoding.language is auto) and scored by its rules
    language_column: str | None = None
    # its name in a suite (`datasets:`, the mapping's key): the `dataset` column of its rows, and
    # the prefix of its utterance ids ("name/id") when the job has several datasets
    name: str | None = None

    @property
    def label(self) -> str:
        return str(self.path) if self.path is not None else f"hub:{self.hub}"

    @property
    def title(self) -> str:
        """What tables call it: its suite name, else its folder's name or hub id."""
        return self.name or (self.path.name if self.path is not None else str(self.hub))


@dataclass(frozen=True)
class ModelCell:
    """One model to evaluate: the reference or a converted artifact of one size."""

    size: str
    target: str
    quant: str
    audio_ctx: int = FULL_AUDIO_CTX  # the encoder's audio context (decoding.audio_ctx)

    @property
    def label(self) -> str:
        """`size/target/quant`, and `@ctx<n>` at a trimmed audio context: two settings of one
        model never share a label (raw files, the scheduler, the history's rows)."""
        context = f"@ctx{self.audio_ctx}" if self.audio_ctx != FULL_AUDIO_CTX else ""
        return f"{self.size}/{self.target}/{self.quant}{context}"

    def as_tuple(self) -> tuple[str, str, str, int]:
        """The model's key in tables: (size, target, quant, audio_ctx)."""
        return self.size, self.target, self.quant, self.audio_ctx


@dataclass(frozen=True)
class ModelsSpec:
    sizes: tuple[str, ...] = ("base",)
    # target -> quantizations; the reference always runs, since every comparison is against it
    targets: tuple[tuple[str, tuple[str, ...]], ...] = ()
    evaluate_failed: bool = False  # also evaluate artifacts that failed their parity gate
    # the job's decoding.audio_ctx: every model at each context; the reference at the full 1500
    # always runs, the point every model is compared with
    audio_ctx: tuple[int, ...] = (FULL_AUDIO_CTX,)

    def cells(self) -> tuple[ModelCell, ...]:
        out = []
        for size in self.sizes:
            out.append(ModelCell(size, REFERENCE, "fp32"))
            for ctx in self.audio_ctx:
                if ctx != FULL_AUDIO_CTX:
                    out.append(ModelCell(size, REFERENCE, "fp32", ctx))
                out += [ModelCell(size, t, q, ctx) for t, quants in self.targets if t != REFERENCE for q in quants]
        return tuple(out)


@dataclass(frozen=True)
class ClusterSpec:
    """Where and how a job runs; none of it changes the results (a resumed run may change it)."""

    address: str | None = None  # None: an embedded local Ray
    # the job vouches for `address`: joining hands that host this machine's Ray token and the job's
    # work, so an address from a job file is joined only when the job (or --trust-job-address) says so
    trust_address: bool = False
    slots: int | None = None  # workers at once, over the whole cluster; None: one per CPU / threads
    threads: int = 1  # threads each worker's model uses
    # utterances per shard: the unit of scheduling, persisting and resuming; a batching runner
    # decodes at most one shard per batch, so it should hold a few batches (decoding.batch_size)
    shard_size: int = 16
    max_attempts: int = 3  # a shard whose worker dies is tried at most this often
    stall_timeout_s: int = 600  # a worker that loads, or decodes one utterance, longer than this is ended
    emulate: bool = False  # run board targets (mtk) on CPUs when no node advertises the board
    # join a cluster that admits clients without a token: the user's decision alone, never a job file's
    allow_unauthenticated: bool = field(default=False, metadata={"flag": "--allow-unauthenticated-cluster"})


@dataclass(frozen=True)
class AnalysisSpec:
    """Analyses beyond the main pass, each opt-in: they cost extra decoding."""

    # per candidate model and utterance: encoder SNR, teacher-forced logits, hybrid runs, the first
    # divergent token (harness.results.divergence); divergence.parquet/csv/md in the run directory
    divergence: bool = False


DURATION = "duration"  # a breakdown by audio length, in DURATION_BUCKETS
LANGUAGE = "language"  # a breakdown by the language that scored each utterance
DURATION_BUCKETS = (5.0, 10.0, 20.0, 30.0)  # seconds: <5, 5-10, 10-20, 20-30, >=30 (long form)
ALL = "all"  # latency.sample: every utterance
MAX_BATCH = 256  # decoding.batch_size: utterances per decoder call, at most


@dataclass(frozen=True)
class LatencySpec:
    """Which utterances time each model at batch 1: per-utterance latency means one utterance at a
    time (batched rows share a batch's time), so every model times the same seeded sample of each
    dataset alone, and the latency columns and the gate's latency rules read those rows only."""

    # utterances per dataset, or "all": enough for a median and a p90 of each model, few enough that
    # a small set still decodes mostly in batches (the rest count for accuracy and throughput)
    sample: int | str = 32
    seed: int = 0


@dataclass(frozen=True)
class JobSpec:
    name: str
    # one dataset (`dataset:`) or a suite (`datasets:`, name -> dataset section): every model runs
    # on each; results are per dataset and pooled (harness.results.summary)
    datasets: tuple[DatasetSpec, ...]
    models: ModelsSpec = field(default_factory=ModelsSpec)
    decoding: DecodingOptions = field(default_factory=DecodingOptions)
    cluster: ClusterSpec = field(default_factory=ClusterSpec)
    thresholds: ThresholdsSpec = field(default_factory=ThresholdsSpec)
    report: bool = False  # write report.html into the run folder once the run is recorded and gated
    analysis: AnalysisSpec = field(default_factory=AnalysisSpec)
    # per-group tables with ΔWER against the reference: metadata columns, `language`, `duration`;
    # None: by language when a dataset names its languages or the job detects them
    breakdown: tuple[str, ...] | None = None
    latency: LatencySpec = field(default_factory=LatencySpec)
    source_file: Path | None = None

    @property
    def breakdowns(self) -> tuple[str, ...]:
        """The breakdown tables the run writes: the job's, else `language` for a multilingual set."""
        if self.breakdown is not None:
            return self.breakdown
        languages = self.decoding.language == AUTO or any(d.language_column for d in self.datasets)
        return (LANGUAGE,) if languages else ()

    def with_overrides(
        self,
        dataset: str | None = None,
        limit: int | None = None,
        slots: int | None = None,
        address: str | None = None,
        trust_address: bool = False,
        allow_unauthenticated: bool = False,
    ) -> JobSpec:
        """The command line's flags, applied to a validated spec and validated the same way. An
        `address` given there is the user's own: trusted."""
        spec = self
        if dataset is not None:
            as_path = Path(dataset).expanduser()
            ds = (
                DatasetSpec(path=as_path.resolve())
                if as_path.exists() or dataset.startswith((".", "/", "~"))
                else DatasetSpec(hub=dataset, split=self.datasets[0].split)
            )
            errors: list[str] = []
            _check_dataset(ds, "--dataset", errors)
            raise_all(errors, "--dataset")
            spec = replace(spec, datasets=(ds,))
        if limit is not None:  # of each dataset of a suite
            raise_all([] if limit > 0 else ["--limit: expected a positive integer"], "command line")
            spec = replace(spec, datasets=tuple(replace(d, limit=limit) for d in spec.datasets))
        if slots is not None:
            raise_all([] if slots > 0 else ["--slots: expected a positive integer"], "command line")
            spec = replace(spec, cluster=replace(spec.cluster, slots=slots))
        if address is not None:
            spec = replace(spec, cluster=replace(spec.cluster, address=address, trust_address=True))
        if trust_address:
            spec = replace(spec, cluster=replace(spec.cluster, trust_address=True))
        if allow_unauthenticated:
            spec = replace(spec, cluster=replace(spec.cluster, allow_unauthenticated=True))
        return spec


# ---------------------------------------------------------------------------------------------
# Loading and validation


def load_job(path: str | Path) -> JobSpec:
    """Parse and validate a job file; raise one HarnessError listing every problem found."""
    path = Path(path)
    raw = read_job_yaml(path)
    errors: list[str] = []
    spec = _job_from_dict(raw, path.parent.resolve(), errors)
    raise_all(errors, str(path))
    assert spec is not None
    return replace(spec, source_file=path.resolve())


_SECTIONS = {
    "name", "dataset", "datasets", "models", "decoding", "cluster", "thresholds", "report", "analysis", "breakdown",
    "latency",
}  # fmt: skip


def _job_from_dict(raw: Any, base: Path, errors: list[str]) -> JobSpec | None:
    if not isinstance(raw, dict):
        errors.append(f"expected a mapping with keys {sorted(_SECTIONS)}, got {type(raw).__name__}")
        return None
    unknown_keys(raw, _SECTIONS, "", errors)
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        errors.append(f"name: expected a name of at most 100 letters, digits, '.', '_' or '-', got {quote(name)}")
    datasets = _datasets(raw, base, errors)
    models = _models(raw.get("models", {}), base, errors)
    decoding_raw = raw.get("decoding") or {}
    if isinstance(decoding_raw, dict):  # audio_ctx may be a list: one model row per value, not a decoding option
        decoding_raw = dict(decoding_raw)
        contexts = _audio_ctx(decoding_raw.pop("audio_ctx", FULL_AUDIO_CTX), errors)
        if models is not None and contexts is not None:
            models = replace(models, audio_ctx=contexts)
    decoding = simple(DecodingOptions, decoding_raw, "decoding", errors)
    if decoding is not None:
        decoding = _check_decoding(decoding, decoding_raw, models, datasets, errors)
    cluster = simple(ClusterSpec, raw.get("cluster", {}), "cluster", errors)
    if cluster is not None:
        for key in ("slots", "threads", "shard_size", "max_attempts", "stall_timeout_s"):
            value = getattr(cluster, key)
            if value is not None and value < 1:
                errors.append(f"cluster.{key}: expected a positive integer, got {quote(value)}")
    thresholds = parse_thresholds(raw.get("thresholds", {}), "thresholds", errors)
    report = raw.get("report", False)
    if not isinstance(report, bool):
        errors.append(f"report: expected true or false, got {quote(report)}")
    analysis = simple(AnalysisSpec, raw.get("analysis", {}), "analysis", errors)
    breakdown = _breakdown(raw.get("breakdown"), errors)
    latency = _latency(raw.get("latency"), errors)
    parts = (datasets, models, decoding, cluster, thresholds, analysis, latency)
    if errors or any(part is None for part in parts):
        return None
    return JobSpec(
        name=name,
        datasets=datasets,
        breakdown=breakdown,
        latency=latency,
        models=models,
        decoding=decoding,
        cluster=cluster,
        thresholds=thresholds,
        report=report,
        analysis=analysis,
    )


def _audio_ctx(raw: Any, errors: list[str]) -> tuple[int, ...] | None:
    """decoding.audio_ctx: one context or a list of them, each 1..1500."""
    values = raw if isinstance(raw, list) else [raw]
    wrong = [v for v in values if isinstance(v, bool) or not isinstance(v, int) or not 0 < v <= FULL_AUDIO_CTX]
    if not values or wrong:
        errors.append(
            f"decoding.audio_ctx: expected an audio context 1..{FULL_AUDIO_CTX} (or a list of them), got {quote(raw)}"
        )
        return None
    return tuple(dict.fromkeys(values))


def _check_decoding(
    decoding: DecodingOptions,
    raw: dict[str, Any],
    models: ModelsSpec | None,
    datasets: tuple[DatasetSpec, ...] | None,
    errors: list[str],
) -> DecodingOptions:
    """The decoding section's values, the language as whisper's code; and what a model cannot do."""
    if decoding.task not in ("transcribe", "translate"):
        errors.append(f"decoding.task: expected 'transcribe' or 'translate', got {quote(decoding.task)}")
    if isinstance(decoding.long_form, str) and decoding.long_form != "auto":
        errors.append(f"decoding.long_form: expected auto, true or false, got {quote(decoding.long_form)}")
    if decoding.max_new_tokens is not None and not 0 < decoding.max_new_tokens <= 448:
        errors.append(f"decoding.max_new_tokens: expected 1..448, got {quote(decoding.max_new_tokens)}")
    if not 0 < decoding.batch_size <= MAX_BATCH:
        errors.append(f"decoding.batch_size: expected 1..{MAX_BATCH}, got {quote(decoding.batch_size)}")
    language = decoding.language
    if language != AUTO:
        code = language if language in LANGUAGES else TO_LANGUAGE_CODE.get(language.lower())
        if code is None:
            hint = did_you_mean(language, [*LANGUAGES, AUTO])
            errors.append(f"decoding.language: unknown language {quote(language)}{hint}; or auto (detected)")
        else:
            decoding = replace(decoding, language=code)
        column = next((d.language_column for d in datasets or () if d.language_column), None)
        if "language" in raw and column is not None:
            errors.append(
                f"decoding.language: {quote(language)} and dataset.language_column {quote(column)} both give the "
                "language; leave decoding.language out (each utterance in its own) or set it to auto"
            )
    if models is None:
        return decoding
    trimmed = [c for c in models.audio_ctx if c != FULL_AUDIO_CTX]
    if decoding.long_form is True and trimmed:
        errors.append(
            f"decoding.long_form: true needs the full audio context ({FULL_AUDIO_CTX}): whisper.transcribe's "
            f"windows are 30 s, and decoding.audio_ctx asks for {trimmed[0]}"
        )
    for size in models.sizes:  # official English-only names; a .pt's own dims are checked when decoding
        refused = english_only_refusal(decoding) if size.endswith(".en") and size in OFFICIAL_NAMES else None
        if refused:
            field = "task" if refused.startswith("task") else "language"
            errors.append(
                f"decoding.{field}: {size} is English-only: it cannot take {refused} "
                "(use a multilingual size such as base)"
            )
    return decoding


_DATASET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # a suite's dataset: a prefix of ids, a table row


def _datasets(raw: dict[str, Any], base: Path, errors: list[str]) -> tuple[DatasetSpec, ...] | None:
    """`dataset:` (one) or `datasets:` (a suite: name -> a dataset section), never both."""
    if "dataset" in raw and "datasets" in raw:
        errors.append("dataset, datasets: expected one of them (datasets: a mapping name -> dataset section)")
        return None
    if "datasets" not in raw:
        one = _dataset(raw.get("dataset"), base, errors, "dataset")
        return None if one is None else (one,)
    suite = raw["datasets"]
    if not isinstance(suite, dict) or not suite:
        errors.append(f"datasets: expected a mapping name -> dataset section, got {quote(suite)}")
        return None
    out = []
    for name, section in suite.items():
        if not isinstance(name, str) or not _DATASET_NAME.fullmatch(name):
            errors.append(f"datasets: expected names of letters, digits, '.', '_' or '-', got {quote(name)}")
            continue
        if isinstance(section, dict) and "name" in section:
            errors.append(f"datasets.{name}.name: the mapping's key names it; leave name out")
            continue
        one = _dataset(section, base, errors, f"datasets.{name}")
        if one is not None:
            out.append(replace(one, name=name))
    return tuple(out) if len(out) == len(suite) else None


def _breakdown(raw: Any, errors: list[str]) -> tuple[str, ...] | None:
    """breakdown: a list of metadata column names, `language` or `duration` (None: the default)."""
    if raw is None:
        return None
    values = [raw] if isinstance(raw, str) else raw
    if not isinstance(values, list) or not all(isinstance(v, str) and v.strip() for v in values):
        errors.append(f"breakdown: expected a list of metadata columns, {LANGUAGE} or {DURATION}, got {quote(raw)}")
        return None
    return tuple(dict.fromkeys(values))


def _latency(raw: Any, errors: list[str]) -> LatencySpec | None:
    spec = simple(LatencySpec, raw, "latency", errors)
    if spec is None:
        return None
    sample = spec.sample
    if (isinstance(sample, str) and sample != ALL) or (isinstance(sample, int) and sample < 1):
        errors.append(f"latency.sample: expected a positive number of utterances or {ALL!r}, got {quote(sample)}")
        return None
    return spec


def _dataset(raw: Any, base: Path, errors: list[str], where: str = "dataset") -> DatasetSpec | None:
    if raw is None:
        errors.append(f"{where}: missing; expected {{path: <audiofolder>}} or {{hub: <dataset id>}}")
        return None
    if isinstance(raw, dict) and "path" in raw:
        if not isinstance(raw["path"], str):
            errors.append(f"{where}.path: expected a folder path, got {quote(raw['path'])}")
            return None
        # relative paths are relative to the job file, so a job means the same from any cwd
        try:
            raw = {**raw, "path": str((base / Path(raw["path"]).expanduser()).resolve())}
        except (RuntimeError, ValueError, OSError) as exc:  # an unknown ~user, a NUL byte, a symlink loop
            errors.append(f"{where}.path: not a usable folder path {quote(raw['path'])} ({exc})")
            return None
    spec = simple(DatasetSpec, raw, where, errors)
    if spec is None:
        return None
    if spec.path is not None:
        spec = replace(spec, path=Path(spec.path))
    _check_dataset(spec, where, errors)
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


def _models(raw: Any, base: Path, errors: list[str]) -> ModelsSpec | None:
    if not isinstance(raw, dict):
        errors.append(f"models: expected a mapping with 'sizes' and 'targets', got {type(raw).__name__}")
        return None
    unknown_keys(raw, {"sizes", "targets", "evaluate_failed"}, "models.", errors)
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
    named = []  # the sizes, a checkpoint's path relative to the job file made absolute
    for i, size in enumerate(sizes):
        if not isinstance(size, str):
            errors.append(f"models.sizes[{i}]: expected a model name, got {quote(size)}")
            ok = False
        elif size not in OFFICIAL_NAMES and not size.endswith(".pt"):
            errors.append(f"models.sizes[{i}]: unknown size {quote(size)}{did_you_mean(size, OFFICIAL_NAMES)}")
            ok = False
        elif size.endswith(".pt"):
            size = _checkpoint_path(size, base)
            if not _is_file(size):
                errors.append(f"models.sizes[{i}]: no such checkpoint file {clip(size)}")
                ok = False
        named.append(size)
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
        sizes=tuple(dict.fromkeys(named)), targets=tuple(targets), evaluate_failed=evaluate_failed is True
    )


def _checkpoint_path(size: str, base: Path) -> str:
    """A `.pt` size relative to the job file's folder `base`, as dataset.path is, so a job means the
    same from any working directory; an absolute or `~` path stays as written. Only the folder is
    resolved: the file's own name (a symlink's, too) is the checkpoint's name in every table."""
    try:
        path = Path(size).expanduser()
        return size if path.is_absolute() else str((base / path).parent.resolve() / path.name)
    except (RuntimeError, ValueError, OSError):  # an unknown ~user, a NUL byte, a symlink loop
        return size  # said as "no such checkpoint file" below


def _is_file(path: str) -> bool:
    try:
        return Path(path).expanduser().is_file()
    except RuntimeError:  # `~user` of an unknown user
        return False
