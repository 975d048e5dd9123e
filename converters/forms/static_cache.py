"""The host side of fixed-shape decoders: one token per call against a static KV cache the host owns.

LiteRT/MediaTek graphs and Core ML's ANE form cannot grow a tensor from call to call, so their
decoders take the whole fixed-size cache in and return only the new position's keys and values;
the host keeps the cache, starts it per utterance and feeds the prompt one token at a time. The
loop is written once, here; each runtime supplies `start` and `advance`.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from harness.core.target import Runner


@dataclass(frozen=True)
class StaticCache:
    """A sequence's cache as `step` hands it back: the runtime's state and the positions filled."""

    state: Any
    length: int


class StaticCacheRunner(Runner):
    @abstractmethod
    def start(self, audio_features: Any) -> Any:
        """A new sequence: its cross-attention keys and values, an empty self-attention cache."""

    @abstractmethod
    def advance(self, state: Any, token: int, position: int) -> np.ndarray:
        """Feed `token` at `position`, store its keys and values in slot `position`; its logits."""

    def step(self, tokens: Sequence[int], audio_features: Any, cache: StaticCache | None) -> tuple[np.ndarray, Any]:
        state, length = (self.start(audio_features), 0) if cache is None else (cache.state, cache.length)
        if length >= len(tokens):
            raise ValueError(f"step called with {len(tokens)} tokens on a cache of {length}: no new token")
        for position in range(length, len(tokens)):  # the prompt one token at a time, then one per step
            logits = self.advance(state, tokens[position], position)
        return np.asarray(logits, dtype=np.float32), StaticCache(state, len(tokens))
