"""What became of an artifact, a model or an utterance: one type, never a string prefix."""

from __future__ import annotations

from enum import Enum


class Status(str, Enum):
    """A `str` subclass, so it is stored as its value in tables and files and compares to it."""

    # an artifact, when `convert` or `run` prepares it
    BUILT = "built"
    REUSED = "reused"
    # a model or one of its utterances
    OK = "ok"
    FAILED = "failed"  # a build that crashed, or an artifact that failed its parity gate
    UNAVAILABLE = "unavailable"  # toolchain, runtime or weights missing on this machine
    WORKER_FAILED = "worker failed"  # the worker could not load the model, or its process died
    ERROR = "error"  # this utterance only: its audio could not be decoded, or decoding raised

    def __str__(self) -> str:
        return self.value

    @property
    def runnable(self) -> bool:
        """An artifact that may be evaluated."""
        return self in (Status.BUILT, Status.REUSED)
