"""Joining a multi-node Ray cluster by address (ray.cluster_utils.Cluster: real raylets)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pandas as pd
import pytest

from tests.conftest import ROOT


@pytest.fixture
def two_node_cluster():
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    yield cluster
    cluster.shutdown()


@pytest.mark.slow  # minutes of real runs: the integration tier keeps to its 12-minute budget
def test_run_joins_a_cluster_and_spreads_models_over_its_nodes(two_node_cluster, tiny_artifacts, models_root, tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "harness", "run", str(ROOT / "jobs" / "librispeech_tiny_en.yaml"), "--limit", "4",
         "--address", two_node_cluster.address, "--allow-unauthenticated-cluster", "--out", str(out), "--models",
         str(models_root), "--no-progress"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    (run_dir,) = (out / "librispeech_tiny_en").iterdir()
    utts = pd.read_parquet(run_dir / "utterances.parquet")
    assert utts["error"].isna().all() and len(utts) == 8
    # one CPU per node and one single-CPU worker per model: the two models ran on different nodes
    assert utts.groupby("target")["node"].nunique().eq(1).all()
    assert utts["node"].nunique() == 2


@pytest.mark.slow
def test_mediatek_work_goes_to_the_node_advertising_the_board(tiny_artifacts, models_root, tmp_path):
    """A MediaTek board joins as a Ray node with the `mediatek` resource; mtk workers land there."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    board = cluster.add_node(num_cpus=1, resources={"mediatek": 1})
    cluster.wait_for_nodes()
    try:
        job = tmp_path / "mtk.yaml"
        job.write_text(
            textwrap.dedent(f"""
                name: mtk_placement
                dataset: {{path: {ROOT / "data" / "librispeech-eval"}, limit: 3}}
                models: {{sizes: [tiny.en], targets: {{mtk: [fp32]}}}}
            """)
        )
        out = tmp_path / "results"
        proc = subprocess.run(
            [sys.executable, "-m", "harness", "run", str(job), "--address", cluster.address,
             "--allow-unauthenticated-cluster", "--out", str(out), "--models", str(models_root), "--no-progress"],
            capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
        (run_dir,) = (out / "mtk_placement").iterdir()
        utts = pd.read_parquet(run_dir / "utterances.parquet")
        nodes = utts.groupby("target")["node"].unique()
        assert [n.split("/")[1] for n in nodes["mtk"]] == [board.node_id[:8]]
        assert utts["error"].isna().all()
    finally:
        cluster.shutdown()


@pytest.mark.slow
def test_a_node_removed_mid_run_costs_only_retries(
    tiny_artifacts, models_root, reference_tokens, embedded_utterances, tmp_path
):
    """Two worker nodes (the head offers no CPU: it holds the driver's artifact server); once the
    first shard is in, one node is removed, raylet and workers with it. Its shards are retried on
    the other node: exactly one row per (model, utterance), the retries recorded, the tokens those
    of an undisturbed decode."""
    import json
    import time

    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    out, limit = tmp_path / "results", 8
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "harness", "run", str(ROOT / "jobs" / "librispeech_tiny_en.yaml"), "--limit",
             str(limit), "--address", cluster.address, "--allow-unauthenticated-cluster", "--out", str(out),
             "--models", str(models_root), "--no-progress"],
            stderr=subprocess.PIPE, text=True, cwd=ROOT,
        )  # fmt: skip
        deadline = time.monotonic() + 600
        while not list(out.glob("*/*/raw/*.parquet")) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        cluster.remove_node(nodes[1], allow_graceful=False)
        _, err = proc.communicate(timeout=900)
    finally:
        cluster.shutdown()
    assert proc.returncode == 0, err[-3000:]
    (run_dir,) = (out / "librispeech_tiny_en").iterdir()
    utts = pd.read_parquet(run_dir / "utterances.parquet")
    assert len(utts) == 2 * limit and not utts.duplicated(["target", "utt_id"]).any()
    assert (utts["status"] == "ok").all() and (utts["attempt"] >= 1).any()
    assert {n.split("/")[1] for n in utts.loc[utts["attempt"] >= 1, "node"]} == {nodes[0].node_id[:8]}
    info = json.loads((run_dir / "run.json").read_text())
    assert info["failures"] and all(f["node_id"] == nodes[1].node_id for f in info["failures"])
    expected = {u.utt_id: list(reference_tokens(u)) for u in embedded_utterances[:limit]}
    for target, group in utts.groupby("target"):
        got = {r.utt_id: list(r.hyp_tokens) for r in group.itertuples()}
        assert got == expected, target  # tiny.en fp32 torchscript-mtk decodes as the reference on these
