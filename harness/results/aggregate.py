"""From the shard files workers wrote to a run's tables, without holding every row.

Workers score their own rows (`harness.results.scoring.score_row`). The driver then reads the run's
shard files a block of shards at a time — every model's files of those shards together, so each row
meets its reference's row of the same utterance (`compare_with_reference`) — and appends them to
`utterances.parquet` as it goes. Of each row it keeps only the few numbers the summary needs
(`SUMMARY_COLUMNS`, strings as categories), so the driver's memory grows by tens of bytes a row,
not by the row: a night of a million rows fits in a few hundred MB. The check that the run has
exactly one row per model and utterance is made here too, shard by shard.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from pandas.api.types import union_categoricals

from harness.core.errors import some
from harness.core.files import write_atomic
from harness.job.spec import ModelCell
from harness.results.run_dir import RAW, RunDir, arrow_schema
from harness.results.schema import UTTERANCE_COLUMNS, UTTERANCE_DTYPES
from harness.results.scoring import compare_with_reference, typed_utterances

# what the summary and breakdown tables read of each row (harness.results.summary)
SUMMARY_COLUMNS = [
    "dataset", "size", "target", "quant", "audio_ctx", "utt_id", "status", "error", "wer_errors", "ref_words",
    "cer_errors", "ref_chars", "substitutions", "deletions", "insertions", "exact_match", "first_divergence",
    "token_edit_rate", "language_match", "timed", "total_ms", "encode_ms", "decode_ms", "n_steps", "audio_s",
    "scoring_language", "runtime", "meta",
]  # fmt: skip
_CATEGORIES = ("dataset", "size", "target", "quant", "utt_id", "status", "error", "scoring_language", "runtime", "meta")
CHUNK_ROWS = 50_000  # rows compared and written together: large enough to amortise, small to hold


def utterances_schema() -> pa.Schema:
    """utterances.parquet's schema, fixed, so that every block of rows appends to one file."""
    return arrow_schema({c: UTTERANCE_DTYPES.get(c, "object") for c in UTTERANCE_COLUMNS})


@dataclass(frozen=True)
class Part:
    """A shard as the driver reads it back: its rows' dataset and the utterance ids it must hold."""

    index: int
    dataset: str
    ids: Sequence[str]


def finalise(
    run: RunDir,
    cells: Sequence[ModelCell],
    parts: Sequence[Part],
    out: Path,
    folder: str = RAW,
) -> pd.DataFrame:
    """Every model's rows of every shard, compared with their reference and written, a block of
    shards at a time (about CHUNK_ROWS rows), to `out` (utterances.parquet, atomically); returns the
    summary columns of every row.

    Raises RuntimeError naming what is missing, repeated or unexpected unless every model has exactly
    one row per utterance: a scheduling bug must never pass as a result."""
    schema = utterances_schema()
    chunks: list[pd.DataFrame] = []
    problems: list[str] = []

    def write(tmp: Path) -> None:
        writer = None  # opened with the first block's schema: its pandas metadata keeps the dtypes
        try:
            for block in _blocks(parts, len(cells)):
                tables = []
                for part in block:
                    for cell in cells:
                        file = run.shard_file(cell, part.index, folder)
                        if not file.is_file():
                            problems.append(f"{cell.label}: shard {part.index} has no rows")
                            continue
                        table = pq.read_table(file)
                        found = _problems(cell, table.column("utt_id").to_pylist(), part.ids)
                        problems.extend(found)
                        tables.append(table.append_column("dataset_", pa.array([part.dataset] * len(table))))
                if problems or not tables:  # the run fails: its rows are not joined
                    continue
                rows = pa.concat_tables(tables, promote_options="permissive").to_pandas()
                rows = rows.drop(columns=["dataset"]).rename(columns={"dataset_": "dataset"})
                rows = typed_utterances(compare_with_reference(rows.assign(run_id=run.run_id)))
                table = pa.Table.from_pandas(rows, schema=schema, preserve_index=False)
                writer = writer or pq.ParquetWriter(tmp, table.schema)
                writer.write_table(table)
                chunks.append(_pack(rows[SUMMARY_COLUMNS]))
            if problems:
                raise RuntimeError(f"transcription: not one row per model and utterance: {some(problems, 5, '; ')}")
            if writer is None:  # no rows at all: the file still has the table's columns
                pq.write_table(schema.empty_table(), tmp)
        finally:
            if writer is not None:
                writer.close()

    write_atomic(out, write)
    return _join(chunks)


def _blocks(parts: Sequence[Part], n_models: int) -> Iterator[list[Part]]:
    """Consecutive shards holding about CHUNK_ROWS rows of every model together."""
    block: list[Part] = []
    rows = 0
    for part in parts:
        block.append(part)
        rows += len(part.ids) * n_models
        if rows >= CHUNK_ROWS:
            yield block
            block, rows = [], 0
    if block:
        yield block


def _problems(cell: ModelCell, found: list[str], expected: Sequence[str]) -> list[str]:
    seen = set(found)
    if len(found) == len(expected) == len(seen) and seen == set(expected):
        return []
    out = []
    if repeated := sorted({u for u, n in Counter(found).items() if n > 1}):
        out.append(f"{cell.label}: more than one row for {some(repeated, 3, ', ')}")
    if missing := [u for u in expected if u not in seen]:
        out.append(f"{cell.label}: {len(missing)} utterances missing ({some(missing, 3, ', ')})")
    if unknown := sorted(seen - set(expected)):
        out.append(f"{cell.label}: utterances not in the dataset ({some(unknown, 3, ', ')})")
    return out


def _pack(rows: pd.DataFrame) -> pd.DataFrame:
    """Rows' summary columns, their strings as categories (a code a row)."""
    return rows.astype({c: "category" for c in _CATEGORIES})


def _join(chunks: list[pd.DataFrame]) -> pd.DataFrame:
    if not chunks:
        return pd.DataFrame(columns=SUMMARY_COLUMNS).astype({c: "category" for c in _CATEGORIES})
    if len(chunks) == 1:
        return chunks[0]
    joined = {
        c: union_categoricals([chunk[c] for chunk in chunks])
        if c in _CATEGORIES
        else pd.concat([chunk[c] for chunk in chunks], ignore_index=True)
        for c in SUMMARY_COLUMNS
    }
    return pd.DataFrame(joined)
