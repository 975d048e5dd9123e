"""Artifacts reach the nodes: published by the driver, fetched into a node's own cache (real Ray, two nodes).

The driver's node (the head) has no CPUs, so every task and worker runs on the second node, whose
processes get their own `HARNESS_NODE_CACHE` and an audit hook (`sys.addaudithook`, installed by
a `sitecustomize` on their PYTHONPATH) that records every file they open under the watched folders.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import ray

from converters.registry import get_target
from converters.store import MANIFEST, load_artifact
from harness.core.decoding import DecodingOptions, Dims, build_prompt, greedy_decode
from harness.core.errors import HarnessError
from harness.core.hashing import file_sha256
from harness.core.target import Artifact
from harness.job.spec import load_job
from harness.run.artifact_server import start_server
from harness.run.execute import run_job
from harness.run.node_cache import CACHE_ENV, materialise, publish
from tests.conftest import ROOT

AUDIT_HOOK = """
import os, sys

_watched = tuple(p for p in os.environ.get("AUDIT_WATCH", "").split(os.pathsep) if p)
if _watched:
    _log = open(os.environ["AUDIT_LOG"], "a", buffering=1)

    def _opened(event, args):
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            path = os.path.abspath(os.fsdecode(args[0]))
            if path.startswith(_watched):
                _log.write(path + "\\n")

    sys.addaudithook(_opened)
