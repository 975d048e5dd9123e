"""Languages: detection on every runner (against openai-whisper's own `detect_language`), `auto`
and `translate` (against `whisper.decode`), a dataset's language column, the English-only
refusal, and per-language scoring (normaliser, CER headline) checked by hand and with jiwer.

The machinery runs here on the shipped English LibriSpeech audio (detection must say English,
with high probability); the real recordings in 11 languages of `data/multilingual/` are held to
openai-whisper in `tests/test_multilingual.py`."""

from __future__ import annotations

from pathlib import Path

import jiwer
import numpy as np
import pandas as pd
import pytest
import torch

from harness.core.audio import log_mel
from harness.core.decoding import AUTO, DecodingOptions, Dims, detect_language
from harness.core.errors import HarnessError
from harness.core.longform import transcribe
from harness.job.spec import load_job
from harness.results.run_dir import raw_frame
from harness.results.schema import RAW_COLUMNS
from harness.results.scoring import CER_LANGUAGES, headline, normalize, score_rows
from harness.results.summary import summarize
from tests.conftest import language_folder

ROOT = Path(__file__).resolve().parents[1]
CLIPS = ("1089-134686-0001", "1089-134691-0000", "1089-134691-0001")  # three short test-clean clips


def _job(tmp_path: Path, decoding: str, sizes: str = "[tiny.en]", dataset: str = "") -> Path:
    job = tmp_path / "job.yaml"
    job.write_text(
        f"name: lang\ndataset: {{path: {ROOT / 'data' / 'librispeech-eval'}{dataset}}}\n"
        f"models: {{sizes: {sizes}}}\ndecoding: {decoding}\n"
    )
    return job


@pytest.mark.unit
@pytest.mark.parametrize(
    ("decoding", "line"),
    [
        ("{language: auto}", "decoding.language: tiny.en is English-only: it cannot take language auto"),
        ("{language: de}", "decoding.language: tiny.en is English-only: it cannot take language 'de'"),
        ("{task: translate}", "decoding.task: tiny.en is English-only: it cannot take task 'translate'"),
    ],
)
def test_english_only_sizes_refuse_other_languages_at_validation(tmp_path, decoding, line):
    with pytest.raises(HarnessError) as exc:
        load_job(_job(tmp_path, decoding))
    assert line in str(exc.value) and "\n" not in str(exc.value)
    load_job(_job(tmp_path, decoding, sizes="[base]"))  # the multilingual size takes it


@pytest.mark.unit
def test_language_values(tmp_path):
    assert load_job(_job(tmp_path, "{language: German}", sizes="[base]")).decoding.language == "de"
    assert load_job(_job(tmp_path, "{language: auto}", sizes="[base]")).decoding.language == AUTO
    with pytest.raises(HarnessError, match=r"decoding\.language: unknown language 'klingon'; or auto"):
        load_job(_job(tmp_path, "{language: klingon}", sizes="[base]"))
    with pytest.raises(HarnessError, match=r"decoding\.language: expected str, got None"):
        load_job(_job(tmp_path, "{language: null}", sizes="[base]"))
    column = ", language_column: lang"
    with pytest.raises(HarnessError, match=r"decoding\.language: 'fr' and dataset\.language_column 'lang' both"):
        load_job(_job(tmp_path, "{language: fr}", sizes="[base]", dataset=column))
    spec = load_job(_job(tmp_path, "{language: auto}", sizes="[base]", dataset=column))
    assert spec.datasets[0].language_column == "lang"


def test_language_column_is_read_and_checked(tmp_path):
    """Each utterance's language, as whisper's code; an unknown or missing one is refused (an
    error row), a missing column before anything runs."""
    from harness.job.spec import DatasetSpec
    from harness.run.dataset import check_dataset, count_rows, plan_shards, read_shard

    language_folder(tmp_path, ["en", "English", "xx", None])
    spec = DatasetSpec(path=tmp_path, language_column="lang")
    check = check_dataset(spec)
    assert len(check.unreadable) == 2 and "language 'xx' in column 'lang'" in check.unreadable[0]
    (shard,) = plan_shards(count_rows(spec), 10)
    utts = read_shard(spec, shard)
    assert [u.language for u in utts[:2]] == ["en", "en"] and all(u.audio is not None for u in utts[:2])
    assert utts[2].audio is None and "not a language Whisper knows" in utts[2].error
    assert utts[3].audio is None and "language None" in utts[3].error
    with pytest.raises(HarnessError, match=r"missing column\(s\) \['language'\]"):
        check_dataset(DatasetSpec(path=tmp_path, language_column="language"))


