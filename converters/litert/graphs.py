"""The LiteRT forms' graphs: fixed shapes throughout, a static self-attention cache the host owns.

- `encoder.tflite`: mel [1, n_mels, 2 x n_audio_ctx] → audio_features [1, n_audio_ctx, d] (fixed:
  an artifact per `decoding.audio_ctx`, each with its own store key);
- `cross_kv.tflite`: audio_features → every layer's cross-attention keys (prescaled) and values,
  computed once per utterance instead of once per token;
- `decoder.tflite`: one token per call against a static self-attention KV cache of n_text_ctx
  slots. The host feeds the cache and an additive mask row (filled slots 0, the rest `MASKED`),
  and writes the step's new key/value row back into slot `position`. The token's own key is
  concatenated inside the graph, so no scatter or dynamic-update op is needed.

The `tflite` decoder looks its token and position up inside the graph; the MediaTek form
(`converters.mtk_target`) takes both embeddings as inputs (no GATHER on the NPU). Both build on
`DecoderLayers`, whose blocks are `converters.forms.blocks.DecoderBlock` with prescaled keys. The
`executorch` target lowers these same graphs (`converters.executorch_target`), its decoder given
each layer's cache as an input of its own (`DecoderLayers` indexes a tuple as it does a stack).
"""

from __future__ import annotations

import torch
from torch import nn
from whisper.model import Whisper

from converters.forms.blocks import CrossKV, DecoderBlock
from harness.core.window import mel_frames

ENCODER, CROSS_KV, DECODER = "encoder.tflite", "cross_kv.tflite", "decoder.tflite"
CACHE_INPUTS = ("mask", "k_cache", "v_cache", "cross_k", "cross_v")
DECODER_OUTPUTS = ("logits", "k_new", "v_new")
IoNames = tuple[tuple[str, ...], tuple[str, ...]]  # (input names, output names) in traced order
IO_NAMES: dict[str, IoNames] = {
    ENCODER: (("mel",), ("audio_features",)),
    CROSS_KV: (("audio_features",), ("cross_k", "cross_v")),
    DECODER: (("token", "position", *CACHE_INPUTS), DECODER_OUTPUTS),
}
# Additive mask value of an empty cache slot. Finite, not -inf: exp() underflows to 0 all the
# same, and a calibrated int8 graph needs a finite range for the mask input.
MASKED = -1e4


class EncoderGraph(nn.Module):
    def __init__(self, model: Whisper) -> None:
        super().__init__()
        self.encoder = model.encoder

    def forward(self, mel: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"audio_features": self.encoder(mel)}


class CrossKVGraph(nn.Module):
    """Every decoder layer's cross-attention keys (prescaled) and values: [n_layer, 1, n_audio_ctx, d]."""

    def __init__(self, model: Whisper) -> None:
        super().__init__()
        self.cross_kv = CrossKV(model.decoder, prescale_keys=True)

    def forward(self, audio_features: torch.Tensor) -> dict[str, torch.Tensor]:
        keys, values = self.cross_kv(audio_features)
        return {"cross_k": keys, "cross_v": values}


class DecoderLayers(nn.Module):
    """The decoder after its embeddings: one position against the static KV cache.

    x [1, 1, d]; mask [1, 1, N] additive over the cache slots; k_cache, v_cache [n_layer, 1, N, d]
    (keys prescaled, as this graph returns them); cross_k, cross_v from CrossKVGraph. Returns the
    logits [1, n_vocab] and this position's keys and values [n_layer, 1, 1, d] for the host to
    store in slot `position`.
    """

    def __init__(self, model: Whisper) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(DecoderBlock(b, prescale_keys=True) for b in model.decoder.blocks)
        self.ln = model.decoder.ln
        self.lm_head = model.decoder.token_embedding.weight  # tied to the embedding

    def forward(self, x, mask, k_cache, v_cache, cross_k, cross_v) -> dict[str, torch.Tensor]:
        with_self = torch.cat([mask, torch.zeros_like(mask[..., :1])], dim=-1)  # the token sees itself
        new_k, new_v = [], []
        for i, block in enumerate(self.blocks):
            x, _, _, k, v = block(x, k_cache[i], v_cache[i], cross_k[i], cross_v[i], with_self)
            new_k.append(k)
            new_v.append(v)
        logits = nn.functional.linear(self.ln(x)[:, 0], self.lm_head)  # a FULLY_CONNECTED the quantizer takes
        return {"logits": logits, "k_new": torch.stack(new_k), "v_new": torch.stack(new_v)}


class TokenDecoderGraph(nn.Module):
    """The `tflite` decoder: token id and position in, both embedding lookups inside the graph."""

    def __init__(self, model: Whisper) -> None:
        super().__init__()
        self.layers = DecoderLayers(model)
        self.token_embedding = model.decoder.token_embedding
        self.positional_embedding = model.decoder.positional_embedding

    def forward(self, token, position, mask, k_cache, v_cache, cross_k, cross_v) -> dict[str, torch.Tensor]:
        x = self.token_embedding(token) + self.positional_embedding[position][None]
        return self.layers(x, mask, k_cache, v_cache, cross_k, cross_v)


Part = tuple[nn.Module, dict[str, torch.Tensor]]  # a module and sample inputs that fix its shapes


def cache_samples(model: Whisper) -> dict[str, torch.Tensor]:
    """Sample values of the decoder's mask, cache and cross-attention inputs (CACHE_INPUTS)."""
    d = model.dims
    cache = torch.zeros(d.n_text_layer, 1, d.n_text_ctx, d.n_text_state)
    cross = torch.zeros(d.n_text_layer, 1, d.n_audio_ctx, d.n_text_state)
    mask = torch.full((1, 1, d.n_text_ctx), MASKED)
    return {"mask": mask, "k_cache": cache, "v_cache": cache.clone(), "cross_k": cross, "cross_v": cross.clone()}


def audio_parts(model: Whisper) -> dict[str, Part]:
    """The encoder and cross-attention graphs, the same in every LiteRT form."""
    d = model.dims
    return {
        ENCODER: (EncoderGraph(model), {"mel": torch.zeros(1, d.n_mels, mel_frames(d.n_audio_ctx))}),
        CROSS_KV: (CrossKVGraph(model), {"audio_features": torch.zeros(1, d.n_audio_ctx, d.n_audio_state)}),
    }


def parts(model: Whisper) -> dict[str, Part]:
    """The `tflite` form's three graphs."""
    token = {"token": torch.zeros(1, 1, dtype=torch.int32), "position": torch.zeros(1, dtype=torch.int32)}
    return {**audio_parts(model), DECODER: (TokenDecoderGraph(model), {**token, **cache_samples(model)})}