"""


@dataclass(frozen=True)
class Node:
    """The second node: its cache folder and the log of watched files its processes opened."""

    cache: Path
    opened: Path

    def opened_since(self, start: int) -> list[str]:
        return self.opened.read_text()[start:].splitlines()

    def log_size(self) -> int:
        return len(self.opened.read_text())


@pytest.fixture(scope="module")
def node(tmp_path_factory, models_root, tiny_checkpoint, tiny_artifacts):
    from ray.cluster_utils import Cluster

    tmp = tmp_path_factory.mktemp("nodes")
    (tmp / "audit").mkdir()
    (tmp / "audit" / "sitecustomize.py").write_text(AUDIT_HOOK)
    node = Node(tmp / "node-cache", tmp / "opened.log")
    node.opened.touch()
    watch = [f"{models_root}{os.sep}", str(tiny_checkpoint.path), f"{node.cache}{os.sep}"]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    cluster.add_node(
        num_cpus=2,
        env_vars={
            CACHE_ENV: str(node.cache),
            # this checkout, and this module (its remote function is pickled by reference)
            "PYTHONPATH": os.pathsep.join([str(tmp / "audit"), str(ROOT), str(ROOT / "tests")]),
            "AUDIT_WATCH": os.pathsep.join(watch),
            "AUDIT_LOG": str(node.opened),
        },
    )
    cluster.wait_for_nodes()
    ray.shutdown()  # the other tests' embedded Ray, if a module before this one started it
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    yield node
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture
def server(node):
    server = start_server()
    yield server
    ray.kill(server)


@ray.remote(num_cpus=1)  # the head has no CPUs: this runs on the second node
def on_node(published, root: str | None = None, audio=None, barrier: str | None = None):
    """Materialise there (after every caller reached `barrier`, when given); decode `audio` with it."""
    if barrier is not None:
        Path(barrier, str(os.getpid())).touch()
        while len(os.listdir(barrier)) < 2:
            time.sleep(0.01)
    artifact = materialise(published, Path(root) if root else None)
    tokens = decode(artifact, audio) if audio is not None else None
    return str(artifact.path), artifact.manifest, tokens


def decode(artifact: Artifact, audio) -> tuple[int, ...]:
    dims = Dims.of(artifact.manifest["dims"])
    runner = get_target(artifact.target).runner(artifact)
    return tuple(greedy_decode(runner, audio, dims, build_prompt(dims, DecodingOptions())).tokens)


def served(published) -> int:
    return ray.get(published.server.served.remote()).get(published.key, 0)


def total_bytes(published) -> int:
    return sum(f["bytes"] for f in published.files.values())


def driver_copy(artifact: Artifact, store: Path) -> Artifact:
    """A copy of a store artifact (the reference: of its checkpoint) under `store`, to take away."""
    store.mkdir()
    if artifact.target == "reference":
        path = Path(shutil.copy(artifact.checkpoint().path, store))
        manifest = {**artifact.manifest, "source": {**artifact.manifest["source"], "path": str(path)}}
        return Artifact(artifact.size, artifact.target, artifact.quant, artifact.path, manifest)
    return load_artifact(Path(shutil.copytree(artifact.path, store / artifact.path.name)))


@pytest.mark.parametrize("target", ["reference", "torchscript-mtk"])
def test_a_node_fetches_the_published_artifact_into_its_cache_and_decodes_with_it(
    target, server, tiny_artifacts, embedded_utterances, reference_tokens, tmp_path
):
    original = tiny_artifacts[target]
    published = publish(server, driver_copy(original, tmp_path / "store"))
    # the driver's copy is gone before the node asks: what it gets came through the server alone
    (tmp_path / "store").rename(tmp_path / "gone")
    utt = embedded_utterances[0]
    path, manifest, tokens = ray.get(on_node.remote(published, str(tmp_path / "cache"), utt.audio))

    folder = tmp_path / "cache" / published.key
    assert Path(path) == folder
    assert {p.name for p in folder.iterdir()} == {*published.files, MANIFEST}
    assert all(file_sha256(folder / name) == facts["sha256"] for name, facts in published.files.items())
    if target == "reference":
        (name,) = published.files
        assert manifest["source"]["path"] == str(folder / name)
        assert published.files[name]["sha256"] == file_sha256(original.checkpoint().path)
    else:
        assert published.files == original.manifest["files"] and published.key == original.manifest["key"]
    assert tokens == (reference_tokens(utt) if target == "reference" else decode(original, utt.audio))
    assert served(published) == total_bytes(published)


@pytest.mark.parametrize("target", ["reference", "torchscript-mtk"])
def test_a_cached_artifact_is_reused_and_a_corrupted_one_fetched_again(target, server, tiny_artifacts, tmp_path):
    published = publish(server, tiny_artifacts[target])
    root = str(tmp_path / "cache")
    first, _, _ = ray.get(on_node.remote(published, root))
    assert served(published) == total_bytes(published)

    again, _, _ = ray.get(on_node.remote(published, root))
    assert again == first and served(published) == total_bytes(published)  # nothing sent twice

    # same size, different bytes: only the checksum tells; and a fetch killed midway left a folder
    name = max(published.files, key=lambda n: published.files[n]["bytes"])
    with open(Path(first) / name, "r+b") as f:
        f.seek(published.files[name]["bytes"] // 2)
        f.write(b"\xff" * 64)
    orphan = tmp_path / "cache" / f".{published.key}.tmp-killed"
    orphan.mkdir()
    repaired, _, _ = ray.get(on_node.remote(published, root))
    assert repaired == first and served(published) == 2 * total_bytes(published)
    assert file_sha256(Path(first) / name) == published.files[name]["sha256"]
    assert not orphan.exists()


def test_a_file_that_changed_on_the_driver_is_refused_in_one_line(server, tiny_artifacts, tmp_path):
    published = publish(server, driver_copy(tiny_artifacts["torchscript-mtk"], tmp_path / "store"))
    (copy,) = (tmp_path / "store").iterdir()
    with open(copy / "token_embedding.npy", "r+b") as f:  # in place: the server serves the changed bytes
        f.seek(200)
        f.write(b"\x00" * 8)
    with pytest.raises(ray.exceptions.RayTaskError) as failed:
        ray.get(on_node.remote(published, str(tmp_path / "cache")))
    assert isinstance(failed.value.cause, HarnessError)
    message = str(failed.value.cause)
    assert "token_embedding.npy" in message and "sha256 differs from its manifest" in message
    assert "\n" not in message
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [f".{published.key}.lock"]  # no folder, whole or half


def test_workers_of_one_node_fetch_once(server, tiny_artifacts, tmp_path):
    published = publish(server, tiny_artifacts["reference"])
    (tmp_path / "barrier").mkdir()
    calls = [on_node.remote(published, str(tmp_path / "cache"), barrier=str(tmp_path / "barrier")) for _ in range(2)]
    (first, _, _), (second, _, _) = ray.get(calls)
    assert first == second and served(published) == total_bytes(published)
    assert not [p for p in (tmp_path / "cache").iterdir() if ".tmp-" in p.name]


def test_a_run_never_opens_the_drivers_store_on_the_node(
    node, tiny_artifacts, tiny_checkpoint, models_root, embedded_utterances, reference_tokens, tmp_path
):
    start = node.log_size()
    spec = load_job(ROOT / "jobs" / "librispeech_tiny_en.yaml").with_overrides(limit=2)
    result = run_job(spec, tmp_path / "results", models_root, progress=False, log=lambda *a: None)

    utts = result.utterances
    assert len(utts) == 4 and (utts["status"] == "ok").all()
    assert utts["node"].nunique() == 1  # the second node: the head has no CPU
    expected = {u.utt_id: reference_tokens(u) for u in embedded_utterances[:2]}
    for row in utts.itertuples():  # torchscript-mtk fp32 matches the reference token for token on tiny.en
        assert tuple(row.hyp_tokens) == expected[row.utt_id]
    opened = node.opened_since(start)
    store = [p for p in opened if p.startswith(f"{models_root}{os.sep}") or p == str(tiny_checkpoint.path)]
    assert not store, f"a worker opened the driver's files: {store[:3]}"
    keys = {tiny_artifacts["torchscript-mtk"].manifest["key"], tiny_artifacts["reference"].manifest["key"]}
    cached = {p.name.split("-")[0] for p in node.cache.iterdir() if not p.name.startswith(".")}
    assert cached == keys
    # the hook saw the runners read their files (token_embedding.npy, the checkpoint) in the node's cache
    folders = {Path(p).relative_to(node.cache).parts[0] for p in opened if p.startswith(f"{node.cache}{os.sep}")}
    assert {f.split("-")[0] for f in folders if not f.startswith(".")} == keys


@pytest.mark.unit
def test_the_artifact_server_imports_nothing_heavy():
    """Ray imports the server's module in the actor's own process before any node can fetch:
    torch, whisper or pandas there would cost every run seconds of start-up."""
    import subprocess
    import sys

    probe = "import sys, harness.run.artifact_server; print(' '.join(sorted(sys.modules)))"
    loaded = set(
        subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    )
    heavy = {"torch", "whisper", "numpy", "pandas", "datasets", "ray"}
    assert not (loaded & heavy), loaded & heavy
