"""The history's tables (`harness.nightly.history`), in SQL both SQLite and PostgreSQL run, and the
migration of a store written by an earlier schema."""

from __future__ import annotations

from harness.core.window import FULL_AUDIO_CTX
from harness.results.schema import JSON, TABLES

# the tables' schema: 2 keys models on their audio context and adds the language columns; 3 keys
# them on their dataset too (a suite's run has a row per dataset and model, and pooled rows). A
# store of an older schema is migrated, one step after another, in one transaction each when a
# writer opens it (`MIGRATIONS`); a store of any other schema is refused, not altered.
SCHEMA = 3
ADDED_IN_2 = {  # columns schema 2 added to each table (every other column was in schema 1)
    "models": ("audio_ctx", "language", "headline", "lang_agreement"),
    "utterances": ("audio_ctx", "task", "language", "detected_language", "language_prob", "ref_language",
                   "scoring_language", "language_match"),
}  # fmt: skip
ADDED_IN_3 = {"models": ("dataset", "n_timed")}  # (new utterance columns are added as any new column is)
KEY = ("run_id", "dataset", "size", "target", "quant", "audio_ctx")  # a models row
ONE_DATASET = ""  # the dataset of a models row from before suites (its run's one dataset)


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


def models_table(name: str, key: tuple[str, ...] = KEY, without: tuple[str, ...] = ()) -> str:
    """The models table as `name`, keyed on `key`, without the columns of a later schema."""
    columns = ", ".join(f'"{c}" {sql_type(t)}' for c, t in TABLES["models"].items() if c not in without)
    primary = ", ".join(f'"{c}"' for c in key)
    return (
        f'CREATE TABLE IF NOT EXISTS "{name}" ({columns}, PRIMARY KEY ({primary}), '
        'FOREIGN KEY ("run_id") REFERENCES "runs" ("run_id"))'
    )


def migrate_1_to_2() -> list[str]:
    """Schema 1 → 2, in statements both databases run: the utterances table gains its columns (a
    row of schema 1 ran at the full audio context), and the models table is rebuilt, since its
    primary key gains `audio_ctx` (neither database alters a primary key in place)."""
    kinds = {**TABLES["utterances"], **TABLES["models"]}

    def added(table: str, column: str) -> str:
        default = f" DEFAULT {FULL_AUDIO_CTX}" if column == "audio_ctx" else ""
        return f'ALTER TABLE "{table}" ADD COLUMN "{column}" {sql_type(kinds[column])}{default}'

    old = ", ".join(f'"{c}"' for c in TABLES["models"] if c not in (*ADDED_IN_2["models"], *ADDED_IN_3["models"]))
    key_2 = tuple(c for c in KEY if c != "dataset")
    return [
        *(added("utterances", c) for c in ADDED_IN_2["utterances"]),
        models_table("models_2", key_2, ADDED_IN_3["models"]),
        f'INSERT INTO "models_2" ({old}, "audio_ctx") SELECT {old}, {FULL_AUDIO_CTX} FROM "models"',
        'DROP TABLE "models"',
        'ALTER TABLE "models_2" RENAME TO "models"',
        """UPDATE "meta" SET "value" = '2' WHERE "key" = 'schema'""",
    ]


def migrate_2_to_3() -> list[str]:
    """Schema 2 → 3: the models table is rebuilt, its primary key gaining `dataset` (a run before
    suites had one dataset: its rows get `ONE_DATASET`). Its new utterance columns are added as any
    new column is (`History._add_new_columns`)."""
    old = ", ".join(f'"{c}"' for c in TABLES["models"] if c not in ADDED_IN_3["models"])
    return [
        models_table("models_3"),
        f'INSERT INTO "models_3" ({old}, "dataset") SELECT {old}, \'{ONE_DATASET}\' FROM "models"',
        'DROP TABLE "models"',
        'ALTER TABLE "models_3" RENAME TO "models"',
        """UPDATE "meta" SET "value" = '3' WHERE "key" = 'schema'""",
    ]


# a store of the key's schema is brought to the next by its statements, until it is of SCHEMA
MIGRATIONS = {"1": migrate_1_to_2, "2": migrate_2_to_3}
