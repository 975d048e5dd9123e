"""The content-addressed artifact store under `models/`.

An artifact's key hashes everything that could change its bytes: the source weights' tensor
sha256, target, quantization, the converter's recipe and the toolchain versions. A folder is
written under a temporary name and renamed into place, so the store never holds half an artifact;
every load re-checks the file checksums recorded in the manifest.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

from converters import parity
from converters.protocol import Artifact, Refused, Unavailable, runtime_unavailable
from converters.registry import REFERENCE, get_target
from harness.errors import HarnessError
from harness.weights import Checkpoint, load_model

MANIFEST = "manifest.json"
BUILD_LOG = "build.log"  # what the toolchains printed; kept beside the files, not one of them
SCHEMA = 1


def toolchain(module: ModuleType) -> dict[str, str]:
    """Versions of the packages that shape a target's files: the base ones plus its TOOLCHAIN."""
    versions = {}
    for pkg in ("torch", "openai-whisper", "numpy", *getattr(module, "TOOLCHAIN", ())):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = "absent"
    return versions


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def artifact_key(checkpoint: Checkpoint, target: str, quant: str) -> tuple[str, dict[str, Any]]:
    module = get_target(target).load()
    recipe = {
        "source_sha256": checkpoint.sha256,
        "target": target,
        "quant": quant,
        "settings": {"recipe": module.RECIPE},
        "toolchain": toolchain(module),
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16], recipe


def artifact_dir(root: Path, size: str, target: str, quant: str, key: str) -> Path:
    return root / Path(size).name / f"{target}-{quant}-{key}"


def verify(artifact: Artifact) -> None:
    """Refuse an artifact whose files are missing or differ from the manifest's checksums."""
    for name, facts in artifact.manifest["files"].items():
        path = artifact.file(name)
        if not path.is_file():
            raise HarnessError(f"{artifact.path}: {name} is missing; delete the folder to rebuild it")
        if file_sha256(path) != facts["sha256"]:
            raise HarnessError(
                f"{path}: sha256 differs from {MANIFEST}; the artifact is corrupt, delete the folder to rebuild it"
            )


def load_artifact(path: Path) -> Artifact:
    manifest = json.loads((path / MANIFEST).read_text())
    return Artifact(manifest["size"], manifest["target"], manifest["quant"], path, manifest)


def ensure(checkpoint: Checkpoint, size: str, target: str, quant: str, root: Path) -> tuple[Artifact, str]:
    """The artifact for (checkpoint, target, quant): reused if present and intact, else built.

    Returns the artifact and "reused" or "built". A built artifact that fails its parity gate is
    kept (with status "failed" and the numbers) so the failure is reported, not rebuilt each time.
    """
    key, recipe = artifact_key(checkpoint, target, quant)
    final = artifact_dir(root, size, target, quant, key)
    if (final / MANIFEST).is_file():
        artifact = load_artifact(final)
        verify(artifact)
        return artifact, "reused"
    refusal = refusal_path(final)
    if refusal.is_file():
        raise Refused(f"{json.loads(refusal.read_text())['reason']} (recorded in {refusal}; delete it to retry)")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    failed_log = failed_log_path(final)
    try:
        with _captured(tmp / BUILD_LOG):
            artifact = _build(checkpoint, size, target, quant, key, recipe, tmp)
        os.replace(tmp, final)  # atomic: a reader sees no folder or a complete one
    except BaseException as exc:
        if isinstance(exc, Refused):
            refusal.write_text(json.dumps({"key": key, "reason": str(exc), **recipe}, indent=2, sort_keys=True))
        # the one thing worth keeping from a build the toolchain ran and lost (a missing toolchain's
        # Unavailable says all in its message, and is no failure to investigate)
        toolchain_ran = isinstance(exc, Refused) or (isinstance(exc, Exception) and not isinstance(exc, Unavailable))
        if toolchain_ran and (tmp / BUILD_LOG).is_file():
            shutil.move(tmp / BUILD_LOG, failed_log)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    failed_log.unlink(missing_ok=True)
    return load_artifact(final), "built"


def failed_log_path(final: Path) -> Path:
    return final.with_name(final.name + ".failed.log")


