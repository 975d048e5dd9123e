"""The contracts every target keeps: `Target` (its declaration), `Implementation`, `Runner`, `Artifact`.

A `Target` is a declaration — name, quantizations with their parity tolerances (and why), runtime
label, the Ray resource its hardware advertises, the modules its runner needs, its recipe and
toolchain (both part of the store key) — made in `converters.registry` without importing any
runtime. Its code lives in one module per target (`converters.<name>_target`), whose
`IMPLEMENTATION` (an `Implementation`: `convert`, its `Runner`, any further availability check) is
imported the first time the target converts or runs. Both check themselves when made, naming what
is missing.

- `convert(checkpoint, model, quant, out, calibration) -> dict`: writes artifact files into `out`
  and returns manifest facts (I/O names and shapes; `parity` only when the target checks itself,
  e.g. in PyTorch where its runtime cannot run here). `calibration` is real audio handed over by
  the caller for the quantizations in `Target.calibrated` (empty otherwise): a converter never
  reads a dataset. Raises `Unavailable` when its toolchain is missing, `Refused` when the
  toolchain writes files its runtime will not run.
- `Runner(artifact, threads)`: executes an artifact, `encode` then repeated `step`. It knows
  nothing of decoding: `harness.core.decoding` owns the prompt, suppression and the greedy loop.
  An engine that decodes only by itself is a `SelfDecodingRunner`: it gets the `Prompt` and
  applies its rules (its `step` serves the parity check only).
- Batching (short form only; long form stays one utterance at a time): a runner whose class sets
  `batching = True` also decodes several utterances per call, under the same rules and to the same
  tokens (`harness.core.decoding.short_form_decode_batch`). It takes `Runner(artifact, threads,
  device="cpu")`: `device="cuda"` (or "cuda:N") runs it on a GPU and its `runtime` label says so
  (e.g. `pytorch-cuda`); a device that is not there raises `Unavailable` with the reason. A step
  runner implements
  - `encode_batch(mel)`: mel float32 [B, n_mels, frames] → the B rows' audio features, in
    whatever form `step_batch` takes. On a CPU the runners here encode the rows one at a time: a
    batch's activations outgrow the caches, and one call on 8 rows cost 8-17 % more CPU time than
    8 calls (tiny.en and base; torch, CTranslate2, onnxruntime; one thread). A GPU takes the batch
    in one call;
  - `step_batch(tokens, audio_features, cache, rows=None)`: one sequence per row still decoding,
    all of one length (every token so far, as `step` takes them) → next-token logits
    [len(tokens), n_vocab] and the new cache. A None cache starts the batch: a sequence for every
    row of `audio_features`, in order (`rows` None). Later, `rows[i]` is the row of
    `audio_features` that `tokens[i]` belongs to, ascending, a subset of the previous call's rows
    (None: the same rows): a row left out has ended (EOT or its step limit) and never comes back.
    The runner drops it from its cache (less work at every later step), or goes on computing it
    and discards its logits, as `whisper.decode` does (the reference, to stay bit-identical to
    it). A row's logits never depend on the other rows' values (the kernels may round differently
    with the number of rows a call holds).
  A batching `SelfDecodingRunner` implements `encode_batch`, `generate_batch(audio_features,
  prompts)` (one `Prompt` per row, each applied as `generate` applies it) and
  `detect_language_batch(audio_features)`. The single-item methods stay: parity checks and long
  form use them. An instance whose artifact would give other tokens in a batch than alone sets
  `batching` False for itself (onnx int8: its activations' quantization scale spans the batch).
"""

from __future__ import annotations

import importlib
import importlib.util
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from harness.core.checkpoint import Checkpoint
from harness.core.errors import HarnessError, did_you_mean, one_line

if TYPE_CHECKING:  # annotations only: declaring a target loads no numerics
    import numpy as np
    from whisper.model import Whisper

    from harness.core.decoding import Prompt

REFERENCE = "reference"  # the target every other is compared with
# Threads per runner: the harness parallelises across workers (one per core), not inside a model,
# so workers sharing a machine do not fight over cores. Runtimes with per-session thread settings
# take it from the Runner's `threads`; torch's is per process, set by the worker (harness.results.timing).
DEFAULT_THREADS = 1


