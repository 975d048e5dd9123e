"""Whisper as three traceable modules with a dynamic-length KV cache (the `torchscript` and `onnx` forms).

- `Encoder`: whisper's encoder taking a float32 mel whatever the weights' dtype; its features
  (and so both caches) are in the weights' dtype.
- `CrossKV` (`converters.forms.blocks`): audio features → the cross-attention keys and values of every
  layer, stacked [n_layer, 1, n_audio_ctx, d]; computed once per utterance.
- `DecoderStep`: (new tokens [1, n], self-attention keys and values of the earlier positions
  [n_layer, 1, T, d], cross keys and values) → (logits [1, n_vocab] of the last position, the
  self-attention keys and values of all T + n positions). T is the cache length (0 on the first
  call), so the positions of the new tokens follow from the cache's shape: no offset input.

The decoder blocks are `converters.forms.blocks.DecoderBlock`; the encoder's attention is whisper's own
(no mask, fixed length: exporters pick SDPA or not with `disable_sdpa`). The tied vocabulary
projection is a quantizable layer too (`TiedVocab`, `TransposedVocab`).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from whisper.model import AudioEncoder, TextDecoder, Whisper

from converters.forms.blocks import CrossKV, DecoderBlock, use_plain_linears


class Encoder(nn.Module):
    """whisper's AudioEncoder (plain linears) on a float32 mel."""

    def __init__(self, encoder: AudioEncoder) -> None:
        super().__init__()
        self.encoder = use_plain_linears(encoder)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        return self.encoder(mel.to(self.encoder.conv1.weight.dtype))


class TiedVocab(nn.Module):
    """The token embedding and the tied vocabulary projection as an `nn.Linear` sharing its weight.

    `torch.ao.quantization.quantize_dynamic` then quantizes the projection; the embedding lookup
    keeps the float weight.
    """

    def __init__(self, weight: nn.Parameter) -> None:
        super().__init__()
        n_vocab, n_state = weight.shape
        self.token_embedding = nn.Embedding(n_vocab, n_state)
        self.token_embedding.weight = weight
        self.lm_head = nn.Linear(n_state, n_vocab, bias=False)
        self.lm_head.weight = weight

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(tokens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(x)


class TransposedVocab(nn.Module):
    """The same, stored once as [d, n_vocab], the layout ONNX's MatMul takes as its B input.

    An `nn.Linear` exports as MatMul(x, Transpose(W)); the ONNX exporter folds that Transpose
    into a new initializer only for small weights, and `onnxruntime.quantization` quantizes a
    MatMul only when B is an initializer, so the vocabulary projection would stay float. Here
    B is the initializer itself, and the embedding lookup gathers columns of the same tensor, so
    the file holds it once.
    """

    def __init__(self, weight: nn.Parameter) -> None:
        super().__init__()
        self.weight_t = nn.Parameter(weight.detach().T.contiguous())

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.weight_t.index_select(1, tokens.flatten()).T.reshape(*tokens.shape, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight_t


class DecoderStep(nn.Module):
    """One KV-cached step of whisper's TextDecoder; see the module docstring for the I/O."""

    def __init__(self, decoder: TextDecoder, vocab: type[TiedVocab | TransposedVocab] = TiedVocab) -> None:
        super().__init__()
        self.vocab = vocab(decoder.token_embedding.weight)
        self.positional_embedding = nn.Parameter(decoder.positional_embedding.detach().clone())
        self.blocks = nn.ModuleList(DecoderBlock(b, prescale_keys=False) for b in decoder.blocks)
        self.ln = decoder.ln
        self.register_buffer("causal_mask", decoder.mask.detach().clone())  # additive: 0 / -inf

    def forward(
        self,
        tokens: torch.Tensor,
        self_k: torch.Tensor,
        self_v: torch.Tensor,
        cross_k: torch.Tensor,
        cross_v: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        offset, n = self_k.shape[2], tokens.shape[1]
        x = self.vocab.embed(tokens) + self.positional_embedding[offset : offset + n]
        x = x.to(cross_k.dtype)
        mask = self.causal_mask[offset : offset + n, : offset + n].to(x.dtype)
        ks, vs = [], []
        for i, block in enumerate(self.blocks):
            x, k, v, _, _ = block(x, self_k[i], self_v[i], cross_k[i], cross_v[i], mask)
            ks.append(k)
            vs.append(v)
        # only the last position's logits are ever used
        logits = self.vocab(self.ln(x[:, -1:]))[:, 0].float()
        return logits, torch.stack(ks), torch.stack(vs)


def modules(
    model: Whisper, vocab: type[TiedVocab | TransposedVocab] = TiedVocab
) -> tuple[Encoder, CrossKV, DecoderStep]:
    """The three exportable modules of `model`, in eval mode, sharing no state with it.

    The modules share parameters with the whisper modules they are built from (a dtype change
    converts those in place), hence the copy.
    """
    model = copy.deepcopy(model)
    return (
        Encoder(model.encoder).eval(),
        CrossKV(model.decoder, prescale_keys=False).eval(),
        DecoderStep(model.decoder, vocab).eval(),
    )
