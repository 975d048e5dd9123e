"""The one exception type the CLI turns into a clean error line, and how errors read in one line."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class HarnessError(Exception):
    """A user-facing failure: the message names the file or field and what was expected.

    Anything else that escapes is a bug and keeps its traceback.
    """


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def one_line(exc: BaseException) -> str:
    """`Type: message` on one line (a toolchain's message can run to pages): its first line, with
    runs of white space folded."""
    first = (str(exc).strip().splitlines() or [""])[0]
    return " ".join(f"{type(exc).__name__}: {first}".split())