class Unavailable(Exception):
    """This target cannot be built or run here; the message says why (e.g. a missing SDK)."""


class Refused(Unavailable):
    """The toolchain ran but wrote files its own runtime refuses: a property of the toolchain
    versions (part of the store key), so the store records it and does not try again."""


@dataclass(frozen=True)
class Artifact:
    """A built (or, for the reference, referenced) model in the store, with its manifest."""

    size: str
    target: str
    quant: str
    path: Path  # the artifact's folder
    manifest: dict[str, Any]

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def mb(self) -> float:
        """Size on disk in MiB: its files, or for the reference (no files of its own) its checkpoint."""
        sizes = [f["bytes"] for f in self.manifest["files"].values()] or [self.checkpoint().path.stat().st_size]
        return sum(sizes) / 2**20

    def checkpoint(self) -> Checkpoint:
        src = self.manifest["source"]
        return Checkpoint(name=src["name"], path=Path(src["path"]), sha256=src["sha256"], source=src["origin"])


class Runner(ABC):
    """Executes one artifact, made as `Runner(artifact, threads=DEFAULT_THREADS)` (a batching
    runner: also `device=`, see the module docstring).

    `step`: one sequence at a time, a `None` cache starts a new one; `step_batch`: several."""

    # what executes the artifact, where the runner chooses when it loads (a board's NPU, or the
    # CPU, or a GPU); None: the artifact's own label (its manifest's `runtime`, else the target's)
    runtime: str | None = None
    # whether it decodes several utterances per call (encode_batch, then step_batch, or for an
    # engine that decodes by itself generate_batch and detect_language_batch); checked when the
    # class is made: a class that sets it and lacks one of them is a TypeError. An instance may
    # turn it off for itself (see the module docstring), never on
    batching: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.batching:
            return
        decodes_itself = issubclass(cls, SelfDecodingRunner)
        needed = ("encode_batch", *(("generate_batch", "detect_language_batch") if decodes_itself else ("step_batch",)))
        base = SelfDecodingRunner if decodes_itself else Runner
        if absent := [name for name in needed if getattr(cls, name) is getattr(base, name)]:
            raise TypeError(f"{cls.__name__} sets batching but does not implement {', '.join(absent)}")

    @abstractmethod
    def encode(self, mel: np.ndarray) -> Any:
        """mel float32 [1, n_mels, 2 x audio_ctx] (3000 frames at the full context) → audio
        features, in whatever form `step` takes."""

    @abstractmethod
    def step(self, tokens: Sequence[int], audio_features: Any, cache: Any) -> tuple[np.ndarray, Any]:
        """All tokens so far (cache is None on the first call) → next-token logits [n_vocab], new cache."""

    def encode_batch(self, mel: np.ndarray) -> Any:
        """A batching runner's: mel float32 [B, n_mels, frames] → the B rows' audio features."""
        raise NotImplementedError(f"{type(self).__name__} does not batch")

    def step_batch(
        self, tokens: Sequence[Sequence[int]], audio_features: Any, cache: Any, rows: Sequence[int] | None = None
    ) -> tuple[np.ndarray, Any]:
        """A batching runner's: the next-token logits [len(tokens), n_vocab] of every row still
        decoding, and the new cache (the rules: the module docstring)."""
        raise NotImplementedError(f"{type(self).__name__} does not batch")


