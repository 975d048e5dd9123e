"""Datasets: the embedded audiofolder (metadata read without `datasets`), a hub-style parquet, bad files."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import soxr

from harness.job.spec import DatasetSpec
from harness.run.dataset import SAMPLE_RATE, count_rows, decode_audio, plan_shards, read_index, read_shard
from tests.conftest import EMBEDDED


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
