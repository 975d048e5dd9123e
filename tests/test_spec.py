"""Job files: every shipped one validates; a bad one gets every problem, each with its YAML path."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from harness.cli import main
from harness.core.errors import HarnessError
from harness.job.spec import load_job

pytestmark = pytest.mark.unit  # pure logic: the unit tier

ROOT = Path(__file__).resolve().parents[1]
JOBS = sorted((ROOT / "jobs").glob("*.yaml"))


@pytest.mark.parametrize("job", JOBS, ids=[j.name for j in JOBS])
def test_every_shipped_job_validates(job):
    spec = load_job(job)
    assert spec.name == job.stem
    assert spec.models.cells()[0].target == "reference"


BAD = """
name: bad job
dataset:
  path: ../no/such/folder
  limt: 3
models:
  sizes: [bsae, tiny.en]
  targets:
    torchscript-mk: [fp32]
    torchscript-mtk: [int3]
decodng: {}
cluster:
  slots: two
report: always
analysis:
  divergense: true
"""


def test_bad_job_reports_every_problem_with_its_path(tmp_path):
    job = tmp_path / "bad.yaml"
    job.write_text(BAD)
    with pytest.raises(HarnessError) as exc:
        load_job(job)
    msg = str(exc.value)
    assert msg.startswith(str(job)) and "\n" not in msg
    for expected in (
        "name: expected a name",
        "dataset.limt: unknown key (did you mean 'limit'?)",
        "dataset.path: no such folder",
        "models.sizes[0]: unknown size 'bsae' (did you mean 'base'?)",
        "models.targets.torchscript-mk: unknown target (did you mean 'torchscript-mtk'?)",
        "models.targets.torchscript-mtk: quantization 'int3' is not offered",
        "decodng: unknown key (did you mean 'decoding'?)",
        "cluster.slots: expected int or None, got 'two'",
        "report: expected true or false, got 'always'",
        "analysis.divergense: unknown key (did you mean 'divergence'?)",
    ):
        assert expected in msg


def test_analysis_is_opt_in_and_checked(tmp_path):
    spec = load_job(ROOT / "jobs" / "librispeech_tiny_en.yaml")
    assert spec.analysis.divergence is False
    job = tmp_path / "job.yaml"
    data = ROOT / "data" / "librispeech-eval"
    job.write_text(f"name: j\ndataset: {{path: {data}}}\nanalysis: {{divergence: true}}\n")
    assert load_job(job).analysis.divergence is True
    for bad, expected in (
        ("{divergence: 'yes'}", "analysis.divergence: expected bool, got 'yes'"),
        ("true", "analysis: expected a mapping, got bool"),
    ):
        job.write_text(f"name: j\ndataset: {{path: {data}}}\nanalysis: {bad}\n")
        with pytest.raises(HarnessError, match=expected):
            load_job(job)


def test_invalid_yaml_and_missing_file(tmp_path):
    job = tmp_path / "broken.yaml"
    job.write_text("name: [unclosed\n")
    with pytest.raises(HarnessError, match=r"broken\.yaml: line \d+ is not valid YAML"):
        load_job(job)
    with pytest.raises(HarnessError, match="no such job file"):
        load_job(tmp_path / "absent.yaml")


def test_the_report_is_written_when_the_job_asks():
    assert load_job(ROOT / "jobs" / "librispeech_tiny_en.yaml").report is False  # the default
    assert load_job(ROOT / "jobs" / "nightly_base.yaml").report is True


def test_overrides_are_validated(tmp_path):
    spec = load_job(ROOT / "jobs" / "librispeech_tiny_en.yaml")
    assert spec.with_overrides(limit=3, slots=2).datasets[0].limit == 3
    with pytest.raises(HarnessError, match=r"--dataset\.path: no such folder"):
        spec.with_overrides(dataset=str(tmp_path / "nothing"))
    with pytest.raises(HarnessError, match="--limit"):
        spec.with_overrides(limit=0)
    hub = spec.with_overrides(dataset="openslr/librispeech_asr")
    assert hub.datasets[0].hub == "openslr/librispeech_asr" and hub.datasets[0].path is None


def test_cli_validate_exit_codes(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD)
    assert main(["validate", *map(str, JOBS)]) == 0
    assert main(["validate", str(bad)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")


def test_cli_run_with_a_bad_job_writes_nothing(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD)
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "harness", "run", str(bad), "--out", str(out)], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ")
    assert not out.exists()


def test_a_relative_checkpoint_path_is_relative_to_the_job_file_like_the_dataset(tmp_path, monkeypatch):
    """A job means the same from any working directory: a `.pt` size resolves against the job
    file's folder (as dataset.path does); an absolute or `~` path is kept as written."""
    jobs = tmp_path / "jobs"
    (jobs / "ckpt").mkdir(parents=True)
    (jobs / "ckpt" / "mine.pt").write_bytes(b"checked when loaded, not here")
    outside = tmp_path / "outside.pt"
    outside.write_bytes(b"")
    data = ROOT / "data" / "librispeech-eval"
    job = jobs / "job.yaml"
    job.write_text(
        f"name: j\ndataset: {{path: {data}}}\nmodels: {{sizes: [ckpt/mine.pt, ../jobs/ckpt/mine.pt, {outside}]}}\n"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert load_job(job).models.sizes == (str(jobs / "ckpt" / "mine.pt"), str(outside))
    monkeypatch.setenv("HOME", str(tmp_path))
    job.write_text(f"name: j\ndataset: {{path: {data}}}\nmodels: {{sizes: [~/outside.pt]}}\n")
    assert load_job(job).models.sizes == ("~/outside.pt",)
    job.write_text(f"name: j\ndataset: {{path: {data}}}\nmodels: {{sizes: [mine.pt]}}\n")  # not beside the job
    with pytest.raises(
        HarnessError, match=rf"models\.sizes\[0\]: no such checkpoint file {re.escape(str(jobs))}/mine\.pt"
    ):
        load_job(job)
