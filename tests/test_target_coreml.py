"""`coreml` on real tiny.en: the ANE-form PyTorch model, its Core ML conversion, and the parity gate.

Core ML predicts only on macOS; elsewhere these tests check the converted packages' structure and
the ANE-form graph in PyTorch, and the Core ML runtime test runs on a Mac only.
"""

from __future__ import annotations

import platform
import time
import zipfile

import numpy as np
import pytest
import torch
from torch import nn

from converters import parity
from converters.coreml_target import DECODER, ENCODER, runtime_unavailable
from converters.forms.ane_host import TorchAneRunner
from converters.forms.ane_model import ANE_MAX_DIM, LayerNormANE, WhisperANE, from_whisper, vocab_chunks
from converters.registry import get_target
from converters.store import ensure
from harness.core.decoding import DecodingOptions, Dims, build_prompt, greedy_decode
from harness.job.spec import DatasetSpec, JobSpec, ModelsSpec
from tests.conftest import EMBEDDED

ON_MAC = platform.system() == "Darwin"


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # the machine is shared: one core per test process


@pytest.fixture(scope="module")
def whisper_model(tiny_checkpoint):
    from harness.core.weights import load_model

    return load_model(tiny_checkpoint)


@pytest.fixture(scope="module")
def dims(whisper_model) -> Dims:
    return Dims.of(whisper_model.dims)


@pytest.fixture(scope="module")
def reference_runner(tiny_checkpoint, models_root):
    from converters.reference_target import ReferenceRunner as Runner

    return Runner(ensure(tiny_checkpoint, "tiny.en", "reference", "fp32", models_root)[0])


@pytest.fixture(scope="module")
def coreml_fp32(tiny_checkpoint, models_root):
    return ensure(tiny_checkpoint, "tiny.en", "coreml", "fp32", models_root)[0]


def _decode_all(runner, utterances, dims):
    prompt = build_prompt(dims, DecodingOptions())
    return {u.utt_id: greedy_decode(runner, u.audio, dims, prompt) for u in utterances}


def _undo_layer_norm_correction(ane: WhisperANE, whisper_model) -> WhisperANE:
    """The classic porting bug: nn.LayerNorm's bias loaded as is into a bias-before-scale LayerNorm."""
    originals = dict(whisper_model.named_modules())
    with torch.no_grad():
        for name, module in ane.named_modules():
            if isinstance(module, LayerNormANE):
                module.bias.copy_(originals[name].bias)
    return ane


# -- the ANE form in PyTorch --------------------------------------------------------------------


def test_layer_norm_ane_equals_nn_layer_norm_on_the_transposed_layout():
    torch.manual_seed(0)
    ln = nn.LayerNorm(384)
    with torch.no_grad():
        ln.weight.normal_(1.0, 0.5)
        ln.bias.normal_(0.0, 1.0)
    ane = LayerNormANE(384)
    ane.load_state_dict(ln.state_dict())  # the load hook divides the bias by the weight
    x = torch.randn(2, 7, 384) * 3 + 1  # [B, S, C]
    bc1s = x.transpose(1, 2).unsqueeze(2)  # [B, C, 1, S]
    with torch.no_grad():
        torch.testing.assert_close(ane(bc1s).squeeze(2).transpose(1, 2), ln(x), atol=2e-5, rtol=1e-5)
        uncorrected = LayerNormANE(384)
        uncorrected.weight.copy_(ln.weight)
        uncorrected.bias.copy_(ln.bias)
        assert (uncorrected(bc1s).squeeze(2).transpose(1, 2) - ln(x)).abs().max() > 0.5


def test_layer_norm_ane_survives_float16_outliers():
    """tiny.en's last encoder block emits 628 before ln_post: a naive float16 variance overflows."""
    torch.manual_seed(0)
    ane = LayerNormANE(384)
    x = torch.randn(1, 384, 1, 5)
    x[0, 7, 0, :] = 628.0
    with torch.no_grad():
        full = ane(x)
        half = ane.half()(x.half()).float()
    assert torch.isfinite(half).all()
    assert parity.snr_db(full.numpy(), half.numpy()) > 50


def test_vocab_projection_is_chunked_within_the_ane_limit(whisper_model):
    heads = from_whisper(whisper_model).decoder.vocab_heads
    sizes = [h.out_channels for h in heads]
    assert len(heads) == vocab_chunks(51864) == 12 and max(sizes) <= ANE_MAX_DIM and sum(sizes) == 51864
    tied = torch.cat([h.weight[:, :, 0, 0] for h in heads])
    assert torch.equal(tied, whisper_model.decoder.token_embedding.weight)
    # multilingual vocabularies: 11 chunks (a small model with that vocabulary is enough to see it)
    from whisper.model import ModelDimensions

    small = ModelDimensions(
        n_mels=80, n_audio_ctx=1500, n_audio_state=8, n_audio_head=2, n_audio_layer=1,
        n_vocab=51865, n_text_ctx=448, n_text_state=8, n_text_head=2, n_text_layer=1,
    )  # fmt: skip
    multi = WhisperANE(small).decoder.vocab_heads
    assert len(multi) == 11 and {h.out_channels for h in multi} == {4715}


