"""`python -m harness run|validate`: the command line, and the one place errors become exit codes."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from harness.core.errors import HarnessError

if TYPE_CHECKING:  # the module pulls in whisper and torch; the CLI imports them only when needed
    from harness.spec import DatasetSpec

EXAMPLES = """examples:
  python -m harness run jobs/librispeech_base.yaml
  python -m harness run jobs/librispeech_base.yaml --limit 10 --workers 2
  python -m harness run jobs/librispeech_base.yaml --dataset path/to/audiofolder
  python -m harness run jobs/librispeech_base.yaml --address ray://head:10001
  python -m harness validate jobs/*.yaml
  python -m harness convert --sizes tiny.en,base --targets all --quant all
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
    run.add_argument("--workers", type=int, help="Ray workers per model (default: the job's cluster.workers)")
    run.add_argument("--address", help="join this Ray cluster instead of starting an embedded one")
    run.add_argument("--out", type=Path, default=Path("results"), help="results root (default: results)")
    run.add_argument(
        "--models",
        type=Path,
        default=Path(os.environ.get("HARNESS_MODELS", "models")),
        help="artifact store (default: $HARNESS_MODELS or models)",
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
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
    validate = sub.add_parser("validate", help="check job files (and local datasets' metadata), report every problem")
    validate.add_argument("jobs", type=Path, nargs="+")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "validate":
            return _validate(args.jobs)
        if args.command == "convert":
            return _convert(args)
        return _run(args)
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _validate(paths: list[Path]) -> int:
    from harness.spec import load_job

    failed = 0
    for path in paths:
        try:
            spec = load_job(path)
            rows = _check_local_dataset(spec.dataset, path)
        except HarnessError as exc:
            print(f"error: {exc}", file=sys.stderr)
            failed += 1
            continue
        cells = ", ".join(c.label for c in spec.models.cells())
        print(f"ok: {path}: job '{spec.name}', dataset {spec.dataset.label} ({rows}), models {cells}")
    return 1 if failed else 0


def _check_local_dataset(dataset: DatasetSpec, job: Path) -> str:
    """The dataset check `run` makes before building anything, for a local folder; a hub dataset
    is checked when run (reading it here would download it). Audio a run would report as error
    rows is an error here: validating is for finding it before a night's run. Returns what the
    `ok:` line says of the dataset."""
    from harness.data import check_dataset

    if dataset.path is None:
        return "a hub dataset, checked when run"
    try:
        check = check_dataset(dataset)
    except HarnessError as exc:
        raise HarnessError(f"{job}: {exc}") from None
    if check.unreadable:
        raise HarnessError(f"{job}: dataset {dataset.label}: {check.note}")
    return f"{check.n_rows} utterances"


def _convert(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from converters.matrix import build, expand
    from harness.data import calibration_source

    cells = expand(args.sizes, args.targets, args.quant)
    table = build(cells, args.models, calibration_source(), progress=sys.stderr.isatty())
    print(tabulate(table.drop(columns="artifact"), headers="keys", tablefmt="github", showindex=False))
    counts = table["status"].value_counts()
    print("\n" + ", ".join(f"{n} {status}" for status, n in counts.items()) + f"; store: {args.models}")
    return 1 if "failed" in counts else 0


def _run(args: argparse.Namespace) -> int:
    from harness.execute import run_job
    from harness.spec import load_job
    from harness.summary import format_summary

    spec = load_job(args.job).with_overrides(
        dataset=args.dataset, limit=args.limit, workers=args.workers, address=args.address
    )
    result = run_job(spec, args.out, args.models, progress=not args.no_progress and sys.stderr.isatty())
    print()
    print(format_summary(result.summary))
    print(f"\nresults: {result.run_dir}")
    return 0
