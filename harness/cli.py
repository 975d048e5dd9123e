"""`python -m harness run|runs|validate|convert|inspect|history|compare|report`: the command line, and the one place
errors become exit codes (`harness.exit_codes.ExitCode`)."""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from harness.core.errors import HarnessError
from harness.exit_codes import ExitCode

if TYPE_CHECKING:  # the module pulls in whisper and torch; the CLI imports them only when needed
    from harness.job.spec import JobSpec


EXAMPLES = """examples:
  python -m harness run jobs/librispeech_base.yaml
  python -m harness run jobs/librispeech_base.yaml --limit 10 --slots 2
  python -m harness run jobs/librispeech_base.yaml --resume latest
  python -m harness runs --job librispeech_base
  python -m harness run jobs/librispeech_base.yaml --dataset path/to/audiofolder
  python -m harness run jobs/librispeech_base.yaml --address ray://head:10001
  python -m harness validate jobs/*.yaml
  python -m harness convert --sizes tiny.en,base --targets all --quant all
  python -m harness inspect base/tflite/int8-dynamic     # what runs in XNNPACK, in which precision
  python -m harness run jobs/nightly_base.yaml --baseline previous   # exit 3 on a regression
  python -m harness history --job nightly_base --last 10
  python -m harness history pin 20250101-020000-1a2b3c --tag release-1.4
  python -m harness compare release-1.4 latest --job nightly_base
  python -m harness report latest --job nightly_base      # results/nightly_base/<run id>/report.html
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m harness",
        description="Evaluate Whisper and its converted forms against the PyTorch reference on Ray.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a job: transcribe with every model, score, write results/")
    run.add_argument("job", type=Path, help="a job file, e.g. jobs/librispeech_base.yaml")
    run.add_argument("--dataset", help="replace the job's dataset: a local audiofolder path or a Hugging Face hub id")
    run.add_argument("--limit", type=int, help="evaluate only the first N utterances")
    run.add_argument(
        "--slots", type=int, help="workers at once over the cluster (default: cluster.slots, or one per CPU)"
    )
    run.add_argument("--resume", metavar="RUN_ID", help="finish an interrupted run: its id, or 'latest'")
    run.add_argument("--address", help="join this Ray cluster instead of starting an embedded one")
    run.add_argument(
        "--trust-job-address", action="store_true", help="join the job file's cluster.address (docs/cluster.md)"
    )
    run.add_argument(
        "--allow-unauthenticated-cluster",
        action="store_true",
        help="join a cluster that admits clients without token authentication (docs/cluster.md)",
    )
    run.add_argument("--out", type=Path, default=Path("results"), help="results root (default: results)")
    run.add_argument(
        "--models",
        type=Path,
        default=Path(os.environ.get("HARNESS_MODELS", "models")),
        help="artifact store (default: $HARNESS_MODELS or models)",
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.add_argument(
        "--baseline", help="then gate the run against latest, previous, a pinned tag or a run id (exit 3: regression)"
    )
    _history_option(run, "$HARNESS_HISTORY or history.sqlite in --out")
    convert = sub.add_parser("convert", help="build (or reuse) artifacts for sizes x targets x quantizations")
    convert.add_argument("--sizes", default="tiny.en", help="comma list of model names, or 'all' (default: tiny.en)")
    convert.add_argument("--targets", default="all", help="comma list of targets, or 'all' (default)")
    convert.add_argument("--quant", default="all", help="comma list of quantizations, or 'all' (default)")
    convert.add_argument(
        "--models",
        type=Path,
        default=Path(os.environ.get("HARNESS_MODELS", "models")),
        help="artifact store (default: $HARNESS_MODELS or models)",
    )
    inspect = sub.add_parser(
        "inspect", help="what executes where in an artifact: operators, delegate partitions, weight precision"
    )
    inspect.add_argument("model", help="an artifact folder, or size/target/quant in --models (e.g. base/tflite/fp32)")
    inspect.add_argument("--json", action="store_true", help="the census as JSON")
    inspect.add_argument(
        "--drift",
        type=Path,
        metavar="AUDIO",
        help="also: each block's output against the reference's on this audio file, at the first divergent token",
    )
    inspect.add_argument(
        "--models",
        type=Path,
        default=Path(os.environ.get("HARNESS_MODELS", "models")),
        help="artifact store (default: $HARNESS_MODELS or models)",
    )
    runs = sub.add_parser("runs", help="list runs and their state; --clean removes abandoned incomplete ones")
    runs.add_argument("--job", help="only this job's runs")
    runs.add_argument("--out", type=Path, default=Path("results"), help="results root (default: results)")
    runs.add_argument(
        "--clean", action="store_true", help="remove incomplete runs: interrupted, failed, or whose process is gone"
    )
    validate = sub.add_parser("validate", help="check job files (and local datasets' metadata), report every problem")
    validate.add_argument("jobs", type=Path, nargs="+")
    history = sub.add_parser("history", help="list the runs in the history (or: history add|pin)")
    history.add_argument("--job", help="only this job's runs")
    history.add_argument("--last", type=int, default=20, help="the last N runs (default 20; 0: all)")
    _history_option(history, "$HARNESS_HISTORY or results/history.sqlite")
    action = history.add_subparsers(dest="action")
    add = action.add_parser("add", help="append completed run folders to the history")
    add.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR")
    _history_option(add, "$HARNESS_HISTORY or history.sqlite in the run's results root", argparse.SUPPRESS)
    pin = action.add_parser("pin", help="name a run, to compare later runs with it")
    pin.add_argument("run_id")
    pin.add_argument("--tag", required=True, help="the name, e.g. release-1.4 (moved if it named another run)")
    _history_option(pin, "$HARNESS_HISTORY or results/history.sqlite", argparse.SUPPRESS)
    compare = sub.add_parser("compare", help="gate a candidate run against a baseline (exit 3: regression)")
    compare.add_argument(
        "baseline", help="latest, previous (the job's last run before the candidate), a tag or a run id"
    )
    compare.add_argument("candidate", help="latest, a tag or a run id")
    compare.add_argument(
        "--job", help="the job whose latest/previous/tag is meant (needed when the history has several)"
    )
    compare.add_argument(
        "--thresholds", type=Path, metavar="JOB", help="a job file whose thresholds: apply (default: the candidate's)"
    )
    _history_option(compare, "$HARNESS_HISTORY or results/history.sqlite")
    report = sub.add_parser("report", help="write a run's self-contained HTML report (report.html in its folder)")
    report.add_argument("run", metavar="RUN_ID", help="a run id, latest (the newest complete run) or a run folder")
    report.add_argument("--job", help="only this job's runs (for latest)")
    report.add_argument("--results", type=Path, default=Path("results"), help="results root (default: results)")
    report.add_argument("--out", type=Path, help="the HTML file to write (default: report.html in the run folder)")
    _history_option(report, "$HARNESS_HISTORY or history.sqlite in the run's results root")
    return parser


def _history_option(parser: argparse.ArgumentParser, default: str, missing: object = None) -> None:
    # SUPPRESS on `history add|pin`: their --history must not reset one given before the action
    parser.add_argument("--history", default=missing, help=f"SQLite file or postgresql:// URL (default: {default})")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "validate":
            return _validate(args.jobs)
        if args.command == "convert":
            return _convert(args)
        if args.command == "runs":
            return _runs(args)
        if args.command == "inspect":
            return _inspect(args)
        if args.command == "history":
            return _history(args)
        if args.command == "compare":
            return _compare(args)
        if args.command == "report":
            return _report(args)
        return _run(args)
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if args.command == "run" and isinstance(exc, _interrupted()):
            print(f"resume with: {_resume_command(args, exc.run.run_id)}", file=sys.stderr)
            return ExitCode.INTERRUPTED
        return ExitCode.BAD_INPUT


def _interrupted() -> type[HarnessError]:
    """`run`'s stop that keeps the work (imported only by `run`: it pulls in the whole pass)."""
    from harness.run.execute import Interrupted

    return Interrupted


