"""`torchscript`: Whisper traced to TorchScript with an explicit KV cache, in fp32, fp16 or int8.

Three traced graphs from `converters.forms.cached_step`: the encoder, the cross-attention K/V
projection (once per utterance) and the KV-cached decoder step, whose cache length stays
dynamic because the trace reads it from the cache tensor's shape. Quantizations:

- fp32: the modules as they are.
- fp16: weights and activations in half; LayerNorms and softmax in float32, as whisper's own
  fp16 path does, since their reductions overflow or lose too much in half. On a CPU without
  native half arithmetic (no AVX512-FP16/AMX-FP16: `torch.ops.mkldnn._is_mkldnn_fp16_supported()`
  is False) torch converts per op; measured on tiny.en, one AMD EPYC AVX-512 thread: encoder
  2.2 s vs 0.46 s in fp32, decoder step 10 ms vs 18 ms (half the bytes to read), so slower but
  practical, and its drift from the reference is worth measuring anywhere.
- int8: `torch.ao.quantization.quantize_dynamic` on every `nn.Linear` (the vocabulary projection
  included: it is an `nn.Linear` in `cached_step.TiedVocab`), int8 weights and 8-bit activations
  quantized per call.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from whisper.model import Whisper

from converters.forms.cached_step import modules
from harness.core.checkpoint import Checkpoint
from harness.core.target import (
    DEFAULT_THREADS,
    Artifact,
    Implementation,
    Runner,
    encoder_io,
)
from harness.core.window import mel_frames

ENCODER, CROSS_KV, DECODER = "encoder.pt", "cross_kv.pt", "decoder_step.pt"
# traced with 2 new tokens on a 3-position cache: neither length is 0 or 1, so the tracer
# cannot fold a size into a constant that happens to hold only for the traced call
TRACE_TOKENS, TRACE_CACHE = 2, 3


def _prepare(module: nn.Module, quant: str) -> nn.Module:
    """`module` in `quant` (one the TARGET offers: the store checks before converting)."""
    if quant == "fp16":
        module = module.half()
        for m in module.modules():
            if isinstance(m, nn.LayerNorm):
                m.float()  # whisper's LayerNorm computes in float32 and casts back
        return module
    if quant == "int8":
        return torch.ao.quantization.quantize_dynamic(module, {nn.Linear}, dtype=torch.qint8)
    return module


def trace(model: Whisper, quant: str) -> tuple[torch.jit.ScriptModule, ...]:
    """The traced (encoder, cross_kv, decoder_step) of `model` in `quant`."""
    d = model.dims
    encoder, cross_kv, step = (_prepare(m, quant) for m in modules(model))
    mel = torch.zeros(1, d.n_mels, mel_frames(d.n_audio_ctx))
    with torch.inference_mode(False), torch.no_grad():
        # the encoder keeps whisper's SDPA: it has no mask and a fixed length, so nothing in it is
        # symbolic, and on CPU it is ~1.6x faster than explicit attention over 1500 positions
        traced_encoder = torch.jit.trace(encoder, mel, check_trace=False)
        features = encoder(mel)
        traced_cross_kv = torch.jit.trace(cross_kv, features, check_trace=False)
        cross_k, cross_v = cross_kv(features)
        tokens = torch.zeros(1, TRACE_TOKENS, dtype=torch.long)
        # distinct sample tensors, so no input can be taken for an alias of another
        self_k, self_v = torch.zeros(2, d.n_text_layer, 1, TRACE_CACHE, d.n_text_state, dtype=cross_k.dtype).unbind()
        traced_step = torch.jit.trace(step, (tokens, self_k, self_v, cross_k, cross_v), check_trace=False)
    return traced_encoder, traced_cross_kv, traced_step


def convert(
    checkpoint: Checkpoint, model: Whisper, quant: str, out: Path, calibration: Sequence[np.ndarray]
) -> dict[str, Any]:
    d = model.dims
    for module, name in zip(trace(model, quant), (ENCODER, CROSS_KV, DECODER), strict=True):
        torch.jit.save(module, str(out / name))
    cache_dtype = torch.float16 if quant == "fp16" else torch.float32
    kv = [d.n_text_layer, 1, d.n_audio_ctx, d.n_text_state]
    self_kv = [d.n_text_layer, 1, "T", d.n_text_state]
    new_kv = [d.n_text_layer, 1, "T+n", d.n_text_state]
    return {
        "path": f"torch.jit.trace of converters.forms.cached_step modules ({quant})",
        "cache_dtype": str(cache_dtype).removeprefix("torch."),
        "io": {
            ENCODER: encoder_io(d),
            CROSS_KV: {
                "inputs": {"audio_features": [1, d.n_audio_ctx, d.n_audio_state]},
                "outputs": {"cross_k": kv, "cross_v": kv},
            },
            DECODER: {
                "inputs": {"tokens": [1, "n"], "self_k": self_kv, "self_v": self_kv, "cross_k": kv, "cross_v": kv},
                "outputs": {"logits": [1, d.n_vocab], "new_self_k": new_kv, "new_self_v": new_kv},
                "max_T+n": d.n_text_ctx,
            },
        },
    }


class TorchScriptRunner(Runner):
    def __init__(self, artifact: Artifact, threads: int = DEFAULT_THREADS) -> None:
        self.encoder = torch.jit.load(str(artifact.file(ENCODER))).eval()
        self.cross_kv = torch.jit.load(str(artifact.file(CROSS_KV))).eval()
        self.decoder = torch.jit.load(str(artifact.file(DECODER))).eval()

    @torch.inference_mode()
    def encode(self, mel: np.ndarray) -> torch.Tensor:
        return self.encoder(torch.from_numpy(mel))

    @torch.inference_mode()
    def step(self, tokens: Sequence[int], audio_features: Any, cache: Any) -> tuple[np.ndarray, Any]:
        """cache: (cross_k, cross_v, self_k, self_v); the self cache's length is the tokens already seen."""
        if cache is None:  # a new utterance: its cross-attention K/V, once
            cross_k, cross_v = self.cross_kv(audio_features)
            n_layer, _, _, n_state = cross_k.shape
            self_k = self_v = torch.zeros(n_layer, 1, 0, n_state, dtype=cross_k.dtype)
        else:
            cross_k, cross_v, self_k, self_v = cache
        new = torch.tensor([list(tokens[self_k.shape[2] :])])
        logits, self_k, self_v = self.decoder(new, self_k, self_v, cross_k, cross_v)
        return logits[0].numpy(), (cross_k, cross_v, self_k, self_v)


IMPLEMENTATION = Implementation(convert=convert, runner=TorchScriptRunner)