def test_ane_form_matches_the_reference_at_every_prompt_position(whisper_model, reference_runner, dims):
    """The static-shape decoder fed token by token gives the reference's logits at each length."""
    runner = TorchAneRunner(from_whisper(whisper_model))
    mel = np.zeros((1, dims.n_mels, 3000), dtype=np.float32)
    tokens = [*build_prompt(dims, DecodingOptions()).tokens, 440, 3290, 286, 257, 1332, 13]
    ref_features, features = reference_runner.encode(mel), runner.encode(mel)
    assert parity.snr_db(np.asarray(ref_features), np.asarray(features)) > 60
    ref_cache = cache = None
    for n in range(2, len(tokens) + 1):
        ref_logits, ref_cache = reference_runner.step(tokens[:n], ref_features, ref_cache)
        logits, cache = runner.step(tokens[:n], features, cache)
        assert cache.length == n and np.max(np.abs(ref_logits - logits)) < 1e-2


def test_broken_ane_model_fails_the_gate(whisper_model, reference_runner, dims):
    broken = _undo_layer_norm_correction(from_whisper(whisper_model), whisper_model)
    numbers = parity.measure(reference_runner, TorchAneRunner(broken), dims, build_prompt(dims, DecodingOptions()))
    failures = parity.gate(get_target("coreml").tolerance("fp32"), numbers)
    assert any("encoder SNR" in f for f in failures) and any("logits max abs err" in f for f in failures)


# -- conversion and the store -------------------------------------------------------------------


def test_conversion_writes_two_mlpackages_and_their_io(coreml_fp32, tiny_checkpoint, tmp_path):
    import coremltools as ct

    m = coreml_fp32.manifest
    assert m["source"]["sha256"] == tiny_checkpoint.sha256 and m["toolchain"]["coremltools"] != "absent"
    assert set(m["files"]) == {ENCODER, DECODER}
    assert m["status"] == "ok" and m["parity_failures"] == []
    assert m["compute_precision"] == "float32" and m["vocab_chunks"] == 12
    io = m["io"]
    assert io[ENCODER]["inputs"] == {"mel": [1, 80, 3000]}
    assert io[ENCODER]["outputs"] == {
        "audio_features": [1, 384, 1, 1500],
        "cross_k": [4, 384, 1, 1500],
        "cross_v": [4, 384, 1, 1500],
    }
    assert io[DECODER]["inputs"]["self_k"] == [4, 384, 1, 448] and io[DECODER]["inputs"]["token"] == [1]
    assert io[DECODER]["outputs"] == {"logits": [1, 51864], "new_k": [4, 384, 1, 1], "new_v": [4, 384, 1, 1]}
    assert io[DECODER]["dtypes"]["token"] == "int32" and io[DECODER]["dtypes"]["logits"] == "float32"
    for name in (ENCODER, DECODER):
        with zipfile.ZipFile(coreml_fp32.file(name)) as z:
            assert f"{name.removesuffix('.zip')}/Manifest.json" in z.namelist()
            z.extractall(tmp_path)
        # the spec (not the compiled model, which needs macOS) states the same names and shapes
        spec = ct.models.MLModel(str(tmp_path / name.removesuffix(".zip")), skip_model_load=True).get_spec()
        assert {f.name: list(f.type.multiArrayType.shape) for f in spec.description.input} == io[name]["inputs"]
        assert spec.WhichOneof("Type") == "mlProgram"


def _pytorch_parity(manifest: dict) -> dict:
    # on macOS the store measures "parity" in Core ML and the PyTorch numbers are kept beside it
    return manifest.get("pytorch_parity", manifest["parity"])


def test_parity_was_measured_on_the_ane_form_in_pytorch(coreml_fp32):
    p = _pytorch_parity(coreml_fp32.manifest)
    assert "PyTorch" in p["runtime"] and "float32" in p["runtime"]
    assert p["encoder_snr_db"] > 60 and p["logits_max_abs_err"] < 1e-2 and p["top1_agreement"] == 1.0
    assert parity.gate(get_target("coreml").tolerance("fp32"), p) == []


@pytest.mark.skipif(ON_MAC, reason="Core ML runs on macOS")
def test_off_macos_the_job_reports_unavailable(coreml_fp32, models_root):
    from harness.run.execute import prepare_models

    reason = runtime_unavailable()
    assert reason is not None and "macOS" in reason
    spec = JobSpec(
        name="coreml-off-mac",
        datasets=(DatasetSpec(path=EMBEDDED),),
        models=ModelsSpec(sizes=("tiny.en",), targets=(("coreml", ("fp32",)),)),
    )
    status = {p.cell.target: p.prepared.describe() for p in prepare_models(spec, models_root, log=lambda *a: None)}
    assert status["reference"] == "reused"
    assert status["coreml"] == f"unavailable: {reason} (artifact reused)"  # the text of the rows for this model


