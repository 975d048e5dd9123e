"""Joining a multi-node Ray cluster by address (ray.cluster_utils.Cluster: real raylets)."""

from __future__ import annotations

import subprocess
import sys

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


@pytest.mark.slow
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
