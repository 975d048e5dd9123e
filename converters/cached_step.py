"""Whisper's decoder step with an explicit KV cache, as plain modules that exporters can trace.

openai-whisper keeps its cache in a Python dict filled by forward hooks, which neither
`torch.jit.trace` nor `torch.export` can carry across calls. Here the cache is tensors in and out:

- `CrossKV`: audio features → the cross-attention keys and values of every layer, stacked
  [n_layer, 1, n_audio_ctx, d]; computed once per utterance.
- `DecoderStep`: (new tokens [1, n], self-attention keys and values of the earlier positions
  [n_layer, 1, T, d], cross keys and values) → (logits [1, n_vocab] of the last position, the
  self-attention keys and values of all T + n positions). T is the cache length (0 on the first
  call), so the positions of the new tokens follow from the cache's shape: no offset input.
- `Encoder`: whisper's encoder taking a float32 mel whatever the weights' dtype; its features
  (and so both caches) are in the weights' dtype.

The decoder's attention is explicit (matmul, softmax, additive causal mask buffer), never SDPA,
whose `is_causal` flag becomes a symbolic value under dynamic-length export; the encoder's is
whisper's own (no mask, fixed length: exporters pick SDPA or not with `disable_sdpa`). Every
linear layer is a plain `nn.Linear` (whisper's own subclass is not matched by `quantize_dynamic`)
and the tied vocabulary projection is a quantizable one too (`TiedVocab`, `TransposedVocab`).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from whisper.model import AudioEncoder, MultiHeadAttention, ResidualAttentionBlock, TextDecoder, Whisper


def plain_linear(src: nn.Linear) -> nn.Linear:
    """An `nn.Linear` sharing `src`'s parameters (whisper's Linear casts weights per call)."""
    out = nn.Linear(src.in_features, src.out_features, bias=src.bias is not None)
    out.weight = src.weight
    if src.bias is not None:
        out.bias = src.bias
    return out


def use_plain_linears(module: nn.Module) -> nn.Module:
    """`module` with its linear layers, in place, all exactly `nn.Linear`."""
    for parent in list(module.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.Linear) and type(child) is not nn.Linear:
                setattr(parent, name, plain_linear(child))
    return module


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_head: int, mask: torch.Tensor | None
) -> torch.Tensor:
    """whisper.model.MultiHeadAttention.qkv_attention without SDPA: [1, n, d] x [1, T, d] → [1, n, d]."""
    d_head = q.shape[-1] // n_head
    scale = d_head**-0.25  # split between q and k, as whisper does, to keep fp16 products in range
    q = q.view(q.shape[0], q.shape[1], n_head, d_head).permute(0, 2, 1, 3)
    k = k.view(k.shape[0], k.shape[1], n_head, d_head).permute(0, 2, 1, 3)
    v = v.view(v.shape[0], v.shape[1], n_head, d_head).permute(0, 2, 1, 3)
    qk = (q * scale) @ (k * scale).transpose(-1, -2)
    if mask is not None:
        qk = qk + mask
    w = F.softmax(qk.float(), dim=-1).to(q.dtype)
    return (w @ v).permute(0, 2, 1, 3).flatten(start_dim=2)


class Encoder(nn.Module):
    """whisper's AudioEncoder (plain linears) on a float32 mel."""

    def __init__(self, encoder: AudioEncoder) -> None:
        super().__init__()
        self.encoder = use_plain_linears(encoder)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        return self.encoder(mel.to(self.encoder.conv1.weight.dtype))


class CrossKV(nn.Module):
    """Audio features [1, n_audio_ctx, d] → cross-attention K and V, each [n_layer, 1, n_audio_ctx, d]."""

    def __init__(self, decoder: TextDecoder) -> None:
        super().__init__()
        self.keys = nn.ModuleList(plain_linear(b.cross_attn.key) for b in decoder.blocks)
        self.values = nn.ModuleList(plain_linear(b.cross_attn.value) for b in decoder.blocks)

    def forward(self, audio_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys = torch.stack([key(audio_features) for key in self.keys])
        return keys, torch.stack([value(audio_features) for value in self.values])


class SelfAttention(nn.Module):
    def __init__(self, attn: MultiHeadAttention) -> None:
        super().__init__()
        self.n_head = attn.n_head
        self.query, self.key = plain_linear(attn.query), plain_linear(attn.key)
        self.value, self.out = plain_linear(attn.value), plain_linear(attn.out)

    def forward(
        self, x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        k = torch.cat([k_cache, self.key(x)], dim=1)
        v = torch.cat([v_cache, self.value(x)], dim=1)
        return self.out(attention(self.query(x), k, v, self.n_head, mask)), k, v


class CrossAttention(nn.Module):
    """Cross-attention on precomputed K and V: only the query and output projections remain."""

    def __init__(self, attn: MultiHeadAttention) -> None:
        super().__init__()
        self.n_head = attn.n_head
        self.query, self.out = plain_linear(attn.query), plain_linear(attn.out)

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.out(attention(self.query(x), k, v, self.n_head, None))


class Block(nn.Module):
    def __init__(self, block: ResidualAttentionBlock) -> None:  # one with cross-attention
        super().__init__()
        self.attn, self.attn_ln = SelfAttention(block.attn), block.attn_ln
        self.cross_attn, self.cross_attn_ln = CrossAttention(block.cross_attn), block.cross_attn_ln
        self.mlp = nn.Sequential(plain_linear(block.mlp[0]), nn.GELU(), plain_linear(block.mlp[2]))
        self.mlp_ln = block.mlp_ln

    def forward(self, x, k_cache, v_cache, cross_k, cross_v, mask):
        a, k, v = self.attn(self.attn_ln(x), k_cache, v_cache, mask)
        x = x + a
        x = x + self.cross_attn(self.cross_attn_ln(x), cross_k, cross_v)
        return x + self.mlp(self.mlp_ln(x)), k, v


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
        self.blocks = nn.ModuleList(Block(b) for b in decoder.blocks)
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
            x, k, v = block(x, self_k[i], self_v[i], cross_k[i], cross_v[i], mask)
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
    return Encoder(model.encoder).eval(), CrossKV(model.decoder).eval(), DecoderStep(model.decoder, vocab).eval()
