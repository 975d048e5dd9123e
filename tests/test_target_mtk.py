"""The `mtk` target: the MediaTek NPU form as .tflite (no gather, host-side embeddings, static
KV cache), run on the LiteRT CPU interpreter as an emulation, on tiny.en.

Fast tier: the fp32 artifact through the store, and int8 (weight-only, the shared recipe) made by
the real quantizer from its float graphs. Slow: every quantization through the store and the 70
embedded utterances decoded by each.
"""

from __future__ import annotations

import importlib
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from converters import litert_target as litert
from converters import mtk, parity
from converters.protocol import Artifact, Unavailable
from converters.registry import get_target
from converters.store import ensure, load_artifact
from tests.conftest import broken_copy, with_noise

GRAPHS = (litert.ENCODER, litert.CROSS_KV, litert.DECODER)
FILES = {*GRAPHS, mtk.EMBEDDING, mtk.POSITIONS}
SUBSET = 5  # utterances the fast tier decodes against the reference
NO_NPU_OPS = {"GATHER", "GATHER_ND", "EMBEDDING_LOOKUP", "SCATTER_ND", "DYNAMIC_UPDATE_SLICE"}


@pytest.fixture(scope="module")
def fp32(tiny_checkpoint, models_root):
    return ensure(tiny_checkpoint, "tiny.en", "mtk", "fp32", models_root)[0]


def op_census(path: Path) -> Counter:
    """How many of each builtin op a .tflite file holds, read from its flatbuffer."""
    from ai_edge_litert import schema_py_generated as schema

    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    model = schema.Model.GetRootAs(path.read_bytes(), 0)
    codes = [model.OperatorCodes(i) for i in range(model.OperatorCodesLength())]
    codes = [max(c.BuiltinCode(), c.DeprecatedBuiltinCode()) for c in codes]
    census = Counter()
    for g in range(model.SubgraphsLength()):
        graph = model.Subgraphs(g)
        census.update(names[codes[graph.Operators(i).OpcodeIndex()]] for i in range(graph.OperatorsLength()))
    return census


def test_fp32_records_path_runtime_files_and_parity(fp32, tiny_checkpoint):
    m = fp32.manifest
    assert m["status"] == "ok" and m["parity_failures"] == []
    assert set(m["files"]) == FILES and m["source"]["sha256"] == tiny_checkpoint.sha256
    assert m["path"] == ("mtk_converter" if mtk.mtk_converter_available() else "litert-torch")
    assert m["runtime"] == "litert-cpu (MediaTek emulation)" and "aot" not in m
    assert m["settings"]["recipe"] == mtk.RECIPE and "mtk_converter" in m["toolchain"]
    step = m["io"][litert.DECODER]["inputs"]
    assert set(step) == {"token_embedding", "position_embedding", *litert.CACHE_INPUTS}
    assert step["token_embedding"] == {"shape": [1, 1, 384], "dtype": "float32"}
    assert m["io"][mtk.EMBEDDING]["shape"] == [51864, 384] and m["io"][mtk.POSITIONS]["shape"] == [448, 384]
    assert parity.gate("mtk", "fp32", m["parity"]) == [] and m["parity"]["top1_agreement"] == 1.0


def test_graphs_have_fixed_shapes_and_no_gather(fp32):
    from ai_edge_litert.interpreter import Interpreter

    for name in GRAPHS:
        census = op_census(fp32.file(name))
        assert not NO_NPU_OPS & set(census), (name, census)
        interpreter = Interpreter(model_path=str(fp32.file(name)))
        for detail in interpreter.get_input_details() + interpreter.get_output_details():
            assert (detail["shape_signature"] > 0).all(), (name, detail["name"])
    assert op_census(fp32.file(litert.DECODER))["FULLY_CONNECTED"] == 8 * 4 + 1  # 8 per layer, the LM head


