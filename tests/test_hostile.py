"""Hostile datasets and job files (issue 11): each gets one clear line or an error row, and a
dataset no run can use is refused before anything is built."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from harness.cli import main
from harness.core.errors import HarnessError
from harness.job.file import MAX_JOB_BYTES
from harness.job.spec import DatasetSpec, load_job
from harness.job.validation import MAX_PROBLEMS
from harness.run.dataset import check_dataset, plan_shards, read_shard
from harness.run.execute import run_job
from tests.conftest import EMBEDDED

AUDIO = EMBEDDED / "test-clean" / "1089-134691-0000.flac"  # 2 s, real speech


def _dataset(folder: Path, rows: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def _job(tmp_path: Path, dataset: Path, name: str = "hostile") -> Path:
    job = tmp_path / f"{name}.yaml"
    job.write_text(f"name: {name}\ndataset: {{path: {dataset}}}\nmodels: {{sizes: [tiny.en]}}\n")
    return job


@pytest.fixture
def escaping(tmp_path) -> Path:
    """A dataset whose metadata reaches for a real audio file outside its folder in every way
    (were it opened, it would decode), next to rows that are fine."""
    secret = Path(shutil.copy(AUDIO, tmp_path / "secret.flac"))
    folder = tmp_path / "ds"
    folder.mkdir()
    shutil.copy(AUDIO, folder / "a.flac")
    (folder / "out.flac").symlink_to(secret)
    (folder / "in.flac").symlink_to("a.flac")  # a symlink that stays inside is fine
    return _dataset(
        folder,
        [
            {"id": "good", "file_name": "a.flac", "text": "HE COULD WAIT NO LONGER"},
            {"id": "dotdot", "file_name": "../secret.flac", "text": "X"},
            {"id": "absolute", "file_name": str(secret), "text": "X"},
            {"id": "symlink", "file_name": "out.flac", "text": "X"},
            {"id": "null", "file_name": None, "text": "X"},
            {"id": "inside", "file_name": "in.flac", "text": "X"},
        ],
    )


def test_file_names_outside_the_folder_or_not_strings_become_error_rows(escaping):
    spec = DatasetSpec(path=escaping)
    by_id = {u.utt_id: u for u in read_shard(spec, plan_shards(6, 6)[0])}
    assert by_id["good"].error is None and by_id["inside"].error is None and by_id["inside"].audio_s > 1
    expected = {
        "dotdot": "file_name '../secret.flac': resolves outside the dataset folder",
        "absolute": f"file_name '{escaping.parent / 'secret.flac'}': an absolute path",
        "symlink": "file_name 'out.flac': resolves outside the dataset folder",
        "null": "file_name None: expected a path relative to the dataset folder",
    }
    for utt_id, message in expected.items():
        utt = by_id[utt_id]
        assert utt.audio is None and utt.error.startswith(message), utt.error
    check = check_dataset(spec)
    assert check.n_rows == 6 and len(check.unreadable) == 4
    assert check.unreadable[0].startswith("utterance 'dotdot': file_name '../secret.flac'")


def test_non_string_file_name_is_an_error_row_not_a_failed_shard(tmp_path):
    folder = _dataset(tmp_path / "ds", [{"file_name": 5, "text": "X"}, {"file_name": 6, "text": "Y"}])
    utts = read_shard(DatasetSpec(path=folder), plan_shards(2, 2)[0])
    assert [u.error for u in utts] == [f"file_name {n}: expected a path relative to the dataset folder" for n in (5, 6)]


def test_validate_reports_the_refused_file_names(escaping, tmp_path, capsys):
    job = _job(tmp_path, escaping)
    assert main(["validate", str(job)]) == 1
    (line,) = capsys.readouterr().err.splitlines()
    refused = "4 of 6 utterances have a file_name or language that is refused"
    assert line.startswith(f"error: {job}: dataset {escaping}: {refused}")
    assert "'../secret.flac'" in line and "'out.flac'" in line and "file_name None" in line


def test_duplicate_ids_are_refused_by_validate_and_before_any_model_is_built(tmp_path, capsys):
    folder = tmp_path / "ds"
    for sub in ("one", "two"):  # the same stem twice and no `id` column: the ids would collide
        (folder / sub).mkdir(parents=True)
        shutil.copy(AUDIO, folder / sub / "utt.flac")
    _dataset(folder, [{"file_name": f"{sub}/utt.flac", "text": "X"} for sub in ("one", "two")])
    with pytest.raises(HarnessError, match=r"utterance ids occur more than once: 'utt' \(2 rows\); .*unique 'id'"):
        check_dataset(DatasetSpec(path=folder))
    job = _job(tmp_path, folder)
    assert main(["validate", str(job)]) == 1
    assert "utterance ids occur more than once" in capsys.readouterr().err
    models, out = tmp_path / "models", tmp_path / "results"
    with pytest.raises(HarnessError, match="more than once"):
        run_job(load_job(job), out, models, progress=False)
    assert not models.exists() and not out.exists()


def test_missing_text_column_is_refused_by_validate_and_by_run_before_building(tmp_path, capsys):
    shutil.copy(AUDIO, tmp_path / "a.flac")
    folder = _dataset(tmp_path, [{"file_name": "a.flac", "transcript": "X"}])
    job = _job(tmp_path, folder)
    assert main(["validate", str(job)]) == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: {job}: {folder / 'metadata.jsonl'}: missing column(s) ['text']")
    models, out = tmp_path / "models", tmp_path / "results"
    # the CLI's run: exit 2, one line, and no artifact, no weights resolved, no results folder
    assert main(["run", str(job), "--out", str(out), "--models", str(models), "--no-progress"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: ") and "missing column(s) ['text']" in line
    assert not models.exists() and not out.exists()


# ---------------------------------------------------------------------------------------------
# Job files

GOOD = f"dataset: {{path: {EMBEDDED}}}\nmodels: {{sizes: [tiny.en]}}\n"


def _refused(tmp_path: Path, content: bytes | str) -> str:
    """load_job's one line for a job file holding `content`."""
    job = tmp_path / "job.yaml"
    job.write_bytes(content.encode() if isinstance(content, str) else content)
    with pytest.raises(HarnessError) as exc:
        load_job(job)
    msg = str(exc.value)
    assert msg.startswith(f"{job}: ") and "\n" not in msg and len(msg) < 2000, msg[:300]
    return msg


