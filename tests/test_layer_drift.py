"""The first layer that drifts (`converters.layer_drift`): block by block against openai-whisper's
own, on real audio and the real tiny.en ONNX artifact; a fault injected into one block of a copy
(a LayerNorm scale off by 30%, the kind of slip a weight-layout correction makes) is found there,
and every block before it still matches."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest

from converters import layer_drift
from converters.store import ensure
from harness.core.decoding import Dims, build_prompt
from harness.core.target import Unavailable
from tests.conftest import EMBEDDED
from tests.nightly_runs import in_process

pytest.importorskip("onnxruntime")
LAYERS = 4  # tiny.en


@pytest.fixture(scope="module")
def onnx_fp32(tiny_checkpoint, models_root):
    return ensure(tiny_checkpoint, "tiny.en", "onnx", "fp32", models_root)[0]


@pytest.fixture(scope="module")
def inputs(onnx_fp32, embedded_utterances, tiny_checkpoint):
    """The reference model, a real utterance's mel, and the prompt with the reference's first tokens."""
    from harness.core.audio import log_mel
    from harness.core.weights import load_model

    dims = Dims.of(onnx_fp32.manifest["dims"])
    mel = log_mel(embedded_utterances[0].audio, dims.n_mels, dims.n_audio_ctx)
    return load_model(tiny_checkpoint).eval(), mel, [*build_prompt(dims).tokens, 440, 3290, 286, 257]


def _with_fault(artifact, folder, file: str, initializer: str):
    """A copy of `artifact` with one LayerNorm scale of one block multiplied by 1.3."""
    import onnx
    from onnx import numpy_helper

    copy = dataclasses.replace(artifact, path=shutil.copytree(artifact.path, folder))
    model = onnx.load(str(copy.file(file)))
    (init,) = [i for i in model.graph.initializer if i.name == initializer]
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(1.3), initializer))
    onnx.save(model, str(copy.file(file)))
    return copy


def test_probes_are_fixed_at_conversion(onnx_fp32):
    probes = onnx_fp32.manifest["probes"]
    assert list(probes["encoder.onnx"]) == [f"encoder.blocks.{i}" for i in range(LAYERS)]
    assert list(probes["decoder_step.onnx"]) == [f"decoder.blocks.{i}" for i in range(LAYERS)]


def test_an_fp32_artifact_matches_block_by_block(onnx_fp32, inputs):
    drift = layer_drift.measure(onnx_fp32, *inputs, threshold_db=80.0)
    assert [b.block for b in drift.blocks] == [
        *(f"encoder.blocks.{i}" for i in range(LAYERS)),
        *(f"decoder.blocks.{i}" for i in range(LAYERS)),
    ]
    assert drift.first is None and all(b.snr_db > 100 for b in drift.blocks), drift.lines()


@pytest.mark.parametrize(
    ("file", "initializer", "faulty"),
    [
        ("encoder.onnx", "encoder.blocks.2.mlp_ln.weight", "encoder.blocks.2"),
        ("decoder_step.onnx", "blocks.1.mlp_ln.weight", "decoder.blocks.1"),
    ],
)
def test_a_fault_in_one_block_is_found_there(onnx_fp32, inputs, tmp_path, file, initializer, faulty):
    broken = _with_fault(onnx_fp32, tmp_path / "broken", file, initializer)
    drift = layer_drift.measure(broken, *inputs, threshold_db=80.0)
    print("\n".join(drift.lines()))
    assert drift.first is not None and drift.first.block == faulty
    names = [b.block for b in drift.blocks]
    assert all(b.snr_db > 100 for b in drift.blocks[: names.index(faulty)])  # upstream untouched
    assert drift.first.snr_db < 40


def test_a_target_without_probes_is_unavailable(onnx_fp32, inputs, tiny_artifacts):
    with pytest.raises(Unavailable, match="no block outputs from its runtime"):
        layer_drift.measure(tiny_artifacts["torchscript-mtk"], *inputs, threshold_db=80.0)
    old = dataclasses.replace(onnx_fp32, manifest={k: v for k, v in onnx_fp32.manifest.items() if k != "probes"})
    with pytest.raises(Unavailable, match="records no probes"):
        layer_drift.measure(old, *inputs, threshold_db=80.0)


def test_inspect_drift_on_real_audio(onnx_fp32):
    clip = sorted(EMBEDDED.glob("**/*.flac"))[0]
    code, out, _ = in_process("inspect", onnx_fp32.path, "--drift", clip)
    assert code == 0
    assert f"layer drift on {clip.name} (agrees with the reference's tokens):" in out
    assert "tiny.en/onnx/fp32: every block at or above 80 dB" in out
