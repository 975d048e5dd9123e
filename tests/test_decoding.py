"""The shared greedy loop: the reference must reproduce `whisper.decode` token for token."""

from __future__ import annotations

import pandas as pd
import pytest

from harness.core.decoding import DecodingOptions, Dims, build_prompt, greedy_decode
from tests.conftest import TINY_RUN, decode_with_whisper


def test_reference_tokens_in_a_run_equal_whisper_decode(tiny_run, whisper_decoded):
    """The harness's reference, through the whole run (workers, the shared loop, the rows), gives
    `whisper.decode`'s tokens on every utterance of the run."""
    utts = pd.read_parquet(tiny_run.run_dir / "utterances.parquet")
    reference = utts[utts["target"] == "reference"]
    assert len(reference) == len(whisper_decoded) == TINY_RUN
    mismatched = [
        u
        for u, tokens in zip(reference["utt_id"], reference["hyp_tokens"], strict=True)
        if list(tokens) != whisper_decoded[u].tokens
    ]
    assert mismatched == []


@pytest.mark.slow
def test_reference_tokens_equal_whisper_decode_on_every_embedded_utterance(
    tiny_checkpoint, tiny_artifacts, tiny_dims, embedded_utterances
):
    from converters.reference_target import ReferenceRunner

    expected = decode_with_whisper(tiny_checkpoint, embedded_utterances, tiny_dims)
    runner = ReferenceRunner(tiny_artifacts["reference"])
    prompt = build_prompt(tiny_dims, DecodingOptions())
    mismatched = [
        utt.utt_id
        for utt in embedded_utterances
        if list(greedy_decode(runner, utt.audio, tiny_dims, prompt).tokens) != expected[utt.utt_id].tokens
    ]
    assert len(embedded_utterances) == 70
    assert mismatched == []


def test_prompt_english_only_and_multilingual():
    from whisper.tokenizer import get_tokenizer

    en = build_prompt(Dims(80, 51864, 448), DecodingOptions())
    tok_en = get_tokenizer(False)
    assert en.tokens == (tok_en.sot, tok_en.no_timestamps)
    multi = build_prompt(Dims(80, 51865, 448), DecodingOptions(language="de", task="translate", max_new_tokens=20))
    tok = get_tokenizer(True, num_languages=99, language="de", task="translate")
    assert multi.tokens == (tok.sot, tok.to_language_token("de"), tok.translate, tok.no_timestamps)
    assert multi.max_new_tokens == 20 and en.max_new_tokens == 224
    assert tok.eot in multi.suppress_at_begin and tok.sot in multi.suppress and tok.no_speech in multi.suppress


def test_large_v3_prompt_counts_its_extra_language():
    # large-v3 has 100 languages (n_vocab 51866): the task tokens move by one
    from whisper.tokenizer import get_tokenizer

    prompt = build_prompt(Dims(128, 51866, 448), DecodingOptions())
    tok = get_tokenizer(True, num_languages=100, language="en", task="transcribe")
    assert prompt.tokens == tuple(tok.sot_sequence_including_notimestamps)


@pytest.mark.parametrize("max_new", [1, 3])
def test_max_new_tokens_bounds_the_loop(tiny_artifacts, tiny_dims, embedded_utterances, max_new):
    from converters.reference_target import ReferenceRunner as Runner

    prompt = build_prompt(tiny_dims, DecodingOptions(max_new_tokens=max_new))
    out = greedy_decode(Runner(tiny_artifacts["reference"]), embedded_utterances[0].audio, tiny_dims, prompt)
    assert out.n_steps == max_new and len(out.tokens) == max_new


@pytest.mark.slow
def test_base_reference_tokens_equal_whisper_decode(embedded_utterances, models_root):
    """The main job's size: the same check with base weights."""
    import torch
    import whisper

    from converters.reference_target import ReferenceRunner as Runner
    from converters.store import ensure
    from harness.core.audio import log_mel
    from harness.core.weights import load_model, resolve_checkpoint

    checkpoint = resolve_checkpoint("base")
    artifact, _ = ensure(checkpoint, "base", "reference", "fp32", models_root)
    d = artifact.manifest["dims"]
    dims = Dims(d["n_mels"], d["n_vocab"], d["n_text_ctx"])
    runner, model = Runner(artifact), load_model(checkpoint)
    prompt = build_prompt(dims, DecodingOptions())
    options = whisper.DecodingOptions(language="en", without_timestamps=True, fp16=False)
    mismatched = []
    for utt in embedded_utterances:
        ours = list(greedy_decode(runner, utt.audio, dims, prompt).tokens)
        theirs = whisper.decode(model, torch.from_numpy(log_mel(utt.audio, dims.n_mels)[0]), options).tokens
        if ours != theirs:
            mismatched.append(utt.utt_id)
    assert mismatched == []
