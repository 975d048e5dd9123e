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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from harness.core.audio import decode_audio
from harness.core.errors import HarnessError, did_you_mean, quote, some
from harness.core.languages import LANGUAGES, TO_LANGUAGE_CODE
from harness.core.target import CalibrationSource
from harness.core.window import SAMPLE_RATE
from harness.job.spec import DURATION, LANGUAGE, DatasetSpec

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
    dataset: str | None = None  # the title of the dataset it comes from (DatasetSpec.title)
    meta: dict[str, str] | None = None  # the job's breakdown columns found in its metadata row

    @property
    def audio_s(self) -> float:
        return 0.0 if self.audio is None else len(self.audio) / SAMPLE_RATE


@dataclass(frozen=True)
class Part:
    """One dataset of a job, placed among the job's rows."""

    spec: DatasetSpec
    offset: int  # the position of its first row among the job's rows
    n_rows: int


@dataclass(frozen=True)
class Rows:
    """The utterances a job evaluates: its datasets' rows one after another, positions 0..n-1.

    Shards never span two datasets (`plan_shards`), so every shard reads one dataset. In a suite
    (several datasets) an utterance's id is "<dataset name>/<its id>": ids stay unique across the
    suite, and every join on them (a model with its reference, a run with its baseline) holds."""

    parts: tuple[Part, ...]
    breakdown: tuple[str, ...] = ()  # metadata columns each utterance carries (`Utterance.meta`)

    @classmethod
    def of(cls, specs: Sequence[DatasetSpec], counts: Sequence[int], breakdown: Sequence[str] = ()) -> Rows:
        offsets = np.cumsum([0, *counts])[:-1]
        parts = tuple(Part(s, int(o), int(n)) for s, o, n in zip(specs, offsets, counts, strict=True))
        return cls(parts, tuple(c for c in breakdown if c not in (LANGUAGE, DURATION)))

    @property
    def n_rows(self) -> int:
        return sum(p.n_rows for p in self.parts)

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(p.n_rows for p in self.parts)

    @property
    def suite(self) -> bool:
        return len(self.parts) > 1

    def part_at(self, position: int) -> Part:
        """The dataset the job's row `position` belongs to."""
        for part in self.parts:
            if part.offset <= position < part.offset + part.n_rows:
                return part
        raise IndexError(f"row {position} is not among the job's {self.n_rows} rows")

    def utt_id(self, part: Part, utt_id: str) -> str:
        return f"{part.spec.title}/{utt_id}" if self.suite else utt_id

    def read(self, shard: Shard) -> list[Utterance]:
        """A shard's utterances, from the one dataset it lies in."""
        part = self.part_at(shard.start)
        local = Shard(shard.index, shard.start - part.offset, shard.stop - part.offset)
        assert local.stop <= part.n_rows, f"shard {shard} spans two datasets"
        return [
            replace(u, utt_id=self.utt_id(part, u.utt_id), dataset=part.spec.title)
            for u in read_shard(part.spec, local, self.breakdown)
        ]

    def index(self) -> tuple[list[str], list[str]]:
        """Every row's utterance id and reference text, without touching audio."""
        ids: list[str] = []
        texts: list[str] = []
        for part in self.parts:
            part_ids, part_texts = read_index(part.spec)
            ids += [self.utt_id(part, u) for u in part_ids]
            texts += part_texts
        return ids, texts

    def open(self) -> None:
        """Open every dataset once (a worker, as it loads its model)."""
        for part in self.parts:
            open_dataset(part.spec)


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
    columns: tuple[str, ...] = ()  # its metadata's columns (a stream's: those it declares)

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
    declared = tuple(getattr(ds, "column_names", None) or ())
    if spec.streaming:  # a stream's ids arrive as it is read; reading it all here would fetch it twice
        return DatasetCheck(n_rows, columns=declared)
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
    columns = declared or tuple(dict.fromkeys(key for row in ds for key in row))
    return DatasetCheck(n_rows, tuple(unreadable), columns)


def check_datasets(specs: Sequence[DatasetSpec], breakdown: Sequence[str]) -> tuple[Rows, list[str]]:
    """Every dataset of a job checked (`check_dataset`), as the job's `Rows`, and a note per dataset
    with utterances a run will report as error rows. A breakdown column that no dataset has is
    refused: its table would be one group of unknowns."""
    checks = [check_dataset(spec) for spec in specs]
    columns = {c for check in checks for c in check.columns}
    for column in breakdown:
        if column not in (LANGUAGE, DURATION) and column not in columns:
            hint = did_you_mean(column, sorted(columns))
            raise HarnessError(
                f"breakdown: no dataset has a metadata column {quote(column)}{hint}; "
                f"expected one of {', '.join(sorted(columns))}, {LANGUAGE} or {DURATION}"
            )
    notes = [
        f"dataset {spec.label}: {check.note}" for spec, check in zip(specs, checks, strict=True) if check.unreadable
    ]
    return Rows.of(specs, [c.n_rows for c in checks], breakdown), notes


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


def plan_shards(sizes: int | Sequence[int], shard_size: int) -> list[Shard]:
    """Shards of at most `shard_size` rows over datasets of `sizes` rows, one after another (a
    number: one dataset), numbered in order; none spans two datasets."""
    shards: list[Shard] = []
    offset = 0
    for n_rows in [sizes] if isinstance(sizes, int) else sizes:
        for start in range(offset, offset + n_rows, shard_size):
            shards.append(Shard(len(shards), start, min(start + shard_size, offset + n_rows)))
        offset += n_rows
    return shards


def read_shard(spec: DatasetSpec, shard: Shard, meta: Sequence[str] = ()) -> list[Utterance]:
    """The shard's utterances with decoded audio; a bad file becomes an Utterance with an error."""
    ds = open_dataset(spec)
    if spec.streaming:
        rows = list(ds.skip(shard.start).take(shard.stop - shard.start))
    elif isinstance(ds, list):  # a local folder's rows
        rows = ds[shard.start : shard.stop]
    else:
        rows = list(ds.select(range(shard.start, shard.stop)))
    return [_with_meta(_utterance(spec, row, shard.start + i), row, meta) for i, row in enumerate(rows)]


def _with_meta(utt: Utterance, row: dict, columns: Sequence[str]) -> Utterance:
    """The utterance with the metadata columns the job breaks results down by (those it has)."""
    if not columns:
        return utt
    meta = {c: str(row[c]) for c in columns if row.get(c) is not None and not isinstance(row[c], (dict, list))}
    return replace(utt, meta=meta)


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
