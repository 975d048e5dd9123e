"""Distributed runs that survive.

The policy alone (unit): slots, placement, retries, failure rows and stalls, on an in-process
cluster (`tests.fake_cluster`, a stand-in for Ray) with workers that crash or hang on cue. Then on
a real embedded Ray with real tiny.en models: elastic slots, a worker killed mid-shard, Ctrl-C then
--resume, an unreachable address, a board no node has."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import pandas as pd
import pytest
import yaml

from harness.core.status import Status
from harness.job.spec import ModelCell, load_job
from harness.results.run_info import PassReport
from harness.run.dataset import Shard, plan_shards
from harness.run.execute import run_job
from harness.run.placement import NodeInfo, Nodes
from harness.run.scheduler import Scheduler, SchedulerOptions, Work
from tests.conftest import ROOT
from tests.fake_cluster import Crash, FakeCluster

# -- the policy alone, on an in-process cluster (unit) ----------------------------------------------

N_UTTS = 6
IDS = [f"u{i}" for i in range(N_UTTS)]


@dataclass(frozen=True)
class Setup:
    """A test worker's setup: its model, its pace in simulated seconds (`tests.fake_cluster`), and
    what goes wrong."""

    cell: ModelCell
    row_s: float = 1.0
    load_s: float = 1.0
    load_error: str | None = None  # its constructor raises ValueError(this)
    crashes: dict[int, int] = field(default_factory=dict)  # utterance → times its process dies there
    bug_at: int | None = None  # its loop raises at this utterance


class CueWorker:
    def __init__(self, setup: Setup) -> None:
        if setup.load_error:
            raise ValueError(setup.load_error)
        self.setup = setup

    def ready(self) -> dict:
        return {"load_s": self.setup.load_s, "rss_mb": 100}

    def peak_rss_mb(self) -> float:
        return 150

    def run_shard(self, shard: Shard, skip: int = 0, attempt: int = 0) -> Iterator[dict]:
        for i in range(shard.start + skip, shard.stop):
            if self.setup.crashes.get(i, 0) > 0:
                self.setup.crashes[i] -= 1
                raise Crash(f"killed on {IDS[i]}")
            if i == self.setup.bug_at:
                raise ValueError("a bug\nwith a traceback")
            yield {"model": self.setup.cell.label, "utt_id": IDS[i], "status": "ok", "reason": None, "attempt": attempt}


def failure_row(cell: ModelCell, utt_id: str, text: str, status: Status, reason: str, attempt: int) -> dict:
    return {"model": cell.label, "utt_id": utt_id, "status": status.value, "reason": reason, "attempt": attempt}


MTK, REF, TS = (ModelCell("tiny.en", t, "fp32") for t in ("mtk", "reference", "torchscript"))


def schedule(cluster: FakeCluster, *work: Work, **options) -> tuple[pd.DataFrame, PassReport]:
    """Run `work` on `cluster`; every row persisted (as a frame) and the report. Each shard must be
    persisted exactly once."""
    shards: dict[tuple[str, int], list[dict]] = {}

    def on_shard(cell: ModelCell, shard: Shard, rows: list[dict]) -> None:
        assert (cell.label, shard.index) not in shards, "a shard persisted twice"
        assert [r["utt_id"] for r in rows] == IDS[shard.start : shard.stop]
        shards[cell.label, shard.index] = rows

    scheduler = Scheduler(
        list(work),
        SchedulerOptions(**options),
        CueWorker,
        on_shard,
        failure_row,
        lambda: (IDS, [""] * N_UTTS),
        progress=False,
        log=lambda line: None,
        cluster=cluster,
    )
    report = scheduler.run()
    rows = pd.DataFrame([r for rows in shards.values() for r in rows])
    assert len(rows) == N_UTTS * len(work) and not rows.duplicated(["model", "utt_id"]).any()
    return rows, report


def work(setup: Setup, resource: str | None = None, shard_size: int = 2) -> Work:
    return Work(setup, tuple(plan_shards(N_UTTS, shard_size)), resource)


@pytest.mark.unit
def test_a_freed_slot_goes_to_the_model_with_the_most_work_left():
    """Two CPUs, a fast and a slow model: once the fast one is done, its slot starts a second
    worker of the slow one; every slot holds one worker at a time."""
    cluster = FakeCluster({"n": {"CPU": 2}})
    rows, report = schedule(cluster, work(Setup(REF, row_s=1)), work(Setup(TS, row_s=4)))
    assert (rows["status"] == "ok").all() and (rows["attempt"] == 0).all()
    started = [s.model for s in cluster.started]
    assert started == [REF.label, TS.label, TS.label]
    per_model = pd.DataFrame(report.workers).groupby("model")["shards"].agg(["count", "sum"])
    assert per_model.loc[TS.label, "count"] == 2 and per_model["sum"].eq(N_UTTS // 2).all()
    assert all(w.ready_s is not None and w.rss_mb == 150 for w in report.workers)  # peak taken at the end
    (node,) = report.nodes
    assert node.shards == 2 * N_UTTS // 2 and node.failures == 0 and node.slots == 2 and not report.failures


@pytest.mark.unit
def test_a_worker_that_dies_mid_shard_costs_a_retry_of_the_rest():
    cluster = FakeCluster({"n": {"CPU": 1}})
    rows, report = schedule(cluster, work(Setup(REF, crashes={3: 1})))
    assert (rows["status"] == "ok").all()
    assert rows.set_index("utt_id")["attempt"].to_dict() == {"u0": 0, "u1": 0, "u2": 0, "u3": 1, "u4": 0, "u5": 0}
    (failure,) = report.failures
    assert failure.model == REF.label and "killed on u3" in failure.reason and failure.node == "host-n"
    assert report.nodes[0].failures == 1 and not report.nodes[0].set_aside
    assert len(cluster.started) == 2  # the retry's new worker


@pytest.mark.unit
def test_a_shard_whose_workers_keep_dying_becomes_rows_with_the_reason():
    """The third death of a shard's worker ends its tries; a node where workers died twice is set
    aside, so the third try runs on the other node."""
    cluster = FakeCluster({"a": {"CPU": 1}, "b": {"CPU": 1}})
    rows, report = schedule(cluster, work(Setup(REF, crashes={2: 3})), slots=1)
    failed = rows[rows["status"] != "ok"]
    assert list(failed["utt_id"]) == ["u2", "u3"] and set(failed["status"]) == {Status.WORKER_FAILED}
    assert failed["reason"].str.endswith("(after 3 attempts)").all() and "killed on u2" in failed["reason"].iloc[0]
    assert (failed["attempt"] == 3).all() and (rows[rows["status"] == "ok"]["attempt"] == 0).all()
    nodes = {n.node_id: n for n in report.nodes}
    assert nodes["a"].failures == 2 and nodes["a"].set_aside and nodes["b"].failures == 1
    assert [s.node_id for s in cluster.started][:3] == ["a", "a", "b"]
    assert "a" not in [s.node_id for s in cluster.started][2:]  # nothing more on the node set aside


@pytest.mark.unit
def test_a_model_that_cannot_load_is_not_retried_and_the_others_finish():
    cluster = FakeCluster({"n": {"CPU": 2}})
    rows, report = schedule(cluster, work(Setup(REF)), work(Setup(TS, load_error="model.bin: sha256 differs")))
    broken = rows[rows["model"] == TS.label]
    assert set(broken["status"]) == {Status.WORKER_FAILED}
    assert set(broken["reason"]) == {"ValueError: model.bin: sha256 differs"}
    assert (rows[rows["model"] == REF.label]["status"] == "ok").all()
    assert [s.model for s in cluster.started].count(TS.label) == 1 and not report.failures
    assert {w.model: w.load_s for w in report.workers} == {REF.label: 1.0, TS.label: None}


@pytest.mark.unit
def test_a_bug_in_the_worker_loop_fails_its_shard_without_a_retry():
    cluster = FakeCluster({"n": {"CPU": 1}})
    rows, report = schedule(cluster, work(Setup(REF, bug_at=3)))
    failed = rows[rows["status"] != "ok"]
    assert list(failed["utt_id"]) == ["u3"] and (failed["attempt"] == 0).all()
    assert failed["reason"].iloc[0] == "ValueError: a bug" and not report.failures  # its own error, one line
    assert (rows[rows["status"] == "ok"]["utt_id"] == ["u0", "u1", "u2", "u4", "u5"]).all()


@pytest.mark.unit
@pytest.mark.parametrize("hangs", ["loading its model", "on one utterance"])
def test_a_silent_worker_is_ended_and_counts_as_dead(hangs):
    """A worker silent for stall_timeout_s is killed; its model is tried again, up to max_attempts."""
    cluster = FakeCluster({"a": {"CPU": 1}, "b": {"CPU": 1}, "c": {"CPU": 1}})
    setup = Setup(REF, load_s=math.inf) if hangs == "loading its model" else Setup(REF, row_s=math.inf)
    rows, report = schedule(cluster, work(setup, shard_size=N_UTTS), stall_timeout_s=60.0, slots=1)
    assert set(rows["status"]) == {Status.WORKER_FAILED}
    reason = f"TimeoutError: no progress for 60 s {hangs} (after 3 attempts)"
    assert rows["reason"].iloc[0] == reason, rows["reason"].iloc[0]
    assert len(report.failures) == 3 and all(a.killed for a in cluster.actors)
    assert cluster.now >= 3 * 60  # simulated time: the test took none of it


@pytest.mark.unit
@pytest.mark.parametrize("emulate", [False, True])
def test_a_board_model_without_a_board_node(emulate):
    """Unavailable at once, no worker started, unless the job lets it run on CPUs."""
    cluster = FakeCluster({"n": {"CPU": 2}})
    rows, _ = schedule(cluster, work(Setup(MTK), "mediatek"), work(Setup(REF)), emulate=emulate)
    mtk = rows[rows["model"] == MTK.label]
    if emulate:
        assert (mtk["status"] == "ok").all() and {s.model for s in cluster.started} == {MTK.label, REF.label}
        assert all(not s.resources for s in cluster.started)
    else:
        assert set(mtk["status"]) == {Status.UNAVAILABLE}
        assert "no node advertises the 'mediatek'" in mtk["reason"].iloc[0]
        assert {s.model for s in cluster.started} == {REF.label}


@pytest.mark.unit
def test_a_board_model_gets_the_board_and_cpu_models_leave_it_its_slot():
    """A head with one CPU, a board node with one CPU and one `mediatek` unit: the board's slot is
    the board model's, each CPU model waits for the head's."""
    cluster = FakeCluster({"head": {"CPU": 1}, "board": {"CPU": 1, "mediatek": 1}})
    rows, _ = schedule(cluster, work(Setup(REF)), work(Setup(TS)), work(Setup(MTK), "mediatek"))
    assert (rows["status"] == "ok").all()
    on_board = [(s, a) for s, a in zip(cluster.started, cluster.actors, strict=True) if s.node_id == "board"]
    (board_model, board_worker), *after = on_board
    assert board_model.model == MTK.label and board_model.resources == {"mediatek": 1}
    assert all(s.at >= board_worker.ended for s, _ in after)  # its slot free once the board model is done
    assert {s.model for s in cluster.started if s.node_id == "head"} == {REF.label, TS.label}


@pytest.mark.unit
def test_a_gpu_goes_to_a_batching_model_and_only_one_worker_holds_it():
    """A GPU host (2 CPUs, 1 GPU) and a CPU host: the batching model's first worker goes to the GPU
    and holds it; nobody else does; a second worker of it, or a model that does not batch, takes a
    CPU slot without a GPU. (The device the worker then decodes on: `worker_device`, from Ray.)"""
    cluster = FakeCluster({"gpu": {"CPU": 2, "GPU": 1}, "cpu": {"CPU": 2}})
    batching = Work(Setup(REF, row_s=2), tuple(plan_shards(N_UTTS, 2)), None, gpu=True)
    rows, _ = schedule(cluster, batching, work(Setup(TS, row_s=1)))
    assert (rows["status"] == "ok").all()
    holding = [s for s in cluster.started if s.resources]
    (first, *_) = [s for s in cluster.started if s.model == REF.label]
    assert first.node_id == "gpu" and first.resources == {"GPU": 1}
    assert all(s.model == REF.label and s.node_id == "gpu" for s in holding)
    assert all(not s.resources for s in cluster.started if s.model == TS.label)
    nodes = Nodes(FakeCluster({"cpu": {"CPU": 4}, "gpu": {"CPU": 2, "GPU": 1}}), 1, None, print)
    assert nodes.place(None, set(), gpu=True) is nodes.nodes["gpu"]  # not the freest: the one with a GPU
    assert nodes.take(nodes.nodes["gpu"], None, gpu=True) == {"GPU": 1}
    assert nodes.place(None, set(), gpu=True) is nodes.nodes["cpu"]  # no GPU left: the freest node
    assert nodes.take(nodes.nodes["gpu"], None, gpu=True) == {}  # a slot, but no second GPU


@pytest.mark.unit
def test_placement_keeps_a_board_nodes_slot_for_the_board_model_that_waits():
    """The placement rules alone: while an mtk model waits for the board, CPU models go elsewhere
    (or wait); once the board's model holds the board, its node's spare CPUs are anyone's."""
    nodes = Nodes(FakeCluster({"head": {"CPU": 1}, "board": {"CPU": 2, "mediatek": 1}}), 1, None, print)
    head, board = nodes.nodes["head"], nodes.nodes["board"]
    assert isinstance(head, NodeInfo) and (head.slots, board.slots) == (1, 2)
    wanted = {"mediatek"}
    assert nodes.place(None, wanted) is head  # the freest node would be the board's
    nodes.take(head, None)
    assert nodes.place(None, wanted) is board  # 2 slots, 1 kept for the board's model
    nodes.take(board, None)
    assert nodes.place(None, wanted) is None  # the last slot is the board model's
    assert nodes.place("mediatek", wanted) is board
    nodes.take(board, "mediatek")
    assert nodes.place(None, set()) is None and board.boards_used == {"mediatek": 1}


