"""Whisper's timestamp tokens: the rules that constrain them while sampling, and what a window's
timestamps say about its segments and where the next window starts.

Long-form decoding samples timestamps (`<|0.00|>` … `<|30.00|>`, 0.02 s apart) and seeks by them.
Both halves mirror openai-whisper exactly: `whisper.decoding.ApplyTimestampRules` (in torch, so
the one comparison that decides a forced timestamp rounds as whisper's does) and the segment
split of `whisper.transcribe`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from harness.core.window import HOP_LENGTH, N_FRAMES, SAMPLE_RATE

# One audio-context position per 2 mel frames: N_FRAMES / n_audio_ctx, 1500 in every Whisper (its
# encoder's positional embedding has to cover exactly the 3000 frames the front end makes)
INPUT_STRIDE = N_FRAMES // 1500
TIME_PRECISION = INPUT_STRIDE * HOP_LENGTH / SAMPLE_RATE  # seconds per timestamp token: 0.02
MAX_INITIAL_TIMESTAMP_S = 1.0  # whisper's default `max_initial_timestamp`


@dataclass(frozen=True)
class TimestampRules:
    """The tokens whisper's timestamp rules need (whisper.decoding.ApplyTimestampRules)."""

    begin: int  # <|0.00|>: this id and every one above it is a timestamp
    eot: int  # ids below it are text
    no_timestamps: int  # never sampled while timestamps are on
    max_initial: int = round(MAX_INITIAL_TIMESTAMP_S / TIME_PRECISION)  # the first timestamp at most <|1.00|>


def apply_timestamp_rules(logits: np.ndarray, sampled: Sequence[int], rules: TimestampRules) -> None:
    """Mask float32 `logits` [n_vocab] in place as ApplyTimestampRules does, given the tokens
    `sampled` so far in this window (the prompt excluded)."""
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(logits)  # shares memory: every mask lands in `logits`
    begin = rules.begin
    t[rules.no_timestamps] = -np.inf
    # timestamps come in pairs (a segment's start and end), except directly before EOT
    last_was_timestamp = len(sampled) >= 1 and sampled[-1] >= begin
    penultimate_was_timestamp = len(sampled) < 2 or sampled[-2] >= begin
    if last_was_timestamp:
        if penultimate_was_timestamp:  # a pair just closed: text or EOT next
            t[begin:] = -np.inf
        else:  # an end timestamp is due: no text
            t[: rules.eot] = -np.inf
    timestamps = [token for token in sampled if token >= begin]
    if timestamps:
        # never backwards, and a segment that just opened must end later (no zero-length loop)
        last = timestamps[-1] if last_was_timestamp and not penultimate_was_timestamp else timestamps[-1] + 1
        t[begin:last] = -np.inf
    if not sampled:  # a window starts with a timestamp, at most max_initial
        t[:begin] = -np.inf
        t[begin + rules.max_initial + 1 :] = -np.inf
    # when all timestamps together are likelier than any single text token, sample a timestamp
    logprobs = F.log_softmax(t[None].float(), dim=-1)[0]
    if logprobs[begin:].logsumexp(dim=-1) > logprobs[:begin].max():
        t[:begin] = -np.inf


@dataclass(frozen=True)
class WindowSplit:
    """What `whisper.transcribe` makes of one window's sampled tokens."""

    segments: tuple[tuple[int, ...], ...]  # each segment's tokens, timestamps included
    starts_ends: tuple[tuple[float, float], ...]  # each segment's start and end, seconds from the file's start
    advance: int  # mel frames to the next window


def split_window(tokens: Sequence[int], seek: int, size: int, rules: TimestampRules) -> WindowSplit:
    """Segments and the next seek of a window of `size` frames at `seek`, as whisper.transcribe
    splits them: at each pair of consecutive timestamps; the next window starts at the last
    closed segment's end, or after this window when the output ends on a lone timestamp or has
    no closed segment (an unfinished segment is decoded again in the next window)."""
    begin = rules.begin
    offset = seek * HOP_LENGTH / SAMPLE_RATE
    is_timestamp = [token >= begin for token in tokens]
    single_timestamp_ending = is_timestamp[-2:] == [False, True]
    consecutive = [i + 1 for i in range(len(tokens) - 1) if is_timestamp[i] and is_timestamp[i + 1]]
    if not consecutive:
        # one segment for the whole window: it ends at its last timestamp if it has one past <|0.00|>
        ends = [token - begin for token in tokens if token >= begin]
        duration = ends[-1] * TIME_PRECISION if ends and ends[-1] != 0 else size * HOP_LENGTH / SAMPLE_RATE
        return WindowSplit((tuple(tokens),), ((offset, offset + duration),), size)
    cuts = [*consecutive, len(tokens)] if single_timestamp_ending else consecutive
    bounds = list(zip([0, *cuts[:-1]], cuts, strict=True))
    segments = tuple(tuple(tokens[a:b]) for a, b in bounds)
    times = tuple(
        (offset + (s[0] - begin) * TIME_PRECISION, offset + (s[-1] - begin) * TIME_PRECISION) for s in segments
    )
    advance = size if single_timestamp_ending else (tokens[cuts[-1] - 1] - begin) * INPUT_STRIDE
    return WindowSplit(segments, times, advance)
