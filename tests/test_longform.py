"""Long form: the reference equals `whisper.transcribe` at temperature 0 on the shipped long-form
items, a converted fp32 target equals the reference, a 40-minute file decodes in bounded memory,
and short form refuses audio over 30 s instead of trimming it."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from harness.core.decoding import DecodingOptions, Dims, build_prompt
from harness.job.spec import DatasetSpec
from harness.run.dataset import Shard, read_shard
from tests.conftest import ROOT

LONGFORM = ROOT / "data" / "librispeech-longform"


@pytest.fixture(scope="module")
def longform_utterances():
    spec = DatasetSpec(path=LONGFORM)
    return read_shard(spec, Shard(0, 0, 2))


@pytest.fixture(scope="module")
def reference_artifact(tiny_checkpoint, models_root):
    from converters.store import ensure

    return ensure(tiny_checkpoint, "tiny.en", "reference", "fp32", models_root)[0]


def worker_rows(artifact, options: DecodingOptions) -> list[dict]:
    """The rows a Ray worker streams for the long-form dataset (the plain class, in this process;
    its artifact published and fetched as on a node)."""
    import ray
    import torch

    from harness.job.spec import ModelCell
    from harness.run.artifact_server import start_server
    from harness.run.dataset import Rows
    from harness.run.node_cache import publish
    from harness.run.worker import ModelWorker, WorkerSetup

    threads = torch.get_num_threads()
    dims = Dims.of(artifact.manifest["dims"])
    server = start_server()
    try:
        cell = ModelCell("tiny.en", artifact.target, artifact.quant)
        prompt = build_prompt(dims, options)
        rows = Rows.of([DatasetSpec(LONGFORM)], [2])
        setup = WorkerSetup(cell, publish(server, artifact), dims, prompt, options, rows)
        return list(ModelWorker(setup).run_shard(Shard(0, 0, 2)))
    finally:
        ray.kill(server)
        torch.set_num_threads(threads)  # a worker sets one thread for its process: not for later tests


@pytest.fixture(scope="module")
def reference_rows(ray_local, reference_artifact):
    """The reference's rows under the default rule (auto: both items are over 30 s)."""
    return worker_rows(reference_artifact, DecodingOptions())


@pytest.fixture(scope="module")
def whisper_transcribed(tiny_checkpoint, longform_utterances):
    """openai-whisper's own `transcribe` at temperature 0: the independent path."""
    import torch
    import whisper

    from harness.core.weights import load_model

    model, threads = load_model(tiny_checkpoint), torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers run: on a busy machine, a second thread mostly waits
    try:
        return {
            u.utt_id: whisper.transcribe(
                model, u.audio, temperature=0.0, condition_on_previous_text=True, fp16=False, language="en"
            )
            for u in longform_utterances
        }
    finally:
        torch.set_num_threads(threads)


def test_shipped_items_are_long(longform_utterances):
    assert [round(u.audio_s, 1) for u in longform_utterances] == [94.5, 158.8]


def test_reference_long_form_equals_whisper_transcribe(reference_rows, whisper_transcribed):
    assert [r["status"] for r in reference_rows] == ["ok", "ok"]
    for row in reference_rows:
        theirs = whisper_transcribed[row["utt_id"]]
        tokens = [t for segment in theirs["segments"] for t in segment["tokens"]]
        assert row["hyp_tokens"] == tokens  # timestamps included: every segment falls where whisper's do
        assert row["hyp_text"] == theirs["text"].strip()
        # one window per seek whisper decoded (none of these windows is silence)
        assert row["n_windows"] == len({segment["seek"] for segment in theirs["segments"]}) > 1
        assert row["n_steps"] > len(tokens)
        assert row["decoding"] == "long form: whisper.transcribe's 30 s windows, temperature 0 without fallback"


@pytest.mark.slow  # minutes of real runs: the integration tier keeps to its 12-minute budget
def test_converted_fp32_target_matches_the_reference_in_long_form(
    ray_local, reference_rows, tiny_checkpoint, models_root
):
    from converters.store import ensure

    artifact = ensure(tiny_checkpoint, "tiny.en", "torchscript", "fp32", models_root)[0]
    rows = worker_rows(artifact, DecodingOptions(long_form=True))
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert [r["hyp_tokens"] for r in rows] == [r["hyp_tokens"] for r in reference_rows]
    assert [r["n_windows"] for r in rows] == [r["n_windows"] for r in reference_rows]


def test_short_form_refuses_audio_over_30_s_as_an_error_row(ray_local, reference_artifact, reference_rows):
    from harness.results.schema import UTTERANCE_COLUMNS
    from harness.results.scoring import score_rows
    from harness.results.summary import summarize

    rows = worker_rows(reference_artifact, DecodingOptions(long_form=False))
    assert [r["status"] for r in rows] == ["error", "error"]
    assert rows[0]["error"].startswith("audio is 94.5 s, longer than the 30 s window of short-form decoding")
    assert "set decoding.long_form to auto or true" in rows[0]["error"] and rows[0]["hyp_tokens"] is None
    # scored beside the long-form rows: n_windows is a column; RTFx counts only audio decoded whole
    raw = pd.DataFrame([*reference_rows, *rows]).assign(size="tiny.en", target="reference", run_id="r")
    raw["quant"] = ["fp32", "fp32", "fp32-short", "fp32-short"]
    utts = score_rows(raw)
    assert list(utts.columns) == UTTERANCE_COLUMNS and str(utts["n_windows"].dtype) == "Int64"
    assert utts["n_windows"].isna().tolist() == [False, False, True, True]
    summary = summarize(utts).set_index("quant")
    ok = utts[utts["status"] == "ok"]
    assert summary.loc["fp32", "rtfx"] == pytest.approx(ok["audio_s"].sum() / (ok["total_ms"].sum() / 1e3))
    assert np.isnan(summary.loc["fp32-short", "rtfx"]) and summary.loc["fp32-short", "errors"] == 2


