"""The timing protocol, in one place.

- Each worker loads its model once, runs one untimed warm-up decode (first-call allocations and
  TorchScript profiling passes would otherwise land on the first utterance), and uses one torch
  thread, so workers sharing a machine do not fight over cores.
- Per utterance `harness.decoding.greedy_decode` times the front end (log-mel), `encode` and the
  decoder loop separately; total = their sum.
- Aggregates: percentiles of per-utterance totals; RTFx = Σ audio seconds / Σ processing seconds;
  decoder ms/token = Σ decode ms / Σ decoder steps (the EOT step counts: it costs a step).
"""

from __future__ import annotations

import numpy as np

from harness.decoding import Dims, Prompt, greedy_decode

WARM_UP_SECONDS = 5.0


def prepare_worker_threads() -> None:
    import torch

    torch.set_num_threads(1)


def warm_up(runner, dims: Dims, prompt: Prompt) -> None:
    """One untimed decode of low-level noise (silence would end at once, after a single step)."""
    rng = np.random.default_rng(0)
    audio = (rng.standard_normal(int(WARM_UP_SECONDS * 16_000)) * 0.01).astype(np.float32)
    greedy_decode(runner, audio, dims, prompt)


def rtfx(audio_s: float, processing_ms: float) -> float:
    return audio_s / (processing_ms / 1e3) if processing_ms > 0 else float("nan")
