"""Running a job: artifacts → Ray workers per model → raw rows per shard → scoring → results.

Data flows one way. The driver prepares artifacts (converting what is missing), plans shards as
row ranges, and hands them to idle workers; workers read their own audio. Each finished shard's
raw rows are written at once (atomically) under the run's partial folder, and only a run that
finished is renamed into `results/<job>/<run id>/`.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import re
import shutil
import subprocess
import time
import uuid
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd

from converters.matrix import prepare_cells
from converters.registry import get_target
from converters.store import Prepared
from harness.core.decoding import Dims, build_prompt
from harness.core.errors import one_line
from harness.core.status import Status
from harness.data import Shard, calibration_source, check_dataset, plan_shards, read_index
from harness.scoring import SCHEMA_VERSION, score_rows
from harness.spec import JobSpec, ModelCell
from harness.summary import format_summary, summarize
from harness.timing import cpu_description
from harness.worker import ModelWorker, WorkerSetup


@dataclass(frozen=True)
class PreparedModel:
    cell: ModelCell
    prepared: Prepared

    @property
    def facts(self) -> dict[str, object]:
        """What the summary shows of the artifact: its runtime label and size on disk."""
        art = self.prepared.artifact
        if art is None:
            return {}
        return {"runtime": art.manifest.get("runtime") or get_target(self.cell.target).runtime, "artifact_mb": art.mb}

    @property
    def dims(self) -> Dims:
        assert self.prepared.artifact is not None
        return Dims.of(self.prepared.artifact.manifest["dims"])


@dataclass(frozen=True)
class RunResult:
    run_dir: Path
    utterances: pd.DataFrame
    summary: pd.DataFrame


def prepare_models(spec: JobSpec, models_root: Path, log=print) -> list[PreparedModel]:
    """Resolve weights and build or reuse every artifact the job needs, on the driver."""
    cells = spec.models.cells()
    prepared = []
    for cell, (_, p) in zip(
        cells, prepare_cells((c.as_tuple() for c in cells), models_root, calibration_source()), strict=True
    ):
        log(f"{cell.label}: {p.describe()}" + (f" ({p.artifact.path})" if p.artifact else ""))
        prepared.append(PreparedModel(cell, p))
    return prepared


def _slug(cell: ModelCell) -> str:
    return cell.label.replace("/", "__")


def _write_parquet_atomic(df: pd.DataFrame, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    df.to_parquet(tmp, index=False)
    os.replace(tmp, path)


def _init_ray(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)


def run_job(spec: JobSpec, out_root: Path, models_root: Path, progress: bool = True, log=print) -> RunResult:
    started = time.time()
    # the dataset first: one that no run can use is refused before any conversion or Ray start
    dataset = check_dataset(spec.dataset)
    if dataset.unreadable:
        log(f"dataset {spec.dataset.label}: {dataset.note}")
    prepared = prepare_models(spec, models_root, log=log)
    n_rows = dataset.n_rows
    shards = plan_shards(n_rows, spec.cluster.shard_size)
    run_id = time.strftime("%Y%m%d-%H%M%S", time.gmtime(started)) + "-" + uuid.uuid4().hex[:6]
    final_dir = out_root / spec.name / run_id
    partial = out_root / spec.name / f".partial-{run_id}"
    (partial / "raw").mkdir(parents=True)
    try:
        raw = _execute(spec, prepared, shards, partial / "raw", progress)
        utts = score_rows(raw.assign(run_id=run_id))
        summary = summarize(utts, {p.cell.as_tuple(): p.facts for p in prepared})
        _write_parquet_atomic(utts, partial / "utterances.parquet")
        summary.to_csv(partial / "summary.csv", index=False)
        (partial / "summary.md").write_text(format_summary(summary) + "\n")
        (partial / "run.json").write_text(
            json.dumps(_run_info(spec, run_id, prepared, n_rows, started), indent=2, default=str)
        )
        os.replace(partial, final_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return RunResult(final_dir, utts, summary)


def _execute(
    spec: JobSpec, prepared: list[PreparedModel], shards: list[Shard], raw_dir: Path, progress: bool
) -> pd.DataFrame:
    import ray
    from tqdm import tqdm

    _init_ray(spec.cluster.address)
    # a model that failed its parity gate is reported, not evaluated, unless the job asks for it
    runnable = [
        p
        for p in prepared
        if p.prepared.status.runnable or (spec.models.evaluate_failed and p.prepared.status == Status.FAILED)
    ]

    @functools.cache
    def index() -> tuple[list[str], list[str]]:  # ids and texts, read once and only if a model has no transcripts
        return read_index(spec.dataset)

    frames = [_error_rows(p, index(), p.prepared.status, p.prepared.reason) for p in prepared if p not in runnable]
    remote_worker = ray.remote(num_cpus=1)(ModelWorker)
    actors: dict[Any, PreparedModel] = {}
    for p in runnable:
        assert p.prepared.artifact is not None
        setup = WorkerSetup(
            p.prepared.artifact.path, p.dims, build_prompt(p.dims, spec.decoding), spec.decoding, spec.dataset
        )
        for _ in range(spec.cluster.workers):
            actors[remote_worker.options(resources=_placement(p.cell.target)).remote(setup)] = p
    queues = {p.cell: list(shards) for p in runnable}
    bars = {
        p.cell: tqdm(total=shards[-1].stop, desc=p.cell.label, unit="utt", disable=not progress, position=i)
        for i, p in enumerate(runnable)
    }
    in_flight: dict[Any, tuple[Any, Shard]] = {}

    def feed(actor) -> None:
        """Give `actor` its model's next shard; with none left, end it, so the CPU (or board) it
        holds goes to a model still waiting: a job may have more models than the cluster has CPUs."""
        queue = queues[actors[actor].cell]
        if queue:
            shard = queue.pop(0)
            in_flight[actor.run_shard.remote(shard)] = (actor, shard)
        else:
            ray.kill(actor)

    def record(p: PreparedModel, shard: Shard, rows: pd.DataFrame) -> None:
        _write_parquet_atomic(rows, raw_dir / f"{_slug(p.cell)}-shard{shard.index:05d}.parquet")
        frames.append(rows)
        bars[p.cell].update(shard.stop - shard.start)

    for actor in actors:
        feed(actor)
    try:
        while in_flight:
            done, _ = ray.wait(list(in_flight), num_returns=1)
            actor, shard = in_flight.pop(done[0])
            p = actors[actor]
            try:
                rows = pd.DataFrame(ray.get(done[0])).assign(size=p.cell.size, target=p.cell.target, quant=p.cell.quant)
            except ray.exceptions.RayError as exc:
                # the worker could not load its model or its process died (a native runtime's crash,
                # memory): this model's utterances become rows with the reason, the other models go on
                reason = _worker_error(exc)
                record(p, shard, _error_rows(p, index(), Status.WORKER_FAILED, reason, shard.start, shard.stop))
                if isinstance(exc, ray.exceptions.RayActorError):
                    del actors[actor]
                    if not any(q is p for q in actors.values()):  # no worker left for this model
                        while queues[p.cell]:
                            left = queues[p.cell].pop(0)
                            record(
                                p, left, _error_rows(p, index(), Status.WORKER_FAILED, reason, left.start, left.stop)
                            )
                    continue
            else:
                record(p, shard, rows)
            feed(actor)
    finally:
        for bar in bars.values():
            bar.close()
        for actor in actors:
            ray.kill(actor)
    raw = pd.concat(frames, ignore_index=True)
    for col in ("hyp_text", "hyp_tokens", "frontend_ms", "encode_ms", "decode_ms", "n_steps", "n_windows", "decoding"):
        if col not in raw:
            raw[col] = None
    return raw


def _placement(target: str) -> dict[str, float]:
    """Ray resources a worker of `target` asks for: its board's, when the cluster has such a node."""
    import ray

    resource = get_target(target).resource
    return {resource: 1} if resource and ray.cluster_resources().get(resource, 0) > 0 else {}


