"""Datasets: a local audiofolder (its metadata read with the standard library) or a Hugging Face
hub id (through `datasets`), read in shards.

Audio is never decoded by `datasets` (its default decoder needs torchcodec and FFmpeg): rows keep
the encoded bytes (a hub row) or the file's path inside the folder (a local row), and soundfile +
soxr turn them into 16 kHz mono float32. The driver only checks the metadata (columns, unique ids,
audio files inside the dataset folder, hub audio given as bytes), counts rows and plans shards;
each worker reads its own shard. A streamed dataset is not read before the run (that would fetch
it twice): its ids are checked as its rows come back (`StreamIds`).
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from harness.core.audio import decode_audio
from harness.core.errors import HarnessError, did_you_mean, quote, some
from harness.core.languages import LANGUAGES, TO_LANGUAGE_CODE
from harness.core.target import CalibrationSource
from harness.core.window import SAMPLE_RATE
from harness.job.spec import DatasetSpec

# train-clean-100 utterances shipped for int8 calibration: never an evaluation split
CALIBRATION = Path(__file__).resolve().parents[2] / "data" / "librispeech-calibration"
LISTED = 5  # problems quoted in one message; the rest are counted


@dataclass(frozen=True)
class Shard:
    index: int
    start: int  # row range [start, stop) of the dataset after split filtering and limit
    stop: int


@dataclass(frozen=True)
class Utterance:
    utt_id: str
    text: str
    audio: np.ndarray | None  # 16 kHz mono float32; None when it could not be decoded
    error: str | None = None
    language: str | None = None  # whisper's code, from dataset.language_column

    @property
    def audio_s(self) -> float:
        return 0.0 if self.audio is None else len(self.audio) / SAMPLE_RATE


def _metadata_file(folder: Path) -> Path:
    for name in ("metadata.jsonl", "metadata.csv"):
        if (folder / name).is_file():
            return folder / name
    raise HarnessError(f"{folder}: no metadata.jsonl or metadata.csv (expected the audiofolder layout)")


def open_dataset(spec: DatasetSpec) -> Any:
    """The dataset's rows before any audio is touched: a local audiofolder's metadata as a list of
    dicts (read with the standard library: the commands that only check a job need no `datasets`),
    a hub dataset as `datasets` loads it. A worker opens it once as it loads its model."""
    if spec.path is not None:
        return _local_rows(spec)
    import datasets

    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(spec.hub, spec.config, split=spec.split or "test", streaming=spec.streaming)
    except Exception as exc:
        raise HarnessError(f"dataset hub:{spec.hub}: cannot be loaded ({type(exc).__name__}: {exc})") from None
    ds = ds.cast_column(spec.audio_column, datasets.Audio(decode=False))
    if spec.limit is not None and not spec.streaming:
        ds = ds.select(range(min(spec.limit, len(ds))))
    return ds


def _local_rows(spec: DatasetSpec) -> list[dict[str, Any]]:
    """An audiofolder's metadata rows (`metadata.jsonl`: one JSON object a line; `metadata.csv`:
    a header, then text cells), split-filtered and limited; one error line naming the file when it
    cannot be read or lacks a column the job needs."""
    assert spec.path is not None
    meta = _metadata_file(spec.path)
    kind = "JSON lines" if meta.suffix == ".jsonl" else "csv"
    try:
        with meta.open(encoding="utf-8", newline="") as handle:
            if meta.suffix == ".jsonl":
                rows = [json.loads(line) for line in handle if line.strip()]
            else:
                rows = list(csv.DictReader(handle))
    except (ValueError, csv.Error) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise HarnessError(f"{meta}: cannot be read as {kind} ({type(exc).__name__}: {exc})") from None
    if not all(isinstance(row, dict) for row in rows):
        raise HarnessError(f"{meta}: cannot be read as {kind} (every line must be a JSON object)")
    columns = list(dict.fromkeys(key for row in rows for key in row))
    missing = {"file_name", spec.text_column, spec.language_column} - {None, *columns}
    if missing:
        raise HarnessError(f"{meta}: missing column(s) {sorted(missing)}; has {columns}")
    if spec.split is not None:
        if "split" not in columns:
            raise HarnessError(f"{meta}: dataset.split is {spec.split!r} but the metadata has no 'split' column")
        rows = [row for row in rows if row.get("split") == spec.split]
    return rows if spec.limit is None else rows[: spec.limit]


def count_rows(spec: DatasetSpec) -> int:
    return _count(spec, open_dataset(spec))


def _count(spec: DatasetSpec, ds: Any) -> int:
    if spec.streaming:
        if spec.limit is not None:
            return spec.limit
        split = ds.info.splits.get(spec.split or "test") if ds.info.splits else None
        if split is None or not split.num_examples:
            raise HarnessError(f"dataset hub:{spec.hub}: streaming with an unknown length; set dataset.limit")
        return split.num_examples
    return len(ds)


@dataclass(frozen=True)
class DatasetCheck:
    """What the driver knows of a dataset before it builds anything."""

    n_rows: int
    unreadable: tuple[str, ...] = ()  # one line per utterance whose audio will not be opened (an error row)

    @property
    def note(self) -> str:
        return (
            f"{len(self.unreadable)} of {self.n_rows} utterances have a file_name or language that is refused "
            f"(a run reports each as an error row): {some(self.unreadable, LISTED)}"
        )


def check_dataset(spec: DatasetSpec) -> DatasetCheck:
    """Refuse a dataset no run can use, before any model is built: missing columns (`open_dataset`), no
    rows, utterance ids that repeat (every model's rows are joined on them, so a repeat would make
    each comparison with the reference meaningless); and list the utterances whose audio file is
    refused, which a run reports as error rows."""
    ds = open_dataset(spec)
    n_rows = _count(spec, ds)
    if n_rows == 0:
        raise HarnessError(f"dataset {spec.label}: no utterances (check dataset.split and dataset.limit)")
    if spec.streaming:  # a stream's ids arrive as it is read; reading it all here would fetch it twice
        return DatasetCheck(n_rows)
    ids, unreadable = [], []
    for position, row in enumerate(ds):
        ids.append(_utt_id(spec, row, position))
        try:
            if spec.path is not None:
                audio_file(spec.path, row.get("file_name"))
            else:
                hub_audio(row.get(spec.audio_column), position)
            if spec.language_column is not None:
                language_of(row.get(spec.language_column), spec.language_column)
        except HarnessError as exc:
            unreadable.append(f"utterance {quote(ids[-1])}: {exc}")
    repeated = [f"{quote(utt_id)} ({n} rows)" for utt_id, n in Counter(ids).items() if n > 1]
    if repeated:
        raise HarnessError(
            f"dataset {spec.label}: utterance ids occur more than once: {some(repeated, LISTED, ', ')}; {_unique(spec)}"
        )
    return DatasetCheck(n_rows, tuple(unreadable))


def _unique(spec: DatasetSpec) -> str:
    return (
        f"an utterance's id is its '{spec.id_column}' column, else its audio file's name without extension, "
        f"so give every row a unique '{spec.id_column}'"
    )


@dataclass
class StreamIds:
    """The utterance ids of a dataset's rows as they are read, per reader (a model of the run: each
    reads every row once). The driver does not read a streamed dataset before the run, so a repeated
    id is refused here, at the first row read again, not by the check of the results after the
    whole run."""

    spec: DatasetSpec
    seen: dict[str, dict[str, int]] = field(default_factory=dict)  # reader → utterance id → row

    def add(self, reader: str, start: int, ids: Iterable[str]) -> None:
        """The ids of rows `start`, `start + 1`, ... as `reader` read them; the same id at another row
        than before is a HarnessError."""
        seen = self.seen.setdefault(reader, {})
        for position, utt_id in enumerate(ids, start):
            first = seen.setdefault(utt_id, position)
            if first != position:
                raise HarnessError(
                    f"dataset {self.spec.label}: utterance id {quote(utt_id)} occurs more than once "
                    f"(rows {min(first, position)} and {max(first, position)}); {_unique(self.spec)}"
                )


def audio_file(folder: Path, file_name: object) -> Path:
    """The audio file a metadata row's `file_name` names, resolved inside `folder`; else a
    HarnessError saying why it is not opened.

    The metadata comes with the dataset, so it may not point anywhere else on the machine: an
    absolute path, `..` or a symlink that leads out of the folder is refused, never opened.
    """
    what = f"file_name {quote(file_name, 200)}"  # long enough for a real path, short for a hostile one
    if not isinstance(file_name, str) or not file_name:
        raise HarnessError(f"{what}: expected a path relative to the dataset folder")
    if Path(file_name).is_absolute():
        raise HarnessError(f"{what}: an absolute path; expected one relative to the dataset folder (not opened)")
    root = folder.resolve()
    try:
        path = (root / file_name).resolve()
    except (OSError, ValueError, RuntimeError) as exc:  # a NUL byte (ValueError), a symlink loop (RuntimeError)
        raise HarnessError(f"{what}: not a usable path ({exc}; not opened)") from None
    if not path.is_relative_to(root):
        raise HarnessError(f"{what}: resolves outside the dataset folder {root} (not opened)")
    return path


def hub_audio(audio: object, position: int) -> bytes:
    """A hub row's encoded audio; else a HarnessError saying why it is not decoded.

    A hub row's audio must come as bytes: a `path` alone would name a file on whichever machine
    reads the row, chosen by whoever wrote the dataset, so it is never opened.
    """
    if isinstance(audio, dict) and isinstance(audio.get("bytes"), bytes) and audio["bytes"]:
        return audio["bytes"]
    path = audio.get("path") if isinstance(audio, dict) else None
    if path:
        raise HarnessError(f"audio of row {position}: no bytes, only the path {quote(path, 200)} (not opened)")
    raise HarnessError(f"audio of row {position}: no bytes (got {quote(audio, 200)})")


def language_of(value: object, column: str) -> str:
    """A language column's value (a whisper language code or name, any case) as whisper's code;
    else a HarnessError saying why the utterance cannot be decoded in it."""
    if isinstance(value, str) and (code := value.lower()) in LANGUAGES:
        return code
    if isinstance(value, str) and value.lower() in TO_LANGUAGE_CODE:
        return TO_LANGUAGE_CODE[value.lower()]
    hint = did_you_mean(value, LANGUAGES) if isinstance(value, str) else ""
    raise HarnessError(f"language {quote(value)} in column {quote(column)}: not a language Whisper knows{hint}")


def read_index(spec: DatasetSpec) -> tuple[list[str], list[str]]:
    """Utterance ids and reference texts, without touching audio (for rows of unrunnable models);
    a repeated id (which only a streamed dataset can still have) is refused."""
    if spec.streaming:
        rows = list(open_dataset(spec).take(count_rows(spec)))
    else:
        rows = list(open_dataset(spec))
    ids = [_utt_id(spec, r, i) for i, r in enumerate(rows)]
    StreamIds(spec).add("index", 0, ids)
    return ids, [str(r.get(spec.text_column) or "") for r in rows]


def plan_shards(n_rows: int, shard_size: int) -> list[Shard]:
    return [Shard(i, start, min(start + shard_size, n_rows)) for i, start in enumerate(range(0, n_rows, shard_size))]


def read_shard(spec: DatasetSpec, shard: Shard) -> list[Utterance]:
    """The shard's utterances with decoded audio; a bad file becomes an Utterance with an error."""
    ds = open_dataset(spec)
    if spec.streaming:
        rows = list(ds.skip(shard.start).take(shard.stop - shard.start))
    elif isinstance(ds, list):  # a local folder's rows
        rows = ds[shard.start : shard.stop]
    else:
        rows = list(ds.select(range(shard.start, shard.stop)))
    return [_utterance(spec, row, shard.start + i) for i, row in enumerate(rows)]


