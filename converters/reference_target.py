"""The reference: openai-whisper's own PyTorch model, with its own kv-cache hooks.

It writes no files: its "artifact" is the checkpoint itself, recorded in a manifest so every
model, reference included, is addressed the same way. It takes any audio context at run time
(`decoding.audio_ctx`): the encoder's positional embedding is sliced to the mel it is given, so one
reference serves every setting, and the full 1500 runs whisper's model exactly as it is.

It batches as `whisper.decode` does given several mels: the batch's features, then decoder calls
on every row of the batch until all have ended, a finished row fed on (its logits discarded)
rather than dropped, so that every call has the shape whisper.decode's has and its rows the same
bits (BLAS kernels round differently at a different number of rows). On `device="cuda"` the model
runs there in fp32 (whisper.decode's `fp16=False`).
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
    CPU,
    DEFAULT_THREADS,
    Artifact,
    Implementation,
    Runner,
    torch_device,
)
from harness.core.weights import load_model
from harness.core.window import FRAMES_PER_POSITION


def convert(checkpoint: Checkpoint, model: Whisper, quant: str, out: Path, calibration: Sequence[np.ndarray]) -> dict:
    return {"checkpoint": str(checkpoint.path), "parity": {"note": "the reference is the parity baseline"}}


class ReferenceRunner(Runner):
    batching = True

    def __init__(self, artifact: Artifact, threads: int = DEFAULT_THREADS, device: str = CPU) -> None:
        self.device = torch_device(device)
        if self.device != CPU:
            self.runtime = "pytorch-cuda"
        self.model = load_model(artifact.checkpoint()).to(self.device)
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
        return self.model.encoder(torch.from_numpy(mel).to(self.device))

    @torch.inference_mode()
    def encode_batch(self, mel: np.ndarray) -> torch.Tensor:
        # a CPU encodes row by row (harness.core.target says why); each row's features are
        # bit-identical to those of whisper's encoder on the whole batch (tiny.en, base: measured)
        return torch.cat([self.encode(row[None]) for row in mel]) if self.device == CPU else self.encode(mel)

    @torch.inference_mode()
    def step(self, tokens: Sequence[int], audio_features: Any, cache: Any) -> tuple[np.ndarray, Any]:
        if cache is None:  # a new sequence: forget the previous one's keys and values
            self._cache.clear()
            new = tokens
        else:
            new = tokens[-1:]
        logits = self.model.decoder(self._tokens([list(new)]), audio_features, kv_cache=self._cache)
        return logits[0, -1].cpu().numpy(), len(tokens)

    @torch.inference_mode()
    def step_batch(
        self, tokens: Sequence[Sequence[int]], audio_features: Any, cache: Any, rows: Sequence[int] | None = None
    ) -> tuple[np.ndarray, Any]:
        """cache: the token each row of the batch was fed last [B, 1]."""
        if cache is None:  # a new batch: forget the previous one's keys and values
            self._cache.clear()
            logits = self.model.decoder(self._tokens(tokens), audio_features, kv_cache=self._cache)
            return logits[:, -1].cpu().numpy(), self._tokens([t[-1:] for t in tokens])
        # every row is fed, as whisper.decode feeds its finished rows: one that has ended gets the
        # token it was fed last again, and its logits are dropped
        at = list(range(len(cache))) if rows is None else list(rows)
        fed = cache.clone()
        fed[at] = self._tokens([t[-1:] for t in tokens])
        logits = self.model.decoder(fed, audio_features, kv_cache=self._cache)
        return logits[at, -1].cpu().numpy(), fed

    def _tokens(self, tokens: Sequence[Sequence[int]]) -> torch.Tensor:
        return torch.tensor([list(t) for t in tokens], device=self.device)


IMPLEMENTATION = Implementation(convert=convert, runner=ReferenceRunner)
