"""The history's tables (`harness.nightly.history`), in SQL both SQLite and PostgreSQL run, and the
migration of a store written by an earlier schema."""

from __future__ import annotations

from harness.core.window import FULL_AUDIO_CTX
from harness.results.schema import JSON, TABLES

# the tables' schema: 2 keys models on their audio context and adds the language columns. A
# store of schema 1 is migrated in one transaction when opened (its rows ran at the full context);
# a store of any other schema is refused, not altered.
SCHEMA = 2
ADDED_IN_2 = {  # columns schema 2 added to each table (every other column was in schema 1)
    "models": ("audio_ctx", "language", "headline", "lang_agreement"),
    "utterances": ("audio_ctx", "task", "language", "detected_language", "language_prob", "ref_language",
                   "scoring_language", "language_match"),
}  # fmt: skip


def sql_type(kind: str) -> str:
    """A column's type as both databases declare it (JSON is kept as its text)."""
    return "TEXT" if kind == JSON else kind


def create() -> list[str]:
    """One schema for both databases: types both understand, every name quoted."""

    def columns(table: str) -> str:
        return ", ".join(f'"{c}" {sql_type(t)}' for c, t in TABLES[table].items())

    return [
        'CREATE TABLE IF NOT EXISTS "meta" ("key" TEXT PRIMARY KEY, "value" TEXT NOT NULL)',
        f'CREATE TABLE IF NOT EXISTS "runs" ({columns("runs")}, "added" TEXT NOT NULL, PRIMARY KEY ("run_id"))',
        models_table("models"),
        # no primary key: a dataset may repeat an id, and the rows are kept as the run wrote them
        f'CREATE TABLE IF NOT EXISTS "utterances" ({columns("utterances")}, '
        'FOREIGN KEY ("run_id") REFERENCES "runs" ("run_id"))',
        'CREATE INDEX IF NOT EXISTS "utterances_by_run" ON "utterances" ("run_id", "position")',
        'CREATE INDEX IF NOT EXISTS "runs_by_job" ON "runs" ("job", "started")',
        'CREATE TABLE IF NOT EXISTS "pins" ("job" TEXT NOT NULL, "tag" TEXT NOT NULL, '
        '"run_id" TEXT NOT NULL REFERENCES "runs" ("run_id"), "pinned_at" TEXT NOT NULL, PRIMARY KEY ("job", "tag"))',
    ]


def models_table(name: str) -> str:
    columns = ", ".join(f'"{c}" {sql_type(t)}' for c, t in TABLES["models"].items())
    return (
        f'CREATE TABLE IF NOT EXISTS "{name}" ({columns}, PRIMARY KEY ("run_id", "size", "target", "quant", '
        '"audio_ctx"), FOREIGN KEY ("run_id") REFERENCES "runs" ("run_id"))'
    )


def migrate_1_to_2() -> list[str]:
    """Schema 1 → 2, in statements both databases run: the utterances table gains its columns (a
    row of schema 1 ran at the full audio context), and the models table is rebuilt, since its
    primary key gains `audio_ctx` (neither database alters a primary key in place)."""
    kinds = {**TABLES["utterances"], **TABLES["models"]}

    def added(table: str, column: str) -> str:
        default = f" DEFAULT {FULL_AUDIO_CTX}" if column == "audio_ctx" else ""
        return f'ALTER TABLE "{table}" ADD COLUMN "{column}" {sql_type(kinds[column])}{default}'

    old = ", ".join(f'"{c}"' for c in TABLES["models"] if c not in ADDED_IN_2["models"])
    return [
        *(added("utterances", c) for c in ADDED_IN_2["utterances"]),
        models_table("models_2"),
        f'INSERT INTO "models_2" ({old}, "audio_ctx") SELECT {old}, {FULL_AUDIO_CTX} FROM "models"',
        'DROP TABLE "models"',
        'ALTER TABLE "models_2" RENAME TO "models"',
        """UPDATE "meta" SET "value" = '2' WHERE "key" = 'schema'""",
    ]