@pytest.mark.unit
def test_normalisers_and_headline_by_hand():
    from whisper.normalizers import BasicTextNormalizer, EnglishTextNormalizer

    assert normalize("Hola, ¿qué tal?", "es") == "hola qué tal" == BasicTextNormalizer()("Hola, ¿qué tal?").strip()
    assert normalize("こんにちは、世界。", "ja") == "こ ん に ち は 世 界"  # a grapheme per "word"
    english = "Mr. Smith's two cats"  # English keeps its own normaliser (abbreviations, numbers)
    assert normalize(english, "en") == EnglishTextNormalizer()(english) == "mister smith is 2 cats"
    assert {headline(c) for c in ("zh", "ja", "th")} == {"cer"} and headline("de") == headline("en") == "wer"
    assert {"zh", "yue", "ja", "th", "lo", "my", "km"} <= CER_LANGUAGES and "ko" not in CER_LANGUAGES


def _raw(model: str, rows: list[tuple], detected: list[str | None]) -> list[dict]:
    target, quant = model.split("/")
    out = []
    for (utt, ref, hyp, language, task, ref_language), det in zip(rows, detected, strict=True):
        values = dict.fromkeys(RAW_COLUMNS)
        values.update(
            size="base", target=target, quant=quant, audio_ctx=1500, utt_id=utt, ref_text=ref, hyp_text=hyp,
            hyp_tokens=[1, 2], audio_s=1.0, frontend_ms=1.0, encode_ms=1.0, decode_ms=1.0, n_steps=3,
            n_windows=1, language=language, task=task, ref_language=ref_language, detected_language=det,
            language_prob=0.9, status="ok", attempt=0,
        )  # fmt: skip
        out.append(values)
    return out


@pytest.mark.unit
def test_scoring_by_language_equals_jiwer_by_hand():
    """Each utterance by its language's rules: the dataset's language first, else the reference's;
    translations in English. CER languages count grapheme errors (spaces never count); the summary
    names the languages and the headline; language agreement is the share of equal detections."""
    reference = [
        ("u1", "今天天气很好。", "今天天气很好", "zh", "transcribe", None),
        ("u2", "Das ist gut.", "Das ist gut", "de", "transcribe", None),
        ("u3", "Hola, mundo.", "hola mundo", "es", "transcribe", "es"),
    ]
    model = [
        ("u1", "今天天气很好。", "今天天汽好", "ja", "transcribe", None),  # decoded as ja: scored as zh
        ("u2", "Das ist gut.", "Das is gut!", "de", "transcribe", None),
        ("u3", "Hola, mundo.", "ola mundo", "fr", "transcribe", "es"),  # the column wins
    ]
    raw = raw_frame(
        _raw("reference/fp32", reference, ["zh", "de", "es"]) + _raw("onnx/fp32", model, ["ja", "de", "es"])
    )
    utts = score_rows(raw.assign(run_id="r"))
    rows = utts[utts["target"] == "onnx"].set_index("utt_id")
    assert list(rows["scoring_language"]) == ["zh", "de", "es"]
    # zh: 6 reference characters, 今天天汽好 against 今天天气很好: one substitution, one deletion
    assert (rows.loc["u1", "cer_errors"], rows.loc["u1", "ref_chars"]) == (2, 6)
    assert jiwer.cer("今天天气很好", "今天天汽好") == 2 / 6
    assert rows.loc["u1", "wer_errors"] == 2  # its words are characters
    # de, es: words of BasicTextNormalizer's text, characters with jiwer
    assert rows.loc["u2", "wer_errors"] == 1 and rows.loc["u2", "ref_words"] == 3
    assert rows.loc["u2", "cer_errors"] == round(jiwer.cer("das ist gut", "das is gut") * len("das ist gut"))
    assert rows.loc["u3", "wer_errors"] == 1
    assert list(rows["language_match"]) == [False, True, True]
    summary = summarize(utts).set_index("target")
    assert summary.loc["onnx", "language"] == "de+es+zh" and summary.loc["onnx", "headline"] == "wer+cer"
    assert summary.loc["onnx", "lang_agreement"] == pytest.approx(2 / 3)
    assert summary.loc["reference", "lang_agreement"] == 1.0
    # a translation's output is English, scored by the English rules, whatever it was spoken in
    translated = raw_frame(
        _raw("reference/fp32", [("u4", "Mr. Smith", "Mister Smith", "de", "translate", "de")], ["de"])
    )
    assert score_rows(translated.assign(run_id="r"))["scoring_language"].tolist() == ["en"]
    only_zh = summarize(utts[utts["utt_id"] == "u1"]).set_index("target")
    assert only_zh.loc["onnx", "headline"] == "cer"


@pytest.fixture(scope="module")
def base(embedded_utterances, models_root):
    """base's reference runner, openai-whisper's own model, its dims and three short clips."""
    from converters.reference_target import ReferenceRunner
    from converters.store import ensure
    from harness.core.weights import load_model, resolve_checkpoint

    torch.set_num_threads(1)
    checkpoint = resolve_checkpoint("base")
    artifact, _ = ensure(checkpoint, "base", "reference", "fp32", models_root)
    clips = [u for u in embedded_utterances if u.utt_id in CLIPS]
    return {
        "checkpoint": checkpoint,
        "runner": ReferenceRunner(artifact),
        "model": load_model(checkpoint),
        "dims": Dims.of(artifact.manifest["dims"]),
        "clips": clips,
    }


