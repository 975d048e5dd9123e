"""The trimmed audio context (`decoding.audio_ctx`): the reference against openai-whisper with its
positional embedding sliced by hand, a fixed-shape target built for it (its own store key, parity
at the same context), validation, the refusal of audio longer than its window, and a real run
whose every table carries the setting (the history keyed on it, the gate never pairing 750 with
1500)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from converters.store import artifact_key, ensure
from harness.core.audio import log_mel
from harness.core.decoding import DecodingOptions, Dims, TooLong, build_prompt, greedy_decode
from harness.core.errors import HarnessError
from harness.core.longform import transcribe
from harness.core.window import N_FRAMES
from harness.job.spec import load_job
from tests.conftest import language_folder

ROOT = Path(__file__).resolve().parents[1]


def _at(dims: Dims, audio_ctx: int) -> Dims:
    return Dims(dims.n_mels, dims.n_vocab, dims.n_text_ctx, audio_ctx)


def test_reference_at_full_context_is_unchanged(reference, tiny_dims, embedded_utterances, reference_tokens):
    """The job's path at 1500 gives the tokens it always gave (whisper.decode's: test_decoding)."""
    assert tiny_dims.n_audio_ctx == 1500 and log_mel(embedded_utterances[0].audio, 80).shape[-1] == N_FRAMES
    for utt in embedded_utterances[:2]:
        assert transcribe(reference, utt.audio, tiny_dims, DecodingOptions()).tokens == reference_tokens(utt)


def test_reference_at_750_equals_whisper_with_its_embedding_sliced(
    tiny_checkpoint, reference, tiny_dims, embedded_utterances
):
    """openai-whisper's own model, positional embedding cut to 750 rows by hand, decoding the
    mel's first 1500 frames with whisper.decode: the independent path."""
    import whisper

    from harness.core.weights import load_model

    model = load_model(tiny_checkpoint)
    model.encoder.positional_embedding = model.encoder.positional_embedding[:750]
    options = whisper.DecodingOptions(language="en", without_timestamps=True, fp16=False)
    dims = _at(tiny_dims, 750)
    for utt in embedded_utterances[:2]:
        mel = whisper.log_mel_spectrogram(whisper.pad_or_trim(torch.from_numpy(utt.audio)))[:, :1500]
        theirs = whisper.decode(model, mel, options)
        ours = transcribe(reference, utt.audio, dims, DecodingOptions())
        assert list(ours.tokens) == theirs.tokens
        with torch.inference_mode():
            features = model.encoder(mel[None])
        assert torch.equal(reference.encode(log_mel(utt.audio, 80, 750)), features)


@pytest.fixture(scope="module")
def tflite_750(tiny_checkpoint, models_root):
    return ensure(tiny_checkpoint, "tiny.en", "tflite", "fp32", models_root, audio_ctx=750)[0]


def test_fixed_shape_target_built_for_750(tflite_750, tiny_checkpoint, reference, tiny_dims, embedded_utterances):
    """LiteRT's graphs have fixed shapes: an artifact for 750 has its own key and 1500-frame
    encoder, passed parity against the reference at 750, and decodes as the reference does there."""
    from converters.litert.runtime import Runner

    full_key, _ = artifact_key(tiny_checkpoint, "tflite", "fp32")
    key, recipe = artifact_key(tiny_checkpoint, "tflite", "fp32", 750)
    assert key == tflite_750.manifest["key"] != full_key and recipe["settings"]["audio_ctx"] == 750
    assert (
        artifact_key(tiny_checkpoint, "reference", "fp32", 750)[0]
        == artifact_key(tiny_checkpoint, "reference", "fp32")[0]
    )
    m = tflite_750.manifest
    assert m["dims"]["n_audio_ctx"] == 750 and m["io"]["encoder.tflite"]["inputs"]["mel"]["shape"] == [1, 80, 1500]
    assert m["status"] == "ok" and m["parity"]["top1_agreement"] == 1.0 and m["parity"]["encoder_snr_db"] > 80
    runner, dims = Runner(tflite_750), _at(tiny_dims, 750)
    prompt = build_prompt(dims, DecodingOptions())
    for utt in embedded_utterances[:2]:
        assert (
            greedy_decode(runner, utt.audio, dims, prompt).tokens
            == greedy_decode(reference, utt.audio, dims, prompt).tokens
        )


