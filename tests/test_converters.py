"""Registry, artifact store and parity gate, on real tiny.en artifacts."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from converters import parity, torchscript_mtk_target
from converters.registry import TARGETS, get_target
from converters.store import BUILD_LOG, MANIFEST, artifact_key, ensure, load_artifact, lock_path, prepare, verify
from harness.core.decoding import DecodingOptions, build_prompt
from harness.core.errors import HarnessError
from harness.core.hashing import file_sha256
from tests.conftest import broken_copy, with_noise


@pytest.mark.unit
def test_unknown_target_suggests_the_closest():
    with pytest.raises(HarnessError, match="did you mean 'torchscript-mtk'"):
        get_target("torchscript-mkt")


def test_manifest_records_recipe_checksums_shapes_and_parity(tiny_artifacts, tiny_checkpoint):
    art = tiny_artifacts["torchscript-mtk"]
    m = art.manifest
    assert m["source"]["sha256"] == tiny_checkpoint.sha256
    assert {"torch", "openai-whisper", "numpy"} <= set(m["toolchain"])
    assert set(m["files"]) == {"encoder.pt", "decoder.pt", "token_embedding.npy"}
    assert (art.path / BUILD_LOG).is_file()  # what the toolchain printed: beside the files, not one of them
    for name, facts in m["files"].items():
        assert file_sha256(art.file(name)) == facts["sha256"]
    assert m["io"]["encoder.pt"]["inputs"]["mel"] == [1, 80, 3000]
    assert m["io"]["decoder.pt"]["inputs"]["token_embeddings"] == [1, "L", 384]
    assert m["status"] == "ok" and m["parity_failures"] == []
    assert m["parity"]["top1_agreement"] == 1.0 and m["parity"]["encoder_snr_db"] > 60
    assert art.path.name.startswith("torchscript-mtk-fp32-") and m["key"] in art.path.name


def test_second_ensure_reuses_the_artifact(tiny_artifacts, tiny_checkpoint, models_root):
    art, how = ensure(tiny_checkpoint, "tiny.en", "torchscript-mtk", "fp32", models_root)
    assert how == "reused" and art.path == tiny_artifacts["torchscript-mtk"].path
    assert not list(art.path.parent.glob(".*"))  # no temporary folder left behind


def test_key_depends_on_target_and_quant(tiny_checkpoint):
    keys = {artifact_key(tiny_checkpoint, t, "fp32")[0] for t in TARGETS}
    assert len(keys) == len(TARGETS)


def test_corrupt_artifact_is_refused(tiny_artifacts, tmp_path):
    copy = broken_copy(tiny_artifacts["torchscript-mtk"], tmp_path)
    with (copy / "decoder.pt").open("r+b") as f:
        f.seek(100)
        f.write(b"\0\1\2\3")
    with pytest.raises(HarnessError, match=r"decoder\.pt: sha256 differs"):
        verify(load_artifact(copy))
    (copy / "decoder.pt").unlink()
    with pytest.raises(HarnessError, match=r"missing 'decoder\.pt'"):
        verify(load_artifact(copy))


def test_mtk_decoder_has_no_gather(tiny_artifacts):
    import torch

    decoder = torch.jit.load(str(tiny_artifacts["torchscript-mtk"].file("decoder.pt")))
    graph = str(decoder.inlined_graph)
    for op in ("aten::embedding", "aten::gather", "aten::index_select"):
        assert op not in graph


def test_mtk_decoder_handles_every_length(tiny_artifacts, tiny_dims):
    """Traced on 4 tokens, it must match the reference at other lengths too."""
    from converters.reference_target import ReferenceRunner as Reference
    from converters.torchscript_mtk_target import MtkTorchScriptRunner as Mtk

    ref, mtk = Reference(tiny_artifacts["reference"]), Mtk(tiny_artifacts["torchscript-mtk"])
    mel = np.zeros((1, tiny_dims.n_mels, 3000), dtype=np.float32)
    tokens = [*list(build_prompt(tiny_dims, DecodingOptions()).tokens), 440, 3290, 286, 257, 1332, 13, 50, 262]
    r_feat, m_feat = ref.encode(mel), mtk.encode(mel)
    for n in (2, 5, len(tokens)):
        r, _ = ref.step(tokens[:n], r_feat, None)
        m, _ = mtk.step(tokens[:n], m_feat, None)
        assert np.max(np.abs(r - m)) < 1e-3


def test_parity_gate_fails_on_a_broken_artifact(tiny_artifacts, parity_of, tmp_path):
    from converters.torchscript_mtk_target import MtkTorchScriptRunner as Mtk

    broken = broken_copy(tiny_artifacts["torchscript-mtk"], tmp_path)
    np.save(broken / "token_embedding.npy", with_noise(np.load(broken / "token_embedding.npy")))
    manifest = json.loads((broken / MANIFEST).read_text())
    tolerance = get_target(manifest["target"]).tolerance(manifest["quant"])
    failures = parity.gate(tolerance, parity_of(Mtk(load_artifact(broken))))
    assert any("logits max abs err" in f for f in failures)
    assert parity.gate(tolerance, manifest["parity"]) == []


def test_a_crashing_converter_is_a_failed_cell_with_its_log(monkeypatch, tiny_checkpoint, tmp_path, capfd):
    """A toolchain that dies mid-build leaves no artifact, keeps its output in a log, and the cell
    reads `failed` with the error's first line; the next cells still get their turn."""
    import os

    def crash(checkpoint, model, quant, out, calibration):
        (out / "encoder.pt").write_bytes(b"half")
        os.write(2, b"native toolchain: lowering failed at node 42\n")
        raise RuntimeError("lowering failed\nwith a long C++ trace")

    broken = replace(torchscript_mtk_target.IMPLEMENTATION, convert=crash)
    monkeypatch.setattr(torchscript_mtk_target, "IMPLEMENTATION", broken)
    result = prepare(tiny_checkpoint, ("tiny.en", "torchscript-mtk", "fp32"), tmp_path)
    assert result.status == "failed" and result.artifact is None
    assert result.reason.startswith("build error: RuntimeError: lowering failed (log: ")
    (log,) = (tmp_path / "tiny.en").glob("*.failed.log")
    assert "lowering failed at node 42" in log.read_text() and str(log) in result.reason
    lock = lock_path(log.with_name(log.name.removesuffix(".failed.log")))
    assert sorted(p.name for p in (tmp_path / "tiny.en").iterdir()) == [log.name, lock.name]  # nothing half-built
    assert "node 42" not in capfd.readouterr().err