def _resume_command(args: argparse.Namespace, run_id: str) -> str:
    """The command that finishes run `run_id` as this `run` was asked to, shell-quoted: every flag
    given that decides what it evaluates and where (a resume refuses another dataset or limit, and
    must find the run, the artifacts and the history where they are)."""
    from harness.nightly.dialect import masked

    words = ["python", "-m", "harness", "run", str(args.job), "--resume", run_id]
    words += ["--out", str(args.out), "--models", str(args.models)]
    for flag in ("dataset", "limit", "slots", "address", "history", "baseline"):
        if (value := getattr(args, flag)) is not None:
            # a history URL's password is never printed (docs/security.md): the user fills it in
            words += [f"--{flag}", masked(str(value)) if flag == "history" else str(value)]
    switches = ("no_progress", "trust_job_address", "allow_unauthenticated_cluster")
    words += [f"--{switch.replace('_', '-')}" for switch in switches if getattr(args, switch)]
    return shlex.join(words)


def _validate(paths: list[Path]) -> int:
    from harness.job.spec import load_job

    failed = 0
    for path in paths:
        try:
            spec = load_job(path)
            datasets = _check_local_datasets(spec, path)
        except HarnessError as exc:
            print(f"error: {exc}", file=sys.stderr)
            failed += 1
            continue
        cells = ", ".join(c.label for c in spec.models.cells())
        print(f"ok: {path}: job '{spec.name}', {datasets}, models {cells}")
    return ExitCode.FAILED if failed else ExitCode.OK