@pytest.mark.unit
def test_a_node_that_leaves_is_set_aside():
    cluster = FakeCluster({"a": {"CPU": 1}, "b": {"CPU": 4}})
    lines: list[str] = []
    nodes = Nodes(cluster, 2, None, lines.append)
    assert nodes.free_slots(0) == 2  # CPU // threads per node: 0 + 2
    cluster.alive = cluster.alive[:1]
    nodes.refresh()
    assert nodes.nodes["b"].set_aside and lines == ["node host-b: left the cluster"]
    assert nodes.unrunnable(None, emulate=False) == "no node of the cluster has a CPU for a 2-thread worker"


# -- on a real embedded Ray (integration) ------------------------------------------------------------


LIMIT, SHARD = 8, 2


def _spec(**cluster):
    spec = load_job(ROOT / "jobs" / "librispeech_tiny_en.yaml").with_overrides(limit=LIMIT)
    return replace(spec, cluster=replace(spec.cluster, shard_size=SHARD, slots=2, **cluster))


def _tokens(utts: pd.DataFrame) -> dict[tuple[str, str], tuple[int, ...]]:
    return {(r.target, r.utt_id): tuple(r.hyp_tokens) for r in utts.itertuples()}


@pytest.fixture(scope="module")
def undisturbed(ray_local, tiny_artifacts, models_root, tmp_path_factory):
    return run_job(_spec(), tmp_path_factory.mktemp("undisturbed"), models_root, progress=False, log=lambda *a: None)


