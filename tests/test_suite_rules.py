"""The rules of suites, latency samples and breakdowns that need no model: job files, shard plans,
the sample, the breakdown tables by hand, and the driver's check of a run's shard files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from harness.core.errors import HarnessError
from harness.core.status import Status
from harness.job.spec import DatasetSpec, ModelCell, load_job
from harness.results.aggregate import Part, finalise
from harness.results.run_dir import RunDir, scored_frame
from harness.results.schema import row
from harness.results.scoring import score_row
from harness.results.summary import breakdown_table, duration_bucket, summarize
from harness.run.dataset import Rows, Shard, check_datasets, plan_shards
from harness.run.worker import latency_sample
from tests.conftest import EMBEDDED

pytestmark = pytest.mark.unit

SUITE = """
name: s
datasets:
  libri: {path: EMBEDDED, limit: 3}
  more: {path: EMBEDDED, split: test-clean}
models: {sizes: [tiny.en]}
"""


def _job(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(text.replace("EMBEDDED", str(EMBEDDED)))
    return path


def test_a_suite_names_its_datasets_and_dataset_stays_valid(tmp_path):
    spec = load_job(_job(tmp_path, SUITE))
    assert [(d.name, d.title, d.limit, d.split) for d in spec.datasets] == [
        ("libri", "libri", 3, None),
        ("more", "more", None, "test-clean"),
    ]
    assert spec.breakdowns == () and spec.latency.sample == 32
    one = load_job(_job(tmp_path, "name: s\ndataset: {path: EMBEDDED, language_column: lang}\n"))
    assert [d.title for d in one.datasets] == ["librispeech-eval"]
    assert one.breakdowns == ("language",)  # a dataset that names its languages: a table per language
    # --limit applies to every dataset of a suite
    assert [d.limit for d in spec.with_overrides(limit=2).datasets] == [2, 2]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (SUITE + "dataset: {path: EMBEDDED}\n", "dataset, datasets: expected one of them"),
        ("name: s\ndatasets: {'bad name': {path: EMBEDDED}}\n", "datasets: expected names of letters"),
        ("name: s\ndatasets: {a: {path: EMBEDDED, name: b}}\n", "datasets.a.name: the mapping's key names it"),
        ("name: s\ndatasets: []\n", "datasets: expected a mapping name -> dataset section"),
        ("name: s\ndatasets: {a: {path: nowhere}}\n", "datasets.a.path: no such folder"),
        (SUITE + "breakdown: [3]\n", "breakdown: expected a list of metadata columns"),
        (SUITE + "latency: {sample: 0}\n", "latency.sample: expected a positive number of utterances or 'all'"),
        (SUITE + "latency: {sample: some}\n", "latency.sample: expected a positive number"),
        (SUITE + "latency: {sampel: 3}\n", "latency.sampel: unknown key (did you mean 'sample'?)"),
        (SUITE + "decoding: {batch_size: 0}\n", "decoding.batch_size: expected 1..256, got 0"),
    ],
)
def test_bad_suites_samples_and_batches_are_one_line_naming_the_field(tmp_path, text, message):
    with pytest.raises(HarnessError) as raised:
        load_job(_job(tmp_path, text))
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_a_breakdown_by_a_column_no_dataset_has_is_refused_with_the_columns_it_could_be():
    spec = DatasetSpec(path=EMBEDDED, limit=2)
    rows, notes = check_datasets([spec], ["speaker_id", "duration"])
    assert rows.n_rows == 2 and rows.breakdown == ("speaker_id",) and notes == []
    with pytest.raises(HarnessError, match=r"breakdown: no dataset has a metadata column 'speakr_id' \(did you mean"):
        check_datasets([spec], ["speakr_id"])


def test_shards_never_span_two_datasets():
    shards = plan_shards([5, 3], 2)
    assert [(s.index, s.start, s.stop) for s in shards] == [(0, 0, 2), (1, 2, 4), (2, 4, 5), (3, 5, 7), (4, 7, 8)]
    assert plan_shards(3, 2) == [Shard(0, 0, 2), Shard(1, 2, 3)]


def test_a_suites_rows_carry_their_dataset_and_prefixed_ids():
    a, b = DatasetSpec(path=EMBEDDED, name="a", limit=2), DatasetSpec(path=EMBEDDED, name="b", limit=3)
    rows = Rows.of([a, b], [2, 3], ["speaker_id", "language"])
    assert rows.breakdown == ("speaker_id",)  # language and duration are the row's own
    first, second = rows.read(Shard(0, 1, 2)), rows.read(Shard(1, 2, 4))
    ids = [json.loads(line)["id"] for line in (EMBEDDED / "metadata.jsonl").read_text().splitlines()[:3]]
    assert [u.utt_id for u in first + second] == [f"a/{ids[1]}", f"b/{ids[0]}", f"b/{ids[1]}"]
    assert [u.dataset for u in first + second] == ["a", "b", "b"]
    assert set(first[0].meta) == {"speaker_id"}
    assert rows.index()[0] == [f"a/{i}" for i in ids[:2]] + [f"b/{i}" for i in ids[:3]]
    single = Rows.of([DatasetSpec(path=EMBEDDED, limit=2)], [2])
    assert [u.utt_id for u in single.read(Shard(0, 0, 2))] == ids[:2]  # one dataset: its own ids


def test_the_latency_sample_is_seeded_per_dataset_and_the_same_for_every_model():
    sample = latency_sample((10, 4), 3, seed=0)
    assert sample == latency_sample((10, 4), 3, seed=0) != latency_sample((10, 4), 3, seed=1)
    assert sample is not None and len([p for p in sample if p < 10]) == 3 and len([p for p in sample if p >= 10]) == 3
    assert latency_sample((10, 4), None, 0) is None and latency_sample((3, 2), 3, 0) is None  # every row
    assert latency_sample((2, 10), 3, 0) >= {0, 1}  # a dataset smaller than the sample: all of it


def _scored(cell: ModelCell, utt: str, ref: str, hyp: str, **facts) -> dict:
    raw = row(cell, utt, ref, Status.OK, hyp_text=hyp, hyp_tokens=[1, 2], task="transcribe", language="en", **facts)
    return score_row(raw)


def test_breakdown_tables_by_hand():
    ref, cand = ModelCell("tiny.en", "reference", "fp32"), ModelCell("tiny.en", "onnx", "int8")
    texts = {"u0": ("a b c d", "a b c d", "a x c d"), "u1": ("e f", "e f", "e"), "u2": ("g h i", "g h", "g h")}
    meta = {"u0": {"speaker_id": "1"}, "u1": {"speaker_id": "2"}, "u2": {"speaker_id": "1"}}
    audio = {"u0": 3.0, "u1": 12.0, "u2": 4.0}
    rows = [
        _scored(cell, u, r, hyps[i], meta=json.dumps(meta[u]), audio_s=audio[u])
        for u, (r, *hyps) in texts.items()
        for i, cell in enumerate((ref, cand))
    ]
    utts = scored_frame(rows).assign(exact_match=True, first_divergence=None, token_edit_rate=0.0, language_match=None)
    table = breakdown_table(utts, ("speaker_id", "duration")).set_index(["breakdown", "group", "target"])
    # speaker 1: u0 + u2, 7 words; the reference misses "i" (1), the candidate also "b" (2)
    assert table.loc[("speaker_id", "1", "reference"), "wer"] == pytest.approx(1 / 7)
    assert table.loc[("speaker_id", "1", "onnx"), "wer"] == pytest.approx(2 / 7)
    assert table.loc[("speaker_id", "1", "onnx"), "wer_delta"] == pytest.approx(1 / 7)
    assert table.loc[("speaker_id", "2", "onnx"), "wer"] == pytest.approx(1 / 2)
    assert table.loc[("duration", "0-5 s", "onnx"), "n"] == 2 and table.loc[("duration", "10-20 s", "onnx"), "n"] == 1
    assert [duration_bucket(s) for s in (0.5, 5.0, 29.9, 30.0, 95.0)] == [
        "0-5 s",
        "5-10 s",
        "20-30 s",
        ">=30 s",
        ">=30 s",
    ]


def test_pooled_rows_are_sums_over_datasets_never_a_mean_of_rates():
    ref = ModelCell("tiny.en", "reference", "fp32")
    rows = [_scored(ref, "a/u0", "a b c d e f g h i j", "a b c d e f g h i j", dataset="a")]
    rows += [_scored(ref, "b/u0", "k l", "x", dataset="b")]
    utts = scored_frame(rows).assign(exact_match=True, first_divergence=None, token_edit_rate=0.0, language_match=None)
    summary = summarize(utts).set_index("dataset")
    assert list(summary.index) == ["a", "b", "all"]
    assert (summary.loc["a", "wer"], summary.loc["b", "wer"]) == (0.0, 1.0)
    assert summary.loc["all", "wer"] == pytest.approx(2 / 12)  # not (0 + 1) / 2


def test_a_run_without_exactly_one_row_per_model_and_utterance_writes_no_utterances(tmp_path):
    cell = ModelCell("tiny.en", "reference", "fp32")
    run = RunDir(tmp_path / "run")
    (run.path / "raw").mkdir(parents=True)
    run.write_shard(cell, 0, scored_frame([_scored(cell, u, "a", "a") for u in ("u0", "u1")]))
    run.write_shard(cell, 1, scored_frame([_scored(cell, u, "a", "a") for u in ("u2", "u2")]))
    parts = [Part(0, "d", ["u0", "u1"]), Part(1, "d", ["u2", "u3"]), Part(2, "d", ["u4"])]
    with pytest.raises(RuntimeError) as raised:
        finalise(run, [cell], parts, run.path / "utterances.parquet")
    assert str(raised.value) == (
        "transcription: not one row per model and utterance: tiny.en/reference/fp32: more than one row for u2; "
        "tiny.en/reference/fp32: 1 utterances missing (u3); tiny.en/reference/fp32: shard 2 has no rows"
    )
    assert not (run.path / "utterances.parquet").exists() and not list(run.path.glob("*.tmp*"))
    kept = finalise(run, [cell], parts[:1], run.path / "utterances.parquet")
    assert len(kept) == 2 and len(pd.read_parquet(run.path / "utterances.parquet")) == 2
    assert np.array_equal(kept["wer_errors"].to_numpy(), [0, 0])
