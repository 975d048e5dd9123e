"""The `transformers` target: HF WhisperForConditionalGeneration from the tiny.en weights."""

from __future__ import annotations

import json

import numpy as np
import pytest

from converters import parity
from converters.registry import get_target
from converters.store import MANIFEST, ensure, load_artifact
from harness.core.decoding import DecodingOptions, build_prompt, greedy_decode
from tests.conftest import broken_copy, check_unavailable_without, with_noise

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_artifact(tiny_checkpoint, models_root):
    return ensure(tiny_checkpoint, "tiny.en", "transformers", "fp32", models_root)[0]


@pytest.fixture(scope="module")
def hf_runner(hf_artifact):
    from converters.transformers_target import TransformersRunner as Runner

    return Runner(hf_artifact)


def test_build_records_files_io_toolchain_and_parity(hf_artifact, tiny_checkpoint):
    m = hf_artifact.manifest
    assert m["status"] == "ok" and m["parity_failures"] == []
    assert set(m["files"]) == {"model.safetensors", "config.json", "generation_config.json"}
    assert {"transformers", "safetensors"} <= set(m["toolchain"]) and m["source"]["sha256"] == tiny_checkpoint.sha256
    assert m["io"]["model.safetensors"]["encoder"]["inputs"]["input_features"] == [1, 80, 3000]
    p = m["parity"]
    assert p["encoder_snr_db"] >= 80 and p["logits_max_abs_err"] < 1e-3 and p["top1_agreement"] == 1.0


def test_config_follows_the_checkpoint_and_the_decoding_rules(hf_artifact, tiny_dims):
    config = json.loads(hf_artifact.file("config.json").read_text())
    generation = json.loads(hf_artifact.file("generation_config.json").read_text())
    d = hf_artifact.manifest["dims"]
    assert (config["d_model"], config["encoder_layers"], config["decoder_attention_heads"]) == (
        d["n_audio_state"],
        d["n_audio_layer"],
        d["n_text_head"],
    )
    assert config["max_source_positions"] == d["n_audio_ctx"] and config["max_target_positions"] == d["n_text_ctx"]
    prompt = build_prompt(tiny_dims, DecodingOptions())
    assert generation["decoder_start_token_id"] == prompt.tokens[0] and generation["eos_token_id"] == prompt.eot
    assert generation["suppress_tokens"] == list(prompt.suppress)
    assert generation["begin_suppress_tokens"] == list(prompt.suppress_at_begin)
    assert "lang_to_id" not in generation  # English-only checkpoint


def test_hf_generate_reproduces_the_reference(hf_runner, reference, tiny_dims):
    """HF's own generate() under the saved configs (not the shared loop) = the reference's tokens."""
    import torch

    from harness.core.audio import decode_audio, log_mel

    audio = decode_audio(str(parity.PARITY_AUDIO))
    mel = torch.from_numpy(log_mel(audio, tiny_dims.n_mels))
    with torch.inference_mode():
        ours = hf_runner.model.generate(input_features=mel, num_beams=1, do_sample=False)[0].tolist()
    prompt = build_prompt(tiny_dims, DecodingOptions())
    assert ours == list(greedy_decode(reference, audio, tiny_dims, prompt).tokens)


def test_cached_steps_match_uncached_ones(hf_runner, tiny_dims):
    prompt = build_prompt(tiny_dims, DecodingOptions())
    mel = np.zeros((1, tiny_dims.n_mels, 3000), dtype=np.float32)
    features = hf_runner.encode(mel)
    tokens = [*prompt.tokens, 440, 3290, 286, 257]
    cache = None
    for n in range(len(prompt.tokens), len(tokens) + 1):
        cached, cache = hf_runner.step(tokens[:n], features, cache)
        fresh, _ = hf_runner.step(tokens[:n], features, None)
        assert np.max(np.abs(cached - fresh)) < 1e-4


def test_first_utterances_match_the_reference(hf_runner, reference, tiny_dims, embedded_utterances):
    prompt = build_prompt(tiny_dims, DecodingOptions())
    for utt in embedded_utterances[:2]:
        ours = greedy_decode(hf_runner, utt.audio, tiny_dims, prompt)
        theirs = greedy_decode(reference, utt.audio, tiny_dims, prompt)
        assert (ours.tokens, ours.n_steps) == (theirs.tokens, theirs.n_steps)


def test_perturbed_weights_fail_the_gate(hf_artifact, parity_of, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    from converters.transformers_target import TransformersRunner as Runner

    broken = broken_copy(hf_artifact, tmp_path)
    weights = load_file(broken / "model.safetensors")
    name = "model.decoder.embed_tokens.weight"  # also the LM head (tied)
    weights[name] = torch.from_numpy(with_noise(weights[name].numpy()))
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    manifest = json.loads((broken / MANIFEST).read_text())
    numbers = parity_of(Runner(load_artifact(broken)))
    assert any(
        "logits max abs err" in f
        for f in parity.gate(get_target(manifest["target"]).tolerance(manifest["quant"]), numbers)
    )


def test_missing_transformers_is_unavailable(monkeypatch, tiny_checkpoint, tmp_path):

    check_unavailable_without(
        "transformers", "transformers", "not installed: transformers", tiny_checkpoint, tmp_path, monkeypatch
    )


@pytest.mark.slow
def test_embedded_tokens_match_the_reference(hf_runner, exact_match, embedded_utterances):
    rate, ms = exact_match(hf_runner, embedded_utterances)
    print(f"transformers fp32: {rate:.1%} of utterances token-identical to the reference, {ms:.0f} ms/utt")
    assert rate >= 0.95


@pytest.mark.slow
def test_base_builds_and_matches_the_reference(embedded_utterances, models_root):
    """The main job's size, multilingual (a four-token prompt), on the first ten utterances."""
    from converters.reference_target import ReferenceRunner as Reference
    from converters.transformers_target import TransformersRunner as Runner
    from harness.core.decoding import Dims
    from harness.core.weights import resolve_checkpoint

    checkpoint = resolve_checkpoint("base")
    reference = ensure(checkpoint, "base", "reference", "fp32", models_root)[0]
    artifact = ensure(checkpoint, "base", "transformers", "fp32", models_root)[0]
    assert artifact.manifest["status"] == "ok"
    d = artifact.manifest["dims"]
    dims = Dims(d["n_mels"], d["n_vocab"], d["n_text_ctx"])
    prompt = build_prompt(dims, DecodingOptions())
    assert len(prompt.tokens) == 4
    ours, theirs = Runner(artifact), Reference(reference)
    for u in embedded_utterances[:10]:
        assert greedy_decode(ours, u.audio, dims, prompt).tokens == greedy_decode(theirs, u.audio, dims, prompt).tokens
