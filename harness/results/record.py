"""A completed run folder as the rows the history stores (`harness.nightly.history`): the tables' columns
with their SQL types, and the reading of `run.json` (`harness.results.run_info`), `summary.csv` and
`utterances.parquet`.

utterances.parquet may hold a million rows (models x utterances): its rows are never held all at
once. `RunRecord.utterances` reads them in batches of `BATCH_ROWS` when iterated, each column
converted as a whole (pyarrow) to the values both databases store, so the memory of reading a run
does not grow with its rows. The per-model facts taken from the rows (the CPU they ran on) come from
a pass over the few columns they need.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

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
    TEXT,
    UTTERANCE_HISTORY_COLUMNS,
)
from harness.results.summary import MODEL_KEY

# Utterance rows read, converted and handed to the database at a time: big enough that the
# per-batch costs (a parquet read, an executemany) vanish, small enough that a batch of Python
# tuples stays a few tens of MB whatever the run's size (measured: benchmarks/history_scale.py)
BATCH_ROWS = 10_000
# bytes of a column chunk read at a time: without it (and with pyarrow's default pre-buffering) a
# reader holds a row group's whole column chunks, and the writer's row groups may be a million rows
READ_BUFFER = 1 << 20


@dataclass(frozen=True)
class UtteranceRows:
    """utterances.parquet's rows as the history's `utterances` table takes them: an iterable of
    batches (lists of tuples in the table's column order, `position` the row's place in the file),
    read anew from the file each time it is iterated.

    A column an older run lacks is filled as that run meant it (no `audio_ctx` before schema 5:
    every model ran at the full audio context; any other: no value)."""

    path: Path
    batch_rows: int = BATCH_ROWS

    def __iter__(self) -> Iterator[list[tuple]]:
        parquet = parquet_stream(self.path)
        present = [c for c in UTTERANCE_HISTORY_COLUMNS if c in parquet.schema_arrow.names]
        position = 0
        for batch in parquet.iter_batches(batch_size=self.batch_rows, columns=present):
            n = batch.num_rows
            columns = [
                range(position, position + n) if column == "position"
                else _sql_values(batch.column(column), kind) if column in present
                else [FULL_AUDIO_CTX if column == "audio_ctx" else None] * n
                for column, kind in TABLES["utterances"].items()
            ]  # fmt: skip
            position += n
            yield list(zip(*columns, strict=True))


@dataclass(frozen=True)
class RunRecord:
    """One completed run as the rows the history stores: values in each table's column order."""

    run_id: str
    job: str
    run: tuple
    models: list[tuple]
    utterances: UtteranceRows


def read_run(run_dir: Path, batch_rows: int = BATCH_ROWS) -> RunRecord:
    """A complete run folder (`results/<job>/<run id>/`) → its rows; a folder that is not one is an error.
    The utterance rows are read when `RunRecord.utterances` is iterated, `batch_rows` at a time."""
    files = {name: run_dir / name for name in (RUN_JSON, "summary.csv", "utterances.parquet")}
    missing = [name for name, path in files.items() if not path.is_file()]
    if missing:
        raise HarnessError(f"{run_dir}: not a complete run folder (no {', '.join(missing)})")
    info = run_info.read(files[RUN_JSON])
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
    if "audio_ctx" not in summary:  # before v5 every model ran at the full audio context
        summary["audio_ctx"] = FULL_AUDIO_CTX
    # a run of one dataset (every run before suites) names it nowhere in its rows: the empty name,
    # as `summarize` gives it (summary.csv keeps it as an empty cell, which pandas reads as NaN)
    summary["dataset"] = summary["dataset"].astype(object).fillna("") if "dataset" in summary else ""
    cpus = _cpus(files["utterances.parquet"], batch_rows)
    models = []
    for position, row in enumerate(summary.to_dict("records")):
        cell = ModelCell(row["size"], row["target"], row["quant"], int(row["audio_ctx"]))
        prepared = artifacts.get(cell.label)
        artifact = prepared.artifact if prepared else None
        key, toolchain = _artifact_facts(artifact)
        counts = cpus.get(cell.as_tuple())
        models.append(
            {
                **row,
                "run_id": run["run_id"],
                "position": position,
                "artifact_key": key,
                "artifact": artifact,
                "toolchain": toolchain,
                "prepared": prepared.status if prepared else None,
                # the kind most of its decoded rows ran on (a tie: the first by name)
                "cpu": min(counts, key=lambda cpu: (-counts[cpu], cpu)) if counts else None,
            }
        )
    return RunRecord(
        run_id=run["run_id"],
        job=run["job"],
        run=_row(run, RUN_COLUMNS),
        models=[_row(m, MODEL_COLUMNS) for m in models],
        utterances=UtteranceRows(files["utterances.parquet"], batch_rows),
    )


