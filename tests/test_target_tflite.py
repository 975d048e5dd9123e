"""The `tflite` target: LiteRT graphs from litert-torch with a static KV cache, on tiny.en.

Fast tier: the fp32 artifact through the store, and one quantized form (int8 dynamic range) made
by the real quantizer from its float graphs. Slow: every quantization through the store and the
70 embedded utterances decoded by each.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from converters import parity
from converters.litert import build as litert_build
from converters.litert import graphs as litert_graphs
from converters.litert import runtime as litert_runtime
from converters.registry import get_target
from converters.store import ensure, load_artifact, prepare
from harness.core.target import Artifact, Unavailable
from harness.run.dataset import calibration_source
from tests.conftest import broken_copy, check_cached_steps, with_noise

FILES = {litert_graphs.ENCODER, litert_graphs.CROSS_KV, litert_graphs.DECODER}
SUBSET = 5  # utterances the fast tier decodes against the reference


@pytest.fixture(scope="module")
def fp32(tiny_checkpoint, models_root):
    return ensure(tiny_checkpoint, "tiny.en", "tflite", "fp32", models_root)[0]


def quantized_copy(artifact: Artifact, quant: str, folder) -> Artifact:
    """`artifact`'s float graphs quantized in a copy, with the shared recipe (no re-conversion)."""
    shutil.copytree(artifact.path, folder)
    for name in FILES:
        litert_build.quantize(folder / name, quant, None)
    return Artifact(artifact.size, artifact.target, quant, folder, {**artifact.manifest, "quant": quant})


def test_fp32_records_files_io_and_parity(fp32, tiny_checkpoint):
    m = fp32.manifest
    assert m["status"] == "ok" and m["parity_failures"] == []
    assert set(m["files"]) == FILES and m["source"]["sha256"] == tiny_checkpoint.sha256
    assert m["settings"]["recipe"] == get_target("tflite").recipe and m["path"] == "litert-torch"
    assert {"litert-torch", "ai-edge-litert", "ai-edge-quantizer"} <= set(m["toolchain"])
    assert m["io"][litert_graphs.ENCODER]["inputs"]["mel"] == {"shape": [1, 80, 3000], "dtype": "float32"}
    step = m["io"][litert_graphs.DECODER]
    assert step["inputs"]["token"] == {"shape": [1, 1], "dtype": "int32"}
    assert step["inputs"]["k_cache"]["shape"] == [4, 1, 448, 384] and step["inputs"]["mask"]["shape"] == [1, 1, 448]
    assert step["inputs"]["cross_k"]["shape"] == [4, 1, 1500, 384]
    assert step["outputs"]["logits"]["shape"] == [1, 51864] and step["outputs"]["k_new"]["shape"] == [4, 1, 1, 384]
    assert set(m["convert_s"]) == FILES and m["quantization"] is None
    p = m["parity"]
    assert parity.gate(get_target("tflite").tolerance("fp32"), p) == [] and p["top1_agreement"] == 1.0


def test_cached_steps_match_whole_sequence_recomputation(fp32, tiny_dims):
    # the host owns the cache; the runner's cache value is the number of filled slots
    check_cached_steps(litert_runtime.Runner(fp32), fp32.checkpoint(), tiny_dims, lambda cache: cache.length)


def test_fp32_and_int8_dynamic_decode_like_the_reference(fp32, parity_of, exact_match, embedded_utterances, tmp_path):
    utterances = embedded_utterances[:SUBSET]
    rate, ms = exact_match(litert_runtime.Runner(fp32), utterances)
    print(f"tflite fp32 on {SUBSET} utterances: {rate:.2f} token-identical, {ms:.0f} ms/utt")
    assert rate >= 0.95

    int8 = quantized_copy(fp32, "int8-dynamic", tmp_path / "int8")
    runner = litert_runtime.Runner(int8)
    numbers = parity_of(runner)
    assert parity.gate(get_target("tflite").tolerance("int8-dynamic"), numbers) == [], numbers
    assert numbers["encoder_snr_db"] < 60  # really quantized
    size = {q: (a.path / litert_graphs.DECODER).stat().st_size for q, a in (("fp32", fp32), ("int8", int8))}
    assert size["int8"] < size["fp32"] / 3  # every weight int8, the embedding/LM head included
    rate, ms = exact_match(runner, utterances)
    print(f"tflite int8-dynamic on {SUBSET} utterances: {rate:.2f} token-identical, {ms:.0f} ms/utt")
    assert rate >= 0.5


def _perturb_float_embedding(decoder: Path, embedding: np.ndarray) -> None:
    """Add full-scale noise to the token embedding (also the LM head) where the .tflite stores it."""
    data = bytearray(decoder.read_bytes())
    start = data.find(embedding.tobytes()[:4096])
    assert start >= 0 and data[start : start + embedding.nbytes] == embedding.tobytes()
    data[start : start + embedding.nbytes] = with_noise(embedding).tobytes()
    decoder.write_bytes(bytes(data))


