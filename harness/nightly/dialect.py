"""What differs between the history's two databases (`harness.nightly.history`), in one object per
database, chosen once from where the history is: connecting (read-only, or for writing), transactions,
placeholders, the lock that serialises schema changes, the catalogue queries, and which driver
errors mean a lock or no database. Also what both share: masking a location's password (`masked`)
wherever it or a driver's message about it is shown, and the bounded wait for a lock.

What both accept is not here: the tables' SQL (`history_schema`, every name quoted, types both
understand), `INSERT ... ON CONFLICT` (SQLite 3.24+ and PostgreSQL 9.5+ spell it alike) and
`cursor.executemany`.
"""

from __future__ import annotations

import math
import os
import re
import sqlite3
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar, Literal
from urllib.parse import unquote

from harness.core.errors import HarnessError

# PostgreSQL's transaction-level advisory lock that creating, migrating and widening the tables
# take, so that concurrent openers of a new or older store change it one at a time (any number the
# rest of a shared database leaves alone would do; this one is what earlier harnesses took)
SCHEMA_LOCK = 7246168

# How long a writer waits for another connection's lock before the history counts as failed: an
# append takes milliseconds, so a lock held for seconds is a stuck or foreign process, and a run
# that finished should say so soon rather than wait (it keeps its results either way)
LOCK_WAIT_ENV = "HARNESS_HISTORY_LOCK_WAIT"
LOCK_WAIT_S = 5.0

# How a history is opened: "read" (history, compare, report: read-only, never a table created or
# altered), "write" (history pin: an existing history, migrated if older), "create" (run, history
# add: the file and the tables made when missing)
Access = Literal["read", "write", "create"]


class HistoryError(HarnessError):
    """The history could not be opened, read or written: one line naming it, its password masked."""


class NotAHistory(HistoryError):
    """The file or database is there but is no history (another program's tables, or no database)."""


def is_url(where: str) -> bool:
    return where.startswith(("postgresql://", "postgres://"))


# -- masking: what a history location or a driver's message may hold of a password

MASK = "***"
# scheme://user:PASSWORD@host — the password runs to the last '@' of the URL, since an unencoded '@'
# or '/' in it splits it differently for each parser (libpq takes the first '@', urllib the last)
_URL_PASSWORD = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"/:]*:)[^\s'\"]*@")
# password=VALUE (and sslpassword=, the key's passphrase): a URL's query parameter, or libpq's
# key=value form, whose value may be quoted
_PARAM_PASSWORD = re.compile(
    r"(?P<head>(?<![A-Za-z0-9_])(?:ssl)?password\s*=\s*)(?P<value>'(?:[^'\\]|\\.)*'|[^\s&#'\"]*)", re.IGNORECASE
)
# what libpq splits a URL's text at: a password holding one unencoded comes back in pieces, as a
# host, a port or a database name
_URL_DELIMITERS = re.compile(r"[@/:?&#=,\s]+")


def _passwords(where: str) -> set[str]:
    """Every text that is the location's password, or a piece of it: as written, percent-decoded,
    and split where a parser of URLs may split it."""
    found = {m.group("value").strip("'") for m in _PARAM_PASSWORD.finditer(where)}
    _, scheme, rest = where.partition("://")
    userinfo, at, _ = rest.rpartition("@")
    if scheme and at and ":" in userinfo:
        found.add(userinfo.partition(":")[2])
    pieces = {piece for secret in found for piece in _URL_DELIMITERS.split(secret)}
    return {s for s in found | {unquote(s) for s in found} | pieces if s and s != MASK}


def masked(text: str, where: str | None = None) -> str:
    """`text` as it may be shown: every password in it replaced by ***. `text` is a history location,
    or a message about the history at `where` (a driver's error, which may repeat the location's
    password or pieces of it, quoted anywhere). The one function that stands between a password
    and the terminal or the report."""
    for secret in sorted(_passwords(text if where is None else where), key=len, reverse=True):
        # whole pieces only: a piece 'ss' of a password is not masked inside 'address'
        text = re.sub(rf"(?<![A-Za-z0-9]){re.escape(secret)}(?![A-Za-z0-9])", MASK, text)
    text = _URL_PASSWORD.sub(rf"\g<head>{MASK}@", text)
    return _PARAM_PASSWORD.sub(rf"\g<head>{MASK}", text)


def lock_wait_s() -> float:
    """Seconds a writer waits for another's lock: ${LOCK_WAIT_ENV}, else LOCK_WAIT_S."""
    raw = os.environ.get(LOCK_WAIT_ENV)
    if raw is None:
        return LOCK_WAIT_S
    try:
        wait = float(raw)
    except ValueError:
        wait = -1.0
    if not (wait >= 0 and math.isfinite(wait)):
        raise HistoryError(f"${LOCK_WAIT_ENV}: expected seconds (a number, 0 or more), got {raw!r}")
    return wait


@dataclass(frozen=True)
class Dialect(ABC):
    """One database's ways. `driver`: its DB-API module, whose `Error` is every error the store gives;
    `lock_wait_s`: how long a statement waits for another connection's lock."""

    driver: ModuleType
    lock_wait_s: float = LOCK_WAIT_S
    # one row, one cell: whether the `meta` table exists (the schema was created)
    has_schema_sql: ClassVar[str]
    # the column names of the table given as the one parameter, in a column `name`
    columns_sql: ClassVar[str]

    @abstractmethod
    def connect(self, where: str, access: Access) -> Any:
        """A connection outside any transaction: reads hold none open, writes open one with
        `transaction`. With "read" access nothing through it can change the store."""

    @abstractmethod
    def ready_to_write(self, conn: Any) -> None:
        """Once the store is known to be a history: what a writer sets on it."""

    @abstractmethod
    def transaction(self, conn: Any) -> AbstractContextManager[Any]:
        """A cursor inside a transaction that holds the write lock, committed at the end, rolled back on error."""

    @abstractmethod
    def sql(self, text: str) -> str:
        """A statement written with `?` placeholders, as the driver takes it."""

    @abstractmethod
    def lock_schema(self, cur: Any) -> None:
        """Inside `transaction`: wait until no other connection is changing the schema."""

    @abstractmethod
    def waited_for_a_lock(self, exc: Exception) -> bool:
        """Whether the driver's error is a lock another connection held past `lock_wait_s`."""

    def not_a_database(self, exc: Exception) -> bool:
        """Whether the driver's error says the store is not a database of its kind at all."""
        return False


