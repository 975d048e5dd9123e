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

from harness.core.audio import FULL_AUDIO_CTX
from harness.core.errors import HarnessError
from harness.job.spec import ModelCell
from harness.results import run_info
from harness.results.run_info import RUN_JSON
from harness.results.scoring import UTTERANCE_COLUMNS

TEXT, INT, REAL, BOOL, JSON = "TEXT", "BIGINT", "DOUBLE PRECISION", "BOOLEAN", "JSON"  # JSON: stored as TEXT

RUN_COLUMNS = {
    "run_id": TEXT, "job": TEXT, "started": TEXT, "finished": TEXT, "git_commit": TEXT, "dataset": TEXT,
    "utterances": INT, "cpu": TEXT, "hostname": TEXT, "packages": JSON, "thresholds": JSON,
    "schema_version": INT, "run_dir": TEXT,
}  # fmt: skip
# per model: its place in the summary, its artifact (key, the toolchain that built it), summary.csv's columns
MODEL_COLUMNS = {
    "run_id": TEXT, "position": INT, "size": TEXT, "target": TEXT, "quant": TEXT, "audio_ctx": INT,
    "language": TEXT, "headline": TEXT, "lang_agreement": REAL, "artifact_key": TEXT,
    "artifact": TEXT, "toolchain": JSON, "prepared": TEXT, "cpu": TEXT, "n": INT, "errors": INT, "wer": REAL,
    "wer_delta": REAL, "wer_delta_lo": REAL, "wer_delta_hi": REAL, "sub": INT, "del": INT, "ins": INT, "cer": REAL,
    "exact_match": REAL, "mean_first_div": REAL, "token_edit_rate": REAL, "p50_ms": REAL, "p90_ms": REAL,
    "p99_ms": REAL, "enc_p50_ms": REAL, "dec_ms_per_tok": REAL, "rtfx": REAL, "runtime": TEXT,
    "artifact_mb": REAL, "status": TEXT, "reason": TEXT,
}  # fmt: skip
_UTTERANCE_TYPES = {
    **dict.fromkeys(("run_id", "utt_id", "size", "target", "quant", "ref_text", "hyp_text", "ref_norm",
                     "hyp_norm", "node", "cpu", "runtime", "status", "error", "decoding", "task", "language",
                     "detected_language", "ref_language", "scoring_language"), TEXT),
    **dict.fromkeys(("hyp_tokens", "reference_tokens"), JSON),
    **dict.fromkeys(("wer_errors", "substitutions", "deletions", "insertions", "ref_words", "cer_errors",
                     "ref_chars", "first_divergence", "n_steps", "n_windows", "n_tokens", "attempt", "audio_ctx"), INT),
    **dict.fromkeys(("token_edit_rate", "audio_s", "frontend_ms", "encode_ms", "decode_ms", "total_ms",
                     "language_prob"), REAL),
    **dict.fromkeys(("exact_match", "language_match"), BOOL),
}  # fmt: skip
# utterances.parquet's declared columns, each with its SQL type (a KeyError here: a new column needs one)
UTTERANCE_HISTORY_COLUMNS = {c: _UTTERANCE_TYPES[c] for c in UTTERANCE_COLUMNS}
# `position`: the row's place in utterances.parquet, so the rows read back in the order written
TABLES = {"runs": RUN_COLUMNS, "models": MODEL_COLUMNS, "utterances": {**UTTERANCE_HISTORY_COLUMNS, "position": INT}}


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
