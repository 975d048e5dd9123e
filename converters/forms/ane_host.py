"""The host side of the Apple-Neural-Engine form: what `encode` hands over, the static cache loop.

Shared by `TorchAneRunner` (the ANE-form graph in PyTorch, for parity where Core ML cannot run)
and the Core ML runner (`converters.coreml_target`); each supplies the two calls.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from converters.forms.ane_model import WhisperANE
from converters.forms.static_cache import StaticCacheRunner


@dataclass(frozen=True)
class EncoderOutput:
    """What `encode` hands to `step`: features in the ANE layout plus the cross keys/values.

    `np.asarray` on it gives openai-whisper's layout [1, n_audio_ctx, C], so parity compares it
    with the reference's features directly.
    """

    features: np.ndarray  # [1, C, 1, n_audio_ctx]
    cross_k: np.ndarray  # [n_text_layer, C, 1, n_audio_ctx]
    cross_v: np.ndarray

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self.features[:, :, 0, :].transpose(0, 2, 1)
        return out if dtype is None else out.astype(dtype)


@dataclass(frozen=True)
class SequenceState:
    """One sequence's state: the cross keys/values and the self-attention cache, filled in place."""

    audio: EncoderOutput
    k: np.ndarray  # [n_text_layer, C, 1, n_text_ctx]
    v: np.ndarray


class AneHost(StaticCacheRunner):
    """The Runner contract over an ANE-form encoder/decoder pair."""

    cache_shape: tuple[int, int, int, int]  # [n_text_layer, n_text_state, 1, n_text_ctx]

    @abstractmethod
    def _encoder(self, mel: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """mel → features, cross_k, cross_v."""

    @abstractmethod
    def _decoder(self, inputs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """token, position, caches, cross keys/values → logits, this token's keys and values."""

    def encode(self, mel: np.ndarray) -> EncoderOutput:
        return EncoderOutput(*self._encoder(mel))

    def start(self, audio_features: EncoderOutput) -> SequenceState:
        return SequenceState(
            audio_features, np.zeros(self.cache_shape, np.float32), np.zeros(self.cache_shape, np.float32)
        )

    def advance(self, state: SequenceState, token: int, position: int) -> np.ndarray:
        logits, k, v = self._decoder(
            {
                "token": np.array([token], dtype=np.int32),
                "position": np.array([position], dtype=np.int32),
                "self_k": state.k,
                "self_v": state.v,
                "cross_k": state.audio.cross_k,
                "cross_v": state.audio.cross_v,
            }
        )
        state.k[..., position] = k[..., 0]
        state.v[..., position] = v[..., 0]
        return np.asarray(logits, dtype=np.float32)[0]


class TorchAneRunner(AneHost):
    """The ANE-form model run by PyTorch on the CPU (float32 or float16): the Core ML graph's math.

    `ane` is cast to `dtype` in place.
    """

    def __init__(self, ane: WhisperANE, dtype: torch.dtype = torch.float32) -> None:
        d = ane.dims
        self.cache_shape = (d.n_text_layer, d.n_text_state, 1, d.n_text_ctx)
        self.ane = ane.to(dtype)
        self.encoder = ane.encoder_package()
        self.dtype = dtype

    def _tensor(self, a: np.ndarray) -> Tensor:
        t = torch.from_numpy(a)
        return t.to(self.dtype) if t.is_floating_point() else t

    @torch.inference_mode()
    def _encoder(self, mel: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return tuple(t.float().numpy() for t in self.encoder(self._tensor(mel)))

    @torch.inference_mode()
    def _decoder(self, inputs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        out = self.ane.decoder(**{k: self._tensor(v) for k, v in inputs.items()})
        return tuple(t.float().numpy() for t in out)
