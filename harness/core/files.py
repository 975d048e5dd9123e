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
    permissions, as a plain write would be.

    Durable too: the temporary's data reaches the disk before the rename (else a power cut can
    leave the new name on an empty or cut-short file, which would pass for a whole one), and the
    folder after it (else the rename itself can be lost)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync(path.parent)


def _fsync(path: Path) -> None:
    """Flush a file's or a folder's data to the disk (any descriptor of it will do)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
