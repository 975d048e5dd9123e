"""A history's password is never shown: not in a URL printed back, not in a `password=` parameter,
not in a database driver's own message that repeats it. Checked on the masking function for every
way a URL can carry one, and on real failed connections — through the commands (a real process's
stdout and stderr) and the report they write, and once through a real `run`."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from harness.exit_codes import ExitCode
from tests.conftest import POSTGRES_ENV
from tests.nightly_runs import harness, in_process, reference_run
from tests.synthetic_nights import night

# a password, its percent-encoded form, and one with '@' and ':' unencoded (which libpq splits
# into a password, a host and a port, and quotes the pieces back)
SECRET = "s3cretPw7"
ENCODED, DECODED = "s3cr%40t%3Ax9", "s3cr@t:x9"
SPLIT = "p4ss@w0rd:x9z"


@pytest.mark.unit
@pytest.mark.parametrize(
    ("where", "shown"),
    [
        (f"postgresql://nightly:{SECRET}@db.example:5432/history", "postgresql://nightly:***@db.example:5432/history"),
        (f"postgres://nightly:{SECRET}@db.example/history", "postgres://nightly:***@db.example/history"),
        (f"postgresql+psycopg://nightly:{SECRET}@db/h", "postgresql+psycopg://nightly:***@db/h"),
        (f"postgresql://:{SECRET}@db/h", "postgresql://:***@db/h"),
        (f"postgresql://nightly@db/h?password={SECRET}", "postgresql://nightly@db/h?password=***"),
        (
            f"postgresql://db/h?sslmode=require&password={SECRET}&application_name=nightly",
            "postgresql://db/h?sslmode=require&password=***&application_name=nightly",
        ),
        (f"postgresql://db/h?PASSWORD={SECRET}#frag", "postgresql://db/h?PASSWORD=***#frag"),
        (f"postgresql://db/h?sslpassword={SECRET}", "postgresql://db/h?sslpassword=***"),
        (f"postgresql://nightly:{ENCODED}@db/h", "postgresql://nightly:***@db/h"),
        (f"postgresql://nightly:{SPLIT}@db:5432/h", "postgresql://nightly:***@db:5432/h"),
        (f"postgresql://nightly:{SECRET}@[::1/h", "postgresql://nightly:***@[::1/h"),  # malformed: still masked
        (f"postgresql://nightly:{SECRET}@db/h?password={SECRET}", "postgresql://nightly:***@db/h?password=***"),
        (f"host=db port=5432 password={SECRET} user=nightly", "host=db port=5432 password=*** user=nightly"),
        (f"host=db password='{SECRET} x' user=nightly", "host=db password=*** user=nightly"),
        # nothing to hide: shown as given
        ("postgresql://nightly@db.example:5432/history", "postgresql://nightly@db.example:5432/history"),
        ("/srv/results/history.sqlite", "/srv/results/history.sqlite"),
        ("results/a:b@c/history.sqlite", "results/a:b@c/history.sqlite"),
    ],
)
def test_every_form_of_password_in_a_location_is_masked(where, shown):
    from harness.nightly.dialect import masked

    assert masked(where) == shown


@pytest.mark.unit
def test_a_driver_message_repeating_the_password_or_a_piece_of_it_is_masked():
    """libpq quotes what it could not parse: the whole URI, a percent-encoded token, or the pieces
    an unencoded '@' or ':' split the password into (as a host, as a port)."""
    from harness.nightly.dialect import masked

    where = f"postgresql://nightly:{SPLIT}@db:5432/h"
    said = "failed to resolve host 'w0rd': invalid integer value \"x9z@db:5432\" for port; user p4ss"
    shown = "failed to resolve host '***': invalid integer value \"***@db:5432\" for port; user ***"
    assert masked(said, where) == shown
    where = f"postgresql://nightly:{ENCODED}@db/h"
    assert masked(f'bad token "{ENCODED}" or {DECODED}', where) == 'bad token "***" or ***'
    uri = f"postgresql://nightly:{SECRET}@[::1/h"
    assert masked(f'no "]" in URI: "{uri}"', uri) == 'no "]" in URI: "postgresql://nightly:***@[::1/h"'
    assert masked("address in use", where) == "address in use"  # only whole pieces, not letters in words


def _forms(host: str, port: int) -> list[tuple[str, tuple[str, ...]]]:
    """History URLs with a password that fail for real, each with the texts that must not appear."""
    return [
        (f"postgresql://nightly:{SECRET}@{host}:1/history", (SECRET,)),  # nothing listens there: refused
        (f"postgresql://nightly:{SECRET}@{host}:{port}/history", (SECRET,)),  # the server answers: no such role
        (f"postgres://nightly:{SECRET}@{host}:{port}/history", (SECRET,)),
        (f"postgresql://{host}:{port}/history?user=nightly&password={SECRET}&application_name=h", (SECRET,)),
        (f"postgresql+psycopg://nightly:{SECRET}@{host}:{port}/history", (SECRET,)),  # not a URL libpq takes
        (f"postgresql://nightly:{ENCODED}@{host}:{port}/history", (ENCODED, DECODED)),
        (f"postgresql://nightly:pw%zz{SECRET}@{host}:{port}/history", (SECRET,)),  # libpq quotes the bad token
        (f"postgresql://nightly:{SECRET}@[::1/history", (SECRET,)),  # libpq quotes the whole URI
        (f"postgresql://nightly:{SPLIT}@{host}:{port}/history", ("p4ss", "w0rd", "x9z")),  # libpq splits it
    ]


def _server() -> tuple[str, int]:
    from urllib.parse import urlsplit

    server = os.environ.get(POSTGRES_ENV)
    if not server:
        pytest.skip(f"${POSTGRES_ENV} is not set: `export {POSTGRES_ENV}=$(bash scripts/postgres-test-server.sh)`")
    parts = urlsplit(server)
    return parts.hostname or "127.0.0.1", parts.port or 5432


def test_failed_connections_never_show_the_password(tmp_path):
    """`history`, `compare` and `report` given each URL: each fails with one line (the report is
    written, without trends), and no output holds the password. `history` runs as real processes,
    all at once, so that whatever the driver might write to the terminal itself is seen too;
    `compare` and `report` in this process (the same opening of the history, pandas loaded once)."""
    host, port = _server()
    run_dir = night(tmp_path / "results", 1)
    forms = _forms(host, port)
    listing = [harness("history", "--history", where, wait=False) for where, _ in forms]
    for i, ((where, secrets), proc) in enumerate(zip(forms, listing, strict=True)):
        out, err = proc.communicate(timeout=120)
        said = {"history": (proc.returncode, out, err)}
        said["compare"] = in_process("compare", "previous", "latest", "--history", where)
        page = tmp_path / f"report-{i}.html"
        said["report"] = in_process("report", run_dir, "--out", page, "--history", where)
        for command, (code, out, err) in said.items():
            if command == "report":
                assert code == 0 and err == "", (where, said)
                out += page.read_text()
                assert "no trends: history " in out, (where, said)
            else:
                assert code == ExitCode.BAD_INPUT and out == "", (where, command, said)
                assert err.startswith("error: history ") and err.count("\n") == 1, (where, command, said)
            for secret in secrets:
                assert secret not in out + err, (where, command, secret, said)


def test_a_run_whose_history_fails_shows_no_password(models_root, tmp_path):
    """A real run (the reference on two utterances) with a history whose URL the driver quotes back
    in its error: the run's results and report are kept, and the password is in neither its
    output nor the report."""
    where = f"postgresql://nightly:pw%zz{SECRET}@127.0.0.1:1/history"
    code, out, err, run_dir = reference_run(tmp_path, models_root, where)
    page = Path(run_dir / "report.html")
    assert code == ExitCode.HISTORY, out + err
    assert page.is_file() and out.rstrip().endswith(f"report: {page}")
    for text in (out, err, page.read_text()):
        assert SECRET not in text
    assert err.splitlines()[-1].startswith("error: history postgresql://nightly:***@127.0.0.1:1/history: ")