def test_fp32_and_int8_decode_like_the_reference(fp32, parity_of, exact_match, embedded_utterances, tmp_path):
    utterances = embedded_utterances[:SUBSET]
    rate, ms = exact_match(mtk.Runner(fp32), utterances)
    print(f"mtk fp32 on {SUBSET} utterances: {rate:.2f} token-identical, {ms:.0f} ms/utt")
    assert rate >= 0.95

    folder = tmp_path / "int8"
    shutil.copytree(fp32.path, folder)
    for name in GRAPHS:
        litert.quantize(folder / name, mtk.RECIPE_OF["int8"], None)
    runner = mtk.Runner(Artifact(fp32.size, "mtk", "int8", folder, {**fp32.manifest, "quant": "int8"}))
    numbers = parity_of(runner)
    assert parity.gate("mtk", "int8", numbers) == [], numbers
    assert numbers["encoder_snr_db"] < 60  # really quantized
    assert (folder / litert.DECODER).stat().st_size < fp32.file(litert.DECODER).stat().st_size / 3
    rate, ms = exact_match(runner, utterances)
    print(f"mtk int8 on {SUBSET} utterances: {rate:.2f} token-identical, {ms:.0f} ms/utt")
    assert rate >= 0.5


def test_perturbed_host_embedding_fails_the_gate(fp32, parity_of, tmp_path):
    broken = broken_copy(fp32, tmp_path)
    np.save(broken / mtk.EMBEDDING, with_noise(np.load(broken / mtk.EMBEDDING)))
    numbers = parity_of(mtk.Runner(load_artifact(broken)))
    print(f"mtk fp32 with a perturbed host embedding: {numbers}")
    assert any("logits max abs err" in f for f in parity.gate("mtk", "fp32", numbers))
    for quant in get_target("mtk").quants:  # every row catches it, not only the strictest
        assert parity.gate("mtk", quant, numbers), quant


def test_aot_for_a_soc_without_the_neuropilot_sdk_is_unavailable(tiny_checkpoint, models_root, monkeypatch):
    """The SoC is read at import (it is part of the recipe), so the module is reloaded with it."""
    if mtk.neuropilot_sdk("MT6989") is None:
        pytest.skip("the NeuroPilot SDK is installed here")
    before = set(models_root.glob("*/*"))
    monkeypatch.setenv(mtk.SOC_ENV, "MT6989")
    try:
        importlib.reload(mtk)
        assert mtk.RECIPE.endswith("+aot:MT6989")
        with pytest.raises(Unavailable, match="ai-edge-litert-sdk-mediatek"):
            ensure(tiny_checkpoint, "tiny.en", "mtk", "fp32", models_root)
        assert set(models_root.glob("*/*")) == before  # nothing half-built is kept
    finally:
        monkeypatch.delenv(mtk.SOC_ENV)
        importlib.reload(mtk)
    assert "+aot" not in mtk.RECIPE


def test_unknown_quantization_is_unavailable(tmp_path):
    with pytest.raises(Unavailable, match="is not one of fp32, fp16, int8"):
        mtk.convert(None, None, "int8-static", tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["fp16", "int8"])
def test_quantized_builds_pass_their_gate(tiny_checkpoint, models_root, fp32, quant):
    m = ensure(tiny_checkpoint, "tiny.en", "mtk", quant, models_root)[0].manifest
    print(f"mtk {quant}: parity {m['parity']}, convert_s {m['convert_s']}")
    assert m["status"] == "ok" and m["quantization"]["recipe"] == mtk.RECIPE_OF[quant]
    assert m["files"][litert.DECODER]["bytes"] < fp32.manifest["files"][litert.DECODER]["bytes"] / 1.9


@pytest.mark.slow
def test_embedded_tokens_match_the_reference(tiny_checkpoint, models_root, exact_match, embedded_utterances):
    rates, ms = {}, {}
    for quant in get_target("mtk").quants:
        artifact = ensure(tiny_checkpoint, "tiny.en", "mtk", quant, models_root)[0]
        rates[quant], ms[quant] = exact_match(mtk.Runner(artifact), embedded_utterances)
    print(f"mtk utterances token-identical to the reference: {rates}; encode+decode ms/utt: {ms}")
    assert rates["fp32"] >= 0.95 and rates["fp16"] >= 0.9 and rates["int8"] >= 0.5
