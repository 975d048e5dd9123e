"""The content-addressed artifact store under `models/`.

An artifact's key hashes everything that could change its bytes: the source weights' tensor
sha256, target, quantization, the target's recipe and its toolchain versions, and the audio
context it was built for when that is not the full 1500 (`decoding.audio_ctx`: every converted
form is built for one context, its graphs' shapes fixed to it; the reference slices at run time). A folder is
written under a temporary name and renamed into place, so the store never holds half an artifact;
every load re-checks that the folder holds exactly the files its manifest lists, with their checksums.

Several processes may share one store (two `convert` calls, Ray workers on one disk): one key is
built by one process at a time, under a lock beside its folder; the others wait, then reuse what
it built (or read its refusal). Every file the store writes appears whole, by rename.
"""

from __future__ import annotations

import contextlib
import fcntl
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
from typing import Any

from converters import parity
from converters.registry import get_target
from harness.core.checkpoint import Checkpoint
from harness.core.decoding import Dims, build_prompt
from harness.core.errors import HarnessError, one_line, quote, some
from harness.core.files import write_atomic
from harness.core.hashing import file_sha256
from harness.core.status import Status
from harness.core.target import REFERENCE, Artifact, CalibrationSource, Refused, Target, Unavailable
from harness.core.weights import load_model, with_audio_ctx
from harness.core.window import FULL_AUDIO_CTX

MANIFEST = "manifest.json"
BUILD_LOG = "build.log"  # what the toolchains printed; kept beside the files, not one of them
SCHEMA = 1
MANIFEST_KEYS = ("size", "target", "quant", "key", "files")  # what loading and `verify` read


def toolchain(target: Target) -> dict[str, str]:
    """Versions of the packages that shape a target's files: the base ones plus its own."""
    versions = {}
    for pkg in ("torch", "openai-whisper", "numpy", *target.toolchain):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = "absent"
    return versions


def built_audio_ctx(target: str, audio_ctx: int) -> int:
    """The audio context an artifact of `target` is built for: the reference (no files, any
    context at run time) always the full one; every converted form the one asked for."""
    return FULL_AUDIO_CTX if target == REFERENCE else audio_ctx


def artifact_key(
    checkpoint: Checkpoint, target: str, quant: str, audio_ctx: int = FULL_AUDIO_CTX
) -> tuple[str, dict[str, Any]]:
    t = get_target(target)
    settings: dict[str, Any] = {"recipe": t.recipe}
    if (ctx := built_audio_ctx(target, audio_ctx)) != FULL_AUDIO_CTX:  # the full context keeps the keys it had
        settings["audio_ctx"] = ctx
    recipe = {
        "source_sha256": checkpoint.sha256,
        "target": target,
        "quant": quant,
        "settings": settings,
        "toolchain": toolchain(t),
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16], recipe


def artifact_dir(root: Path, size: str, target: str, quant: str, key: str) -> Path:
    return root / Path(size).name / f"{target}-{quant}-{key}"


def verify(artifact: Artifact) -> None:
    """Refuse an artifact whose folder is not the one its manifest names, or whose files are not
    exactly the manifest's (none missing, none extra: a runner opens what is there) with its checksums."""
    m, folder = artifact.manifest, artifact.path
    named = f"{m['target']}-{m['quant']}-{m['key']}"
    if folder.name != named:
        raise _unusable(folder, f"{MANIFEST} names {quote(named)}, not this folder")
    listed = set(m["files"])
    # a file name is one name in this folder: the driver publishes every listed file to the nodes,
    # so `../x`, an absolute path or a symlink leading out would send them a file of its choosing
    for name in sorted(listed):
        if not _inside(folder, name):
            raise _unusable(folder, f"{MANIFEST} names {quote(name)}, outside this folder")
    if missing := sorted(name for name in listed if not artifact.file(name).is_file()):
        raise _unusable(folder, f"missing {_names(missing)} listed in {MANIFEST}")
    if extra := sorted({p.name for p in folder.iterdir()} - listed - {MANIFEST, BUILD_LOG}):
        raise _unusable(folder, f"{_names(extra)} not listed in {MANIFEST}")
    for name, facts in m["files"].items():
        if file_sha256(artifact.file(name)) != facts["sha256"]:
            raise _unusable(artifact.file(name), f"sha256 differs from {MANIFEST}; the artifact is corrupt")


def _inside(folder: Path, name: str) -> bool:
    """Whether `name` is a plain file name whose file, symlinks followed, stays within `folder`."""
    if name in ("", ".", "..") or "/" in name or "\0" in name:
        return False
    # realpath, not resolve: a symlink loop is not an error here (it is a missing file, said below)
    return Path(os.path.realpath(folder / name)).parent == Path(os.path.realpath(folder))


