"""The two small protocols every target implements.

- A target module's ``convert(checkpoint, model, quant, out) -> dict`` writes artifact files into `out`
  and returns manifest facts (I/O names and shapes, parity numbers). It knows nothing of datasets.
- Its ``Runner`` executes an artifact: ``encode`` then repeated ``step``. It knows nothing of
  decoding; `harness.decoding` owns the prompt, suppression and the greedy loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from harness.weights import Checkpoint


@dataclass(frozen=True)
class Artifact:
    """A built (or, for the reference, referenced) model in the store, with its manifest."""

    size: str
    target: str
    quant: str
    path: Path  # the artifact's folder
    manifest: dict[str, Any]

    def file(self, name: str) -> Path:
        return self.path / name

    def checkpoint(self) -> Checkpoint:
        src = self.manifest["source"]
        return Checkpoint(name=src["name"], path=Path(src["path"]), sha256=src["sha256"], source=src["origin"])


class Runner(Protocol):
    kv_cache: bool  # whether `step` reuses earlier positions or recomputes the whole sequence

    def encode(self, mel: np.ndarray) -> Any:
        """mel float32 [1, n_mels, 3000] → audio features, in whatever form `step` takes."""

    def step(self, tokens: Sequence[int], audio_features: Any, cache: Any) -> tuple[np.ndarray, Any]:
        """All tokens so far (cache is None on the first call) → next-token logits [n_vocab], new cache."""