@dataclass(frozen=True)
class SQLite(Dialect):
    driver: ModuleType = sqlite3
    has_schema_sql: ClassVar[str] = "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta')"
    columns_sql: ClassVar[str] = "SELECT name FROM pragma_table_info(?)"

    def connect(self, where: str, access: Access) -> Any:
        path = Path(where)
        if access != "create" and not path.is_file():
            raise HistoryError(f"history {masked(where)}: no such file (a run appends to it when it completes)")
        # isolation_level=None: no implicit transactions, so BEGIN IMMEDIATE below is the only one;
        # timeout: how long a statement waits for another connection's lock (SQLite's busy timeout)
        if access != "create":
            # a URI, so SQLite opens the file as it is: mode=ro refuses every write (no table, no
            # journal mode, no -journal file), mode=rw never creates a missing file
            uri = f"{path.absolute().as_uri()}?mode={'ro' if access == 'read' else 'rw'}"
            conn = sqlite3.connect(uri, uri=True, timeout=self.lock_wait_s, isolation_level=None)
        else:
            fresh = not path.exists() or path.stat().st_size == 0
            path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(path, timeout=self.lock_wait_s, isolation_level=None)
            if fresh:  # WAL before the first table: two creators of one new file never switch it at once
                conn.execute("PRAGMA journal_mode=WAL")
        if access != "read":
            conn.execute("PRAGMA synchronous=FULL")  # a committed night survives a power cut
            conn.execute("PRAGMA foreign_keys=ON")
        return conn

    def ready_to_write(self, conn: Any) -> None:
        # WAL: readers never block the writer nor see half a run (a no-op on a history, which has it
        # from its first table; set only now, so that a file refused as no history keeps its journal)
        conn.execute("PRAGMA journal_mode=WAL")

    @contextmanager
    def transaction(self, conn: Any) -> Iterator[Any]:
        # IMMEDIATE: take the write lock now, so two writers queue instead of failing at commit
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn.cursor()
        except BaseException:
            conn.rollback()
            raise
        conn.commit()

    def sql(self, text: str) -> str:
        return text

    def lock_schema(self, cur: Any) -> None:
        """Nothing to take: BEGIN IMMEDIATE already holds the file's one write lock."""

    def waited_for_a_lock(self, exc: Exception) -> bool:
        return getattr(exc, "sqlite_errorname", "") in ("SQLITE_BUSY", "SQLITE_LOCKED")

    def not_a_database(self, exc: Exception) -> bool:
        return getattr(exc, "sqlite_errorname", "") == "SQLITE_NOTADB"


@dataclass(frozen=True)
class PostgreSQL(Dialect):
    # pg_tables, read with this statement's snapshot: to_regclass may answer from a cache that
    # still says "no such table" inside a transaction begun before the creator committed
    has_schema_sql: ClassVar[str] = (
        "SELECT EXISTS (SELECT 1 FROM pg_tables WHERE schemaname = current_schema() AND tablename = 'meta')"
    )
    columns_sql: ClassVar[str] = (
        'SELECT column_name AS "name" FROM information_schema.columns '
        "WHERE table_schema = current_schema() AND table_name = ?"
    )

    def connect(self, where: str, access: Access) -> Any:
        # autocommit: reads hold no transaction open; writes open one explicitly. Settings by SET,
        # not by connection options, which would replace any `options` the URL gives
        conn = self.driver.connect(where, autocommit=True, connect_timeout=10)
        # in milliseconds, at least 1: PostgreSQL reads 0 as "wait for ever", SQLite as "do not wait"
        conn.execute(f"SET lock_timeout = {max(1, round(self.lock_wait_s * 1000))}")
        if access == "read":  # every statement in a read-only transaction: the server refuses any change
            conn.execute("SET default_transaction_read_only = on")
        return conn

    def ready_to_write(self, conn: Any) -> None:
        """Nothing to set: the server keeps its own journal."""

    @contextmanager
    def transaction(self, conn: Any) -> Iterator[Any]:
        with conn.transaction():
            yield conn.cursor()

    def sql(self, text: str) -> str:
        return text.replace("?", "%s")

    def lock_schema(self, cur: Any) -> None:
        # concurrent CREATE TABLEs collide in the catalogue, and concurrent migrations would each run
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))

    def waited_for_a_lock(self, exc: Exception) -> bool:
        return isinstance(exc, self.driver.errors.LockNotAvailable)


def dialect_of(where: str) -> Dialect:
    """The dialect of a history location: a postgresql:// URL, else a file path."""
    if not is_url(where):
        if "://" in where:
            raise HistoryError(f"history {masked(where)}: expected a file path or a postgresql:// URL")
        return SQLite(lock_wait_s=lock_wait_s())
    try:
        import psycopg
    except ImportError:
        raise HistoryError(f"history {masked(where)}: PostgreSQL needs the psycopg package") from None
    return PostgreSQL(psycopg, lock_wait_s=lock_wait_s())