def load_artifact(path: Path) -> Artifact:
    """The artifact in folder `path`, as its manifest describes it."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise _unusable(path, f"cannot read {MANIFEST} ({one_line(exc)})") from None
    if not (isinstance(manifest, dict) and all(k in manifest for k in MANIFEST_KEYS)):
        raise _unusable(path, f"{MANIFEST} lacks one of {', '.join(MANIFEST_KEYS)}")
    return Artifact(manifest["size"], manifest["target"], manifest["quant"], path, manifest)


def _unusable(where: Path, problem: str) -> HarnessError:
    """What the user reads about a store folder that cannot be used, and what to do about it."""
    return HarnessError(f"{where}: {problem}; delete the folder to rebuild it")


def _names(names: list[str]) -> str:
    """File names as an error quotes them: a few, each repr'd (a name may hold a newline)."""
    return some([quote(n) for n in names], 5, ", ")


def ensure(
    checkpoint: Checkpoint,
    size: str,
    target: str,
    quant: str,
    root: Path,
    calibration: CalibrationSource | None = None,
    audio_ctx: int = FULL_AUDIO_CTX,
) -> tuple[Artifact, Status]:
    """The artifact for (checkpoint, target, quant) at `audio_ctx`: reused if present and intact, else built.

    Returns the artifact and BUILT or REUSED. A built artifact that fails its parity gate is kept
    (with status "failed" and the numbers) so the failure is reported, not rebuilt each time.
    `calibration` is handed to the converter when the quantization needs it. A process that finds
    another building the same key waits for it, then reuses its artifact (or reads its refusal).
    """
    get_target(target).check_quant(quant)  # an unknown quantization never builds something else
    key, recipe = artifact_key(checkpoint, target, quant, audio_ctx)
    final = artifact_dir(root, size, target, quant, key)
    # no lock to read: a folder appears whole (a rename), and a read-only store stays usable
    if (artifact := _stored(final)) is not None:
        return artifact, Status.REUSED
    final.parent.mkdir(parents=True, exist_ok=True)
    with _locked(final):
        if (artifact := _stored(final)) is not None:  # built (or refused) by the process this one waited for
            return artifact, Status.REUSED
        _sweep(final)
        return _build_into(final, checkpoint, size, get_target(target), quant, key, recipe, calibration), Status.BUILT


def _stored(final: Path) -> Artifact | None:
    """The verified artifact at `final`, or None when there is none yet; `Refused` when the
    toolchain's refusal of this key is on record."""
    if final.exists():
        artifact = load_artifact(final)
        verify(artifact)
        return artifact
    refusal = refusal_path(final)
    if refusal.is_file():
        raise Refused(f"{json.loads(refusal.read_text())['reason']} (recorded in {refusal}; delete it to retry)")
    return None


