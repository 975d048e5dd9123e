"""What differs between the history's two databases (`harness.nightly.history`), in one object per
database, chosen once from where the history is: connecting, transactions, placeholders, the lock
that serialises schema changes, and the catalogue queries.

What both accept is not here: the tables' SQL (`history_schema`, every name quoted, types both
understand), `INSERT ... ON CONFLICT` (SQLite 3.24+ and PostgreSQL 9.5+ spell it alike) and
`cursor.executemany`.
"""

from __future__ import annotations

import sqlite3
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar
from urllib.parse import urlsplit, urlunsplit

from harness.core.errors import HarnessError

# PostgreSQL's transaction-level advisory lock that creating, migrating and widening the tables
# take, so that concurrent openers of a new or older store change it one at a time (any number the
# rest of a shared database leaves alone would do; this one is what earlier harnesses took)
SCHEMA_LOCK = 7246168


def is_url(where: str) -> bool:
    return where.startswith(("postgresql://", "postgres://"))


def display(where: str) -> str:
    """The location as printed: a URL's password masked."""
    if not is_url(where):
        return where
    parts = urlsplit(where)
    if parts.password is None:
        return where
    return urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@")))


@dataclass(frozen=True)
class Dialect(ABC):
    """One database's ways. `driver`: its DB-API module, whose `Error` is every error the store gives."""

    driver: ModuleType
    # one row, one cell: whether the `meta` table exists (the schema was created)
    has_schema_sql: ClassVar[str]
    # the column names of the table given as the one parameter, in a column `name`
    columns_sql: ClassVar[str]

    @abstractmethod
    def connect(self, where: str, create: bool) -> Any:
        """A connection outside any transaction: reads hold none open, writes open one with `transaction`."""

    @abstractmethod
    def transaction(self, conn: Any) -> AbstractContextManager[Any]:
        """A cursor inside a transaction that holds the write lock, committed at the end, rolled back on error."""

    @abstractmethod
    def sql(self, text: str) -> str:
        """A statement written with `?` placeholders, as the driver takes it."""

    @abstractmethod
    def lock_schema(self, cur: Any) -> None:
        """Inside `transaction`: wait until no other connection is changing the schema."""


@dataclass(frozen=True)
class SQLite(Dialect):
    driver: ModuleType = sqlite3
    has_schema_sql: ClassVar[str] = "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta')"
    columns_sql: ClassVar[str] = "SELECT name FROM pragma_table_info(?)"

    def connect(self, where: str, create: bool) -> Any:
        path = Path(where)
        if not create and not path.is_file():
            raise HarnessError(f"history {where}: no such file (a run appends to it when it completes)")
        path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: no implicit transactions, so BEGIN IMMEDIATE below is the only one;
        # timeout: a second writer waits up to a minute for the first one's lock
        conn = sqlite3.connect(path, timeout=60, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")  # a committed night survives a power cut
        conn.execute("PRAGMA foreign_keys=ON")
        return conn

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

    def connect(self, where: str, create: bool) -> Any:
        # autocommit: reads hold no transaction open; writes open one explicitly. `create` asks
        # nothing here: the database is the server's, and its tables are made as for a new file
        return self.driver.connect(where, autocommit=True, connect_timeout=10)

    @contextmanager
    def transaction(self, conn: Any) -> Iterator[Any]:
        with conn.transaction():
            yield conn.cursor()

    def sql(self, text: str) -> str:
        return text.replace("?", "%s")

    def lock_schema(self, cur: Any) -> None:
        # concurrent CREATE TABLEs collide in the catalogue, and concurrent migrations would each run
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))


def dialect_of(where: str) -> Dialect:
    """The dialect of a history location: a postgresql:// URL, else a file path."""
    if not is_url(where):
        if "://" in where:
            raise HarnessError(f"history {where}: expected a file path or a postgresql:// URL")
        return SQLite()
    try:
        import psycopg
    except ImportError:
        raise HarnessError(f"history {display(where)}: PostgreSQL needs the psycopg package") from None
    return PostgreSQL(psycopg)
