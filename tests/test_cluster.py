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


def test_run_joins_a_cluster_and_spreads_models_over_its_nodes(two_node_cluster, tiny_artifacts, models_root, tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "harness", "run", str(ROOT / "jobs" / "librispeech_tiny_en.yaml"), "--limit", "4",
         "--address", two_node_cluster.address, "--out", str(out), "--models", str(models_root), "--no-progress"],
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
            [sys.executable, "-m", "harness", "run", str(job), "--address", cluster.address, "--out", str(out),
             "--models", str(models_root), "--no-progress"],
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
