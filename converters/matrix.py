"""`python -m harness convert`: build or reuse every (size, target, quantization) cell asked for."""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd

from converters.registry import TARGETS, get_target
from converters.store import Prepared, prepare
from harness.errors import HarnessError, did_you_mean
from harness.weights import OFFICIAL_NAMES, WeightsError, resolve_checkpoint


def expand(sizes: str, targets: str, quants: str) -> list[tuple[str, str, str]]:
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


def build(cells: list[tuple[str, str, str]], root: Path, progress: bool = True) -> pd.DataFrame:
    """One row per cell: status (built, reused, failed, unavailable), reason, time, size on disk."""
    from tqdm import tqdm

    rows = []
    checkpoints: dict[str, object] = {}
    for size, target, quant in tqdm(cells, desc="convert", unit="artifact", disable=not progress):
        started = time.perf_counter()
        if size not in checkpoints:
            try:
                checkpoints[size] = resolve_checkpoint(size)
            except WeightsError as exc:
                checkpoints[size] = exc
        ckpt = checkpoints[size]
        result = (
            Prepared(None, "unavailable", f"weights: {ckpt}")
            if isinstance(ckpt, WeightsError)
            else prepare(ckpt, size, target, quant, root)
        )
        rows.append(
            {
                "size": size,
                "target": target,
                "quant": quant,
                "status": result.status,
                "reason": result.reason,
                "seconds": round(time.perf_counter() - started, 1),
                "mb": round(result.artifact.mb, 1) if result.artifact else "-",
                "artifact": str(result.artifact.path) if result.artifact else "",
            }
        )
    return pd.DataFrame(rows)
