"""`run.json`: what a completed run was (its job, models, packages, host) and how it ran (nodes,
workers, failures, the driver's phases), as one typed value. This module is its only writer and
reader: `RunInfo.write` and `read`.

Runs written by older versions of the harness stay readable (the history and the report read them
all): a field an old file lacks takes its default here, so only `run_id`, `job` (with its `name`
and `dataset`) and `started` are required. A file that is not what it should be is one error line
naming the file and the field.
"""

from __future__ import annotations

import json
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.core.errors import HarnessError, clip
from harness.core.files import write_atomic

if TYPE_CHECKING:
    from harness.job.spec import JobSpec

RUN_JSON = "run.json"
# field metadata: the field's None is written as no key at all, as run.json has always had it
_OMIT_NONE = "omit_none"


@dataclass(frozen=True, kw_only=True)
class ModelInfo:
    """A model of the job as the driver prepared it (older runs: no `key` nor `reason`, and a
    `status` line such as `failed: why`)."""

    model: str  # its label, size/target/quant[@audio_ctx]
    artifact: str | None = None  # the artifact's folder on the driver
    key: str | None = None
    status: str | None = None  # built, reused, failed or unavailable
    reason: str | None = None


@dataclass(frozen=True, kw_only=True)
class Host:
    """The driver's machine."""

    hostname: str | None = None
    platform: str | None = None
    python: str | None = None
    cpus: int | None = None
    cpu: str | None = None  # `harness.results.timing.cpu_description`


@dataclass(frozen=True, kw_only=True)
class NodeReport:
    """A node of the cluster over one pass: its resources, slots, shards, failures and busy time."""

    node: str  # its host name
    node_id: str
    resources: dict[str, float]
    slots: int
    shards: int
    failures: int
    set_aside: bool
    busy_s: float


@dataclass(frozen=True, kw_only=True)
class WorkerReport:
    """One worker over its life: where it ran, its model's load cost and peak memory, its work."""

    model: str
    node: str
    # none of the three for a worker ended before its model had loaded. load_s: loading the model
    # in its process; ready_s: from the request to a loaded, warmed model (process start included);
    # rss_mb: its peak resident memory
    load_s: float | None = field(default=None, metadata={_OMIT_NONE: True})
    ready_s: float | None = field(default=None, metadata={_OMIT_NONE: True})
    rss_mb: float | None = field(default=None, metadata={_OMIT_NONE: True})
    shards: int
    busy_s: float
    alive_s: float


@dataclass(frozen=True, kw_only=True)
class Failure:
    """A worker that died (its process, its node, or a stall), and what became of it."""

    model: str
    node: str
    node_id: str
    reason: str
    at: str  # UTC, ISO 8601


@dataclass(frozen=True, kw_only=True)
class PassReport:
    """What one pass of workers did (`harness.run.scheduler`)."""

    nodes: tuple[NodeReport, ...] = ()
    workers: tuple[WorkerReport, ...] = ()
    failures: tuple[Failure, ...] = ()


# Fields in the order run.json has always had them; kw_only so that the defaults old files need
# can sit anywhere in it.
@dataclass(frozen=True, kw_only=True)
class RunInfo:
    run_id: str
    schema_version: int | None = None  # of utterances.parquet (harness.results.scoring)
    # the job as JSON (a JobSpec as a dict: `job_json`); its shape follows JobSpec's over time, so
    # only what the readers of old runs need is checked: `name` and `dataset`
    job: dict[str, Any]
    models: tuple[ModelInfo, ...] = ()
    utterances: int | None = None
    packages: dict[str, str] | None = None
    git_commit: str | None = None
    host: Host = Host()
    # the main pass's (runs before the elastic scheduler have none)
    nodes: tuple[NodeReport, ...] = ()
    workers: tuple[WorkerReport, ...] = ()
    failures: tuple[Failure, ...] = ()
    # when the job asks for the divergence analysis
    divergence_pass: PassReport | None = field(default=None, metadata={_OMIT_NONE: True})
    phases: dict[str, float] | None = None  # the driver's seconds per phase (harness.results.timing.Phases)
    resumed: tuple[str, ...] = ()  # when the run was taken over again (--resume)
    started: str
    finished: str | None = None

    @property
    def job_name(self) -> str:
        return self.job["name"]

    @property
    def datasets(self) -> list[dict[str, Any]]:
        """The job's datasets (a run before suites has its one `dataset`)."""
        return self.job["datasets"] if "datasets" in self.job else [self.job["dataset"]]

    @property
    def dataset_label(self) -> str:
        """How the history names the run's data: runs on the same datasets compare."""

        def label(dataset: dict[str, Any]) -> str:
            where = dataset["path"] if dataset.get("path") else f"hub:{dataset['hub']}"
            facts = "".join(f" {k}={dataset[k]}" for k in ("config", "split", "limit") if dataset.get(k) is not None)
            return (f"{dataset['name']}=" if len(self.datasets) > 1 and dataset.get("name") else "") + where + facts

        return " + ".join(label(d) for d in self.datasets)

    @property
    def thresholds(self) -> dict[str, Any] | None:
        """The job's thresholds; runs from before `thresholds:` have none (defaults apply)."""
        return self.job.get("thresholds")

    def write(self, path: Path) -> None:
        """`path` (a run folder's run.json), atomically."""
        text = json.dumps(_to_json(self), indent=2, default=str)
        write_atomic(path, lambda tmp: tmp.write_text(text))