def _whisper_detection(model, audio: np.ndarray, dims: Dims) -> tuple[str, float]:
    """openai-whisper's own `Whisper.detect_language` on the clip's mel: the independent path."""
    with torch.inference_mode():
        _, probs = model.detect_language(torch.from_numpy(log_mel(audio, dims.n_mels)))
    language = max(probs[0], key=probs[0].get)
    return language, probs[0][language]


@pytest.mark.slow
def test_detection_agrees_with_openai_whisper(base, models_root):
    """The one shared detection, run by the reference and a converted target with its own decoder
    (TorchScript's step), and CTranslate2's own detection (its step masks the language tokens:
    checked), against whisper's `detect_language`."""
    from converters.registry import get_target
    from converters.store import ensure

    runners = {"reference": base["runner"]}
    for target in ("torchscript", "ctranslate2"):
        artifact, _ = ensure(base["checkpoint"], "base", target, "fp32", models_root)
        runners[target] = get_target(target).runner(artifact)
    for clip in base["clips"]:
        language, probability = _whisper_detection(base["model"], clip.audio, base["dims"])
        assert language == "en" and probability > 0.9, clip.utt_id  # English audio, with high probability
        mel = log_mel(clip.audio, base["dims"].n_mels)
        for name, runner in runners.items():
            features = runner.encode(mel)
            ours = detect_language(runner, features, base["dims"])
            assert ours.language == language, (name, clip.utt_id)
            assert ours.probability == pytest.approx(probability, abs=1e-5 if name == "reference" else 1e-3)
        sot_logits, _ = runners["ctranslate2"].step([50258], runners["ctranslate2"].encode(mel), None)
        assert len(set(sot_logits[50259:50358].tolist())) == 1  # why CTranslate2 detects by its own means


@pytest.mark.slow
def test_auto_and_translate_equal_whisper_decode(base):
    """`language: auto` decodes in the detected language and `task: translate` translates, token
    for token as whisper.decode(language=None) does; English translated is English."""
    import whisper

    for clip in base["clips"]:
        mel = torch.from_numpy(log_mel(clip.audio, base["dims"].n_mels)[0])
        for task in ("transcribe", "translate"):
            ours = transcribe(base["runner"], clip.audio, base["dims"], DecodingOptions(language=AUTO, task=task))
            options = whisper.DecodingOptions(language=None, task=task, without_timestamps=True, fp16=False)
            theirs = whisper.decode(base["model"], mel, options)
            assert (list(ours.tokens), ours.language) == (theirs.tokens, theirs.language), (clip.utt_id, task)
            assert ours.detection is not None and ours.detection.language == "en"
            assert jiwer.wer(normalize(clip.text), normalize(theirs.text)) < 0.35, theirs.text
        fixed = transcribe(base["runner"], clip.audio, base["dims"], DecodingOptions(language="en"))
        assert fixed.detection == ours.detection and fixed.n_steps + 1 == ours.n_steps  # auto's detection step


def test_english_only_model_records_no_detection(reference, tiny_dims, embedded_utterances):
    out = transcribe(reference, embedded_utterances[0].audio, tiny_dims, DecodingOptions())
    assert out.costs()["language"] == "en" and out.detection is None
    assert pd.isna(out.costs()["detected_language"])


@pytest.mark.slow
def test_long_form_auto_equals_whisper_transcribe(base):
    """Long form detects once, on the file's first window, as whisper.transcribe(language=None)."""
    import whisper

    from harness.job.spec import DatasetSpec
    from harness.run.dataset import Shard, read_shard

    (utt,) = read_shard(DatasetSpec(path=ROOT / "data" / "librispeech-longform"), Shard(0, 0, 1))
    ours = transcribe(base["runner"], utt.audio, base["dims"], DecodingOptions(language=AUTO))
    theirs = whisper.transcribe(base["model"], utt.audio, temperature=0.0, condition_on_previous_text=True, fp16=False)
    assert list(ours.tokens) == [t for segment in theirs["segments"] for t in segment["tokens"]]
    assert ours.language == theirs["language"] == "en" and ours.n_windows > 1


def test_the_written_out_language_tables_are_whispers_own():
    """harness.core.languages spells whisper's tables out so that a job's language is checked
    without torch: they must not drift from the installed openai-whisper."""
    from whisper.tokenizer import LANGUAGES, TO_LANGUAGE_CODE

    from harness.core import languages

    assert languages.LANGUAGES == LANGUAGES and languages.TO_LANGUAGE_CODE == TO_LANGUAGE_CODE
