"""The one exception type the CLI turns into a clean error line, and how errors read in one line."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence


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


def clip(text: str, limit: int = 200) -> str:
    """`text` cut to at most `limit` characters: a message shows what it refuses without repeating
    a hostile value (a megabyte string, a huge list) whole."""
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def quote(value: object, limit: int = 60) -> str:
    """repr(value), clipped: how a message quotes a value it refuses."""
    return clip(repr(value), limit)


def some(items: Sequence[str], limit: int, sep: str = "; ") -> str:
    """The first `limit` items joined, then how many more: one bounded line for any number of problems."""
    more = f"{sep}and {len(items) - limit} more" if len(items) > limit else ""
    return sep.join(items[:limit]) + more
