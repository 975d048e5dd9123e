"""Cells of the conversion matrix (size, target, quantization): expand what was asked, prepare each.

`prepare_cells` is the one resolve-then-prepare loop: `python -m harness convert` tabulates it
and `harness run` evaluates what it prepares.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import pandas as pd

from converters.registry import TARGETS, get_target
from converters.store import Cell, Prepared, prepare
from harness.core.checkpoint import OFFICIAL_NAMES, Checkpoint, WeightsError
from harness.core.errors import HarnessError, did_you_mean
from harness.core.status import Status
from harness.core.target import CalibrationSource
from harness.core.weights import resolve_checkpoint
from harness.core.window import FULL_AUDIO_CTX


def expand(sizes: str, targets: str, quants: str) -> list[Cell]:
    """Comma lists (or 'all') → the cells each target offers; an unknown word is an error."""
    size_list = list(OFFICIAL_NAMES) if sizes == "all" else [s.strip() for s in sizes.split(",") if s.strip()]
    for size in size_list:
        if size not in OFFICIAL_NAMES and not Path(size).is_file():
            raise HarnessError(f"--sizes: unknown size '{size}'{did_you_mean(size, OFFICIAL_NAMES)}")
    target_list = list(TARGETS) if targets == "all" else [get_target(t.strip()).name for t in targets.split(",")]
    offered = {q for t in target_list for q in TARGETS[t].quants}
    quant_list = sorted(offered) if quants == "all" else [q.strip() for q in quants.split(",")]
    for q in quant_list:
        if q not in offered:
            raise HarnessError(f"--quant: '{q}' is not offered by {', '.join(target_list)}{did_you_mean(q, offered)}")
    return [(s, t, q) for s in size_list for t in target_list for q in TARGETS[t].quants if q in quant_list]


# a cell at an audio context (`decoding.audio_ctx`): (size, target, quant, audio_ctx)
ContextCell = tuple[str, str, str, int]


def prepare_cells(
    cells: Iterable[Cell | ContextCell], root: Path, calibration: CalibrationSource | None = None
) -> Iterator[tuple[Cell, Prepared]]:
    """Each cell's artifact, built or reused, in order (at its audio context, when it names one);
    weights are resolved once per size, and a size whose weights cannot be had makes its cells
    unavailable."""
    checkpoints: dict[str, Checkpoint | WeightsError] = {}
    for size, target, quant, *context in cells:
        audio_ctx = context[0] if context else FULL_AUDIO_CTX
        if size not in checkpoints:
            try:
                checkpoints[size] = resolve_checkpoint(size)
            except WeightsError as exc:
                checkpoints[size] = exc
        ckpt = checkpoints[size]
        if isinstance(ckpt, WeightsError):
            yield (size, target, quant), Prepared(None, Status.UNAVAILABLE, f"weights: {ckpt}")
        else:
            yield (size, target, quant), prepare(ckpt, (size, target, quant), root, calibration, audio_ctx)


def build(
    cells: list[Cell], root: Path, calibration: CalibrationSource | None = None, progress: bool = True
) -> pd.DataFrame:
    """One row per cell: status (built, reused, failed, unavailable), reason, time, size on disk."""
    from tqdm import tqdm

    rows = []
    started = time.perf_counter()
    bar = tqdm(total=len(cells), desc="convert", unit="artifact", disable=not progress)
    for (size, target, quant), result in prepare_cells(cells, root, calibration):
        rows.append(
            {
                "size": size,
                "target": target,
                "quant": quant,
                "status": str(result.status),
                "reason": result.reason,
                "seconds": round(time.perf_counter() - started, 1),
                "mb": round(result.artifact.mb, 1) if result.artifact else "-",
                "artifact": str(result.artifact.path) if result.artifact else "",
            }
        )
        bar.update()
        started = time.perf_counter()
    bar.close()
    return pd.DataFrame(rows)