def _error_rows(
    p: PreparedModel,
    index: tuple[list[str], list[str]],
    status: Status,
    reason: str,
    start: int = 0,
    stop: int | None = None,
) -> pd.DataFrame:
    """Utterances [start, stop) of a model that produced no transcript for them: rows with the reason."""
    ids, texts = index
    return pd.DataFrame(
        {
            "utt_id": ids[start:stop],
            "ref_text": texts[start:stop],
            "audio_s": 0.0,
            "node": None,
            "cpu": None,
            "status": status.value,
            "error": reason,
        }
    ).assign(size=p.cell.size, target=p.cell.target, quant=p.cell.quant)


def _worker_error(exc: BaseException) -> str:
    """The worker's own exception as `Type: first line`; Ray wraps it in pages of traceback (for a
    failed `__init__` only as text), or says in its first line why a process died."""
    import ray

    if isinstance(exc, ray.exceptions.RayTaskError) and exc.cause is not None:
        return one_line(exc.cause)
    lines = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).splitlines()
    frames = [i for i, line in enumerate(lines) if line.lstrip().startswith('File "')]
    after = [line for line in lines[frames[-1] + 1 :] if line[:1].strip()] if frames else []
    if after:  # the traceback's last line names the exception: `module.Type: message`
        name, _, message = after[0].partition(": ")
        return f"{name.rsplit('.', 1)[-1]}: {message}".strip()
    return lines[0].strip() if lines else type(exc).__name__


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def _run_info(spec: JobSpec, run_id: str, prepared: list[PreparedModel], n_rows: int, started: float) -> dict[str, Any]:
    packages = (
        "torch",
        "openai-whisper",
        "ray",
        "datasets",
        "jiwer",
        "pandas",
        "pyarrow",
        "numpy",
        "soundfile",
        "soxr",
    )
    return {
        "run_id": run_id,
        "schema_version": SCHEMA_VERSION,
        "job": asdict(spec),
        "models": [
            {
                "model": p.cell.label,
                "artifact": p.prepared.artifact.path if p.prepared.artifact else None,
                "status": p.prepared.status.value,
                "reason": p.prepared.reason,
            }
            for p in prepared
        ],
        "utterances": n_rows,
        "packages": {p: metadata.version(p) for p in packages},
        "git_commit": _git_commit(),
        "host": {
            "hostname": platform.node(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "cpu": cpu_description(),
        },
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
