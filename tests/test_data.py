"""Datasets: the embedded audiofolder (metadata read without `datasets`), a hub-style parquet, bad files."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import soxr

from harness.core.errors import HarnessError
from harness.job.spec import DatasetSpec
from harness.run.dataset import (
    SAMPLE_RATE,
    check_dataset,
    count_rows,
    decode_audio,
    plan_shards,
    read_index,
    read_shard,
)
from tests.conftest import EMBEDDED, ROOT, csv_audiofolder


def test_embedded_set_is_whole(embedded_utterances):
    meta = [json.loads(line) for line in (EMBEDDED / "metadata.jsonl").read_text().splitlines()]
    assert [u.utt_id for u in embedded_utterances] == [m["id"] for m in meta]
    for utt, m in zip(embedded_utterances, meta, strict=True):
        assert utt.error is None and utt.audio.dtype == np.float32
        assert abs(utt.audio_s - m["duration_s"]) < 0.01
        assert utt.text == m["text"]


@pytest.mark.unit
def test_split_filter_limit_and_shards():
    spec = DatasetSpec(path=EMBEDDED, split="test-clean")
    assert count_rows(spec) == 8
    assert count_rows(DatasetSpec(path=EMBEDDED, limit=5)) == 5
    shards = plan_shards(70, 8)
    assert len(shards) == 9 and shards[-1].start == 64 and shards[-1].stop == 70
    assert [u.utt_id for u in read_shard(spec, plan_shards(8, 3)[2])] == read_index(spec)[0][6:8]


def test_resamples_and_downmixes(embedded_utterances, tmp_path):
    audio = embedded_utterances[0].audio
    stereo = soxr.resample(audio, SAMPLE_RATE, 44_100)
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([stereo, stereo], axis=1), 44_100, subtype="PCM_16")
    back = decode_audio(str(path))
    assert abs(len(back) - len(audio)) <= 2
    n = min(len(back), len(audio))
    assert np.corrcoef(back[:n], audio[:n])[0, 1] > 0.99


def test_corrupt_audio_becomes_an_error_row(tmp_path):
    (tmp_path / "bad.flac").write_bytes(b"not audio at all")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "bad.flac", "text": "X"}) + "\n")
    (utt,) = read_shard(DatasetSpec(path=tmp_path), plan_shards(1, 1)[0])
    assert utt.utt_id == "bad" and utt.audio is None
    assert utt.error.startswith(f"cannot decode audio {tmp_path / 'bad.flac'}")


def test_hub_style_parquet_with_audio_bytes(embedded_utterances, tmp_path):
    """The shape of a hub dataset (parquet, audio as bytes), loaded by `datasets` from a folder."""
    files = sorted(EMBEDDED.glob("test-clean/*.flac"))[:3]
    table = pa.table(
        {
            "audio": [{"bytes": f.read_bytes(), "path": f.name} for f in files],
            "text": ["A", "B", "C"],
        }
    )
    (tmp_path / "data").mkdir()
    pq.write_table(table, tmp_path / "data" / "test-00000-of-00001.parquet")
    spec = DatasetSpec(hub=str(tmp_path), split="test")
    utts = read_shard(spec, plan_shards(count_rows(spec), 10)[0])
    assert [u.utt_id for u in utts] == [f.stem for f in files]
    by_id = {u.utt_id: u for u in embedded_utterances}
    for u in utts:
        assert np.array_equal(u.audio, by_id[u.utt_id].audio)


def _hub_folder(folder, audio: list[dict], ids: list[str] | None = None):
    """A folder `datasets` loads as it loads a hub dataset: one parquet split, audio as {bytes, path}."""
    columns = {"audio": audio, "text": [f"T{i}" for i in range(len(audio))]}
    (folder / "data").mkdir(parents=True)
    pq.write_table(pa.table(columns | ({"id": ids} if ids else {})), folder / "data" / "test-00000-of-00001.parquet")
    return folder


def test_a_hub_row_without_audio_bytes_is_an_error_row_never_a_file_opened(tmp_path):
    """A hub row's audio comes as bytes; one that gives only a `path` (a real audio file, which
    would decode) is an error row naming it, in the run and in the driver's check."""
    real = sorted(EMBEDDED.glob("test-clean/*.flac"))[0]
    audio = [{"bytes": real.read_bytes(), "path": real.name}, {"bytes": None, "path": str(real)}]
    folder = _hub_folder(tmp_path, audio, ["good", "only-path"])
    for streaming in (False, True):
        spec = DatasetSpec(hub=str(folder), split="test", streaming=streaming, limit=2)
        good, only_path = read_shard(spec, plan_shards(2, 2)[0])
        assert good.error is None and good.audio_s > 1
        assert only_path.audio is None
        assert only_path.error == f"audio of row 1: no bytes, only the path {str(real)!r} (not opened)"
    (refused,) = check_dataset(DatasetSpec(hub=str(folder), split="test")).unreadable
    assert refused == f"utterance 'only-path': audio of row 1: no bytes, only the path {str(real)!r} (not opened)"