class SelfDecodingRunner(Runner):
    """An engine that decodes only by itself (e.g. CTranslate2): `generate` under the `Prompt`'s
    rules, `detect_language` by its own means; its `step` (teacher-forced logits) serves the
    parity check only."""

    @abstractmethod
    def detect_language(self, audio_features: Any) -> tuple[str, float]:
        """The most likely spoken language (whisper's code) and its probability, as whisper's
        `detect_language` defines them, by the engine's own detection: such an engine's `step`
        need not score language tokens (CTranslate2 masks them)."""

    @abstractmethod
    def generate(self, audio_features: Any, prompt: Prompt) -> tuple[list[int], int]:
        """Greedy decoding under `prompt`: prompt tokens, `suppress` always, `suppress_at_begin` at
        the first sampled step, at most `prompt.step_limit` steps; returns the sampled text tokens
        (prompt and EOT stripped) and the decoder steps taken, counted as the shared loop counts."""

    def detect_language_batch(self, audio_features: Any) -> list[tuple[str, float]]:
        """A batching engine's: `detect_language` of every row of `audio_features`."""
        raise NotImplementedError(f"{type(self).__name__} does not batch")

    def generate_batch(self, audio_features: Any, prompts: Sequence[Prompt]) -> list[tuple[list[int], int]]:
        """A batching engine's: `generate` of every row of `audio_features` under its own prompt."""
        raise NotImplementedError(f"{type(self).__name__} does not batch")


@dataclass(frozen=True)
class Tolerance:
    """How far an artifact may sit from PyTorch on the parity input, and why (what was measured)."""

    min_encoder_snr_db: float
    max_logit_abs_err: float
    min_top1_agreement: float
    why: str


@dataclass(frozen=True)
class CalibrationSource:
    """Audio a caller hands to a converter whose quantization needs calibration (never evaluation
    audio): loaded only when such a quantization is built."""

    label: str  # where it comes from, recorded in the manifest
    load: Callable[[], list[np.ndarray]]  # 16 kHz mono float32 utterances


Converter = Callable[["Checkpoint", "Whisper", str, Path, "Sequence[np.ndarray]"], dict[str, Any]]


def encoder_io(dims: Any, mel: str = "mel", features: str = "audio_features") -> dict[str, Any]:
    """The manifest's description of an encoder: mel [1, n_mels, 2 x n_audio_ctx] → [1, n_audio_ctx, d]."""
    from harness.core.window import mel_frames

    return {
        "inputs": {mel: [1, dims.n_mels, mel_frames(dims.n_audio_ctx)]},
        "outputs": {features: [1, dims.n_audio_ctx, dims.n_audio_state]},
    }


CPU, CUDA = "cpu", "cuda"


def device_kind(device: str) -> str:
    """`CPU` or `CUDA` for a batching runner's `device` ("cpu", "cuda" or "cuda:N"); anything
    else is `Unavailable`."""
    kind, _, index = device.partition(":")
    if device == CPU or (kind == CUDA and (not index or index.isdigit())):
        return kind
    raise Unavailable(f"device {device!r}: expected {CPU!r}, {CUDA!r} or 'cuda:N'")


def torch_device(device: str) -> str:
    """`device` for a torch runner, or `Unavailable` where torch has no such device."""
    import torch

    if device_kind(device) == CPU:
        return device
    if not torch.cuda.is_available():
        why = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}: no GPU or driver"
        raise Unavailable(f"device {device!r}: torch {torch.__version__} sees no CUDA device ({why})")
    index = int(device.partition(":")[2] or 0)
    if index >= (count := torch.cuda.device_count()):
        raise Unavailable(f"device {device!r}: torch sees {count} CUDA device(s)")
    return device


def always_available() -> str | None:
    """The availability check of a target whose runtime is always installed (torch)."""
    return None


def missing(*modules: str) -> str | None:
    """Why a toolchain or runtime cannot be used here: the modules of `modules` not installed."""
    absent = [m for m in modules if importlib.util.find_spec(m) is None]
    return f"not installed: {', '.join(absent)} (pip install {' '.join(absent)})" if absent else None


def require(*modules: str) -> None:
    """Raise `Unavailable` unless every one of `modules` is installed."""
    if reason := missing(*modules):
        raise Unavailable(reason)


def needs(*modules: str) -> Callable[[], str | None]:
    """A `Target.unavailable` check: the runtime is `modules`."""
    return lambda: missing(*modules)


