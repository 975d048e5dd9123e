"""The sha256 digests that pin weights and artifacts."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import torch


def file_sha256(path: Path) -> str:
    """A file's sha256, streamed: checkpoints and artifacts run to gigabytes."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def tensor_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Digest of the tensor contents, independent of how the file was pickled."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().cpu().contiguous()
        digest.update(key.encode() + b"\0")
        digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode() + b"\0")
        # Viewing as bytes works for every dtype, bfloat16 included (numpy has none).
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
