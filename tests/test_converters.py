"""Registry, artifact store and parity gate, on real tiny.en artifacts."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from converters import parity
from converters.registry import TARGETS, get_target
from converters.store import MANIFEST, artifact_key, ensure, file_sha256, load_artifact, verify
from harness.decoding import build_prompt
from harness.errors import HarnessError
from harness.spec import DecodingSpec


def test_every_registry_entry_builds():
    for name, target in TARGETS.items():
        module = target.load()
        assert callable(module.convert) and hasattr(module, "Runner"), name
        assert target.quants, name


def test_unknown_target_suggests_the_closest():
    with pytest.raises(HarnessError, match="did you mean 'torchscript-mtk'"):
        get_target("torchscript-mkt")


def test_manifest_records_recipe_checksums_shapes_and_parity(tiny_artifacts, tiny_checkpoint):
    art = tiny_artifacts["torchscript-mtk"]
    m = art.manifest
    assert m["source"]["sha256"] == tiny_checkpoint.sha256
    assert {"torch", "openai-whisper", "numpy"} <= set(m["toolchain"])
    assert set(m["files"]) == {"encoder.pt", "decoder.pt", "token_embedding.npy"}
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
    copy = tmp_path / "copy"
    shutil.copytree(tiny_artifacts["torchscript-mtk"].path, copy)
    with (copy / "decoder.pt").open("r+b") as f:
        f.seek(100)
        f.write(b"\0\1\2\3")
    with pytest.raises(HarnessError, match=r"decoder\.pt: sha256 differs"):
        verify(load_artifact(copy))
    (copy / "decoder.pt").unlink()
    with pytest.raises(HarnessError, match=r"decoder\.pt is missing"):
        verify(load_artifact(copy))


def test_mtk_decoder_has_no_gather(tiny_artifacts):
    import torch

    decoder = torch.jit.load(str(tiny_artifacts["torchscript-mtk"].file("decoder.pt")))
    graph = str(decoder.inlined_graph)
    for op in ("aten::embedding", "aten::gather", "aten::index_select"):
        assert op not in graph


def test_mtk_decoder_handles_every_length(tiny_artifacts, tiny_dims):
    """Traced on 4 tokens, it must match the reference at other lengths too."""
    from converters.reference import Runner as Reference
    from converters.torchscript_mtk import Runner as Mtk

    ref, mtk = Reference(tiny_artifacts["reference"]), Mtk(tiny_artifacts["torchscript-mtk"])
    mel = np.zeros((1, tiny_dims.n_mels, 3000), dtype=np.float32)
    tokens = [*list(build_prompt(tiny_dims, DecodingSpec()).tokens), 440, 3290, 286, 257, 1332, 13, 50, 262]
    r_feat, m_feat = ref.encode(mel), mtk.encode(mel)
    for n in (2, 5, len(tokens)):
        r, _ = ref.step(tokens[:n], r_feat, None)
        m, _ = mtk.step(tokens[:n], m_feat, None)
        assert np.max(np.abs(r - m)) < 1e-3


def test_parity_gate_fails_on_a_broken_artifact(tiny_artifacts, tiny_dims, tmp_path):
    from converters.reference import Runner as Reference
    from converters.torchscript_mtk import Runner as Mtk

    broken = tmp_path / "broken"
    shutil.copytree(tiny_artifacts["torchscript-mtk"].path, broken)
    emb = np.load(broken / "token_embedding.npy")
    rng = np.random.default_rng(0)
    np.save(broken / "token_embedding.npy", emb + rng.normal(0, emb.std(), emb.shape).astype(np.float32))
    manifest = json.loads((broken / MANIFEST).read_text())
    numbers = parity.measure(
        Reference(tiny_artifacts["reference"]),
        Mtk(load_artifact(broken)),
        tiny_dims,
        build_prompt(tiny_dims, DecodingSpec()),
    )
    failures = parity.gate(manifest["target"], manifest["quant"], numbers)
    assert any("logits max abs err" in f for f in failures)
    assert parity.gate("torchscript-mtk", "fp32", manifest["parity"]) == []
