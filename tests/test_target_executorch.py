"""The `executorch` target: ExecuTorch programs lowered to XNNPACK, the LiteRT graphs' static KV
cache, on tiny.en: fp32 and int8 through the store (manifest, census, parity), decoding like the
reference, a broken copy caught by the gate; the census of a small known graph counted by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from converters import executorch_target, parity
from converters.registry import get_target
from converters.store import ensure, load_artifact
from tests.conftest import TINY_ENCODER_MACS, broken_copy, check_cached_steps, with_noise

pytest.importorskip("executorch")  # in pyproject's targets extra, as the other targets' toolchains

FILES = {executorch_target.ENCODER, executorch_target.CROSS_KV, executorch_target.DECODER}
SUBSET = 5  # utterances decoded against the reference


@pytest.fixture(scope="module")
def fp32(tiny_checkpoint, models_root):
    return ensure(tiny_checkpoint, "tiny.en", "executorch", "fp32", models_root)[0]


@pytest.fixture(scope="module")
def int8(tiny_checkpoint, models_root):
    return ensure(tiny_checkpoint, "tiny.en", "executorch", "int8", models_root)[0]


def test_fp32_records_files_io_census_and_parity(fp32, tiny_checkpoint):
    m = fp32.manifest
    assert m["status"] == "ok" and m["parity_failures"] == [] and m["runtime"] == "executorch-xnnpack"
    assert set(m["files"]) == FILES and m["source"]["sha256"] == tiny_checkpoint.sha256
    assert m["settings"]["recipe"] == get_target("executorch").recipe and m["quantization"] is None
    assert {"executorch", "torchao"} <= set(m["toolchain"])
    step = m["io"][executorch_target.DECODER]["inputs"]
    assert step["token"] == {"shape": [1, 1], "dtype": "int32"} and step["k_cache"]["shape"] == [4, 1, 448, 384]
    # the encoder is one XNNPACK partition (LayerNorm written out for it, the no-op expands gone)
    encoder = m["census"][executorch_target.ENCODER]
    assert encoder["partitions"] == 1 and encoder["portable"] == {} and encoder["delegated"]["linear"] >= 4 * 6
    # the decoder: only the lookups (token, position) and the mask's extra slot stay in portable kernels
    decoder = m["census"][executorch_target.DECODER]
    assert set(decoder["portable"]) <= {"embedding", "index", "full_like", "select_copy", "unsqueeze_copy"}
    assert decoder["portable"]["embedding"] == 1 and "linear" in decoder["delegated"]
    assert m["kv_cache"]["inputs"] == "one per layer: k_cache, v_cache, cross_k, cross_v"
    # counted by hand (tests/conftest.py), and the 9 LayerNorms' two means, written out as products
    assert encoder["compute"] == {"float32": TINY_ENCODER_MACS + 9 * 2 * 1500 * 384}
    assert parity.gate(get_target("executorch").tolerance("fp32"), m["parity"]) == []
    assert m["parity"]["encoder_snr_db"] > 100


def test_its_blocks_match_the_reference_block_by_block(fp32, embedded_utterances):
    """The programs return their blocks' outputs after their own (the probes, fixed at
    conversion): on a real utterance every block of the fp32 form is within fp32 rounding."""
    from converters import layer_drift

    assert fp32.manifest["probes"] == {
        executorch_target.ENCODER: [f"encoder.blocks.{i}" for i in range(4)],
        executorch_target.DECODER: [f"decoder.blocks.{i}" for i in range(4)],
    }
    drift, step = layer_drift.at_first_divergence(fp32, embedded_utterances[0].audio)
    assert step is None and drift.first is None and len(drift.blocks) == 8
    assert all(b.snr_db > 90 for b in drift.blocks), drift.lines()


def test_cached_steps_match_whole_sequence_recomputation(fp32, tiny_dims):
    check_cached_steps(executorch_target.Runner(fp32), fp32.checkpoint(), tiny_dims, lambda cache: cache.length)


def test_fp32_decodes_like_the_reference(fp32, exact_match, embedded_utterances):
    rate, ms = exact_match(executorch_target.Runner(fp32), embedded_utterances[:SUBSET])
    print(f"executorch fp32 on {SUBSET} utterances: {rate:.2f} token-identical, {ms:.0f} ms/utt")
    assert rate >= 0.95


@pytest.mark.slow  # a second conversion (~50 s here); the known graph's int8 census runs in the fast tier
def test_int8_is_int8_where_it_matters_and_decodes_close_to_the_reference(fp32, int8, exact_match, embedded_utterances):
    utterances = embedded_utterances[:SUBSET]
    m = int8.manifest
    assert m["status"] == "ok" and m["quantization"]["recipe"] == "dynamic int8, per channel"
    assert m["parity"]["encoder_snr_db"] < 60  # really quantized
    # the linears' share of the encoder's work runs on int8 weights (attention and convolutions stay float)
    compute = m["census"][executorch_target.ENCODER]["compute"]
    assert set(compute) == {"int8", "float32"} and compute["int8"] / TINY_ENCODER_MACS > 0.5
    # int8 weights: the encoder shrinks ~3x (the metadata checks that kept fp32 copies are gone)
    encoder = {q: a.manifest["files"][executorch_target.ENCODER]["bytes"] for q, a in (("fp32", fp32), ("int8", int8))}
    assert encoder["int8"] < encoder["fp32"] / 2.5
    rate, ms = exact_match(executorch_target.Runner(int8), utterances)
    print(f"executorch int8 on {SUBSET} utterances: {rate:.2f} token-identical, {ms:.0f} ms/utt")
    assert rate >= 0.5


def test_perturbed_embedding_fails_the_gate(fp32, parity_of, tmp_path):
    """Full-scale noise on the token embedding wherever the decoder stores it (the gather's copy and
    the LM head's): every quantization's bar catches it."""
    from harness.core.weights import load_model

    broken = broken_copy(fp32, tmp_path) / executorch_target.DECODER
    embedding = load_model(fp32.checkpoint()).decoder.token_embedding.weight.detach().numpy()
    data, raw, copies = bytearray(broken.read_bytes()), embedding.tobytes(), 0
    while (start := data.find(raw[:4096])) >= 0:
        assert data[start : start + len(raw)] == raw
        data[start : start + len(raw)] = with_noise(embedding).tobytes()
        copies += 1
    assert copies == 2  # tied: stored for the gather and again for XNNPACK's linear
    broken.write_bytes(bytes(data))
    numbers = parity_of(executorch_target.Runner(load_artifact(broken.parent)))
    print(f"executorch fp32 with a perturbed embedding: {numbers}")
    for quant in get_target("executorch").quants:
        failures = parity.gate(get_target("executorch").tolerance(quant), numbers)
        assert any("logits max abs err" in f for f in failures), quant


class _Known(nn.Module):
    """linear → cumsum → layer norm → linear → relu: XNNPACK takes neither a cumulative sum nor
    (as it is) a layer norm; the export writes the norm out for it, the sum stays portable."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.norm, self.b = nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"y": torch.relu(self.b(self.norm(torch.cumsum(self.a(x), dim=-1))))}


@pytest.mark.parametrize("quant", ["fp32", "int8"])
def test_the_census_of_a_known_graph(quant, tmp_path):
    """Counted by hand: the cumulative sum splits two partitions and is the one portable operator;
    inside them the two linears, the norm's two means (as linears on a 1/d row), its centring
    (sub), square and scale (mul x 3), rsqrt, the epsilon and the bias (add x 2), the relu."""
    module, sample = _Known().eval(), {"x": torch.randn(2, 8)}
    buffer, census = executorch_target.lower(module, sample, quant)
    assert census["partitions"] == 2 and census["portable"] == {"cumsum": 1}
    delegated = census["delegated"]
    assert delegated["linear"] == 4 and delegated["relu"] == 1 and delegated["rsqrt"] == 1
    assert delegated["sub"] == 1 and delegated["mul"] == 3 and delegated["add"] == 2
    # MACs: 2 rows x (8 x 16 + 16 x 4), and the norm's two means over 16 channels
    assert sum(census["compute"].values()) == 2 * (8 * 16 + 16 * 4) + 2 * 2 * 16
    if quant == "int8":  # the two linears on int8 weights; the means stay float
        assert census["compute"] == {"int8": 2 * (8 * 16 + 16 * 4), "float32": 2 * 2 * 16}
    from executorch.runtime import Runtime

    (tmp_path / "known.pte").write_bytes(buffer)
    (out,) = Runtime.get().load_program(tmp_path / "known.pte").load_method("forward").execute([sample["x"]])
    with torch.no_grad():
        expected = module(**sample)["y"]
    assert np.allclose(out.numpy(), expected.numpy(), atol=1e-5 if quant == "fp32" else 0.1)


def test_an_unknown_quantization_is_refused(tiny_checkpoint, models_root):
    from harness.core.errors import HarnessError

    with pytest.raises(HarnessError, match="int4"):
        ensure(tiny_checkpoint, "tiny.en", "executorch", "int4", models_root)