def read(path: Path) -> RunInfo:
    """A run.json, checked: a file that is not one is a HarnessError naming the file and the field."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HarnessError(f"{path}: not a readable run.json ({exc})") from None
    try:
        info = _parse(data, RunInfo, "")
        _check_job(info.job)
    except _Bad as bad:
        raise HarnessError(f"{path}: {bad.where or 'the file'}: {bad.problem}") from None
    return info


def _check_job(job: dict[str, Any]) -> None:
    """What the readers of a run's job need of it, in every version: its name and its datasets
    (`datasets`, a list; before suites, one `dataset`)."""
    if not isinstance(job.get("name"), str):
        raise _Bad("job.name", f"expected a string, got {_shown(job.get('name'))}")
    key = "datasets" if "datasets" in job else "dataset"
    datasets = job.get(key) if key == "datasets" else [job.get(key)]
    if not isinstance(datasets, list) or not datasets:
        raise _Bad(f"job.{key}", f"expected a list of datasets, got {_shown(datasets)}")
    for i, dataset in enumerate(datasets):
        if not isinstance(dataset, dict) or not (dataset.get("path") or dataset.get("hub")):
            where = f"job.datasets[{i}]" if key == "datasets" else "job.dataset"
            raise _Bad(where, f"expected an object with a path or a hub id, got {_shown(dataset)}")


def job_json(job: JobSpec) -> dict[str, Any]:
    """A JobSpec as run.json keeps it (paths as strings, tuples as lists)."""
    return json.loads(json.dumps(asdict(job), default=str))


# -- to and from JSON ------------------------------------------------------------------------------


def _to_json(value: Any) -> Any:
    if is_dataclass(value):
        return {
            f.name: _to_json(getattr(value, f.name))
            for f in fields(value)
            if not (f.metadata.get(_OMIT_NONE) and getattr(value, f.name) is None)
        }
    if isinstance(value, tuple):
        return [_to_json(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_json(v) for k, v in value.items()}
    return value


class _Bad(Exception):
    """What is wrong with a run.json, and where (`models[2].status`)."""

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(f"{where}: {problem}")
        self.where, self.problem = where, problem


def _shown(value: Any) -> str:
    return clip(json.dumps(value), 60)


def _parse(value: Any, kind: Any, where: str) -> Any:
    """`value` (parsed JSON) as `kind`: a dataclass of this module, `X | None`, `tuple[X, ...]`,
    `dict[str, X]`, str, int, float (an int is one), bool or Any; else _Bad naming `where`."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _parse(value, inner, where)
    if is_dataclass(kind):
        if not isinstance(value, dict):
            raise _Bad(where, f"expected an object, got {_shown(value)}")
        hints = typing.get_type_hints(kind)
        values = {}
        for f in fields(kind):
            inside = f"{where}.{f.name}" if where else f.name
            if f.name in value:
                values[f.name] = _parse(value[f.name], hints[f.name], inside)
            elif f.default is MISSING and f.default_factory is MISSING:
                raise _Bad(inside, "missing")
        return kind(**values)  # keys the harness no longer writes are left behind
    if origin is tuple:
        if not isinstance(value, list):
            raise _Bad(where, f"expected a list, got {_shown(value)}")
        return tuple(_parse(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise _Bad(where, f"expected an object, got {_shown(value)}")
        return {k: _parse(v, args[1], f"{where}.{k}") for k, v in value.items()}
    what, accepted = _SCALARS[kind]
    if not isinstance(value, accepted) or (kind is not bool and isinstance(value, bool)):  # JSON's true is no number
        raise _Bad(where, f"expected {what}, got {_shown(value)}")
    return value


_SCALARS: dict[type, tuple[str, type | tuple[type, ...]]] = {
    str: ("a string", str),
    int: ("an integer", int),
    float: ("a number", (int, float)),  # an int is a number too (`round(x)` writes one)
    bool: ("true or false", bool),
}
