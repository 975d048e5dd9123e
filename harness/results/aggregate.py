"""From the shard files workers wrote to a run's tables, without holding every row.

Workers score their own rows (`harness.results.scoring.score_row`). The driver then reads the run's
shard files one shard at a time — every model's file of that shard together, so each row meets its
reference's row of the same utterance (`compare_with_reference`) — and appends them to
`utterances.parquet` as it goes. Of each row it keeps only the few numbers the summary needs
(`SUMMARY_COLUMNS`, strings as categories), so the driver's memory grows by tens of bytes a row,
not by the row: a night of a million rows fits in a few hundred MB. The check that the run has
exactly one row per model and utterance is made here too, shard by shard.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from pandas.api.types import union_categoricals

from harness.core.errors import some
from harness.core.files import write_atomic
from harness.job.spec import ModelCell
from harness.results.run_dir import RAW, RunDir
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
CHUNK_ROWS = 50_000  # rows gathered before their summary columns are packed into one frame


def arrow_schema() -> pa.Schema:
    """utterances.parquet's schema, fixed, so that every shard's rows append to one file."""
    types = {
        "string": pa.string(), "Int64": pa.int64(), "float64": pa.float64(), "Float64": pa.float64(),
        "boolean": pa.bool_(),
    }  # fmt: skip
    fields = [
        pa.field(c, types[UTTERANCE_DTYPES[c]] if c in UTTERANCE_DTYPES else pa.list_(pa.int64()))
        for c in UTTERANCE_COLUMNS
    ]
    return pa.schema(fields)


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
    on_rows: Callable[[pd.DataFrame], None] | None = None,
) -> pd.DataFrame:
    """Every model's rows of every shard, compared with their reference and written, shard by shard,
    to `out` (utterances.parquet, atomically); returns the summary columns of every row.
    `on_rows` sees each shard's finished rows (a caller's own tally).

    Raises RuntimeError naming what is missing, repeated or unexpected unless every model has exactly
    one row per utterance: a scheduling bug must never pass as a result."""
    schema = arrow_schema()
    chunks: list[pd.DataFrame] = []
    pending: list[pd.DataFrame] = []
    pending_rows = 0
    problems: list[str] = []

    def write(tmp: Path) -> None:
        nonlocal pending_rows
        with pq.ParquetWriter(tmp, schema) as writer:
            for part in parts:
                frames = []
                for cell in cells:
                    file = run.shard_file(cell, part.index, folder)
                    if not file.is_file():
                        problems.append(f"{cell.label}: shard {part.index} has no rows")
                        continue
                    frame = pd.read_parquet(file)
                    problems.extend(_problems(cell, frame["utt_id"], part.ids))
                    frames.append(frame)
                if not frames:
                    continue
                rows = pd.concat(frames, ignore_index=True).assign(run_id=run.run_id, dataset=part.dataset)
                rows = typed_utterances(compare_with_reference(rows))
                writer.write_table(pa.Table.from_pandas(rows, schema=schema, preserve_index=False))
                if on_rows is not None:
                    on_rows(rows)
                pending.append(rows[SUMMARY_COLUMNS])
                pending_rows += len(rows)
                if pending_rows >= CHUNK_ROWS:
                    chunks.append(_pack(pending))
                    pending.clear()
                    pending_rows = 0
            if problems:
                raise RuntimeError(f"transcription: not one row per model and utterance: {some(problems, 5, '; ')}")

    write_atomic(out, write)
    if pending:
        chunks.append(_pack(pending))
    return _join(chunks)


def _problems(cell: ModelCell, found: pd.Series, expected: Sequence[str]) -> list[str]:
    if len(found) == len(expected) and set(found) == set(expected) and not found.duplicated().any():
        return []
    seen = set(found)
    out = []
    if repeated := sorted(set(found[found.duplicated()])):
        out.append(f"{cell.label}: more than one row for {some(repeated, 3, ', ')}")
    if missing := [u for u in expected if u not in seen]:
        out.append(f"{cell.label}: {len(missing)} utterances missing ({some(missing, 3, ', ')})")
    if unknown := sorted(seen - set(expected)):
        out.append(f"{cell.label}: utterances not in the dataset ({some(unknown, 3, ', ')})")
    return out


def _pack(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """Rows' summary columns as one frame, its strings as categories (a code a row)."""
    packed = pd.concat(frames, ignore_index=True)
    return packed.astype({c: "category" for c in _CATEGORIES})


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
