"""A completed run folder as the rows the history stores (`harness.nightly.history`): the tables' columns
with their SQL types, and the reading of `run.json` (`harness.results.run_info`), `summary.csv` and
`utterances.parquet`."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from harness.core.errors import HarnessError
from harness.core.window import FULL_AUDIO_CTX
from harness.job.spec import ModelCell
from harness.results import run_info
from harness.results.run_info import RUN_JSON
from harness.results.schema import (
    BOOL,
    INT,
    JSON,
    MODEL_COLUMNS,
    REAL,
    RUN_COLUMNS,
    TABLES,
    UTTERANCE_COLUMNS,
)


@dataclass(frozen=True)
class RunRecord:
    """One completed run as the rows the history stores: values in each table's column order."""

    run_id: str
    job: str
    run: tuple
    models: list[tuple]
    utterances: list[tuple]


def read_run(run_dir: Path) -> RunRecord:
    """A complete run folder (`results/<job>/<run id>/`) → its rows; a folder that is not one is an error."""
    files = {name: run_dir / name for name in (RUN_JSON, "summary.csv", "utterances.parquet")}
    missing = [name for name, path in files.items() if not path.is_file()]
    if missing:
        raise HarnessError(f"{run_dir}: not a complete run folder (no {', '.join(missing)})")
    info = run_info.read(files[RUN_JSON])
    utts = pd.read_parquet(files["utterances.parquet"])
    summary = pd.read_csv(files["summary.csv"])
    run = {
        "run_id": info.run_id,
        "job": info.job_name,
        "started": info.started,
        "finished": info.finished,
        "git_commit": info.git_commit,
        "dataset": info.dataset_label,
        "utterances": info.utterances,
        "cpu": info.host.cpu,
        "hostname": info.host.hostname,
        "packages": info.packages,
        "thresholds": info.thresholds,
        "schema_version": info.schema_version,
        "run_dir": str(run_dir.resolve()),
    }
    artifacts = {m.model: m for m in info.models}
    for col in UTTERANCE_COLUMNS:  # a run from an older schema lacks newer columns (v1: no `cpu`)
        if col not in utts:  # before v5 every model ran at the full audio context
            utts[col] = FULL_AUDIO_CTX if col == "audio_ctx" else None
    if "audio_ctx" not in summary:
        summary["audio_ctx"] = FULL_AUDIO_CTX
    models = []
    for position, row in enumerate(summary.to_dict("records")):
        cell = ModelCell(row["size"], row["target"], row["quant"], int(row["audio_ctx"]))
        prepared = artifacts.get(cell.label)
        artifact = prepared.artifact if prepared else None
        key, toolchain = _artifact_facts(artifact)
        rows = utts[
            (utts["size"] == cell.size)
            & (utts["target"] == cell.target)
            & (utts["quant"] == cell.quant)
            & (utts["audio_ctx"] == cell.audio_ctx)
        ]
        cpus = rows.loc[rows["error"].isna(), "cpu"].dropna()
        models.append(
            {
                **row,
                "run_id": run["run_id"],
                "position": position,
                "artifact_key": key,
                "artifact": artifact,
                "toolchain": toolchain,
                "prepared": prepared.status if prepared else None,
                "cpu": cpus.mode().iloc[0] if len(cpus) else None,  # the kind most of its rows ran on
            }
        )
    return RunRecord(
        run_id=run["run_id"],
        job=run["job"],
        run=_row(run, RUN_COLUMNS),
        models=[_row(m, MODEL_COLUMNS) for m in models],
        utterances=[
            _row({**u, "position": i}, TABLES["utterances"])
            for i, u in enumerate(utts[UTTERANCE_COLUMNS].to_dict("records"))
        ],
    )


_KEY_SUFFIX = re.compile(r"-([0-9a-f]{16})$")  # converters.store.artifact_dir: <target>-<quant>-<key>


def _artifact_facts(path: str | None) -> tuple[str | None, dict | None]:
    """(key, toolchain versions) of an artifact: from its manifest when this machine has the folder,
    else the key from the folder's name (the run may come from another machine)."""
    if not path:
        return None, None
    manifest = Path(path) / "manifest.json"
    if manifest.is_file():
        facts = json.loads(manifest.read_text())
        return facts.get("key"), facts.get("toolchain")
    match = _KEY_SUFFIX.search(Path(path).name)
    return (match.group(1) if match else None), None


def _row(values: dict[str, Any], columns: dict[str, str]) -> tuple:
    return tuple(_to_sql(values.get(c), t) for c, t in columns.items())


def _to_sql(value: Any, kind: str) -> Any:
    """A pandas/numpy/JSON value → what both drivers store for the column's type (None for missing)."""
    if isinstance(value, (list, tuple, np.ndarray, dict)):
        return json.dumps(value.tolist() if isinstance(value, np.ndarray) else value)
    if value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value)):
        return None
    if kind == JSON:
        return json.dumps(value)
    if kind == INT:
        return int(value)
    if kind == REAL:
        return float(value)
    if kind == BOOL:
        return bool(value)
    return str(value)