def test_a_refused_build_is_recorded_and_not_retried(monkeypatch, tiny_checkpoint, tmp_path):
    """A toolchain whose files its runtime refuses gives the same answer until its versions (the key)
    change: the second call reads the record instead of converting again."""
    from harness.core.target import Refused

    calls = []

    def refused(checkpoint, model, quant, out, calibration):
        calls.append(quant)
        raise Refused("quantizer wrote a NaN scale")

    refusing = replace(torchscript_mtk_target.IMPLEMENTATION, convert=refused)
    monkeypatch.setattr(torchscript_mtk_target, "IMPLEMENTATION", refusing)
    first = prepare(tiny_checkpoint, ("tiny.en", "torchscript-mtk", "fp32"), tmp_path)
    second = prepare(tiny_checkpoint, ("tiny.en", "torchscript-mtk", "fp32"), tmp_path)
    assert calls == ["fp32"] and first.status == second.status == "unavailable"
    assert first.reason == "quantizer wrote a NaN scale"
    (record,) = (tmp_path / "tiny.en").glob("*.refused.json")
    assert second.reason == f"quantizer wrote a NaN scale (recorded in {record}; delete it to retry)"
    assert json.loads(record.read_text())["toolchain"]["torch"]  # keyed like an artifact
    record.unlink()
    prepare(tiny_checkpoint, ("tiny.en", "torchscript-mtk", "fp32"), tmp_path)
    assert calls == ["fp32", "fp32"]


@pytest.fixture(scope="module")
def large_v3_shaped(tmp_path_factory):
    """A checkpoint shaped like large-v3 where sizes differ in kind (128 mel bins, the 51866-token
    vocabulary with 100 languages) but two layers of width 64, seeded random weights: the sizes
    without packaged weights cannot be downloaded here, and every target must still take them."""
    from dataclasses import asdict

    import torch
    from whisper.model import ModelDimensions, Whisper

    from harness.core.weights import resolve_checkpoint

    dims = ModelDimensions(
        n_mels=128, n_audio_ctx=1500, n_audio_state=64, n_audio_head=2, n_audio_layer=2,
        n_vocab=51866, n_text_ctx=448, n_text_state=64, n_text_head=2, n_text_layer=2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Whisper(dims)
    # whisper leaves the decoder's positional embedding uninitialized (torch.empty): the
    # checkpoint fills it, and a random model must too, or it holds whatever memory held
    torch.nn.init.normal_(model.decoder.positional_embedding, std=0.02)
    path = tmp_path_factory.mktemp("weights") / "large-v3-shaped.pt"
    torch.save({"dims": asdict(dims), "model_state_dict": model.state_dict()}, path)
    return resolve_checkpoint(str(path))


@pytest.mark.slow  # minutes of real runs: the integration tier keeps to its 12-minute budget
@pytest.mark.parametrize("target", [t for t in TARGETS if t != "reference"])
def test_every_target_converts_a_large_v3_shaped_model(large_v3_shaped, target, tmp_path_factory):
    root = tmp_path_factory.getbasetemp() / "large-v3-shaped-models"
    result = prepare(large_v3_shaped, (str(large_v3_shaped.path), target, "fp32"), root)
    assert result.status.runnable or (result.status == "unavailable" and result.artifact is not None), result.describe()
    m = result.artifact.manifest
    assert m["status"] == "ok" and m["dims"]["n_mels"] == 128 and m["dims"]["n_vocab"] == 51866
    assert m["parity"]["top1_agreement"] == 1.0 and m["parity"]["logits_max_abs_err"] < 1e-3, m["parity"]


@pytest.mark.unit
def test_nan_numbers_fail_every_check():
    """NaN compares false with everything: an artifact that computes NaN must not slip through."""
    nan = float("nan")
    numbers = {"encoder_snr_db": nan, "logits_max_abs_err": nan, "top1_agreement": nan}
    assert len(parity.gate(get_target("torchscript").tolerance("int8"), numbers)) == 3
    assert np.isnan(parity.snr_db(np.ones(3), np.array([1.0, nan, 1.0])))  # not "inf", as for equal outputs