def test_windowed_log_mel_is_whisper_transcribe_front_end_bit_for_bit(longform_utterances):
    import torch
    import whisper

    from harness.core.audio import WindowedMel
    from harness.core.window import N_FRAMES, N_SAMPLES

    audio = longform_utterances[0].audio
    whole = whisper.log_mel_spectrogram(torch.from_numpy(audio), 80, padding=N_SAMPLES)
    mel = WindowedMel.of(audio, 80)
    assert mel.n_frames == whole.shape[-1] - N_FRAMES
    for seek in (0, 2972, mel.n_frames - N_FRAMES, mel.n_frames - 5):  # the last two: whole and partial windows
        size = min(N_FRAMES, mel.n_frames - seek)
        theirs = whisper.pad_or_trim(whole[:, seek : seek + size], N_FRAMES).numpy()
        assert np.array_equal(mel.window(seek, size)[0], theirs), seek


# Run in a fresh process, so its peak resident memory is this decode's, not an earlier test's.
FORTY_MINUTES = """
import json, pathlib, resource, sys
import numpy as np, torch
from converters.reference_target import ReferenceRunner
from converters.store import load_artifact
from harness.core.audio import decode_audio
from harness.core.window import SAMPLE_RATE
from harness.core.decoding import DecodingOptions, Dims
from harness.core.longform import transcribe

torch.set_num_threads(1)
artifact = load_artifact(pathlib.Path(sys.argv[1]))
runner, dims = ReferenceRunner(artifact), Dims.of(artifact.manifest["dims"])
items = [decode_audio(path) for path in sys.argv[2:]]
audio = np.concatenate(items * 10)[: 40 * 60 * SAMPLE_RATE]  # 40 minutes of the shipped speech
# one sampled token per window: every window is encoded and decoded, quickly
options = DecodingOptions(max_new_tokens=1, long_form=True)
transcribe(runner, audio[: 60 * SAMPLE_RATE], dims, options)  # first-call allocations, before measuring
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = transcribe(runner, audio, dims, options)
growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(json.dumps({"kib": growth, "windows": out.n_windows, "steps": out.n_steps, "seconds": audio.size / SAMPLE_RATE}))
"""


@pytest.mark.slow  # minutes of real runs: the integration tier keeps to its 12-minute budget
def test_forty_minutes_decode_in_bounded_memory(reference_artifact, longform_utterances):
    """Every window of a 40-minute file (154 MB of audio) with peak memory growing by under 50 MB
    (11 MB measured here): whisper's whole-file log-mel in the same span grows it by 1.08 GB, and
    anything kept per window (features, caches) would pile up over 80 windows."""
    files = [str(LONGFORM / json.loads(line)["file_name"]) for line in (LONGFORM / "metadata.jsonl").open()]
    done = subprocess.run(
        [sys.executable, "-c", FORTY_MINUTES, str(reference_artifact.path), *files],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["seconds"] == 2400.0
    assert out["windows"] == out["steps"] == 80  # each window: 3000 frames, one decoder step
    assert out["kib"] < 50 * 1024, out


@pytest.mark.unit
def test_long_form_setting_is_validated(tmp_path):
    from harness.core.errors import HarnessError
    from harness.job.spec import load_job

    job = tmp_path / "job.yaml"
    for value, ok in (("auto", True), ("true", True), ("false", True), ("maybe", False), ("3", False)):
        job.write_text(f"name: j\ndataset: {{path: {LONGFORM}}}\ndecoding: {{long_form: {value}}}\n")
        if ok:
            assert load_job(job).decoding.long_form == {"auto": "auto", "true": True, "false": False}[value]
        else:
            with pytest.raises(HarnessError, match=r"decoding\.long_form: expected"):
                load_job(job)


@pytest.mark.slow
def test_base_reference_long_form_equals_whisper_transcribe(longform_utterances, models_root):
    """A multilingual size: its SOT sequence ends in language and task tokens, so P(no speech) at
    SOT takes a decoder call of its own; the tokens must still be whisper's."""
    import whisper

    from converters.reference_target import ReferenceRunner
    from converters.store import ensure
    from harness.core.longform import transcribe
    from harness.core.weights import load_model, resolve_checkpoint

    checkpoint = resolve_checkpoint("base")
    artifact, _ = ensure(checkpoint, "base", "reference", "fp32", models_root)
    utt = longform_utterances[0]
    ours = transcribe(ReferenceRunner(artifact), utt.audio, Dims.of(artifact.manifest["dims"]), DecodingOptions())
    theirs = whisper.transcribe(
        load_model(checkpoint), utt.audio, temperature=0.0, condition_on_previous_text=True, fp16=False, language="en"
    )
    assert list(ours.tokens) == [t for segment in theirs["segments"] for t in segment["tokens"]]
    assert ours.n_windows > 1
