"""The `mtk` target: the MediaTek NPU form as .tflite (no gather, host-side embeddings, static
KV cache), run on the LiteRT CPU interpreter as an emulation, on tiny.en.

Fast tier: the fp32 artifact through the store, and int8 (weight-only, the shared recipe) made by
the real quantizer from its float graphs. Slow: every quantization through the store and the 70
embedded utterances decoded by each.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import shutil
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from converters import mtk_target, parity, registry
from converters.litert import NPU_UNSUPPORTED_OPS
from converters.litert import build as litert_build
from converters.litert import graphs as litert_graphs
from converters.litert import runtime as litert_runtime
from converters.registry import TARGETS, get_target
from converters.store import ensure, load_artifact
from harness.core.errors import HarnessError
from harness.core.target import Artifact, Unavailable
from tests.conftest import broken_copy, with_noise

GRAPHS = (litert_graphs.ENCODER, litert_graphs.CROSS_KV, litert_graphs.DECODER)
FILES = {*GRAPHS, mtk_target.EMBEDDING, mtk_target.POSITIONS}
SUBSET = 5  # utterances the fast tier decodes against the reference


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
    assert m["path"] == ("mtk_converter" if mtk_target.mtk_converter_available() else "litert-torch")
    assert m["runtime"] == "litert-cpu (MediaTek emulation)" and "aot" not in m
    assert m["settings"]["recipe"] == get_target("mtk").recipe and "mtk_converter" in m["toolchain"]
    step = m["io"][litert_graphs.DECODER]["inputs"]
    assert set(step) == {"token_embedding", "position_embedding", *litert_graphs.CACHE_INPUTS}
    assert step["token_embedding"] == {"shape": [1, 1, 384], "dtype": "float32"}
    assert m["io"][mtk_target.EMBEDDING]["shape"] == [51864, 384] and m["io"][mtk_target.POSITIONS]["shape"] == [
        448,
        384,
    ]
    assert parity.gate(get_target("mtk").tolerance("fp32"), m["parity"]) == [] and m["parity"]["top1_agreement"] == 1.0


def test_graphs_have_fixed_shapes_and_no_gather(fp32):
    from ai_edge_litert.interpreter import Interpreter

    for name in GRAPHS:
        census = op_census(fp32.file(name))
        assert not NPU_UNSUPPORTED_OPS & set(census), (name, census)
        interpreter = Interpreter(model_path=str(fp32.file(name)))
        for detail in interpreter.get_input_details() + interpreter.get_output_details():
            assert (detail["shape_signature"] > 0).all(), (name, detail["name"])
    assert op_census(fp32.file(litert_graphs.DECODER))["FULLY_CONNECTED"] == 8 * 4 + 1  # 8 per layer, the LM head


def test_fp32_and_int8_decode_like_the_reference(fp32, parity_of, exact_match, embedded_utterances, tmp_path):
    utterances = embedded_utterances[:SUBSET]
    rate, ms = exact_match(mtk_target.Runner(fp32), utterances)
    print(f"mtk_target fp32 on {SUBSET} utterances: {rate:.2f} token-identical, {ms:.0f} ms/utt")
    assert rate >= 0.95

    folder = tmp_path / "int8"
    shutil.copytree(fp32.path, folder)
    for name in GRAPHS:
        litert_build.quantize(folder / name, mtk_target.RECIPE_OF["int8"], None)
    runner = mtk_target.Runner(Artifact(fp32.size, "mtk", "int8", folder, {**fp32.manifest, "quant": "int8"}))
    numbers = parity_of(runner)
    assert parity.gate(get_target("mtk").tolerance("int8"), numbers) == [], numbers
    assert numbers["encoder_snr_db"] < 60  # really quantized
    assert (folder / litert_graphs.DECODER).stat().st_size < fp32.file(litert_graphs.DECODER).stat().st_size / 3
    rate, ms = exact_match(runner, utterances)
    print(f"mtk_target int8 on {SUBSET} utterances: {rate:.2f} token-identical, {ms:.0f} ms/utt")
    assert rate >= 0.5


def test_perturbed_host_embedding_fails_the_gate(fp32, parity_of, tmp_path):
    broken = broken_copy(fp32, tmp_path)
    np.save(broken / mtk_target.EMBEDDING, with_noise(np.load(broken / mtk_target.EMBEDDING)))
    numbers = parity_of(mtk_target.Runner(load_artifact(broken)))
    print(f"mtk_target fp32 with a perturbed host embedding: {numbers}")
    assert any("logits max abs err" in f for f in parity.gate(get_target("mtk").tolerance("fp32"), numbers))
    for quant in get_target("mtk").quants:  # every row catches it, not only the strictest
        assert parity.gate(get_target("mtk").tolerance(quant), numbers), quant


def test_aot_for_a_soc_without_the_neuropilot_sdk_is_unavailable(tiny_checkpoint, models_root, monkeypatch):
    """The SoC is read at import (it is part of the recipe), so the module is reloaded with it."""
    reason = mtk_target.neuropilot_sdk("MT6989")
    if reason is None:
        pytest.skip("the NeuroPilot SDK is installed here")
    if importlib.util.find_spec("ai_edge_litert_sdk_mediatek") is not None:  # installed offline: no libraries
        assert reason == mtk_target.NO_SDK_LIBRARIES
    before = {p for p in models_root.glob("*/*") if p.suffix != ".lock"}
    monkeypatch.setenv(mtk_target.SOC_ENV, "MT6989")
    try:
        importlib.reload(mtk_target)
        # the registry's entry, as built at import with the SoC in the environment
        monkeypatch.setitem(TARGETS, "mtk", replace(TARGETS["mtk"], recipe=registry.mtk_recipe()))
        assert get_target("mtk").recipe.endswith("+aot:MT6989")
        with pytest.raises(Unavailable, match=re.escape(reason)):
            ensure(tiny_checkpoint, "tiny.en", "mtk", "fp32", models_root)
        # nothing half-built is kept (the key's build lock stays: converters.store._locked)
        assert {p for p in models_root.glob("*/*") if p.suffix != ".lock"} == before
    finally:
        monkeypatch.delenv(mtk_target.SOC_ENV)
        importlib.reload(mtk_target)
    assert "+aot" not in registry.mtk_recipe()


def test_unknown_quantization_is_refused_before_anything_is_built(tiny_checkpoint, tmp_path):
    with pytest.raises(
        HarnessError, match=r"target .mtk. offers no quantization .int8-static.*offered: fp32, fp16, int8"
    ):
        ensure(tiny_checkpoint, "tiny.en", "mtk", "int8-static", tmp_path)
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["fp16", "int8"])
def test_quantized_builds_pass_their_gate(tiny_checkpoint, models_root, fp32, quant):
    m = ensure(tiny_checkpoint, "tiny.en", "mtk", quant, models_root)[0].manifest
    print(f"mtk_target {quant}: parity {m['parity']}, convert_s {m['convert_s']}")
    assert m["status"] == "ok" and m["quantization"]["recipe"] == mtk_target.RECIPE_OF[quant]
    assert m["files"][litert_graphs.DECODER]["bytes"] < fp32.manifest["files"][litert_graphs.DECODER]["bytes"] / 1.9


@pytest.mark.slow
def test_embedded_tokens_match_the_reference(tiny_checkpoint, models_root, exact_match, embedded_utterances):
    rates, ms = {}, {}
    for quant in get_target("mtk").quants:
        artifact = ensure(tiny_checkpoint, "tiny.en", "mtk", quant, models_root)[0]
        rates[quant], ms[quant] = exact_match(mtk_target.Runner(artifact), embedded_utterances)
    print(f"mtk_target utterances token-identical to the reference: {rates}; encode+decode ms/utt: {ms}")
    assert rates["fp32"] >= 0.95 and rates["fp16"] >= 0.9 and rates["int8"] >= 0.5


def test_the_board_path_with_the_cpu_accelerator_decodes_as_the_interpreter(
    fp32, embedded_utterances, tiny_dims, monkeypatch
):
    """No board here: the CompiledModel path a board's NPU is reached through runs with LiteRT's CPU
    accelerator (HARNESS_MTK_ACCELERATOR=cpu) and says so; it decodes as the interpreter does."""
    from harness.core.audio import log_mel
    from harness.core.decoding import DecodingOptions, build_prompt, greedy_decode

    prompt = build_prompt(tiny_dims, DecodingOptions())
    interpreter = mtk_target.Runner(fp32)
    assert interpreter.runtime is None  # the artifact's label: litert-cpu (MediaTek emulation)
    monkeypatch.setenv(mtk_target.ACCELERATOR_ENV, "cpu")
    compiled = mtk_target.Runner(fp32)
    assert compiled.runtime == "litert-compiled-cpu (MediaTek emulation)"
    assert all(isinstance(g, litert_runtime.CompiledGraph) for g in (compiled.encoder, compiled.decoder))
    mel = log_mel(embedded_utterances[0].audio, tiny_dims.n_mels)
    a, b = interpreter.encode(mel), compiled.encode(mel)
    np.testing.assert_allclose(a, b, atol=1e-4)
    tokens = list(prompt.tokens)
    np.testing.assert_allclose(interpreter.step(tokens, a, None)[0], compiled.step(tokens, b, None)[0], atol=1e-3)
    for utt in embedded_utterances[:2]:
        assert greedy_decode(compiled, utt.audio, tiny_dims, prompt).tokens == (
            greedy_decode(interpreter, utt.audio, tiny_dims, prompt).tokens
        )


def test_a_board_without_a_dispatch_library_or_with_an_unknown_accelerator_is_unavailable(fp32, monkeypatch, tmp_path):
    monkeypatch.setenv(mtk_target.SOC_ENV, "MT6989")  # a board says what it is
    monkeypatch.setenv(mtk_target.DISPATCH_ENV, str(tmp_path))  # a folder without the library
    with pytest.raises(Unavailable, match="no MediaTek NPU dispatch library on this node"):
        mtk_target.Runner(fp32)
    monkeypatch.setenv(mtk_target.ACCELERATOR_ENV, "gpu")
    with pytest.raises(Unavailable, match="HARNESS_MTK_ACCELERATOR='gpu' is not one of npu, cpu, interpreter"):
        mtk_target.Runner(fp32)