def parquet_stream(path: Path) -> pq.ParquetFile:
    """A parquet file to read in batches, holding about a batch at a time whatever its row groups."""
    return pq.ParquetFile(path, pre_buffer=False, buffer_size=READ_BUFFER)


def _cpus(path: Path, batch_rows: int) -> dict[tuple, Counter[str]]:
    """Per model (size, target, quant, audio_ctx): how many of its decoded rows (no `error`) ran on
    each recorded CPU, counted batch by batch over those columns alone."""
    parquet = parquet_stream(path)
    names = parquet.schema_arrow.names
    if "cpu" not in names:  # v1 rows say nothing of their CPU
        return {}
    columns = [c for c in (*MODEL_KEY, "error", "cpu") if c in names]
    counts: dict[tuple, Counter[str]] = {}
    for batch in parquet.iter_batches(batch_size=batch_rows, columns=columns):
        rows = pa.Table.from_batches([batch])
        if "audio_ctx" not in names:
            rows = rows.append_column("audio_ctx", pa.array([FULL_AUDIO_CTX] * len(rows), pa.int64()))
        decoded = pc.is_valid(rows["cpu"])
        if "error" in names:
            decoded = pc.and_(decoded, pc.is_null(rows["error"]))
        grouped = rows.filter(decoded).group_by([*MODEL_KEY, "cpu"]).aggregate([([], "count_all")])
        for group in grouped.to_pylist():
            model = tuple(group[c] for c in MODEL_KEY)
            counts.setdefault(model, Counter())[group["cpu"]] += group["count_all"]
    return counts


def _sql_values(column: pa.Array, kind: str) -> list:
    """A column of a batch → the values `_to_sql` gives for each of its cells, converted as a whole
    where its arrow type is the one the column's SQL type expects (one conversion per column, not
    one per cell); any other type (a run written by another tool or an older pandas) cell by cell."""
    kind_of = column.type
    if pa.types.is_null(kind_of):
        return [None] * len(column)
    if pa.types.is_list(kind_of) or pa.types.is_large_list(kind_of):
        return _json_lists(column)
    native = {
        TEXT: pa.types.is_string(kind_of) or pa.types.is_large_string(kind_of),
        INT: pa.types.is_integer(kind_of),
        REAL: pa.types.is_floating(kind_of) or pa.types.is_integer(kind_of),
        BOOL: pa.types.is_boolean(kind_of),
    }
    if not native.get(kind, False):
        return [_to_sql(value, kind) for value in column.to_pylist()]
    if kind == REAL:  # NaN is no value, as pandas reads it
        column = pc.cast(column, pa.float64())
        column = pc.if_else(pc.is_nan(column), pa.scalar(None, pa.float64()), column)
    return column.to_pylist()


def _json_lists(column: pa.ListArray | pa.LargeListArray) -> list:
    """Lists of integers (token ids) → their JSON text as `json.dumps` writes it ("[1, 2]"),
    joined by pyarrow; lists of anything else, or holding a null, through `json.dumps` one by one."""
    items = column.values  # the whole child array: `offsets` index into it, even in a slice of the column
    if not pa.types.is_integer(items.type) or pc.list_flatten(column).null_count:
        return [None if value is None else json.dumps(value) for value in column.to_pylist()]
    texts = type(column).from_arrays(column.offsets, pc.cast(items, pa.string()), mask=column.is_null())
    return pc.binary_join_element_wise("[", pc.binary_join(texts, ", "), "]", "").to_pylist()


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