@dataclass(frozen=True)
class Implementation:
    """What a target's module provides, as its `IMPLEMENTATION`: the converter, the runner and, where
    the runtime needs more than installed modules (an OS, native libraries), the check of that."""

    convert: Converter
    runner: type[Runner]
    unavailable: Callable[[], str | None] = always_available  # why its runner cannot run here, or None

    def __post_init__(self) -> None:
        problems = [
            f"{name} is not callable" for name in ("convert", "unavailable") if not callable(getattr(self, name))
        ]
        if not (isinstance(self.runner, type) and issubclass(self.runner, Runner)):
            problems.append(f"runner {self.runner!r} is not a subclass of harness.core.target.Runner")
        if problems:
            raise TypeError("; ".join(problems))


@dataclass(frozen=True)
class Target:
    """One target's declaration: facts only, so that naming, validating and keying a target imports
    no runtime. Its code is `implementation` ("module:attribute", an `Implementation`), imported the
    first time it converts or runs. Made once, in `converters.registry`, and checked here."""

    name: str
    description: str
    recipe: str  # names the conversion recipe; bump it when the produced files change (store key)
    toolchain: tuple[str, ...]  # packages whose versions shape the files (store key)
    tolerances: Mapping[str, Tolerance]  # every quantization offered, with its parity tolerance
    runtime: str  # what executes it, for tables (a manifest's own `runtime` overrides it)
    implementation: str  # "module:attribute" of its `Implementation`
    requires: tuple[str, ...] = ()  # modules its runner needs, checked without importing them
    # a Ray resource that nodes with this target's hardware advertise (e.g. MediaTek boards):
    # when the cluster has one, the target's workers are placed there; otherwise it runs in emulation
    resource: str | None = None
    calibrated: frozenset[str] = field(default_factory=frozenset)  # quantizations given calibration audio

    def __post_init__(self) -> None:
        problems = [
            f"{name} is empty" for name in ("name", "description", "recipe", "runtime") if not getattr(self, name)
        ]
        if not self.tolerances:
            problems.append("tolerances is empty: no quantization offered")
        problems += [
            f"tolerances[{q!r}] is not a Tolerance with its reason"
            for q, t in self.tolerances.items()
            if not isinstance(t, Tolerance) or not t.why.strip()
        ]
        if unknown := sorted(set(self.calibrated) - set(self.tolerances)):
            problems.append(f"calibrated names quantizations it does not offer: {unknown}")
        module, _, attribute = self.implementation.partition(":")
        if not (module and attribute):
            problems.append(f"implementation {self.implementation!r} is not 'module:attribute'")
        if problems:
            raise TypeError(f"target {self.name or '?'}: " + "; ".join(problems))

    def load(self) -> Implementation:
        """The target's code, imported now (Python keeps the module: later calls cost a lookup).
        A module that fails to import makes this target unavailable, never the others."""
        module_name, _, attribute = self.implementation.partition(":")
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:  # any import-time failure of one target's SDK: that target only
            raise Unavailable(f"{module_name} failed to import: {one_line(exc)}") from exc
        found = getattr(module, attribute, None)
        if not isinstance(found, Implementation):
            raise TypeError(f"target {self.name}: {self.implementation} is not an Implementation ({found!r})")
        return found

    def unavailable(self) -> str | None:
        """Why this target's runner cannot run on this machine, or None."""
        if reason := missing(*self.requires):
            return reason
        try:
            return self.load().unavailable()
        except Unavailable as exc:
            return str(exc)

    @property
    def convert(self) -> Converter:
        return self.load().convert

    @property
    def runner(self) -> type[Runner]:
        return self.load().runner

    @property
    def quants(self) -> tuple[str, ...]:
        return tuple(self.tolerances)

    @property
    def decodes_itself(self) -> bool:
        """Whether it decodes by itself (`SelfDecodingRunner.generate`) rather than step by step."""
        return issubclass(self.runner, SelfDecodingRunner)

    def check_quant(self, quant: str) -> None:
        """Refuse a quantization this target does not offer, with the closest one it does."""
        if quant not in self.tolerances:
            raise HarnessError(
                f"target '{self.name}' offers no quantization '{quant}'{did_you_mean(quant, self.quants)}; "
                f"offered: {', '.join(self.quants)}"
            )

    def tolerance(self, quant: str) -> Tolerance:
        self.check_quant(quant)
        return self.tolerances[quant]
