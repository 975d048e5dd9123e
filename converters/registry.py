"""The registry of targets: one entry per backend module, validated in one place."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

from harness.errors import HarnessError, did_you_mean


@dataclass(frozen=True)
class Target:
    name: str
    module: str  # imported lazily: validating a job must not pay for torch or toolchains
    quants: tuple[str, ...]
    description: str

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)


REFERENCE = "reference"

TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target(REFERENCE, "converters.reference", ("fp32",), "openai-whisper in PyTorch (the reference)"),
        Target(
            "torchscript-mtk",
            "converters.torchscript_mtk",
            ("fp32",),
            "MediaTek-friendly TorchScript: decoder on token embeddings, no gather, mask as buffer",
        ),
    )
}


def get_target(name: str) -> Target:
    try:
        return TARGETS[name]
    except KeyError:
        raise HarnessError(
            f"unknown target '{name}'{did_you_mean(name, TARGETS)}; known: {', '.join(TARGETS)}"
        ) from None
