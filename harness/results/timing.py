"""The timing protocol, in one place.

- Each worker loads its model once, runs one untimed warm-up decode (first-call allocations and
  TorchScript profiling passes would otherwise land on the first utterance), and runs with
  `DEFAULT_THREADS` threads (harness.core.target), so workers sharing a machine do not fight
  over cores.
- Per utterance `harness.core.longform.transcribe` times the front end (log-mel), `encode`
  and the decoder loop separately, summed over its 30 s windows in long form; total = their sum.
- Aggregates: percentiles of per-utterance totals; RTFx = Σ audio seconds / Σ processing seconds
  over the utterances that decoded, whose audio was decoded whole (short form refuses audio over
  30 s instead of trimming it); decoder ms/token = Σ decode ms / Σ decoder steps (the EOT step
  counts: it costs a step).
"""

from __future__ import annotations

import contextlib
import platform
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from harness.core.decoding import Dims, Prompt, greedy_decode
from harness.core.target import Runner
from harness.core.window import SAMPLE_RATE

WARM_UP_SECONDS = 5.0
# CPU features that decide which kernels run: timings, and the results of int8 forms that quantize
# activations at run time (torch, onnxruntime, XNNPACK pick their int8 kernels by these)
KERNEL_FEATURES = (
    "avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_int8", "amx_bf16",
    "asimddp", "i8mm", "sve",
)  # fmt: skip


def cpu_description() -> str:
    """The CPU a worker runs on, e.g. `Intel(R) Xeon(R) Processor [avx2 avx512f avx_vnni]`."""
    name, features = platform.processor() or platform.machine(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():  # Linux; elsewhere the platform's processor name alone
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = (part.strip() for part in line.partition(":"))
            if key == "model name":
                name = value
            elif key in ("flags", "Features"):
                features.update(value.split())
    return f"{name} [{' '.join(f for f in KERNEL_FEATURES if f in features)}]"


class Phases:
    """Seconds the driver spends in each phase of a run (run.json `phases`): where the time goes
    that no worker's busy time shows (joining Ray, building and publishing artifacts, scoring)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._t0 = time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - started, 2)

    def report(self) -> dict[str, float]:
        return {**self.seconds, "total": round(time.perf_counter() - self._t0, 2)}


def prepare_worker_threads(threads: int) -> None:
    """torch's thread count is per process: the worker's process is its model's."""
    import torch

    torch.set_num_threads(threads)


def warm_up(runner: Runner, dims: Dims, prompt: Prompt) -> None:
    """One untimed decode of low-level noise (silence would end at once, after a single step), at
    most as long as the window the encoder sees (a trimmed audio context's may be shorter)."""
    rng = np.random.default_rng(0)
    n = min(int(WARM_UP_SECONDS * SAMPLE_RATE), dims.window_samples)
    audio = (rng.standard_normal(n) * 0.01).astype(np.float32)
    greedy_decode(runner, audio, dims, prompt)


def rtfx(audio_s: float, processing_ms: float) -> float:
    return audio_s / (processing_ms / 1e3) if processing_ms > 0 else float("nan")