def refusal_path(final: Path) -> Path:
    return final.with_name(final.name + ".refused.json")


@contextlib.contextmanager
def _captured(log: Path) -> Iterator[None]:
    """Send what converters print (file descriptors 1 and 2, so C++ toolchains too) to `log`.

    litert-torch, the ONNX exporter and torch.jit.trace print pages of progress and warnings per
    artifact; the user wants the progress bar and the table, and the log when a build goes wrong.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    try:
        with log.open("ab") as f:
            os.dup2(f.fileno(), 1)
            os.dup2(f.fileno(), 2)
            try:
                yield
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
    finally:
        os.close(saved[0])
        os.close(saved[1])


@dataclass(frozen=True)
class Prepared:
    """What became of one (size, target, quant): the artifact if any, and a status for tables."""

    artifact: Artifact | None
    status: str  # built | reused | failed | unavailable
    reason: str = ""  # why failed or unavailable

    @property
    def runnable(self) -> bool:
        return self.status in ("built", "reused")

    def describe(self) -> str:
        return f"{self.status}: {self.reason}" if self.reason else self.status


def prepare(checkpoint: Checkpoint, size: str, target: str, quant: str, root: Path) -> Prepared:
    """`ensure`, with every outcome a user must see turned into a status instead of an exception."""
    try:
        artifact, how = ensure(checkpoint, size, target, quant, root)
    except Unavailable as exc:
        return Prepared(None, "unavailable", str(exc))
    except HarnessError:
        raise  # a corrupt artifact in the store: the user must act, so the run stops with its line
    except Exception as exc:  # a toolchain crashed: report the cell and go on with the others
        key, _ = artifact_key(checkpoint, target, quant)
        log = failed_log_path(artifact_dir(root, size, target, quant, key))
        first_line = (str(exc).strip().splitlines() or [""])[0]
        where = f" (log: {log})" if log.is_file() else ""
        return Prepared(None, "failed", f"build error: {type(exc).__name__}: {first_line}{where}")
    if reason := runtime_unavailable(get_target(target).load()):
        # the files exist (a macOS node, or another machine, can run them): say so
        return Prepared(artifact, "unavailable", f"{reason} (artifact {how})")
    if artifact.manifest["status"] != "ok":
        return Prepared(artifact, "failed", "parity gate: " + "; ".join(artifact.manifest["parity_failures"]))
    return Prepared(artifact, how)


def _build(checkpoint: Checkpoint, size: str, target: str, quant: str, key: str, recipe: dict, out: Path) -> Artifact:
    module = get_target(target).load()
    started = time.time()
    model = load_model(checkpoint)
    facts = module.convert(checkpoint, model, quant, out)
    manifest: dict[str, Any] = {
        "schema": SCHEMA,
        "key": key,
        "size": size,
        "target": target,
        "quant": quant,
        "source": {
            "name": checkpoint.name,
            "path": str(checkpoint.path),
            "sha256": checkpoint.sha256,
            "origin": checkpoint.source,
        },
        **{k: recipe[k] for k in ("settings", "toolchain")},
        "dims": asdict(model.dims),
        "files": {
            p.name: {"sha256": file_sha256(p), "bytes": p.stat().st_size}
            for p in sorted(out.iterdir())
            if p.name != BUILD_LOG
        },
        **facts,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
    }
    artifact = Artifact(size, target, quant, out, manifest)
    if target != REFERENCE:
        if "parity" not in manifest:  # measured in the target's own runtime
            if reason := runtime_unavailable(module):
                raise Unavailable(f"cannot check parity: {reason}")
            from harness.decoding import Dims, build_prompt
            from harness.spec import DecodingSpec

            dims = Dims(model.dims.n_mels, model.dims.n_vocab, model.dims.n_text_ctx)
            reference = get_target(REFERENCE).load().Runner(artifact)
            runner = module.Runner(artifact)
            manifest["parity"] = parity.measure(reference, runner, dims, build_prompt(dims, DecodingSpec()))
        manifest["parity_failures"] = parity.gate(target, quant, manifest["parity"])
    manifest["status"] = "failed" if manifest.get("parity_failures") else "ok"
    manifest["build_s"] = round(time.time() - started, 2)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return artifact