@pytest.mark.unit
def test_a_streamed_index_refuses_repeated_ids(tmp_path):
    files = sorted(EMBEDDED.glob("test-clean/*.flac"))[:3]
    folder = _hub_folder(tmp_path, [{"bytes": f.read_bytes(), "path": f.name} for f in files], ["a", "b", "a"])
    with pytest.raises(HarnessError, match=r"utterance id 'a' occurs more than once \(rows 0 and 2\)"):
        read_index(DatasetSpec(hub=str(folder), split="test", streaming=True, limit=3))


def test_a_streamed_dataset_with_repeated_ids_is_refused_as_it_is_read(tiny_artifacts, models_root, tmp_path):
    """A stream's ids are not read before the run (that would fetch it twice): the run refuses at
    the first shard that repeats an id, in one line, and the run folder says failed, why."""
    files = sorted(EMBEDDED.glob("test-clean/*.flac"))[:4]
    folder = _hub_folder(
        tmp_path / "hub", [{"bytes": f.read_bytes(), "path": f.name} for f in files], ["a", "b", "a", "d"]
    )
    job = tmp_path / "streamed.yaml"
    dataset = {"hub": str(folder), "split": "test", "streaming": True, "limit": 4}
    job.write_text(json.dumps({"name": "streamed", "dataset": dataset, "models": {"sizes": ["tiny.en"]},
                               "cluster": {"shard_size": 1, "slots": 1}}))  # fmt: skip
    out = tmp_path / "results"
    done = subprocess.run(
        [sys.executable, "-m", "harness", "run", str(job), "--out", str(out), "--models", str(models_root),
         "--no-progress", "--history", str(tmp_path / "history.sqlite")],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env=os.environ | {"PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    message = f"dataset hub:{folder}: utterance id 'a' occurs more than once (rows 0 and 2)"
    (line,) = [line for line in done.stderr.splitlines() if line.startswith("error:")]  # Ray may warn too
    assert line.startswith(f"error: {message}"), done.stderr
    (run_dir,) = (out / "streamed").iterdir()
    state = json.loads((run_dir / "state.json").read_text())
    assert state["state"] == "failed" and state["reason"] == f"HarnessError: {line.removeprefix('error: ')}"
    assert not (run_dir / "utterances.parquet").exists()


@pytest.mark.unit
def test_a_csv_audiofolder_with_nested_folders_and_no_id_column(tmp_path):
    """metadata.csv (read without `datasets`): text cells, nested folders, ids from the file names,
    a corrupt file an error row and the others decoded."""
    meta = csv_audiofolder(tmp_path, 8, 2)
    spec = DatasetSpec(path=tmp_path)
    assert count_rows(spec) == 3
    utts = read_shard(spec, plan_shards(3, 3)[0])
    assert [u.utt_id for u in utts] == [m["id"] for m in meta] + ["broken"]
    assert [u.text for u in utts] == [m["text"] for m in meta] + ["NOTHING HERE"]
    assert all(u.audio is not None and u.error is None for u in utts[:2])
    assert utts[2].audio is None and utts[2].error.startswith("cannot decode audio")