def test_audio_longer_than_the_window_is_refused_not_trimmed(reference, tiny_dims, embedded_utterances):
    long = next(u for u in embedded_utterances if u.audio_s > 15)
    with pytest.raises(
        TooLong,
        match=rf"audio is {long.audio_s:.1f} s, longer than the 15.0 s the encoder sees at decoding.audio_ctx 750",
    ):
        transcribe(reference, long.audio, _at(tiny_dims, 750), DecodingOptions())
    assert transcribe(reference, long.audio, _at(tiny_dims, 1000), DecodingOptions()).tokens


@pytest.mark.unit
@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("0", "decoding.audio_ctx: expected an audio context 1..1500 (or a list of them), got 0"),
        ("1501", "got 1501"),
        ("'750'", "got '750'"),
        ("[]", "got []"),
        ("[750, true]", "got [750, True]"),
        ("750, long_form: true", "decoding.long_form: true needs the full audio context (1500)"),
    ],
)
def test_audio_ctx_is_validated(tmp_path, value, problem):
    job = tmp_path / "job.yaml"
    job.write_text(
        f"name: ctx\ndataset: {{path: {ROOT / 'data' / 'librispeech-eval'}}}\ndecoding: {{audio_ctx: {value}}}\n"
    )
    with pytest.raises(HarnessError) as exc:
        load_job(job)
    assert problem in str(exc.value)


