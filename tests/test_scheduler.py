"""Distributed runs that survive, on a real embedded Ray with real tiny.en models: elastic slots,
a worker killed mid-shard, Ctrl-C then --resume, an unreachable address, a board no node has."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import yaml

from harness.core.status import Status
from harness.job.spec import load_job
from harness.run.execute import run_job
from tests.conftest import ROOT

LIMIT, SHARD = 8, 2


def _spec(**cluster):
    spec = load_job(ROOT / "jobs" / "librispeech_tiny_en.yaml").with_overrides(limit=LIMIT)
    return replace(spec, cluster=replace(spec.cluster, shard_size=SHARD, slots=2, **cluster))


def _tokens(utts: pd.DataFrame) -> dict[tuple[str, str], tuple[int, ...]]:
    return {(r.target, r.utt_id): tuple(r.hyp_tokens) for r in utts.itertuples()}


@pytest.fixture(scope="module")
def undisturbed(ray_local, tiny_artifacts, models_root, tmp_path_factory):
    return run_job(_spec(), tmp_path_factory.mktemp("undisturbed"), models_root, progress=False, log=lambda *a: None)


def test_a_freed_slot_goes_to_the_model_with_work_left(undisturbed):
    """torchscript-mtk (no KV cache) is the slower model: once the reference is done, its slot
    starts a second torchscript-mtk worker instead of idling."""
    info = json.loads((undisturbed.run_dir / "run.json").read_text())
    workers = pd.DataFrame(info["workers"])
    per_model = workers.groupby("model")["shards"].agg(["count", "sum"])
    assert per_model.loc["tiny.en/reference/fp32", "count"] == 1
    assert per_model.loc["tiny.en/torchscript-mtk/fp32", "count"] == 2, workers
    assert (workers["shards"] >= 1).all() and per_model["sum"].eq(LIMIT // SHARD).all()
    assert (workers["load_s"] > 0).all() and (workers["rss_mb"] > 100).all()  # load cost and memory, per worker
    assert (workers["ready_s"] > workers["load_s"]).all()  # process start and imports come first
    # the driver's own time, phase by phase, within the run's
    phases = info["phases"]
    assert set(phases) >= {"dataset", "connect", "artifacts", "publish", "schedule", "score", "total"}
    assert sum(v for k, v in phases.items() if k != "total") <= phases["total"]
    assert phases["schedule"] >= (workers["alive_s"].max() - 1)
    (node,) = info["nodes"]
    assert node["shards"] == 2 * LIMIT // SHARD and node["failures"] == 0 and node["busy_s"] > 0
    assert (undisturbed.utterances["attempt"] == 0).all()


def _model_workers() -> list[int]:
    """Pids of this session's live ModelWorker processes: children of its raylet (from /proc)."""
    import ray

    raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes()
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == raylet and b"ModelWorker" in cmdline:
            pids.append(int(proc.name))
    return pids


def test_a_worker_killed_mid_shard_costs_only_a_retry(ray_local, undisturbed, models_root, tmp_path):
    """SIGKILL a real worker process once the first shard is in: the rest of its shard is retried on
    a new worker, the retry is recorded, and the results equal the undisturbed run's."""
    out, killed = tmp_path / "results", []

    def kill_one() -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if list(out.glob("*/*/raw/*.parquet")) and (pids := _model_workers()):
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
                return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_one)
    killer.start()
    result = run_job(_spec(), out, models_root, progress=False, log=lambda *a: None)
    killer.join()
    assert killed
    utts = result.utterances
    assert len(utts) == 2 * LIMIT and not utts.duplicated(["target", "utt_id"]).any()
    assert (utts["status"] == Status.OK).all() and (utts["attempt"] >= 1).any()
    info = json.loads((result.run_dir / "run.json").read_text())
    assert len(info["failures"]) == 1 and info["nodes"][0]["failures"] == 1
    assert _tokens(utts) == _tokens(undisturbed.utterances)
    assert result.summary.set_index("target")["wer"].equals(undisturbed.summary.set_index("target")["wer"])


def _job_file(tmp_path, **decoding):
    job = yaml.safe_load((ROOT / "jobs" / "librispeech_tiny_en.yaml").read_text())
    job["dataset"]["path"] = str(ROOT / "data" / "librispeech-eval")
    job["dataset"]["limit"] = LIMIT
    job["cluster"] = {"shard_size": SHARD, "slots": 2}
    job["decoding"] = {"language": "en", **decoding}
    path = tmp_path / f"job{len(decoding)}.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def _cli(*args, **kw):
    return [sys.executable, "-m", "harness", *map(str, args)]