def _build_into(
    final: Path,
    checkpoint: Checkpoint,
    size: str,
    target: Target,
    quant: str,
    key: str,
    recipe: dict[str, Any],
    calibration: CalibrationSource | None,
) -> Artifact:
    """Build into a temporary folder beside `final` and rename it into place; the caller holds the lock."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    failed_log = failed_log_path(final)
    try:
        with _captured(tmp / BUILD_LOG):
            _build(checkpoint, size, target, quant, key, recipe, tmp, calibration)
        os.replace(tmp, final)  # atomic: a reader sees no folder or a complete one
    except BaseException as exc:
        if isinstance(exc, Refused):
            record = {"key": key, "reason": str(exc), **recipe}
            write_atomic(refusal_path(final), lambda tmp: tmp.write_text(json.dumps(record, indent=2, sort_keys=True)))
        # the one thing worth keeping from a build the toolchain ran and lost (a missing toolchain's
        # Unavailable says all in its message, and is no failure to investigate)
        toolchain_ran = isinstance(exc, Refused) or (isinstance(exc, Exception) and not isinstance(exc, Unavailable))
        if toolchain_ran and (tmp / BUILD_LOG).is_file():
            os.replace(tmp / BUILD_LOG, failed_log)  # a rename within one folder: whole, like write_atomic
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    failed_log.unlink(missing_ok=True)
    return load_artifact(final)


def failed_log_path(final: Path) -> Path:
    return final.with_name(final.name + ".failed.log")


def refusal_path(final: Path) -> Path:
    return final.with_name(final.name + ".refused.json")


def lock_path(final: Path) -> Path:
    return final.with_name(final.name + ".lock")


@contextlib.contextmanager
def _locked(final: Path) -> Iterator[None]:
    """Hold the build lock of `final`'s key, waiting for a process that holds it.

    An `flock` on `<name>.lock` beside the folder, because the kernel releases it when the process
    holding it ends, however it ends: a killed builder never wedges the store, and whoever holds
    the lock knows that no live process is building this key. The descriptor is not inherited
    across exec (PEP 446), so a toolchain's helper process does not hold the key after the builder
    dies. The file stays: unlinking it while another process waits would let a third lock a new
    file, and two builders run at once.
    """
    fd = os.open(lock_path(final), os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _sweep(final: Path) -> None:
    """Delete what killed builders of `final`'s key left: temporary folders and half-written files
    (`.<name>.*`). Called holding the key's lock, and only the lock's holder makes or removes them,
    so every one present belongs to a process that is gone. (An age threshold could not tell a dead
    build from a slow one: a large model's conversion runs for many minutes.)"""
    for stale in final.parent.glob(f".{final.name}.*"):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


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
    """What became of one (size, target, quant): the artifact if any, and its status for tables."""

    artifact: Artifact | None
    status: Status  # BUILT, REUSED, FAILED or UNAVAILABLE
    reason: str = ""  # why failed or unavailable

    def describe(self) -> str:
        return f"{self.status}: {self.reason}" if self.reason else str(self.status)


Cell = tuple[str, str, str]  # (size, target, quant)


def prepare(
    checkpoint: Checkpoint,
    cell: Cell,
    root: Path,
    calibration: CalibrationSource | None = None,
    audio_ctx: int = FULL_AUDIO_CTX,
) -> Prepared:
    """`ensure`, with every outcome a user must see turned into a status instead of an exception."""
    size, target, quant = cell
    try:
        artifact, how = ensure(checkpoint, size, target, quant, root, calibration, audio_ctx)
    except Unavailable as exc:
        return Prepared(None, Status.UNAVAILABLE, str(exc))
    except HarnessError:
        raise  # a corrupt artifact in the store: the user must act, so the run stops with its line
    except Exception as exc:  # a toolchain crashed: report the cell and go on with the others
        key, _ = artifact_key(checkpoint, target, quant, audio_ctx)
        log = failed_log_path(artifact_dir(root, size, target, quant, key))
        where = f" (log: {log})" if log.is_file() else ""
        return Prepared(None, Status.FAILED, f"build error: {one_line(exc)}{where}")
    if reason := get_target(target).unavailable():
        # the files exist (a macOS node, or another machine, can run them): say so
        return Prepared(artifact, Status.UNAVAILABLE, f"{reason} (artifact {how})")
    if artifact.manifest["status"] != Status.OK:
        return Prepared(artifact, Status.FAILED, "parity gate: " + "; ".join(artifact.manifest["parity_failures"]))
    return Prepared(artifact, how)


def _build(
    checkpoint: Checkpoint,
    size: str,
    target: Target,
    quant: str,
    key: str,
    recipe: dict,
    out: Path,
    calibration: CalibrationSource | None,
) -> None:
    """Convert into `out` and write the manifest, parity measured and gated."""
    started = time.time()
    audio_ctx = recipe["settings"].get("audio_ctx", FULL_AUDIO_CTX)
    model = with_audio_ctx(load_model(checkpoint), audio_ctx)  # converters build for model.dims.n_audio_ctx
    audio = []
    if quant in target.calibrated:
        if calibration is None:
            raise Unavailable(f"{target.name} {quant} needs calibration audio, and none was handed over")
        audio = calibration.load()
    facts = target.convert(checkpoint, model, quant, out, audio)
    manifest: dict[str, Any] = {
        "schema": SCHEMA,
        "key": key,
        "size": size,
        "target": target.name,
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
        **({"calibration_source": calibration.label} if audio else {}),
        **facts,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
    }
    artifact = Artifact(size, target.name, quant, out, manifest)
    if target.name != REFERENCE:
        if "parity" not in manifest:  # measured in the target's own runtime
            if reason := target.unavailable():
                raise Unavailable(f"cannot check parity: {reason}")
            dims = Dims.of(model.dims)  # at the artifact's audio context: the reference runs at it too
            reference = get_target(REFERENCE).runner(artifact)
            manifest["parity"] = parity.measure(reference, target.runner(artifact), dims, build_prompt(dims))
        manifest["parity_failures"] = parity.gate(target.tolerance(quant), manifest["parity"])
    manifest["status"] = str(Status.FAILED if manifest.get("parity_failures") else Status.OK)
    manifest["build_s"] = round(time.time() - started, 2)
    write_atomic(out / MANIFEST, lambda tmp: tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True)))