@pytest.mark.unit
def test_non_utf8_job_file_names_the_byte_offset(tmp_path):
    msg = _refused(tmp_path, b"name: caf\xe9\n" + GOOD.encode())
    assert msg.endswith("not UTF-8 text (byte 0xe9 at offset 9)")


@pytest.mark.unit
def test_oversized_job_file_is_refused_unparsed(tmp_path):
    """Valid YAML (a comment) just over the limit: refused for its size alone."""
    content = f"name: big\n{GOOD}# " + "x" * MAX_JOB_BYTES + "\n"
    assert "larger than 64 KiB, the limit for a job file; not parsed" in _refused(tmp_path, content)


@pytest.mark.unit
def test_alias_bomb_is_refused_in_one_short_line(tmp_path):
    levels = "".join(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]\n" for i in range(1, 10))
    msg = _refused(tmp_path, f"name: bomb\n{GOOD}l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n{levels}")
    assert msg.endswith("line 4: anchors and aliases (&name, *name) are not allowed in job files; write the value out")
    # an alias alone (no bomb) is refused the same way: job files never need them
    assert "anchors and aliases" in _refused(tmp_path, f"name: a\n{GOOD}cluster: &c {{slots: 1}}\n")


@pytest.mark.unit
def test_name_is_matched_whole(tmp_path):
    assert "name: expected a name" in _refused(tmp_path, f'name: "job\\n"\n{GOOD}')
    assert "name: expected a name" in _refused(tmp_path, f"name: ok/../../etc\n{GOOD}")


@pytest.mark.unit
@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (f"name: deep\n{GOOD}x: " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply for a job file"),
        (f"name: n\n{GOOD}cluster: {{slots: {'9' * 5000}}}\n", "is not valid YAML (Exceeds the limit"),
        ('name: n\ndataset: {path: "a\\0b"}\n', "dataset.path: not a usable folder path 'a\\x00b'"),
    ],
    ids=["deep", "huge-int", "nul-path"],
)
def test_other_hostile_yaml_gets_one_line(tmp_path, content, expected):
    assert expected in _refused(tmp_path, content)


@pytest.mark.unit
def test_error_messages_stay_short(tmp_path):
    """A huge offending value is quoted clipped, and thousands of problems are counted, not listed."""
    msg = _refused(tmp_path, "name: " + "x" * 50_000 + "\n" + GOOD)
    assert len(msg) < 300 and "..." in msg
    keys = "".join(f"key{i}: 1\n" for i in range(3000))
    msg = _refused(tmp_path, f"name: many\n{GOOD}{keys}")
    assert msg.count("unknown key") == MAX_PROBLEMS and msg.endswith(f"and {3000 - MAX_PROBLEMS} more")


@pytest.mark.unit
def test_a_duplicate_key_is_refused_naming_it_and_its_line(tmp_path):
    """YAML lets the later of two equal keys win silently: a job file refuses them, at any depth."""
    msg = _refused(tmp_path, f"name: first\n{GOOD}name: second\n")
    assert msg.endswith("line 4: duplicate key 'name' (first on line 1); keep one of them")
    nested = "cluster:\n  slots: 1\n  threads: 2\n  slots: 4\n"
    assert _refused(tmp_path, f"name: n\n{GOOD}{nested}").endswith(
        "line 7: duplicate key 'slots' (first on line 5); keep one of them"
    )
    flow = "models: {sizes: [tiny.en], sizes: [base]}\n"
    assert "line 3: duplicate key 'sizes' (first on line 3)" in _refused(
        tmp_path, f"name: n\ndataset: {{path: {EMBEDDED}}}\n{flow}"
    )
