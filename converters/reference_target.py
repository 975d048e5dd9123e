"""The reference: openai-whisper's own PyTorch model, with its own kv-cache hooks.

It writes no files: its "artifact" is the checkpoint itself, recorded in a manifest so every
model, reference included, is addressed the same way. It takes any audio context at run time
(`decoding.audio_ctx`): the encoder's positional embedding is sliced to the mel it is given, so one
reference serves every setting, and the full 1500 runs whisper's model exactly as it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from whisper.model import Whisper

from harness.core.checkpoint import Checkpoint
from harness.core.target import (
    DEFAULT_THREADS,
    Artifact,
    Implementation,
    Runner,
)
from harness.core.weights import load_model
from harness.core.window import FRAMES_PER_POSITION


def convert(checkpoint: Checkpoint, model: Whisper, quant: str, out: Path, calibration: Sequence[np.ndarray]) -> dict:
    return {"checkpoint": str(checkpoint.path), "parity": {"note": "the reference is the parity baseline"}}


class ReferenceRunner(Runner):
    def __init__(self, artifact: Artifact, threads: int = DEFAULT_THREADS) -> None:
        self.model = load_model(artifact.checkpoint())
        # whisper's own hooks, installed once: the same incremental computation as whisper.decode,
        # so the reference is bit-for-bit what openai-whisper produces
        self._cache, self._hooks = self.model.install_kv_cache_hooks()
        self._positions = self.model.encoder.positional_embedding  # all 1500 rows, kept for slicing

    @torch.inference_mode()
    def encode(self, mel: np.ndarray) -> torch.Tensor:
        # whisper's encoder asserts that the mel's positions equal its embedding's: a trimmed
        # context (2 x audio_ctx frames) gets the embedding's first audio_ctx rows
        positions = mel.shape[-1] // FRAMES_PER_POSITION
        if self.model.encoder.positional_embedding.shape[0] != positions:
            self.model.encoder.register_buffer("positional_embedding", self._positions[:positions])
        return self.model.encoder(torch.from_numpy(mel))

    @torch.inference_mode()
    def step(self, tokens: Sequence[int], audio_features: Any, cache: Any) -> tuple[np.ndarray, Any]:
        if cache is None:  # a new sequence: forget the previous one's keys and values
            self._cache.clear()
            new = tokens
        else:
            new = tokens[-1:]
        logits = self.model.decoder(torch.tensor([list(new)]), audio_features, kv_cache=self._cache)
        return logits[0, -1].numpy(), len(tokens)


IMPLEMENTATION = Implementation(convert=convert, runner=ReferenceRunner)