def _check_local_datasets(spec: JobSpec, job: Path) -> str:
    """The dataset checks `run` makes before building anything, for local folders (and the
    breakdown's columns, when every dataset is one); a hub dataset is checked when run (reading it
    here would download it). Audio a run would report as error rows is an error here: validating
    is for finding it before a night's run. Returns what the `ok:` line says of the datasets."""
    from harness.run.dataset import check_dataset, check_datasets

    said = []
    try:
        for dataset in spec.datasets:
            if dataset.path is None:
                said.append(f"dataset {dataset.label} (a hub dataset, checked when run)")
                continue
            check = check_dataset(dataset)
            if check.unreadable:
                raise HarnessError(f"dataset {dataset.label}: {check.note}")
            said.append(f"dataset {dataset.label} ({check.n_rows} utterances)")
        if all(d.path is not None for d in spec.datasets):
            check_datasets(spec.datasets, spec.breakdowns)
    except HarnessError as exc:
        raise HarnessError(f"{job}: {exc}") from None
    return ", ".join(said)


def _convert(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from converters.matrix import build, expand
    from harness.run.dataset import calibration_source

    cells = expand(args.sizes, args.targets, args.quant)
    table = build(cells, args.models, calibration_source(), progress=sys.stderr.isatty())
    print(tabulate(table.drop(columns="artifact"), headers="keys", tablefmt="github", showindex=False))
    counts = table["status"].value_counts()
    print("\n" + ", ".join(f"{n} {status}" for status, n in counts.items()) + f"; store: {args.models}")
    return ExitCode.FAILED if "failed" in counts else ExitCode.OK


def _inspect(args: argparse.Namespace) -> int:
    import json

    from converters.census import census, find_artifact, format_census
    from converters.store import load_artifact
    from harness.core.target import Unavailable

    artifact = load_artifact(find_artifact(args.models, args.model))
    try:
        found = census(artifact)
    except Unavailable as exc:
        print(f"census: unavailable: {exc}", file=sys.stderr)
        return ExitCode.INCOMPLETE
    print(json.dumps(found.as_dict(), indent=2) if args.json else format_census(found))
    if args.drift is not None:
        from converters.layer_drift import at_first_divergence
        from harness.core.audio import decode_audio

        try:
            drift, step = at_first_divergence(artifact, decode_audio(str(args.drift)))
        except Unavailable as exc:
            print(f"layer drift: unavailable: {exc}", file=sys.stderr)
            return ExitCode.INCOMPLETE
        where = "agrees with the reference's tokens" if step is None else f"first divergent token: #{step}"
        print(f"\nlayer drift on {args.drift.name} ({where}):")
        print("\n".join(drift.lines()))
    return ExitCode.OK


def _run(args: argparse.Namespace) -> int:
    from harness.job.spec import load_job
    from harness.nightly.gate import record_and_gate
    from harness.nightly.history import HistoryError, dialect_of, location
    from harness.results.summary import format_summary
    from harness.run.execute import run_job

    spec = load_job(args.job).with_overrides(
        dataset=args.dataset,
        limit=args.limit,
        slots=args.slots,
        address=args.address,
        trust_address=args.trust_job_address,
        allow_unauthenticated=args.allow_unauthenticated_cluster,
    )
    where = location(args.history, args.out)
    dialect_of(where)  # a history location (or lock wait) the harness cannot use is bad input, found before the run
    # SIGTERM (a scheduler's kill, a CI timeout) stops the run as Ctrl-C does: its work is kept
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    result = run_job(spec, args.out, args.models, progress=not args.no_progress, resume=args.resume)
    print()
    print(format_summary(result.summary))
    if result.breakdown is not None:
        from harness.results.summary import format_breakdown

        print(f"\n{format_breakdown(result.breakdown)}")
    if result.divergence is not None:
        from harness.results.divergence import format_divergence

        print("\ndivergence from the reference (divergence.parquet has every utterance):\n")
        print(format_divergence(result.divergence))
    print(f"\nresults: {result.run_dir}")
    failure = None
    try:
        gated = record_and_gate(result.run_dir, where, args.baseline)
    except HistoryError as exc:
        # the run is done and kept: a history that fails (locked, unreachable, not a history) costs
        # its append and its gate, said in one line and a code of its own, not the run or its report
        print(f"error: {exc}", file=sys.stderr)
        failure, gated = str(exc), ExitCode.HISTORY
    if spec.report:  # after the gate, so its verdict is in the report
        from harness.report.page import write_report

        print(f"report: {write_report(result.run_dir, where, history_failure=failure)}")
    if gated in (ExitCode.REGRESSION, ExitCode.HISTORY):
        return gated
    return ExitCode.OK if (result.summary["errors"] == 0).all() else ExitCode.INCOMPLETE


def _runs(args: argparse.Namespace) -> int:
    from harness.results.run_dir import InUse, list_runs

    for run in list_runs(args.out, args.job):
        if args.clean:
            try:
                # under the run's lock, asked again: a resume may have taken it, or finished it, meanwhile
                if run.abandoned():
                    with run.lock():
                        if run.abandoned():
                            run.remove()
                            print(f"removed {run.path}")
                            continue
            except InUse as exc:
                print(f"kept {run.path}: in use by another process (pid {exc.holder})")
                continue
            except HarnessError as exc:  # its state cannot be read: what it holds is unknown, so it stays
                print(f"kept {run.path}: {exc}")
                continue
        print(run.summary_line())
    return ExitCode.OK


def _history(args: argparse.Namespace) -> int:
    from harness.nightly.history import History, format_runs, location, masked

    if args.action == "add":
        from harness.results.record import read_run  # reading a run's rows needs pandas; listing does not

        for run_dir in args.run_dirs:
            where = location(args.history, run_dir.parent.parent)  # results/<job>/<run id>
            record = read_run(run_dir)
            with History(where) as history:
                added = history.add(record)
            print(f"{record.run_id}: {'appended to' if added else 'already in'} {masked(where)}")
        return ExitCode.OK
    where = location(args.history, Path("results"))
    with History(where, access="write" if args.action == "pin" else "read") as history:
        if args.action == "pin":
            before = history.pin(args.run_id, args.tag)
            moved = f" (moved from {before})" if before and before != args.run_id else ""
            print(f"{args.tag} -> {args.run_id}{moved}")
            return ExitCode.OK
        if args.last < 0:
            raise HarnessError(f"--last: expected 0 or more, got {args.last}")
        runs = history.runs(args.job, args.last)
    print(format_runs(runs) if runs else f"no runs{f' of {args.job}' if args.job else ''} in {masked(where)}")
    return ExitCode.OK


def _compare(args: argparse.Namespace) -> int:
    from harness.job.spec import load_job
    from harness.nightly.gate import gate, resolve_pair
    from harness.nightly.history import History, location

    thresholds = load_job(args.thresholds).thresholds if args.thresholds else None
    with History(location(args.history, Path("results")), access="read") as history:
        baseline, candidate = resolve_pair(history, args.baseline, args.candidate, args.job)
        return gate(history, baseline, candidate, thresholds, requested=args.baseline)


def _report(args: argparse.Namespace) -> int:
    from harness.nightly.history import location
    from harness.report.page import find_run, write_report

    run_dir = find_run(args.results, args.run, args.job)
    # the history a run appended to: in its results root, unless given (as `history add` finds it)
    print(f"report: {write_report(run_dir, location(args.history, run_dir.parent.parent), args.out)}")
    return ExitCode.OK
