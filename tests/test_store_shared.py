"""A store that several processes share: real `convert` processes building tiny.en's torchscript-mtk
fp32 artifact at once, a builder killed mid-build, and folders that do not match their manifests."""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from converters.store import MANIFEST, load_artifact, lock_path, prepare, verify
from harness.core.errors import HarnessError, quote
from harness.core.hashing import file_sha256
from tests.conftest import ROOT

CELL = ("tiny.en", "torchscript-mtk", "fp32")


def convert(models: Path) -> subprocess.Popen:
    """`python -m harness convert` of CELL into `models`, as a user would start it."""
    size, target, quant = CELL
    command = ["-m", "harness", "convert", "--sizes", size, "--targets", target, "--quant", quant, "--models"]
    return subprocess.Popen(
        [sys.executable, *command, str(models)],
        cwd=ROOT,
        env={**os.environ, "HARNESS_WEIGHTS_OFFLINE": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def building(process: subprocess.Popen, models: Path, timeout: float = 120) -> Path:
    """The temporary folder `process` builds in, once it exists."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if tmp := [p for p in (models / CELL[0]).glob(".*") if p.is_dir()]:
            return tmp[0]
        assert process.poll() is None, f"the builder exited before building: {process.communicate()[0]}"
        time.sleep(0.05)
    process.kill()
    pytest.fail(f"no temporary build folder after {timeout} s")


def finished(process: subprocess.Popen) -> str:
    out, _ = process.communicate(timeout=300)
    assert process.returncode == 0, out
    return out


def test_two_converts_of_one_cell_build_once_and_both_succeed(tmp_path):
    """The second process starts while the first is building: it waits for the key's lock, then
    reuses the first one's artifact instead of building its own and failing to rename it into place."""
    first = convert(tmp_path)
    building(first, tmp_path)
    second = convert(tmp_path)
    first_out, second_out = finished(first), finished(second)
    assert "| built " in first_out and "| reused " in second_out, (first_out, second_out)
    store = tmp_path / CELL[0]
    (artifact,) = [p for p in store.iterdir() if p.is_dir()]
    assert sorted(p.name for p in store.iterdir()) == sorted([artifact.name, lock_path(artifact).name])
    verify(load_artifact(artifact))


def test_a_killed_builder_leaves_a_folder_the_next_build_sweeps(tmp_path, tiny_checkpoint):
    """SIGKILL runs no cleanup: the temporary folder stays, but the kernel drops the dead process's
    lock, so the next call knows the folder is stale, deletes it and builds."""
    killed = convert(tmp_path)
    stale = building(killed, tmp_path)
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=30)
    assert stale.is_dir()
    store = tmp_path / CELL[0]
    (artifact_lock,) = store.glob("*.lock")
    with artifact_lock.open() as f:  # a dead builder's lock is free: the store is not wedged
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    result = prepare(tiny_checkpoint, CELL, tmp_path)
    assert result.status == "built", result.describe()
    assert not stale.exists() and not list(store.glob(".*"))
    assert sorted(p.name for p in store.iterdir()) == sorted([result.artifact.path.name, artifact_lock.name])


@pytest.fixture
def stored_copy(tiny_artifacts, tmp_path) -> Path:
    """A copy of the stored torchscript-mtk artifact under its own name, to break."""
    art = tiny_artifacts["torchscript-mtk"]
    return Path(shutil.copytree(art.path, tmp_path / art.path.name))


def test_verify_refuses_a_folder_its_manifest_does_not_name(stored_copy):
    wrong_key = stored_copy.rename(stored_copy.with_name("torchscript-mtk-fp32-0123456789abcdef"))
    with pytest.raises(HarnessError, match=rf"^{wrong_key}: manifest\.json names 'torchscript-mtk-fp32-\w{{16}}', not"):
        verify(load_artifact(wrong_key))
    right = wrong_key.rename(stored_copy)
    manifest = json.loads((right / MANIFEST).read_text())
    (right / MANIFEST).write_text(json.dumps({**manifest, "quant": "fp16"}))
    with pytest.raises(HarnessError, match=r"names 'torchscript-mtk-fp16-\w{16}', not this folder"):
        verify(load_artifact(right))


def test_verify_refuses_a_file_the_manifest_does_not_list(stored_copy):
    verify(load_artifact(stored_copy))
    (stored_copy / "encoder.pt.orig").write_bytes(b"left by a hand edit")
    with pytest.raises(HarnessError, match=r"'encoder\.pt\.orig' not listed in manifest\.json; delete the folder"):
        verify(load_artifact(stored_copy))


def test_verify_refuses_a_missing_file(stored_copy):
    (stored_copy / "token_embedding.npy").unlink()
    with pytest.raises(HarnessError, match=r"missing 'token_embedding\.npy' listed in manifest\.json"):
        verify(load_artifact(stored_copy))


@pytest.mark.parametrize("how", ["dot-dot", "absolute", "symlink"])
def test_verify_refuses_a_manifest_naming_a_file_outside_its_folder(stored_copy, tmp_path, how):
    """A hand-edited manifest whose checksums match: only the names show that the driver would read
    (and publish to every node) a file outside the artifact."""
    secret = tmp_path / "secret"
    secret.write_bytes(b"not part of any artifact")
    facts = {"sha256": file_sha256(secret), "bytes": secret.stat().st_size}
    manifest = json.loads((stored_copy / MANIFEST).read_text())
    if how == "symlink":
        name = "token_embedding.npy"
        (stored_copy / name).unlink()
        (stored_copy / name).symlink_to(secret)
    else:
        name = "../secret" if how == "dot-dot" else str(secret)
    manifest["files"][name] = facts
    (stored_copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(
        HarnessError, match=rf"^{re.escape(str(stored_copy))}: manifest\.json names {re.escape(quote(name))}, outside"
    ) as e:
        verify(load_artifact(stored_copy))
    assert "\n" not in str(e.value)
