"""run.json through its one writer and reader (`harness.results.run_info`): the keys the history and
the report have always read, old runs' files read with defaults, a bad file refused in one line."""

from __future__ import annotations

import json

import pytest

from harness.cli import main
from harness.core.errors import HarnessError
from harness.results import run_info
from harness.results.run_info import (
    RUN_JSON,
    Failure,
    Host,
    ModelInfo,
    NodeReport,
    PassReport,
    RunInfo,
    WorkerReport,
)

pytestmark = pytest.mark.unit

JOB = {"name": "nightly", "dataset": {"path": "/data/eval", "hub": None, "split": "test", "limit": 8}}
NODE = NodeReport(
    node="host", node_id="ab" * 8, resources={"CPU": 2.0}, slots=2, shards=4, failures=1, set_aside=False, busy_s=3.5
)
LOADED = WorkerReport(
    model="tiny.en/reference/fp32", node="host/abab", load_s=1.2, ready_s=3.4, rss_mb=512, shards=4, busy_s=3.5,
    alive_s=5.0,
)  # fmt: skip
DIED_LOADING = WorkerReport(model="tiny.en/reference/fp32", node="host", shards=0, busy_s=0.0, alive_s=1.0)


def _info(**changes) -> RunInfo:
    values = dict(
        run_id="20260101-020000-abcdef", schema_version=5, job=JOB,
        models=(ModelInfo(model="tiny.en/reference/fp32", artifact="/m/reference-fp32-" + "0" * 16, key="0" * 16,
                          status="reused", reason=""),),
        utterances=8, packages={"numpy": "2.0"}, git_commit="f" * 40,
        host=Host(hostname="host", platform="Linux", python="3.11", cpus=2, cpu="CPU [avx2]"),
        nodes=(NODE,), workers=(LOADED, DIED_LOADING),
        failures=(Failure(model="tiny.en/reference/fp32", node="host", node_id="ab" * 8, reason="died", at="now"),),
        phases={"schedule": 4.0, "total": 9.0}, resumed=("2026-01-01T02:05:00Z",),
        started="2026-01-01T02:00:00Z", finished="2026-01-01T02:10:00Z",
    )  # fmt: skip
    return RunInfo(**{**values, **changes})


def test_it_writes_the_keys_run_json_always_had_and_reads_them_back(tmp_path):
    path = tmp_path / RUN_JSON
    for analysis in (None, PassReport(nodes=(NODE,), workers=(LOADED,))):
        info = _info(divergence_pass=analysis)
        info.write(path)
        written = json.loads(path.read_text())
        keys = ["run_id", "schema_version", "job", "models", "utterances", "packages", "git_commit", "host", "nodes",
                "workers", "failures", "phases", "resumed", "started", "finished"]  # fmt: skip
        if analysis is not None:  # only a run whose job asks for the analysis has its report
            keys.insert(keys.index("phases"), "divergence_pass")
        assert list(written) == keys
        assert written["workers"][0] == {
            "model": "tiny.en/reference/fp32", "node": "host/abab", "load_s": 1.2, "ready_s": 3.4, "rss_mb": 512,
            "shards": 4, "busy_s": 3.5, "alive_s": 5.0,
        }  # fmt: skip
        assert "load_s" not in written["workers"][1]  # a worker that never loaded has no load figures
        assert written["host"]["cpu"] == "CPU [avx2]" and written["models"][0]["key"] == "0" * 16
        assert run_info.read(path) == info
    assert info.dataset_label == "/data/eval split=test limit=8" and info.job_name == "nightly"


def test_a_run_json_of_an_early_harness_reads_with_defaults(tmp_path):
    """As the first version with a history wrote it: no nodes, workers, phases or resumed, models
    with a status line and no key, no thresholds in the job."""
    early = {
        "run_id": "20251201-020000-aaaaaa", "schema_version": 1,
        "job": {"name": "nightly", "dataset": {"hub": "openslr/librispeech_asr", "config": "clean", "split": "test"}},
        "models": [{"model": "tiny.en/reference/fp32", "artifact": None, "status": "failed: no weights"}],
        "utterances": 70, "packages": {"torch": "2.4"}, "git_commit": None,
        "host": {"hostname": "old", "platform": "Linux", "python": "3.10", "cpus": 8, "cpu": "x"},
        "started": "2025-12-01T02:00:00Z", "finished": "2025-12-01T02:30:00Z", "dropped since": True,
    }  # fmt: skip
    (tmp_path / RUN_JSON).write_text(json.dumps(early))
    info = run_info.read(tmp_path / RUN_JSON)
    assert info.models == (ModelInfo(model="tiny.en/reference/fp32", status="failed: no weights"),)
    assert (info.nodes, info.workers, info.failures, info.resumed) == ((), (), (), ())
    assert info.phases is None and info.divergence_pass is None and info.thresholds is None
    assert info.dataset_label == "hub:openslr/librispeech_asr config=clean split=test"


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"run_id": 3}, "run_id: expected a string, got 3"),
        ({"started": ...}, "started: missing"),  # ...: no such key
        ({"utterances": "70"}, 'utterances: expected an integer, got "70"'),
        ({"utterances": True}, "utterances: expected an integer, got true"),
        ({"models": [{"model": "a"}, {"status": "ok"}]}, "models[1].model: missing"),
        ({"host": {"cpus": 2.5}}, "host.cpus: expected an integer, got 2.5"),
        ({"nodes": [{"node": "h"}]}, "nodes[0].node_id: missing"),
        ({"phases": {"total": "long"}}, 'phases.total: expected a number, got "long"'),
        ({"job": {"name": "x"}}, "job.dataset: expected an object with a path or a hub id, got null"),
        ({"job": {"dataset": {"path": "/d"}}}, "job.name: expected a string, got null"),
    ],
)
def test_a_bad_run_json_is_one_line_naming_the_file_and_field(tmp_path, change, error):
    path = tmp_path / RUN_JSON
    _info().write(path)
    written = {**json.loads(path.read_text()), **change}
    path.write_text(json.dumps({k: v for k, v in written.items() if v is not ...}))
    with pytest.raises(HarnessError) as raised:
        run_info.read(path)
    assert str(raised.value) == f"{path}: {error}"


def test_history_add_of_a_folder_with_a_broken_run_json_is_one_error_line(tmp_path, capsys):
    for name in ("summary.csv", "utterances.parquet"):
        (tmp_path / name).write_text("")
    (tmp_path / RUN_JSON).write_text("[]")
    assert main(["history", "add", str(tmp_path), "--history", str(tmp_path / "h.sqlite")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / RUN_JSON}: the file: expected an object, got []\n"
    (tmp_path / RUN_JSON).write_text('{"run_id": ')
    assert main(["history", "add", str(tmp_path), "--history", str(tmp_path / "h.sqlite")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / RUN_JSON}: not a readable run.json (") and err.count("\n") == 1
