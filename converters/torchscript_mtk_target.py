"""`torchscript-mtk`: the MediaTek-friendly form of Whisper, traced to TorchScript (stage 1 of
the MediaTek port).

The NPU has no GATHER, so the decoder never sees token ids: it takes token *embeddings*
[1, L, d] that the host looks up in `token_embedding.npy`. The positional embedding and an
additive causal mask are buffers, attention is explicit matmul/softmax (no SDPA), and the LM head
is the tied embedding matrix. No KV cache: every step recomputes the sequence, as the port does.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from whisper.model import Whisper

from harness.core.checkpoint import Checkpoint
from harness.core.target import (
    DEFAULT_THREADS,
    Artifact,
    Implementation,
    Runner,
    encoder_io,
)
from harness.core.window import mel_frames

ENCODER, DECODER, EMBEDDING = "encoder.pt", "decoder.pt", "token_embedding.npy"
TRACE_LENGTH = 4  # traced on a 4-token prompt; slicing by the input's length keeps L dynamic


class EmbeddingDecoder(nn.Module):
    """Whisper's TextDecoder with the embedding lookup moved to the host."""

    def __init__(self, decoder: nn.Module) -> None:
        super().__init__()
        self.blocks = decoder.blocks
        self.ln = decoder.ln
        self.register_buffer("positional_embedding", decoder.positional_embedding.detach().clone())
        self.register_buffer("causal_mask", decoder.mask.detach().clone())  # additive: 0 / -inf
        self.register_buffer("lm_head", decoder.token_embedding.weight.detach().clone())  # tied

    def forward(self, token_embeddings: torch.Tensor, audio_features: torch.Tensor) -> torch.Tensor:
        length = token_embeddings.shape[1]
        x = token_embeddings + self.positional_embedding[:length]
        for block in self.blocks:
            x = block(x, audio_features, mask=self.causal_mask)
        x = self.ln(x[:, -1:])  # only the last position's logits are ever used
        return (x @ self.lm_head.T)[:, 0]


def _traced(model) -> tuple[torch.jit.ScriptModule, torch.jit.ScriptModule, np.ndarray]:
    from whisper.model import disable_sdpa

    dims = model.dims
    mel = torch.zeros(1, dims.n_mels, mel_frames(dims.n_audio_ctx))
    # whisper's encoder asserts its input shape: constant for the fixed [1, n_mels, 3000] input,
    # so the tracer's warning about it (and torch.jit's deprecation notice) is noise here
    with torch.inference_mode(False), torch.no_grad(), disable_sdpa(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        encoder = torch.jit.trace(model.encoder, mel, check_trace=False)
        features = model.encoder(mel)
        emb = model.decoder.token_embedding.weight.detach()
        decoder = torch.jit.trace(
            EmbeddingDecoder(model.decoder).eval(), (emb[:TRACE_LENGTH][None], features), check_trace=False
        )
    return encoder, decoder, emb.numpy().astype(np.float32)


def convert(
    checkpoint: Checkpoint, model: Whisper, quant: str, out: Path, calibration: Sequence[np.ndarray]
) -> dict[str, Any]:
    encoder, decoder, embedding = _traced(model)
    torch.jit.save(encoder, str(out / ENCODER))
    torch.jit.save(decoder, str(out / DECODER))
    np.save(out / EMBEDDING, embedding)
    d = model.dims
    return {
        "io": {
            ENCODER: encoder_io(d),
            DECODER: {
                "inputs": {
                    "token_embeddings": [1, "L", d.n_text_state],
                    "audio_features": [1, d.n_audio_ctx, d.n_audio_state],
                },
                "outputs": {"logits": [1, d.n_vocab]},
                "max_L": d.n_text_ctx,
            },
            EMBEDDING: {"shape": list(embedding.shape), "dtype": "float32"},
        },
    }


class MtkTorchScriptRunner(Runner):
    """No KV cache: every step recomputes the whole sequence, as the port does."""

    def __init__(self, artifact: Artifact, threads: int = DEFAULT_THREADS) -> None:
        self.encoder = torch.jit.load(str(artifact.file(ENCODER))).eval()
        self.decoder = torch.jit.load(str(artifact.file(DECODER))).eval()
        self.embedding = np.load(artifact.file(EMBEDDING))

    @torch.inference_mode()
    def encode(self, mel: np.ndarray) -> torch.Tensor:
        return self.encoder(torch.from_numpy(mel))

    @torch.inference_mode()
    def step(self, tokens: Sequence[int], audio_features: Any, cache: Any) -> tuple[np.ndarray, Any]:
        embeddings = torch.from_numpy(self.embedding[np.asarray(tokens)][None])  # the host-side lookup
        return self.decoder(embeddings, audio_features)[0].numpy(), None


IMPLEMENTATION = Implementation(convert=convert, runner=MtkTorchScriptRunner)
