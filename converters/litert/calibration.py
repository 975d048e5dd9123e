"""Calibration sets for full-int8 LiteRT graphs: real inputs of each graph, recorded while the float
graphs transcribe audio the caller handed over (never evaluation audio; a converter reads no dataset).

The decoder's samples come from its own greedy decode (the shared loop) at `CALIBRATION_STEPS`
positions spread over each utterance, so the cache holds real keys.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from harness.core.audio import log_mel
from harness.core.decoding import Dims, build_prompt, greedy_decode
from harness.core.target import Artifact

if TYPE_CHECKING:
    from converters.litert.runtime import Runner

CALIBRATION_STEPS = 6  # decoder steps recorded per calibration utterance, spread over its decode
Calibration = Callable[[], Iterator[list[dict[str, np.ndarray]]]]


def _recording(runner: type[Runner]) -> type[Runner]:
    """`runner` whose decoder inputs at the positions in `record_at` are kept in `samples`."""

    class Recording(runner):  # type: ignore[misc, valid-type]
        record_at: frozenset[int] = frozenset()
        samples: list[dict[str, np.ndarray]]
        cross: dict[str, np.ndarray]  # one copy per sequence, shared by its samples

        def advance(self, state: Any, token: int, position: int) -> np.ndarray:
            if position in self.record_at:  # read before the step writes this position's row
                if not self.samples:
                    self.cross = {n: self.decoder.read(n) for n in ("cross_k", "cross_v")}
                cache = {n: self.decoder.read(n) for n in ("k_cache", "v_cache")}
                self.samples.append({**self.decoder_inputs(token, position), **cache, **self.cross})
            return super().advance(state, token, position)

    return Recording


def calibration_sets(
    runner: type[Runner], float_artifact: Artifact, model_dims: Any, audio: Sequence[np.ndarray]
) -> dict[str, Calibration]:
    """Per graph file, a generator of input batches (one batch per calibration utterance)."""
    from converters.litert.graphs import CROSS_KV, DECODER, ENCODER

    dims = Dims.of(model_dims)
    prompt = build_prompt(dims)
    recorder = _recording(runner)(float_artifact)
    # inputs, not transcripts, are wanted: of a long utterance, the part the encoder sees
    audio = [a[: dims.window_samples] for a in audio]

    def encoder() -> Iterator[list[dict]]:
        for a in audio:
            yield [{"mel": log_mel(a, dims.n_mels, dims.n_audio_ctx)}]

    def cross_kv() -> Iterator[list[dict]]:
        for a in audio:
            yield [{"audio_features": recorder.encode(log_mel(a, dims.n_mels, dims.n_audio_ctx))}]

    def decoder() -> Iterator[list[dict]]:
        for a in audio:
            # positions 0 .. the last one this utterance's decode feeds, then that decode recorded
            last = len(prompt.tokens) + greedy_decode(recorder, a, dims, prompt).n_steps - 2
            recorder.record_at = frozenset(np.linspace(0, last, CALIBRATION_STEPS).astype(int).tolist())
            recorder.samples = []
            greedy_decode(recorder, a, dims, prompt)
            recorder.record_at = frozenset()
            yield recorder.samples

    return {ENCODER: encoder, CROSS_KV: cross_kv, DECODER: decoder}