def _utt_id(spec: DatasetSpec, row: dict, position: int) -> str:
    """The id column, else the audio file's stem, else the row's position."""
    if row.get(spec.id_column):
        return str(row[spec.id_column])
    name = row.get("file_name") if spec.path is not None else (row.get(spec.audio_column) or {}).get("path")
    return Path(name).stem if isinstance(name, str) and name else str(position)


def _utterance(spec: DatasetSpec, row: dict, position: int) -> Utterance:
    utt_id = _utt_id(spec, row, position)
    text = str(row.get(spec.text_column) or "")
    language = None
    if spec.language_column is not None:
        try:
            language = language_of(row.get(spec.language_column), spec.language_column)
        except HarnessError as exc:
            return Utterance(utt_id, text, None, str(exc))
    if spec.path is not None:
        try:
            source: str | io.BytesIO = str(audio_file(spec.path, row.get("file_name")))
        except HarnessError as exc:
            return Utterance(utt_id, text, None, str(exc), language)
        where = source
    else:
        audio = row.get(spec.audio_column)
        try:
            source = io.BytesIO(hub_audio(audio, position))
        except HarnessError as exc:
            return Utterance(utt_id, text, None, str(exc), language)
        where = audio.get("path") or f"row {position}"
    try:
        return Utterance(utt_id, text, decode_audio(source), language=language)
    except Exception as exc:  # soundfile raises LibsndfileError, OSError, RuntimeError
        return Utterance(utt_id, text, None, f"cannot decode audio {where}: {exc}", language)


def calibration_source(folder: Path = CALIBRATION) -> CalibrationSource:
    """The calibration audio converters are handed (they never read a dataset themselves)."""

    def load() -> list[np.ndarray]:
        spec = DatasetSpec(path=folder)
        return [u.audio for u in read_shard(spec, Shard(0, 0, count_rows(spec))) if u.audio is not None]

    return CalibrationSource(f"data/{folder.name}", load)