@pytest.mark.slow  # minutes of real runs: the integration tier keeps to its 12-minute budget
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


@pytest.mark.slow  # minutes of real runs: the integration tier keeps to its 12-minute budget
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


@pytest.mark.slow  # minutes of real runs: the integration tier keeps to its 12-minute budget
def test_ctrl_c_keeps_the_work_and_resume_finishes_it(undisturbed, tiny_artifacts, models_root, tmp_path):
    job, out = _job_file(tmp_path), tmp_path / "results"
    common = ["--out", out, "--models", models_root, "--no-progress"]
    proc = subprocess.Popen(_cli("run", job, *common), stderr=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.monotonic() + 400
    while not list(out.glob("*/*/raw/*.parquet")) and time.monotonic() < deadline and proc.poll() is None:
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
    from harness.run.artifact_server import start_server
    from harness.run.dataset import Rows
    from harness.run.execute import failure_row
    from harness.run.node_cache import publish
    from harness.run.worker import ModelWorker, WorkerSetup

    art = tiny_artifacts["torchscript-mtk"]
    dims = Dims.of(art.manifest["dims"])
    spec = _spec()
    server = start_server()
    rows = Rows.of(spec.datasets, [LIMIT])
    setup = WorkerSetup(
        ModelCell("tiny.en", "mtk", "fp32"), publish(server, art), dims, build_prompt(dims), spec.decoding, rows
    )
    shards = tuple(plan_shards(LIMIT, SHARD))
    rows = []
    started = time.monotonic()
    report = Scheduler(
        [Work(setup, shards, "mediatek")],
        SchedulerOptions(slots=2),
        ModelWorker,
        lambda cell, shard, r: rows.extend(r),
        failure_row,
        lambda: ([f"u{i}" for i in range(LIMIT)], [""] * LIMIT),
        progress=False,
    ).run()
    ray_local.kill(server)
    assert time.monotonic() - started < 60 and not report.workers
    assert len(rows) == LIMIT and {r["status"] for r in rows} == {"unavailable"}
    assert "no node advertises the 'mediatek' resource" in rows[0]["error"]
