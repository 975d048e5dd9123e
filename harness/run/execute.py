"""Running a job: check the data, join Ray, prepare artifacts, schedule shards, score, write results.

Data flows one way. The driver checks the dataset, and a resume's run (it exists, is not complete
or in use, was made by the same job on the same data), and connects to Ray before building
anything (an unusable dataset, a mistyped --resume or an unreachable cluster costs seconds, not a
matrix of conversions), prepares artifacts, plans shards as row ranges, and runs the transcription
pass over them (`harness.run.passes`, on `harness.run.scheduler`); workers read their own audio
and stream rows back. Every finished shard is persisted at once in the run directory
(`harness.results.run_dir`), so an interrupted or failed run keeps its work and `--resume`
re-plans only what is missing. The divergence analysis, when the job asks, is a second pass
(`harness.run.divergence_pass`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import platform
import subprocess
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd

from converters.census import CENSUS_FILE, census
from converters.matrix import prepare_cells
from converters.registry import get_target
from harness.core.decoding import build_prompt
from harness.core.errors import HarnessError, one_line
from harness.core.status import Status
from harness.core.target import REFERENCE, Target, Unavailable
from harness.job.spec import ALL, JobSpec, ModelCell
from harness.results.aggregate import Part, finalise
from harness.results.run_dir import RAW, InUse, RunDir, RunState, fingerprint, scored_frame, scored_table
from harness.results.run_info import RUN_JSON, Host, ModelInfo, PassReport, RunInfo, job_json
from harness.results.schema import SCHEMA_VERSION, row
from harness.results.scoring import score_row
from harness.results.summary import BREAKDOWN_FILE, breakdown_table, format_breakdown, format_summary, summarize
from harness.results.timing import Phases, cpu_description
from harness.run.cluster import connect
from harness.run.dataset import Rows, Shard, StreamIds, calibration_source, check_datasets, plan_shards
from harness.run.divergence_pass import analysed, run_divergence, write_divergence
from harness.run.passes import Pass, PreparedModel, Publisher, serving
from harness.run.scheduler import Index, ShardDone, Work
from harness.run.worker import ModelWorker, WorkerSetup, latency_sample

UTTERANCES = "utterances.parquet"


def failure_row(cell: ModelCell, utt_id: str, text: str, status: Status, reason: str, attempt: int = 0) -> dict:
    """The scored row of an utterance no worker transcribed (`harness.run.scheduler.FailureRow`)."""
    return score_row(row(cell, utt_id, text, status, reason, attempt=attempt))


# the main pass: a scored row per model and utterance in raw/ (harness.results.run_dir)
TRANSCRIPTION = Pass(
    "transcription",
    RAW,
    ModelWorker,
    scored_frame,
    failure_row,
    ("size", "target", "quant", "audio_ctx"),
    scored_table,
)


@dataclass(frozen=True)
class RunResult:
    run_dir: Path
    summary: pd.DataFrame  # per dataset (and pooled, for a suite) and model
    divergence: pd.DataFrame | None = None  # per candidate model, when the job asks (harness.run.divergence_pass)
    breakdown: pd.DataFrame | None = None  # per breakdown, group and model (harness.results.summary)

    @property
    def utterances(self) -> pd.DataFrame:
        """Every row of the run, read from its utterances.parquet (a million rows: read what you need)."""
        return pd.read_parquet(self.run_dir / UTTERANCES)


class Interrupted(HarnessError):
    """The run stopped before it finished; its directory keeps the finished shards."""

    def __init__(self, run: RunDir, why: str) -> None:
        super().__init__(f"{why}; finished shards are kept in {run.path}")
        self.run = run


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


def run_job(
    spec: JobSpec, out_root: Path, models_root: Path, progress: bool = True, log=print, resume: str | None = None
) -> RunResult:
    started = time.time()
    phases = Phases()
    # the datasets first: one that no run can use is refused before any conversion or Ray start
    with phases("dataset"):
        rows, notes = check_datasets(spec.datasets, spec.breakdowns)
    for note in notes:
        log(note)
    with contextlib.ExitStack() as owned:  # the run's lock, held until the run is done with
        resumed = None if resume is None else _take_over(out_root, spec, resume, rows.sizes, owned)
        if resumed is not None:
            log(f"resuming {resumed.path}")
        with phases("connect"):
            connect(spec.cluster, log)
        with phases("artifacts"):
            prepared = prepare_models(spec, models_root, log=log)
        keys = {
            p.cell.label: (p.prepared.artifact.manifest.get("key") if p.prepared.artifact else None) for p in prepared
        }
        marks = fingerprint(spec, rows.sizes, keys)
        if resumed is None:
            run = RunDir.create(out_root, spec.name)
            owned.enter_context(run.lock())
            run.start(marks)
        else:
            run = resumed
            run.resume(marks)  # the artifacts too, now that they are built
        return _evaluate(spec, prepared, run, rows, started, progress, log, phases)


def _take_over(
    out_root: Path, spec: JobSpec, which: str, sizes: tuple[int, ...], owned: contextlib.ExitStack
) -> RunDir:
    """The run `--resume` names, locked for this process; refused (one line) before Ray starts or
    anything is built when there is no such run, it is complete, running or in use, or its job or
    dataset differs (its artifacts can be compared only once built)."""
    run = RunDir.find(out_root, spec.name, which)
    try:
        owned.enter_context(run.lock())
    except InUse as exc:
        raise HarnessError(f"--resume {run.run_id}: {exc}") from None
    run.check(fingerprint(spec, sizes))
    return run


def _evaluate(
    spec: JobSpec,
    prepared: list[PreparedModel],
    run: RunDir,
    rows: Rows,
    started: float,
    progress: bool,
    log,
    phases: Phases,
) -> RunResult:
    """The passes, scoring and results of a run this process owns; its state says how it ended."""
    shards = plan_shards(rows.sizes, spec.cluster.shard_size)
    cells = [p.cell for p in prepared]

    @functools.cache
    def index() -> tuple[list[str], list[str]]:  # ids and texts, read once and only if a model has no transcripts
        return rows.index()

    try:
        transcription = _transcribe(spec, prepared, shards, run, rows, index, progress, log, phases)
        analysis = None
        if spec.analysis.divergence:  # needs every reference row, so after the main pass
            raw = TRANSCRIPTION.rows(run)
            TRANSCRIPTION.check_complete(raw, cells, rows.n_rows, index)
            with phases("divergence"):
                analysis = run_divergence(spec, prepared, run, raw, rows, progress, log)
        with phases("score"):
            ids = index()[0]
            parts = [Part(s.index, rows.part_at(s.start).spec.title, ids[s.start : s.stop]) for s in shards]
            kept = finalise(run, cells, parts, run.path / UTTERANCES)
            summary = summarize(kept, {p.cell.as_tuple(): p.facts for p in prepared})
            breakdown = breakdown_table(kept, spec.breakdowns) if spec.breakdowns else None
            del kept
            summary.to_csv(run.path / "summary.csv", index=False)
            text = format_summary(summary)
            if breakdown is not None:
                breakdown.to_csv(run.path / BREAKDOWN_FILE, index=False)
                text += "\n\n" + format_breakdown(breakdown)
            (run.path / "summary.md").write_text(text + "\n")
            _write_census(prepared, run.path / CENSUS_FILE)
            candidates = [p.cell for p in prepared if analysed(p.cell)]
            divergence = write_divergence(run, candidates, rows.n_rows, index) if spec.analysis.divergence else None
        info = _run_info(spec, run, prepared, rows.n_rows, started, transcription, analysis, phases.report())
        info.write(run.path / RUN_JSON)
        run.complete()
    except KeyboardInterrupt:
        run.stop(RunState.INTERRUPTED, "interrupted")
        raise Interrupted(run, "interrupted") from None
    except BaseException as exc:
        run.stop(RunState.FAILED, one_line(exc))
        raise
    return RunResult(run.path, summary, divergence, breakdown)


def _write_census(prepared: list[PreparedModel], path: Path) -> None:
    """What executes where in each converted model's artifact (`converters.census`), for the
    report; a census that cannot be read says why, and costs the run nothing else."""
    found: dict[str, Any] = {}
    for p in prepared:
        if p.prepared.artifact is None or p.cell.target == REFERENCE:
            continue
        try:
            found[p.cell.label] = census(p.prepared.artifact).as_dict()
        except Exception as exc:
            found[p.cell.label] = {"error": one_line(exc)}
    path.write_text(json.dumps(found, indent=1))


def _transcribe(
    spec: JobSpec,
    prepared: list[PreparedModel],
    shards: list[Shard],
    run: RunDir,
    rows: Rows,
    index: Index,
    progress: bool,
    log,
    phases: Phases,
) -> PassReport:
    with serving() as server:
        with phases("publish"):
            work = _work(spec, prepared, shards, run, rows, server, index, log)
        check = _stream_check(prepared, shards, run, rows) if any(d.streaming for d in spec.datasets) else None
        with phases("schedule"):
            return TRANSCRIPTION.schedule(run, work, spec.cluster, index, progress, log, check)


def _stream_check(prepared: list[PreparedModel], shards: list[Shard], run: RunDir, rows: Rows) -> ShardDone:
    """A streamed dataset's ids checked as each shard comes back (`StreamIds`), after those of
    the shards a resumed run already has."""
    ids = {part.offset: StreamIds(part.spec) for part in rows.parts if part.spec.streaming}

    def add(label: str, shard: Shard, utt_ids) -> None:
        part = rows.part_at(shard.start)
        if part.offset in ids:
            ids[part.offset].add(label, shard.start - part.offset, utt_ids)

    for p in prepared:
        for s in shards:
            if (file := run.shard_file(p.cell, s.index)).is_file():
                add(p.cell.label, s, pd.read_parquet(file, columns=["utt_id"])["utt_id"])
    return lambda cell, shard, done: add(cell.label, shard, (r["utt_id"] for r in done))


def _work(
    spec: JobSpec,
    prepared: list[PreparedModel],
    shards: list[Shard],
    run: RunDir,
    rows: Rows,
    server: Publisher,
    index: Index,
    log,
) -> list[Work[WorkerSetup]]:
    """What the scheduler runs: each runnable model's published artifact and the shards it has
    left; a model that cannot run gets its rows now, with its status."""
    work = []
    for p in prepared:
        todo = TRANSCRIPTION.todo(run, p.cell, shards, log)
        if not todo:
            continue
        # a model that failed its parity gate is reported, not evaluated, unless the job asks for it
        runnable = p.prepared.status.runnable or (spec.models.evaluate_failed and p.prepared.status == Status.FAILED)
        if not runnable:
            ids, texts = index()
            for s in todo:
                done = [
                    failure_row(p.cell, ids[i], texts[i], p.prepared.status, p.prepared.reason)
                    for i in range(s.start, s.stop)
                ]
                TRANSCRIPTION.persist(run, p.cell, s, done)
            continue
        sample = None if spec.latency.sample == ALL else int(spec.latency.sample)
        setup = WorkerSetup(
            p.cell,
            server.publish(p),
            p.dims,
            build_prompt(p.dims, spec.decoding),
            spec.decoding,
            rows,
            spec.cluster.threads,
            latency_sample(rows.sizes, sample, spec.latency.seed),
        )
        target = get_target(p.cell.target)
        work.append(Work(setup, todo, target.resource, gpu=_batches(target)))
    return work


def _batches(target: Target) -> bool:
    """Whether the target's runner decodes several utterances per call (so a GPU serves it)."""
    try:
        return target.runner.batching
    except Unavailable:  # its runtime is not here: its rows will say so, on a CPU slot
        return False


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def _run_info(
    spec: JobSpec,
    run: RunDir,
    prepared: list[PreparedModel],
    n_rows: int,
    started: float,
    transcription: PassReport,
    analysis: PassReport | None,
    phases: dict[str, float],
) -> RunInfo:
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
    return RunInfo(
        run_id=run.run_id,
        schema_version=SCHEMA_VERSION,
        job=job_json(spec),
        models=tuple(
            ModelInfo(
                model=p.cell.label,
                artifact=str(p.prepared.artifact.path) if p.prepared.artifact else None,
                key=p.prepared.artifact.manifest.get("key") if p.prepared.artifact else None,
                status=p.prepared.status.value,
                reason=p.prepared.reason,
            )
            for p in prepared
        ),
        utterances=n_rows,
        packages={p: metadata.version(p) for p in packages},
        git_commit=_git_commit(),
        host=Host(
            hostname=platform.node(),
            platform=platform.platform(),
            python=platform.python_version(),
            cpus=os.cpu_count(),
            cpu=cpu_description(),
        ),
        nodes=transcription.nodes,
        workers=transcription.workers,
        failures=transcription.failures,
        divergence_pass=analysis,
        phases=phases,
        resumed=tuple(run.state().get("resumed", [])),
        started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
