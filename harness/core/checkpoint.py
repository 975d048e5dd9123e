"""A Whisper checkpoint as the harness names it: which one, where, pinned by its tensors' digest.

Facts only (no torch, no whisper): commands that run no model (validate, runs, history, report)
name checkpoints too. Resolving and loading them is `harness.core.weights`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from harness.core.errors import HarnessError

# openai-whisper's own model names (`whisper._MODELS`, in its order; tests/test_weights.py checks
# the installed openai-whisper still has exactly these): written out so naming a size needs no torch
OFFICIAL_NAMES: tuple[str, ...] = (
    "tiny.en", "tiny", "base.en", "base", "small.en", "small", "medium.en", "medium",
    "large-v1", "large-v2", "large-v3", "large", "large-v3-turbo", "turbo",
)  # fmt: skip


class WeightsError(HarnessError):
    """Weights could not be resolved or verified; the message is one line."""


@dataclass(frozen=True)
class Checkpoint:
    name: str
    path: Path
    sha256: str  # tensor digest (harness.core.weights.tensor_sha256), not the file's
    source: str
