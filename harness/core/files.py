"""Files written whole or not at all: every store, cache and result file goes through here."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """`write` fills a temporary `.<name>.<random>.tmp` beside `path`, which is then renamed onto
    it: a reader sees the old file or the new one, never half of one, and a killed writer leaves
    only the hidden temporary (which the store's sweep removes). Created with the umask's
    permissions, as a plain write would be."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
