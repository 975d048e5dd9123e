"""Artifacts reach the nodes: published once by the driver, fetched once into each node's cache.

Ray nodes share no filesystem with the driver (a Mac, a MediaTek board), so a worker never opens
a path in the driver's store. The driver starts an `ArtifactServer` actor on its own node
(`harness.run.artifact_server`) and `publish`es each artifact to it: a small picklable
`PublishedArtifact` (cache key, manifest, file checksums, the server's handle) travels to the
workers instead of a path. A worker `materialise`s it into its node's cache,
`~/.cache/harness/artifacts/<key>/` (or `$HARNESS_NODE_CACHE/<key>/`, read on the node), under a
lock so the workers of one node fetch it once, into a temporary folder renamed into place, every
file checked against its sha256; a later run reuses the folder after checking the checksums
again, and fetches it anew if one differs.

The reference has no files of its own: its checkpoint is published instead, pinned by the file's
sha256 taken at publish time (the tensor digest `load_model` re-checks needs the whole file loaded),
and the materialised manifest's `source.path` points at the node's copy.

Why a chunk-serving actor rather than `ray.put` of whole files: artifacts and checkpoints run to
gigabytes, and a put object stays in the driver node's object store (or spills) for the whole run
even when every node already has the files cached. The actor reads a chunk from disk only when a
node asks for it, so memory holds the chunks in flight and nothing more, and a cached artifact
costs no transfer at all. The files are opened when published, so what the nodes receive is what
was published even if the store is rebuilt or moved during the run. With Ray Client (`ray://`) the
driver is not a node: "its node" is the one its session lives on (the head), which must then see
the models folder at the driver's path.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import json
import os
import re
import shutil
import tempfile
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from converters.store import MANIFEST
from harness.core.errors import HarnessError
from harness.core.hashing import file_sha256
from harness.core.target import REFERENCE, Artifact

CACHE_ENV = "HARNESS_NODE_CACHE"
CHUNK_BYTES = 8 << 20  # one request's worth: large enough to amortise a Ray call, small enough to hold a few
IN_FLIGHT = 4  # chunk requests a node keeps open, so transfer overlaps writing and hashing
_KEY = re.compile(r"[0-9a-f]+(-[0-9a-f]+)?")  # a store key, plus the checkpoint's digest for the reference


def cache_root() -> Path:
    """This node's artifact cache: `$HARNESS_NODE_CACHE`, else `~/.cache/harness/artifacts`."""
    configured = os.getenv(CACHE_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "harness" / "artifacts"


@dataclass(frozen=True)
class PublishedArtifact:
    """What a worker gets instead of a path: enough to fetch the artifact and check every byte."""

    key: str  # the node-cache folder's name
    manifest: dict[str, Any]  # the store's manifest
    files: Mapping[str, Mapping[str, Any]]  # name -> {"sha256", "bytes"}: what a node fetches
    checkpoint: str | None  # the name in `files` that is the reference's checkpoint, else None
    server: Any  # the ArtifactServer actor serving `files`


def publish(server: Any, artifact: Artifact) -> PublishedArtifact:
    """Hand `artifact`'s files (the reference: its checkpoint) to `server`, on the driver."""
    import ray

    manifest = artifact.manifest
    if artifact.target == REFERENCE:  # no files of its own: the checkpoint is what runs
        path = artifact.checkpoint().path
        files = {path.name: {"sha256": file_sha256(path), "bytes": path.stat().st_size}}
        paths, checkpoint = {path.name: path}, path.name
        key = f"{manifest['key']}-{files[path.name]['sha256'][:16]}"  # the same weights may be pickled apart
    else:
        files, checkpoint, key = manifest["files"], None, manifest["key"]
        paths = {name: artifact.file(name) for name in files}
    ray.get(server.add.remote(key, {name: str(p) for name, p in paths.items()}))
    return PublishedArtifact(key, manifest, files, checkpoint, server)


def materialise(published: PublishedArtifact, root: Path | None = None) -> Artifact:
    """The published artifact in this node's cache (`root`, else `cache_root()`): reused when
    every checksum holds, else fetched from the driver. Raises HarnessError when it cannot be."""
    root = root or cache_root()
    _check_names(published)
    final = root / published.key
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / f".{published.key}.lock"):
        if final.is_dir():
            if _intact(final, published.files):
                return _artifact(published, final)
            shutil.rmtree(final)  # a file was changed or lost since: fetch it all again
        for orphan in root.glob(f".{published.key}.tmp-*"):  # left by a fetch that was killed
            shutil.rmtree(orphan, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{published.key}.tmp-", dir=root))
        try:
            for name, facts in published.files.items():
                _fetch(published, name, facts, tmp / name)
            # the folder reads like a store artifact, for anyone who opens it on the node
            (tmp / MANIFEST).write_text(json.dumps(_node_manifest(published, final), indent=2, sort_keys=True))
            os.replace(tmp, final)  # atomic: the cache holds no folder or a complete one
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return _artifact(published, final)


def _check_names(published: PublishedArtifact) -> None:
    """Names from the driver become paths on the node: a key and plain file names, nothing else."""
    bad = [n for n in published.files if Path(n).name != n or n in (".", "..", MANIFEST)]
    if not _KEY.fullmatch(published.key) or bad:
        raise HarnessError(f"artifact key {published.key!r} or file names {bad} are not plain names; not cached")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` (the kernel drops it if the holder dies)."""
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _intact(folder: Path, files: Mapping[str, Mapping[str, Any]]) -> bool:
    for name, facts in files.items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != facts["bytes"] or file_sha256(path) != facts["sha256"]:
            return False
    return True


def _fetch(published: PublishedArtifact, name: str, facts: Mapping[str, Any], dest: Path) -> None:
    """Stream one file from the server into `dest`, hashing as it is written."""
    import ray

    digest = hashlib.sha256()
    requests = (
        published.server.read.remote(published.key, name, offset, CHUNK_BYTES)
        for offset in range(0, facts["bytes"], CHUNK_BYTES)
    )
    pending = deque(itertools.islice(requests, IN_FLIGHT))
    with dest.open("wb") as out:
        while pending:
            chunk = ray.get(pending.popleft())
            pending.extend(itertools.islice(requests, 1))  # keep IN_FLIGHT asked for while this one is written
            digest.update(chunk)
            out.write(chunk)
    if digest.hexdigest() != facts["sha256"]:
        raise HarnessError(
            f"artifact {published.key}: {name} as served by the driver: sha256 differs from its manifest "
            f"({digest.hexdigest()[:16]}…, manifest {facts['sha256'][:16]}…); the driver's copy changed or is corrupt"
        )


def _node_manifest(published: PublishedArtifact, folder: Path) -> dict[str, Any]:
    """The manifest as this node sees it: the reference's checkpoint is the node's copy."""
    manifest = published.manifest
    if published.checkpoint is None:
        return manifest
    return {**manifest, "source": {**manifest["source"], "path": str(folder / published.checkpoint)}}


def _artifact(published: PublishedArtifact, folder: Path) -> Artifact:
    manifest = _node_manifest(published, folder)
    return Artifact(manifest["size"], manifest["target"], manifest["quant"], folder, manifest)