def test_perturbed_embedding_fails_the_gate(fp32, parity_of, tmp_path):
    from harness.core.weights import load_model

    broken = broken_copy(fp32, tmp_path)
    embedding = load_model(fp32.checkpoint()).decoder.token_embedding.weight.detach().numpy()
    _perturb_float_embedding(broken / litert_graphs.DECODER, embedding)
    numbers = parity_of(litert_runtime.Runner(load_artifact(broken)))
    print(f"tflite fp32 with a perturbed embedding: {numbers}")
    failures = parity.gate(get_target("tflite").tolerance("fp32"), numbers)
    assert any("logits max abs err" in f for f in failures) and any("top-1" in f for f in failures)
    for quant in get_target("tflite").quants:  # every row catches it, not only the strictest
        assert parity.gate(get_target("tflite").tolerance(quant), numbers), quant


def test_tflite_runtime_is_refused_for_dynamic_int8_from_the_new_quantizer():
    toolchain = {"ai-edge-quantizer": "0.10.0"}
    assert "silently wrong" in litert_runtime.interpreter_refusal("tflite-runtime", "int8-dynamic", toolchain)
    for quant in ("fp32", "fp16", "int8-weight", "int8-static"):
        assert litert_runtime.interpreter_refusal("tflite-runtime", quant, toolchain) is None
    assert litert_runtime.interpreter_refusal("ai-edge-litert", "int8-dynamic", toolchain) is None
    assert litert_runtime.interpreter_refusal("tflite-runtime", "int8-dynamic", {"ai-edge-quantizer": "absent"}) is None


def test_interpreter_choice_is_checked(fp32, monkeypatch):
    monkeypatch.setenv(litert_runtime.INTERPRETER_ENV, "tflite")
    assert "is not one of" in litert_runtime.runtime_unavailable()
    monkeypatch.setenv(litert_runtime.INTERPRETER_ENV, "tflite-runtime")
    reason = litert_runtime.runtime_unavailable()
    if reason is not None:  # tflite-runtime 2.14 needs numpy < 2, which this environment may not have
        assert reason == "tflite-runtime is not installed" or "numpy < 2" in reason
        with pytest.raises(Unavailable, match=r"not installed|numpy < 2"):
            litert_runtime.Runner(fp32)
    dynamic = Artifact(fp32.size, "tflite", "int8-dynamic", fp32.path, fp32.manifest)
    with pytest.raises(Unavailable, match=r"not installed|numpy < 2|silently wrong"):
        litert_runtime.Runner(dynamic)


def test_unknown_quantization_is_unavailable():
    with pytest.raises(Unavailable, match="no LiteRT recipe"):
        litert_build.quant_recipe("int4")


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["fp16", "int8-dynamic", "int8-weight"])
def test_quantized_builds_pass_their_gate(tiny_checkpoint, models_root, fp32, quant):
    m = ensure(tiny_checkpoint, "tiny.en", "tflite", quant, models_root)[0].manifest
    print(f"tflite {quant}: parity {m['parity']}, convert_s {m['convert_s']}")
    assert m["status"] == "ok" and m["quantization"] == {"tool": "ai-edge-quantizer", "recipe": quant}
    assert m["files"][litert_graphs.DECODER]["bytes"] < fp32.manifest["files"][litert_graphs.DECODER]["bytes"] / 1.9


@pytest.mark.slow
def test_full_int8_is_refused_with_the_measured_reason(tiny_checkpoint, models_root):
    """Full int8, calibrated on the shipped train-clean-100 utterances: ai-edge-quantizer 0.10
    writes graphs LiteRT's kernels refuse to prepare (a gate failure, had they loaded: per-tensor
    int8 cannot hold whisper's outliers). Either way the store reports it, never a crash."""
    prepared = prepare(tiny_checkpoint, ("tiny.en", "tflite", "int8-static"), models_root, calibration_source())
    print(f"tflite int8-static: {prepared.status}: {prepared.reason}")
    assert prepared.status in ("unavailable", "failed")
    if prepared.status == "unavailable":
        assert "cannot run" in prepared.reason
        assert not [p for p in models_root.glob("*/tflite-int8-static-*") if p.is_dir()]  # no artifact
        # recorded, not rebuilt
        again = prepare(tiny_checkpoint, ("tiny.en", "tflite", "int8-static"), models_root, calibration_source())
        assert again.status == "unavailable" and again.reason.startswith(prepared.reason + " (recorded in ")
    else:
        assert prepared.artifact.manifest["calibration"]["utterances"] == 10
        assert prepared.artifact.manifest["calibration_source"] == "data/librispeech-calibration"
        assert any("encoder SNR" in f for f in prepared.artifact.manifest["parity_failures"])


@pytest.mark.slow
def test_embedded_tokens_match_the_reference(tiny_checkpoint, models_root, exact_match, embedded_utterances):
    rates, ms = {}, {}
    for quant in ("fp32", "fp16", "int8-dynamic", "int8-weight"):
        artifact = ensure(tiny_checkpoint, "tiny.en", "tflite", quant, models_root)[0]
        rates[quant], ms[quant] = exact_match(litert_runtime.Runner(artifact), embedded_utterances)
    print(f"tflite utterances token-identical to the reference: {rates}; encode+decode ms/utt: {ms}")
    assert rates["fp32"] >= 0.95 and rates["fp16"] >= 0.9
    assert rates["int8-dynamic"] >= 0.5 and rates["int8-weight"] >= 0.5