@pytest.mark.skipif(ON_MAC, reason="Core ML runs on macOS")
def test_off_macos_the_summary_says_why(coreml_fp32, models_root, ray_local, tmp_path):
    from harness.results.summary import format_summary
    from harness.run.execute import run_job

    spec = JobSpec(
        name="coreml-off-mac",
        datasets=(DatasetSpec(path=EMBEDDED, limit=2),),
        models=ModelsSpec(sizes=("tiny.en",), targets=(("coreml", ("fp32",)),)),
    )
    summary = run_job(spec, tmp_path, models_root, progress=False, log=lambda *a: None).summary
    assert list(summary["target"]) == ["reference", "coreml"]  # the job's order
    reason = f"{runtime_unavailable()} (artifact reused)"
    assert list(summary["status"]) == ["ok", "unavailable"] and list(summary["reason"]) == ["", reason]
    assert list(summary["errors"]) == [0, 2]
    table = format_summary(summary)
    assert f"- tiny.en/coreml/fp32: unavailable: {reason}" in table.splitlines()
    assert "| unavailable |" in table.splitlines()[3].replace("  ", "")


@pytest.mark.slow
def test_fp16_build_passes_its_gate(tiny_checkpoint, models_root, coreml_fp32):
    art = ensure(tiny_checkpoint, "tiny.en", "coreml", "fp16", models_root)[0]
    m = art.manifest
    assert m["status"] == "ok" and m["compute_precision"] == "float16"
    assert "float16" in _pytorch_parity(m)["runtime"] and m["parity"]["encoder_snr_db"] > 40
    # float16 weights: about half the bytes of the fp32 packages
    fp32_bytes = sum(f["bytes"] for f in coreml_fp32.manifest["files"].values())
    assert sum(f["bytes"] for f in m["files"].values()) < 0.6 * fp32_bytes
    print(f"\ncoreml fp16 parity: {m['parity']}")


# -- decoding the embedded utterances -----------------------------------------------------------


@pytest.fixture(scope="module")
def reference_decoded(reference_runner, embedded_utterances, dims):
    return _decode_all(reference_runner, embedded_utterances, dims)


def _agreement(decoded, reference_decoded) -> float:
    return sum(decoded[u].tokens == reference_decoded[u].tokens for u in decoded) / len(decoded)


@pytest.mark.slow
def test_ane_form_decodes_all_utterances_like_the_reference(
    whisper_model, reference_decoded, embedded_utterances, dims
):
    started = time.perf_counter()
    decoded = _decode_all(TorchAneRunner(from_whisper(whisper_model)), embedded_utterances, dims)
    ms = (time.perf_counter() - started) * 1e3 / len(decoded)
    exact = _agreement(decoded, reference_decoded)
    print(f"\nANE form fp32 in PyTorch: {exact:.1%} exact over {len(decoded)} utterances, {ms:.0f} ms/utterance")
    assert len(decoded) == 70 and exact >= 0.95


@pytest.mark.slow
def test_ane_form_float16_decodes_like_the_reference(whisper_model, reference_decoded, embedded_utterances, dims):
    """Without native float16 arithmetic, PyTorch's float16 CPU kernels run ~20x slower than float32
    (~20 s per utterance on an AVX-512 EPYC without FP16): a subset of the utterances."""
    subset = embedded_utterances[:8]
    started = time.perf_counter()
    decoded = _decode_all(TorchAneRunner(from_whisper(whisper_model), torch.float16), subset, dims)
    ms = (time.perf_counter() - started) * 1e3 / len(decoded)
    exact = _agreement(decoded, reference_decoded)
    print(f"\nANE form fp16 in PyTorch: {exact:.1%} exact over {len(decoded)} utterances, {ms:.0f} ms/utterance")
    assert exact >= 0.75


@pytest.mark.slow
@pytest.mark.skipif(not ON_MAC, reason="Core ML predicts only on macOS")
@pytest.mark.parametrize("quant, minimum", [("fp32", 0.95), ("fp16", 0.8)])
def test_core_ml_decodes_like_the_reference(
    quant, minimum, tiny_checkpoint, models_root, reference_decoded, embedded_utterances, dims
):
    from converters.coreml_target import CoreMLRunner as Runner

    art = ensure(tiny_checkpoint, "tiny.en", "coreml", quant, models_root)[0]
    assert art.manifest["status"] == "ok"
    decoded = _decode_all(Runner(art), embedded_utterances, dims)
    exact = _agreement(decoded, reference_decoded)
    print(f"\nCore ML {quant}: {exact:.1%} exact over {len(decoded)} utterances")
    assert exact >= minimum
