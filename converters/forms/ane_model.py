"""Whisper re-expressed for the Apple Neural Engine, in PyTorch (the form the `coreml` target converts).

The ANE's rules, as in Apple's ml-ane-transformers and the Whisper ports built on it (whisper.cpp's
CoreML converter, whisperkittools):
- activations are [B, C, 1, S] (channels first, a dummy height of 1), so every nn.Linear becomes a
  1x1 nn.Conv2d and LayerNorm normalizes over C (`LayerNormANE`);
- attention is split per head into einsums the ANE compiler maps well;
- the ANE loads no tensor dimension above 16,384, so the vocabulary projection's weight is split
  into 11 (multilingual) or 12 (English-only) chunks, as whisper.cpp splits it (the embedding
  gather and the concatenated logits keep the whole vocabulary, as in whisper.cpp and
  whisperkittools; Core ML decides where those ops run);
- shapes are static: the decoder takes one token per call with a fixed-size self-attention
  key/value cache in and that token's keys/values out (after whisperkittools' decoder), and the
  cross-attention keys/values are computed once per utterance by the encoder package instead of
  at every step.

`converters.forms.ane_host` is the host side of that interface, shared by the form in PyTorch (parity
here) and the Core ML runner (`converters.coreml_target`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from whisper.model import ModelDimensions, Whisper

ANE_MAX_DIM = 16384  # the largest tensor dimension the ANE loads
EPS = 1e-5  # whisper's nn.LayerNorm default
MASK = -1e4  # "minus infinity" that stays finite in float16 (exp underflows to 0 all the same)


def vocab_chunks(n_vocab: int) -> int:
    # whisper.cpp's split: 51,865 = 11 x 4,715 (multilingual), 51,864 = 12 x 4,322 (English-only)
    return 11 if n_vocab >= 51865 else 12


# -- weights ------------------------------------------------------------------------------------


def _correct_bias_scale_order(module, state_dict, prefix, *_args) -> None:
    """nn.LayerNorm computes x̂·w + b, `LayerNormANE` (x̂ + b)·w: store b/w so both agree.

    The same load-time hook as ml-ane-transformers' `correct_for_bias_scale_order_inversion`.
    """
    weight, bias = state_dict[prefix + "weight"], state_dict[prefix + "bias"]
    if bool((weight == 0).any()):
        raise ValueError(f"{prefix}weight has zeros: (x̂ + b)·w cannot express a LayerNorm with w = 0")
    state_dict[prefix + "bias"] = bias / weight


def _map_whisper_keys(module: WhisperANE, state_dict, prefix, *_args) -> None:
    """openai-whisper's state dict → the ANE form's: the parameter names are shared, but an nn.Linear
    weight [out, in] becomes a 1x1 nn.Conv2d weight [out, in, 1, 1], and the tied output projection
    becomes the chunks of the token embedding matrix."""
    for key, value in state_dict.items():
        if value.ndim == 2 and (".attn." in key or ".cross_attn." in key or ".mlp." in key):
            state_dict[key] = value[:, :, None, None]
    heads = module.decoder.vocab_heads
    chunks = state_dict[prefix + "decoder.token_embedding.weight"].split(heads[0].out_channels)
    for i, chunk in enumerate(chunks):
        state_dict[f"{prefix}decoder.vocab_heads.{i}.weight"] = chunk[:, :, None, None]


# -- layers -------------------------------------------------------------------------------------


class LayerNormANE(nn.Module):
    """LayerNorm over the channels of [B, C, 1, S], with bias applied before scale.

    The order is that of Apple's reference LayerNormANE, on which whisper.cpp's ANE converter
    builds; `_correct_bias_scale_order` makes nn.LayerNorm weights load into it exactly.

    The variance is the sum of (x - mean)²/C rather than the mean of (x - mean)²: in float16 a
    deviation above 256 squares past 65,504 (tiny.en's last encoder block emits 628 before
    `ln_post`, which turned the whole output to bias·weight); scaling first moves that limit to
    256·√C. (Apple's LayerNormANE clamps the input instead, which changes the result.)
    """

    def __init__(self, n_channels: int, eps: float = EPS) -> None:
        super().__init__()
        self.eps = eps
        self.scale = n_channels**-0.5
        self.weight = nn.Parameter(torch.ones(n_channels))
        self.bias = nn.Parameter(torch.zeros(n_channels))
        self.register_load_state_dict_pre_hook(_correct_bias_scale_order)

    def forward(self, x: Tensor) -> Tensor:
        zero_mean = x - x.mean(dim=1, keepdim=True)
        scaled = zero_mean * self.scale
        denom = ((scaled * scaled).sum(dim=1, keepdim=True) + self.eps).rsqrt()
        return (zero_mean * denom + self.bias.view(1, -1, 1, 1)) * self.weight.view(1, -1, 1, 1)


def attend(q: Tensor, k: Tensor, v: Tensor, n_head: int, mask: Tensor | None = None) -> Tensor:
    """Multi-head attention on [B, C, 1, S] tensors, one einsum pair per head (ml-ane-transformers'
    split_einsum). `mask` is additive, [1, S_k, 1, 1] or broadcastable to the scores [B, S_k, 1, S_q]."""
    d = q.shape[1] // n_head
    q = q * d**-0.5
    heads = []
    for qi, ki, vi in zip(q.split(d, dim=1), k.transpose(1, 3).split(d, dim=3), v.split(d, dim=1), strict=True):
        w = torch.einsum("bchq,bkhc->bkhq", qi, ki)  # [B, S_k, 1, S_q]
        if mask is not None:
            w = w + mask
        heads.append(torch.einsum("bkhq,bchk->bchq", w.softmax(dim=1), vi))  # [B, d, 1, S_q]
    return torch.cat(heads, dim=1)


class AttentionANE(nn.Module):
    """whisper.model.MultiHeadAttention's parameters (same names) as 1x1 convolutions."""

    def __init__(self, n_state: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.query = nn.Conv2d(n_state, n_state, 1)
        self.key = nn.Conv2d(n_state, n_state, 1, bias=False)
        self.value = nn.Conv2d(n_state, n_state, 1)
        self.out = nn.Conv2d(n_state, n_state, 1)


def _mlp(n_state: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(n_state, 4 * n_state, 1), nn.GELU(), nn.Conv2d(4 * n_state, n_state, 1))


class EncoderBlockANE(nn.Module):
    def __init__(self, n_state: int, n_head: int) -> None:
        super().__init__()
        self.attn = AttentionANE(n_state, n_head)
        self.attn_ln = LayerNormANE(n_state)
        self.mlp = _mlp(n_state)
        self.mlp_ln = LayerNormANE(n_state)

    def forward(self, x: Tensor) -> Tensor:
        h = self.attn_ln(x)
        a = self.attn
        x = x + a.out(attend(a.query(h), a.key(h), a.value(h), a.n_head))
        return x + self.mlp(self.mlp_ln(x))


class DecoderBlockANE(nn.Module):
    def __init__(self, n_state: int, n_head: int) -> None:
        super().__init__()
        self.attn = AttentionANE(n_state, n_head)
        self.attn_ln = LayerNormANE(n_state)
        self.cross_attn = AttentionANE(n_state, n_head)
        self.cross_attn_ln = LayerNormANE(n_state)
        self.mlp = _mlp(n_state)
        self.mlp_ln = LayerNormANE(n_state)

    def forward(
        self, x: Tensor, k_cache: Tensor, v_cache: Tensor, write: Tensor, mask: Tensor, cross_k: Tensor, cross_v: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """x [1, C, 1, 1]: one token; caches [1, C, 1, n_ctx]; `write` one-hot [n_ctx] of its slot."""
        h = self.attn_ln(x)
        a = self.attn
        k, v = a.key(h), a.value(h)
        # the token's own key/value go into its slot in-graph; the host stores them for later steps
        keys, values = k_cache * (1 - write) + k * write, v_cache * (1 - write) + v * write
        x = x + a.out(attend(a.query(h), keys, values, a.n_head, mask))
        c = self.cross_attn
        x = x + c.out(attend(c.query(self.cross_attn_ln(x)), cross_k, cross_v, c.n_head))
        return x + self.mlp(self.mlp_ln(x)), k, v


# -- the two packages ---------------------------------------------------------------------------


class AudioEncoderANE(nn.Module):
    """whisper.model.AudioEncoder on the ANE layout: mel [1, n_mels, 3000] → [1, C, 1, n_audio_ctx]."""

    def __init__(self, dims: ModelDimensions) -> None:
        super().__init__()
        n = dims.n_audio_state
        self.conv1 = nn.Conv1d(dims.n_mels, n, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(n, n, kernel_size=3, stride=2, padding=1)
        self.register_buffer("positional_embedding", torch.zeros(dims.n_audio_ctx, n))
        self.blocks = nn.ModuleList(EncoderBlockANE(n, dims.n_audio_head) for _ in range(dims.n_audio_layer))
        self.ln_post = LayerNormANE(n)

    def forward(self, mel: Tensor) -> Tensor:
        x = F.gelu(self.conv2(F.gelu(self.conv1(mel))))  # [1, C, S]: already channels first
        x = (x + self.positional_embedding.T).unsqueeze(2)
        for block in self.blocks:
            x = block(x)
        return self.ln_post(x)


class EncoderPackage(nn.Module):
    """The encoder package: audio features [1, C, 1, n_audio_ctx] and every decoder layer's
    cross-attention keys/values [n_text_layer, C, 1, n_audio_ctx], fixed for the utterance."""

    def __init__(self, encoder: AudioEncoderANE, cross_attn: Sequence[AttentionANE]) -> None:
        super().__init__()
        self.encoder = encoder
        self.cross_attn = nn.ModuleList(cross_attn)

    def forward(self, mel: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x = self.encoder(mel)
        return x, torch.cat([a.key(x) for a in self.cross_attn]), torch.cat([a.value(x) for a in self.cross_attn])


class TextDecoderANE(nn.Module):
    """One token per call: (token, position, self-attention caches, cross keys/values) → logits
    [1, n_vocab] and this token's keys/values [n_text_layer, C, 1, 1] for the host to store."""

    def __init__(self, dims: ModelDimensions) -> None:
        super().__init__()
        n = dims.n_text_state
        self.token_embedding = nn.Embedding(dims.n_vocab, n)
        self.positional_embedding = nn.Parameter(torch.zeros(dims.n_text_ctx, n))
        self.blocks = nn.ModuleList(DecoderBlockANE(n, dims.n_text_head) for _ in range(dims.n_text_layer))
        self.ln = LayerNormANE(n)
        self.register_buffer("slots", torch.arange(dims.n_text_ctx, dtype=torch.int32), persistent=False)
        # the tied output projection as 1x1 convolutions on chunks of the embedding matrix, each
        # within the ANE's dimension limit (`_map_whisper_keys` fills them)
        size = math.ceil(dims.n_vocab / vocab_chunks(dims.n_vocab))
        self.vocab_heads = nn.ModuleList(
            nn.Conv2d(n, min(size, dims.n_vocab - start), 1, bias=False) for start in range(0, dims.n_vocab, size)
        )

    def forward(
        self, token: Tensor, position: Tensor, self_k: Tensor, self_v: Tensor, cross_k: Tensor, cross_v: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        x = (self.token_embedding(token) + self.positional_embedding[position])[:, :, None, None]
        write = (self.slots == position).to(x.dtype)
        mask = ((self.slots > position).to(x.dtype) * MASK).view(1, -1, 1, 1)  # causal: later slots are empty
        new_k, new_v = [], []
        for i, block in enumerate(self.blocks):
            layer = slice(i, i + 1)
            x, k, v = block(x, self_k[layer], self_v[layer], write, mask, cross_k[layer], cross_v[layer])
            new_k.append(k)
            new_v.append(v)
        x = self.ln(x)
        logits = torch.cat([head(x) for head in self.vocab_heads], dim=1)  # [1, n_vocab, 1, 1]
        return logits.flatten(1), torch.cat(new_k), torch.cat(new_v)


class WhisperANE(nn.Module):
    """Parameters named as in whisper.model.Whisper, so its state dict loads by key."""

    def __init__(self, dims: ModelDimensions) -> None:
        super().__init__()
        self.dims = dims
        self.encoder = AudioEncoderANE(dims)
        self.decoder = TextDecoderANE(dims)
        self.register_load_state_dict_pre_hook(_map_whisper_keys)

    def encoder_package(self) -> EncoderPackage:
        return EncoderPackage(self.encoder, [block.cross_attn for block in self.decoder.blocks])


def from_whisper(model: Whisper) -> WhisperANE:
    """The ANE form of an openai-whisper model, loaded from its state dict by key."""
    ane = WhisperANE(model.dims)
    # whisper's causal `mask` and `alignment_heads` are not parameters of the ANE form
    state = {k: v for k, v in model.state_dict().items() if k not in ("decoder.mask", "alignment_heads")}
    ane.load_state_dict(state, strict=True)
    return ane.eval()