@pytest.mark.unit
def test_sweep_job_makes_a_model_per_context():
    spec = load_job(ROOT / "jobs" / "audio_ctx_sweep_base.yaml")
    labels = [c.label for c in spec.models.cells()]
    assert labels == [
        "base/reference/fp32", "base/tflite/fp32",
        "base/reference/fp32@ctx1000", "base/tflite/fp32@ctx1000",
        "base/reference/fp32@ctx750", "base/tflite/fp32@ctx750",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def sweep_run(tiny_artifacts, models_root, tmp_path_factory):
    """The sweep on tiny.en (reference and torchscript-mtk at 1500 and 750) over three utterances
    whose dataset names their languages: en, English and de (which English-only tiny.en refuses)."""
    from harness.run.execute import run_job
    from tests.conftest import embedded_ray

    embedded_ray()
    out = tmp_path_factory.mktemp("sweep")
    data = language_folder(tmp_path_factory.mktemp("data"), ["en", "English", "de"])
    job = out / "sweep.yaml"
    job.write_text(
        f"name: sweep\ndataset: {{path: {data}, language_column: lang}}\n"
        "models: {sizes: [tiny.en], targets: {torchscript-mtk: [fp32]}}\n"
        "decoding: {audio_ctx: [1500, 750]}\ncluster: {shard_size: 3}\n"
    )
    return run_job(load_job(job), out / "results", models_root, progress=False, log=lambda *_: None)


def test_every_table_carries_the_audio_context(sweep_run, tmp_path):
    from harness.nightly.history import History
    from harness.results.record import read_run

    summary = pd.read_csv(sweep_run.run_dir / "summary.csv")
    assert list(zip(summary["target"], summary["audio_ctx"], strict=True)) == [
        ("reference", 1500), ("torchscript-mtk", 1500), ("reference", 750), ("torchscript-mtk", 750)
    ]  # fmt: skip
    utts = pd.read_parquet(sweep_run.run_dir / "utterances.parquet")
    assert sorted(utts.groupby("audio_ctx").size().items()) == [(750, 6), (1500, 6)]
    raw = pd.concat(pd.read_parquet(f) for f in sorted((sweep_run.run_dir / "raw").glob("*.parquet")))
    assert "@ctx750" in " ".join(p.name for p in (sweep_run.run_dir / "raw").iterdir())
    assert set(raw["audio_ctx"]) == {750, 1500}
    # every row at 750 compared with the reference at 1500: its tokens are the divergence's reference
    full = utts[(utts["target"] == "reference") & (utts["audio_ctx"] == 1500)].set_index("utt_id")["hyp_tokens"]
    for _, row in utts[(utts["audio_ctx"] == 750) & (utts["status"] == "ok")].iterrows():
        assert list(row["reference_tokens"]) == list(full[row["utt_id"]])
    # the dataset's languages: decoded in English, the German one refused by English-only tiny.en
    german = utts["ref_language"] == "de"
    assert set(utts.loc[german, "status"]) == {"unavailable"}
    assert set(utts.loc[german, "error"]) == {"tiny.en is English-only: it cannot take language 'de'"}
    assert set(utts.loc[~german, "ref_language"]) == {"en"} and set(utts.loc[~german, "language"]) == {"en"}
    assert utts["detected_language"].isna().all() and set(utts["scoring_language"]) == {"en", "de"}
    assert list(summary["errors"]) == [1, 1, 1, 1]
    with History(str(tmp_path / "h.sqlite")) as history:  # the models table is keyed on audio_ctx
        history.add(read_run(sweep_run.run_dir))
        models = history.models(sweep_run.run_dir.name)
    assert sorted(zip(models["target"], models["audio_ctx"], strict=True)) == [
        ("reference", 750), ("reference", 1500), ("torchscript-mtk", 750), ("torchscript-mtk", 1500)
    ]  # fmt: skip


@pytest.mark.slow  # minutes of real runs: the integration tier keeps to its 12-minute budget
def test_a_model_at_750_is_never_gated_against_its_1500_baseline(nightly_run, tmp_path):
    """The same model at another audio context is another model: the baseline's is missing (a
    regression), the candidate's new (a note), never compared."""
    from harness.nightly.gate import compare
    from harness.nightly.history import History
    from harness.results.record import read_run
    from tests.nightly_runs import MTK, derive_run, of_model

    def at_750(raw: pd.DataFrame) -> pd.DataFrame:
        raw.loc[of_model(raw, MTK), "audio_ctx"] = 750
        return raw

    base, candidate = (
        derive_run(nightly_run["run_dir"], tmp_path, 1),
        derive_run(nightly_run["run_dir"], tmp_path, 2, at_750),
    )
    with History(str(tmp_path / "h.sqlite")) as history:
        for run_dir in (base, candidate):
            history.add(read_run(run_dir))
        checks = {c.model: c for c in compare(history, base.name, candidate.name).checks}
    assert checks["tiny.en/torchscript-mtk/fp32"].regressions[0].startswith("missing from the candidate")
    assert checks["tiny.en/torchscript-mtk/fp32@ctx750"].notes == ("new: not in the baseline",)
    assert checks["tiny.en/reference/fp32"].regressions == ()


@pytest.mark.slow
@pytest.mark.parametrize(
    "target", ["torchscript", "onnx", "torchscript-mtk", "transformers", "ctranslate2", "mtk", "coreml"]
)
def test_every_converted_target_is_built_for_750(target, tiny_checkpoint, models_root):
    """Each converted form at 750 (tflite: above): its own key, the trimmed dims, parity passed
    against the reference at 750 (Core ML's measured in PyTorch off macOS)."""
    artifact, _ = ensure(tiny_checkpoint, "tiny.en", target, "fp32", models_root, audio_ctx=750)
    assert artifact.manifest["key"] != artifact_key(tiny_checkpoint, target, "fp32")[0]
    assert artifact.manifest["dims"]["n_audio_ctx"] == 750 and artifact.manifest["status"] == "ok"
    assert artifact.manifest["parity"]["top1_agreement"] == 1.0
