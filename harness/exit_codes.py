"""What `python -m harness` exits with, in one place (documented in the README and docs/nightly.md)."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0  # every model evaluated, every utterance transcribed (convert: every cell usable)
    FAILED = 1  # convert: a cell failed; validate: a job file is wrong
    BAD_INPUT = 2  # a job file, dataset, flag or address the harness cannot use: one line says which
    REGRESSION = 3  # the gate found a model worse than its baseline
    INCOMPLETE = 4  # the run finished, but some models or utterances failed or were unavailable
    INTERRUPTED = 5  # the run stopped early (Ctrl-C, SIGTERM, an error): resume it with --resume
    # `run` finished and kept its results (and its report), but appending to or gating against the
    # history failed (locked, unreachable, not a history): one line names it, and the run is not
    # gated; `history add RUN_DIR` appends it later. Not 2: the job's input was fine, the history
    # is what needs a look
    HISTORY = 6
