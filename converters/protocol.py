"""The two small protocols every target implements, one module per target.

A target module has:
- ``RECIPE``: a string naming the conversion recipe; bump it when the produced files change
  (it is part of the artifact's store key).
- ``convert(checkpoint, model, quant, out) -> dict``: writes artifact files into `out` and returns
  manifest facts (I/O names and shapes; ``parity`` only when the target checks itself, e.g. in
  PyTorch where its runtime cannot run here). Raises `Unavailable` when its toolchain is missing,
  `Refused` when the toolchain writes files its runtime will not run.
  It knows nothing of datasets.
- ``runtime_unavailable() -> str | None`` (optional): why its runner cannot run on this machine.
- ``Runner(artifact)``: executes an artifact, ``encode`` then repeated ``step``. It knows nothing
  of decoding; `harness.decoding` owns the prompt, suppression and the greedy loop. An engine
  that can only decode by itself (CTranslate2) offers ``generate(features, prompt) -> (tokens,
  steps)`` instead of ``step`` and must apply the `Prompt`'s rules (prompt tokens, suppression,
  blank suppression at the first step, max_new_tokens, EOT and prompt stripped).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import numpy as np

from harness.weights import Checkpoint


class Unavailable(Exception):
    """This target cannot be built or run here; the message says why (e.g. a missing SDK)."""


class Refused(Unavailable):
    """The toolchain ran but wrote files its own runtime refuses: a property of the toolchain
    versions (part of the store key), so the store records it and does not try again."""


def runtime_unavailable(module: ModuleType) -> str | None:
    check = getattr(module, "runtime_unavailable", None)
    return check() if check is not None else None


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

    @property
    def mb(self) -> float:
        """Size on disk in MiB: its files, or for the reference (no files of its own) its checkpoint."""
        sizes = [f["bytes"] for f in self.manifest["files"].values()] or [self.checkpoint().path.stat().st_size]
        return sum(sizes) / 2**20

    def checkpoint(self) -> Checkpoint:
        src = self.manifest["source"]
        return Checkpoint(name=src["name"], path=Path(src["path"]), sha256=src["sha256"], source=src["origin"])


class Runner(Protocol):
    kv_cache: bool  # whether `step` reuses earlier positions or recomputes the whole sequence

    def encode(self, mel: np.ndarray) -> Any:
        """mel float32 [1, n_mels, 3000] → audio features, in whatever form `step` takes."""

    def step(self, tokens: Sequence[int], audio_features: Any, cache: Any) -> tuple[np.ndarray, Any]:
        """All tokens so far (cache is None on the first call) → next-token logits [n_vocab], new cache."""