def test_ctrl_c_keeps_the_work_and_resume_finishes_it(undisturbed, tiny_artifacts, models_root, tmp_path):
    job, out = _job_file(tmp_path), tmp_path / "results"
    common = ["--out", out, "--models", models_root, "--no-progress"]
    proc = subprocess.Popen(_cli("run", job, *common), stderr=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.monotonic() + 400
    while not len(list(out.glob("*/*/raw/*.parquet"))) >= 2 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 5, err[-2000:]
    (run_dir,) = (out / "librispeech_tiny_en").iterdir()
    assert f"resume with: python -m harness run {job} --resume {run_dir.name}" in err
    state = json.loads((run_dir / "state.json").read_text())
    assert state["state"] == "interrupted" and not (run_dir / "utterances.parquet").exists()
    kept = {p.name for p in (run_dir / "raw").glob("*.parquet")}
    assert kept

    listed = subprocess.run(_cli("runs", "--out", out), capture_output=True, text=True, cwd=ROOT)
    assert f"librispeech_tiny_en/{run_dir.name}  interrupted" in listed.stdout

    changed = _job_file(tmp_path, max_new_tokens=20)
    refused = subprocess.run(_cli("run", changed, "--resume", run_dir.name, *common), capture_output=True, text=True)
    assert refused.returncode == 2 and "the job differs from the run's (decoding)" in refused.stderr
    assert refused.stderr.count("\n") == 1, refused.stderr

    resumed = subprocess.run(_cli("run", job, "--resume", "latest", *common), capture_output=True, text=True, cwd=ROOT)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert kept <= {p.name for p in (run_dir / "raw").glob("*.parquet")}  # finished shards were not redone
    utts = pd.read_parquet(run_dir / "utterances.parquet")
    assert _tokens(utts) == _tokens(undisturbed.utterances)
    assert json.loads((run_dir / "state.json").read_text())["state"] == "complete"
    assert json.loads((run_dir / "run.json").read_text())["resumed"]


def test_an_unreachable_address_is_one_line_before_anything_is_built(tmp_path):
    models = tmp_path / "models"
    started = time.monotonic()
    proc = subprocess.run(
        _cli("run", ROOT / "jobs" / "librispeech_tiny_en.yaml", "--address", "127.0.0.1:9", "--models", models,
             "--out", tmp_path / "results"),
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2 and time.monotonic() - started < 30
    assert proc.stderr.strip().count("\n") == 0 and "cannot reach a Ray cluster there" in proc.stderr
    assert not models.exists() and not (tmp_path / "results").exists()


def test_a_board_target_no_node_offers_is_unavailable_at_once(ray_local, tiny_artifacts, tmp_path):
    """Work that needs a `mediatek` node, on a cluster without one and no emulation: rows that say
    why, without starting a worker."""
    from harness.core.decoding import Dims, build_prompt
    from harness.job.spec import ModelCell
    from harness.run.artifact_server import start_server
    from harness.run.dataset import plan_shards
    from harness.run.node_cache import publish
    from harness.run.scheduler import Scheduler, SchedulerOptions, Work
    from harness.run.worker import WorkerSetup

    art = tiny_artifacts["torchscript-mtk"]
    dims = Dims.of(art.manifest["dims"])
    spec = _spec()
    server = start_server()
    setup = WorkerSetup(
        ModelCell("tiny.en", "mtk", "fp32"), publish(server, art), dims, build_prompt(dims), spec.decoding, spec.dataset
    )
    shards = tuple(plan_shards(LIMIT, SHARD))
    rows = []
    started = time.monotonic()
    report = Scheduler(
        [Work(setup, shards, "mediatek")],
        SchedulerOptions(slots=2),
        lambda cell, shard, r: rows.extend(r),
        lambda: ([f"u{i}" for i in range(LIMIT)], [""] * LIMIT),
        progress=False,
    ).run()
    ray_local.kill(server)
    assert time.monotonic() - started < 60 and not report["workers"]
    assert len(rows) == LIMIT and {r["status"] for r in rows} == {"unavailable"}
    assert "no node advertises the 'mediatek' resource" in rows[0]["error"]


def test_a_cpu_model_leaves_a_board_node_its_slot_while_a_board_model_waits():
    """A board node with one CPU and one `mediatek` unit: while an mtk model waits for it, the CPU
    models go elsewhere (or wait); once the board's model holds the board, its node's spare CPUs
    are anyone's."""
    from harness.run.placement import NodeInfo, Nodes

    nodes = Nodes.__new__(Nodes)  # the placement rules alone, on nodes described by hand
    head = NodeInfo("head", "host", {"CPU": 1}, slots=1)
    board = NodeInfo("board", "host", {"CPU": 2, "mediatek": 1}, slots=2)
    nodes.nodes = {"head": head, "board": board}
    wanted = {"mediatek"}
    assert nodes.place(None, wanted) is head  # the freest node would be the board's
    nodes.take(head, None)
    assert nodes.place(None, wanted) is board  # 2 slots, 1 kept for the board's model
    nodes.take(board, None)
    assert nodes.place(None, wanted) is None  # the last slot is the board model's
    assert nodes.place("mediatek", wanted) is board
    nodes.take(board, "mediatek")
    assert nodes.place(None, set()) is None and board.boards_used == {"mediatek": 1}
