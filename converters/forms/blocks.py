"""Whisper's decoder, re-expressed once for exporters: attention, the cached decoder block, cross K/V.

openai-whisper keeps its cache in a Python dict filled by forward hooks, which neither
`torch.jit.trace`, `torch.export` nor litert-torch can carry across calls, and its attention may
be SDPA, whose `is_causal` flag becomes a symbolic value under dynamic-length export. The forms
built here take the cache as tensors in and out and write attention out (matmul, softmax,
additive mask). The forms differ only in parameters:

- `prescale_keys`: whisper splits the 1/sqrt(d_head) scale between q and k (d_head**-0.25 each,
  to keep fp16 products in range). The static-cache LiteRT/MediaTek graphs store keys already
  scaled, so a step scales only its own token's key, not the whole cache; the TorchScript/ONNX
  step scales the keys it attends to.
- the embedding, positions and mask around the blocks (`converters.forms.cached_step` slices them by
  the cache length; `converters.litert.graphs` takes them as inputs at fixed shapes).

Every linear layer is a plain `nn.Linear` sharing whisper's parameters: whisper's own subclass
casts its weight per call and is not matched by `quantize_dynamic`.

The Apple-Neural-Engine form (`converters.forms.ane_model`) is the one form not built from these: its
layout is [B, C, 1, S] with 1x1 convolutions and a per-head einsum split, which is the form itself.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from whisper.model import MultiHeadAttention, ResidualAttentionBlock, TextDecoder


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


def key_scale(n_state: int, n_head: int) -> float:
    """whisper's share of the attention scale applied to each of q and k."""
    return (n_state // n_head) ** -0.25


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_head: int, mask: torch.Tensor | None, keys_scaled: bool = False
) -> torch.Tensor:
    """whisper.model.MultiHeadAttention.qkv_attention without SDPA: [b, n, d] x [b, T, d] → [b, n, d].

    `mask` is additive and broadcasts to the scores [b, n_head, n, T]; `keys_scaled`: k already
    carries its share of the scale (see the module docstring)."""
    b, n, d = q.shape
    scale = key_scale(d, n_head)
    q = q.view(b, n, n_head, -1).permute(0, 2, 1, 3) * scale
    if keys_scaled:
        k = k.view(b, k.shape[1], n_head, -1).permute(0, 2, 3, 1)
    else:  # scaled before the transpose, in this order: exporters fuse ops by their order
        k = (k.view(b, k.shape[1], n_head, -1).permute(0, 2, 1, 3) * scale).transpose(-1, -2)
    v = v.view(b, v.shape[1], n_head, -1).permute(0, 2, 1, 3)
    qk = q @ k
    if mask is not None:
        qk = qk + mask
    w = F.softmax(qk.float(), dim=-1).to(q.dtype)  # float32 softmax, as whisper computes it in fp16
    return (w @ v).permute(0, 2, 1, 3).flatten(start_dim=2)


class BlockOutput(NamedTuple):
    x: torch.Tensor
    keys: torch.Tensor  # the cache and the new positions' keys: what this step attended to
    values: torch.Tensor
    new_keys: torch.Tensor  # the new positions' keys only, for a host that owns the cache
    new_values: torch.Tensor


class DecoderBlock(nn.Module):
    """One whisper decoder block on an explicit cache: self-attention over cache + new positions,
    cross-attention on precomputed keys and values, MLP."""

    def __init__(self, block: ResidualAttentionBlock, prescale_keys: bool) -> None:
        super().__init__()
        attn, cross = block.attn, block.cross_attn
        self.n_head, self.prescale_keys = attn.n_head, prescale_keys
        self.attn_ln, self.cross_attn_ln, self.mlp_ln = block.attn_ln, block.cross_attn_ln, block.mlp_ln
        self.query, self.key, self.value, self.out = (
            plain_linear(m) for m in (attn.query, attn.key, attn.value, attn.out)
        )
        self.cross_query, self.cross_out = plain_linear(cross.query), plain_linear(cross.out)
        self.mlp = nn.Sequential(plain_linear(block.mlp[0]), nn.GELU(), plain_linear(block.mlp[2]))

    def forward(self, x, k_cache, v_cache, cross_k, cross_v, mask) -> BlockOutput:
        """x [1, n, d]; caches [1, T, d]; cross K/V [1, n_audio_ctx, d] (keys prescaled like the
        cache); mask additive over the T + n positions."""
        h = self.attn_ln(x)
        k, v = self.key(h), self.value(h)
        if self.prescale_keys:
            k = k * key_scale(x.shape[-1], self.n_head)
        keys, values = torch.cat([k_cache, k], dim=1), torch.cat([v_cache, v], dim=1)
        x = x + self.out(attention(self.query(h), keys, values, self.n_head, mask, self.prescale_keys))
        h = self.cross_attn_ln(x)
        x = x + self.cross_out(attention(self.cross_query(h), cross_k, cross_v, self.n_head, None, self.prescale_keys))
        return BlockOutput(x + self.mlp(self.mlp_ln(x)), keys, values, k, v)


class CrossKV(nn.Module):
    """Audio features [1, n_audio_ctx, d] → every layer's cross-attention K and V, each
    [n_layer, 1, n_audio_ctx, d]; computed once per utterance instead of once per token."""

    def __init__(self, decoder: TextDecoder, prescale_keys: bool) -> None:
        super().__init__()
        attns: list[MultiHeadAttention] = [b.cross_attn for b in decoder.blocks]
        self.keys = nn.ModuleList(plain_linear(a.key) for a in attns)
        self.values = nn.ModuleList(plain_linear(a.value) for a in attns)
        self.n_head, self.prescale_keys = attns[0].n_head, prescale_keys

    def forward(self, audio_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # each layer's keys scaled as they come out of their projection: an exporter may fold the
        # scale into that projection's weights, which changes the rounding of the keys
        scale = key_scale(audio_features.shape[-1], self.n_head) if self.prescale_keys else None
        keys = [key(audio_features) if scale is None else key(audio_features) * scale for key in self.keys]
        return torch.stack(keys), torch.stack([value(audio_features) for value in self.values])
