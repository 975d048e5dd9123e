"""What executes where (`converters.census`, `harness inspect`), on real tiny.en artifacts, the
counts checked by hand against whisper's architecture: 4 encoder blocks of 6 linears (q, k, v, out,
two MLP), 4 decoder blocks, the vocabulary projection; weights against the model's parameters."""

from __future__ import annotations

import dataclasses
import json

import pytest

from converters.census import Census, census, find_artifact, format_census, short_name
from converters.store import ensure
from harness.exit_codes import ExitCode
from tests.conftest import TINY_ENCODER_MACS
from tests.nightly_runs import in_process

LAYERS = 4  # tiny.en's blocks, encoder and decoder alike


@pytest.fixture(scope="module")
def tflite(tiny_checkpoint, models_root):
    return ensure(tiny_checkpoint, "tiny.en", "tflite", "fp32", models_root)[0]


@pytest.fixture(scope="module")
def tflite_census(tflite):
    return census(tflite)


def _graph(found: Census, name: str):
    (graph,) = [g for g in found.graphs if g.file == name]
    return graph


def test_litert_graphs_counted_by_hand(tflite_census, tiny_checkpoint):
    from harness.core.weights import load_model

    encoder = _graph(tflite_census, "encoder.tflite")
    assert encoder.ops["FULLY_CONNECTED"] == LAYERS * 6  # q, k, v, out, fc1, fc2 per block
    assert encoder.delegated == encoder.ops and encoder.partitions == 1  # XNNPACK takes all of it
    decoder = _graph(tflite_census, "decoder.tflite")
    # self q, k, v, out; cross q, out (its keys and values come from cross_kv); fc1, fc2; the LM head
    assert decoder.ops["FULLY_CONNECTED"] == LAYERS * 8 + 1
    assert decoder.delegated["FULLY_CONNECTED"] == LAYERS * 8 + 1 and decoder.partitions == 1
    fallback = set(decoder.ops) - set(decoder.delegated)
    assert "EMBEDDING_LOOKUP" in fallback or "GATHER" in fallback  # the token lookup XNNPACK does not take
    assert encoder.compute == {"float32": TINY_ENCODER_MACS}
    cross = _graph(tflite_census, "cross_kv.tflite")
    assert cross.ops["FULLY_CONNECTED"] == LAYERS * 2  # each block's cross keys and values
    # the decoder's weights: the model's decoder but the cross keys and values, the tied matrix once
    model = load_model(tiny_checkpoint)
    elsewhere = ("cross_attn.key.weight", "cross_attn.value.weight", "cross_attn.value.bias")
    params = sum(p.numel() for n, p in model.decoder.named_parameters() if not n.endswith(elsewhere))
    assert decoder.weights["float32"] == pytest.approx(4 * params, rel=0.02)
    assert (
        decoder.largest[0].shape == (51864, 384) and decoder.weight_share("float32") > 0.999
    )  # the rest: int32 shapes


def test_onnx_int8_shows_where_it_is_not_int8(tiny_checkpoint, models_root):
    """Every weight MatMul is a MatMulInteger; but the decoder keeps the vocabulary twice, int8 for
    the projection and float32 for the token lookup (a Gather), so by bytes it is mostly float."""
    found = census(ensure(tiny_checkpoint, "tiny.en", "onnx", "int8", models_root)[0])
    assert all(g.delegated is None and g.engine.startswith("onnxruntime") for g in found.graphs)
    assert _graph(found, "encoder.onnx").ops["MatMulInteger"] == LAYERS * 6
    decoder = _graph(found, "decoder_step.onnx")
    # self q, k, v, out; cross q, out; fc1, fc2 per block, and the vocabulary projection
    assert decoder.ops["MatMulInteger"] == LAYERS * 8 + 1
    vocab = {(t.dtype, t.shape) for t in decoder.largest[:2]}
    assert vocab == {("float32", (384, 51864)), ("int8", (384, 51864))}
    assert decoder.weight_share("float32") > 0.7


def test_the_mediatek_check_finds_a_gather(tflite, tiny_checkpoint, models_root):
    """The MediaTek form keeps its promise (host lookups); the tflite form's graphs, held to it, break it."""
    mtk = census(ensure(tiny_checkpoint, "tiny.en", "mtk", "fp32", models_root)[0])
    assert mtk.checks == {"no GATHER or cache write (MediaTek NPU)": "ok"}
    as_mtk = census(dataclasses.replace(tflite, target="mtk"))
    (verdict,) = as_mtk.checks.values()
    assert verdict.startswith("found decoder.tflite: ")


def test_census_round_trips_and_prints(tflite_census):
    assert Census.from_dict(json.loads(json.dumps(tflite_census.as_dict()))) == tflite_census
    text = format_census(tflite_census)
    assert "encoder.tflite on LiteRT CPU (XNNPACK)" in text and "(100%) in 1 partition(s)" in text
    assert short_name("a.b.Graph/c.d.Block_3/e.Linear_0;x") == "Block_3/Linear_0" and short_name("lm.w") == "lm.w"


def test_inspect_command(tflite, models_root):
    code, out, _ = in_process("inspect", "tiny.en/tflite/fp32", "--models", models_root)
    assert code == ExitCode.OK and "FULLY_CONNECTED 24" in out and "check:" not in out
    code, out, _ = in_process("inspect", tflite.path, "--json")
    assert code == ExitCode.OK and json.loads(out)["model"] == "tiny.en/tflite/fp32"
    assert find_artifact(models_root, str(tflite.path)) == tflite.path
    code, _, err = in_process("inspect", "tiny.en/tflite/int4", "--models", models_root)
    assert code == ExitCode.BAD_INPUT and err.count("\n") == 1 and "int4" in err
    code, _, err = in_process("inspect", "tiny.en/tflite/fp16", "--models", models_root / "nowhere")
    assert code == ExitCode.BAD_INPUT and "no artifact" in err and "harness convert" in err


def test_a_census_whose_reader_is_not_installed_is_one_line(tflite, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)  # as if ai-edge-litert were absent
    code, out, err = in_process("inspect", tflite.path)
    assert code == ExitCode.INCOMPLETE and out == "" and err.count("\n") == 1
    assert "cross_kv.tflite: reading it needs ai_edge_litert.interpreter, not installed here" in err
