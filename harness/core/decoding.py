"""The one decoding rule set every model shares: prompt, suppression, limits, the greedy loop.

Step runners implement only numeric steps (`harness.core.target.Runner`), so a difference between
two models measures the conversion, never the decoding code. An engine that decodes only by
itself (`SelfDecodingRunner`) is handed the same `Prompt` and applies it; it never re-derives a
rule. Short form (one ≤30 s window) mirrors `whisper.decode(model, mel, DecodingOptions(
language=..., without_timestamps=True, fp16=False))` at temperature 0, and a test holds the
reference to that token for token. Long form (`harness.core.longform`) runs the same loop on
timestamped windows, with whisper's timestamp rules (`harness.core.timestamps`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, is_dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from harness.core.audio import N_SAMPLES, SAMPLE_RATE, log_mel
from harness.core.errors import HarnessError
from harness.core.target import Runner, SelfDecodingRunner
from harness.core.timestamps import TimestampRules, apply_timestamp_rules


@dataclass(frozen=True)
class DecodingOptions:
    """What a job may set about decoding (validated with the job file, `harness.spec`)."""

    language: str | None = "en"
    task: str = "transcribe"
    max_new_tokens: int | None = None  # None: openai-whisper's default, n_text_ctx // 2 (per window)
    # true: every item in 30 s windows as whisper.transcribe does (harness.core.longform); false:
    # one window, and longer audio is an error row (never trimmed); auto: long form past 30 s
    long_form: bool | str = "auto"

    def long_form_for(self, n_samples: int) -> bool:
        """Whether audio of `n_samples` is decoded in long form under this job's `long_form`."""
        return self.long_form is True or (self.long_form == "auto" and n_samples > N_SAMPLES)


@dataclass(frozen=True)
class Dims:
    """The checkpoint facts decoding needs (a subset of whisper.model.ModelDimensions)."""

    n_mels: int
    n_vocab: int
    n_text_ctx: int

    @classmethod
    def of(cls, dims: Any) -> Dims:
        """From whisper's ModelDimensions or a manifest's `dims` mapping."""
        d: Mapping[str, Any] = asdict(dims) if is_dataclass(dims) else dims
        return cls(d["n_mels"], d["n_vocab"], d["n_text_ctx"])

    @property
    def multilingual(self) -> bool:
        return self.n_vocab >= 51865

    @property
    def num_languages(self) -> int:
        return self.n_vocab - 51765 - int(self.multilingual)


@dataclass(frozen=True)
class Prompt:
    tokens: tuple[int, ...]  # SOT, language, task, no-timestamps (SOT, no-timestamps for .en)
    eot: int
    suppress: tuple[int, ...]  # never sampled
    suppress_at_begin: tuple[int, ...]  # not as the first sampled token (blank, EOT)
    max_new_tokens: int
    n_ctx: int
    timestamps: TimestampRules | None = None  # long-form windows: timestamps sampled under whisper's rules

    @property
    def step_limit(self) -> int:
        """Decoder steps at most: `max_new_tokens`, and never more than `n_ctx` tokens fed."""
        return min(self.max_new_tokens, self.n_ctx + 1 - len(self.tokens))


def tokenizer_for(dims: Dims, options: DecodingOptions):  # -> whisper.tokenizer.Tokenizer
    from whisper.tokenizer import get_tokenizer

    if not dims.multilingual:
        return get_tokenizer(False, num_languages=dims.num_languages)
    return get_tokenizer(True, num_languages=dims.num_languages, language=options.language or "en", task=options.task)


@lru_cache(maxsize=8)
def build_prompt(dims: Dims, options: DecodingOptions | None = None) -> Prompt:
    """The prompt and rules of `options` (the defaults: English transcription) for `dims`."""
    options = options or DecodingOptions()
    tok = tokenizer_for(dims, options)
    # whisper's suppress_tokens="-1": non-speech symbols plus the special tokens a transcript
    # never contains; no-speech is scored separately, never sampled
    suppress = set(tok.non_speech_tokens) | {tok.transcribe, tok.translate, tok.sot, tok.sot_prev, tok.sot_lm}
    if tok.no_speech is not None:
        suppress.add(tok.no_speech)
    return Prompt(
        tokens=tuple(tok.sot_sequence_including_notimestamps),
        eot=tok.eot,
        suppress=tuple(sorted(suppress)),
        suppress_at_begin=tuple([*tok.encode(" "), tok.eot]),
        max_new_tokens=options.max_new_tokens or dims.n_text_ctx // 2,
        n_ctx=dims.n_text_ctx,
    )


# What a row says of how it was decoded: both forms are greedy, and long form never re-decodes a
# window at a higher temperature (harness.core.longform says why)
SHORT_FORM = "short form: one 30 s window, temperature 0"
LONG_FORM = "long form: whisper.transcribe's 30 s windows, temperature 0 without fallback"


class TooLong(HarnessError):
    """Audio longer than one window in short-form decoding: refused, never trimmed."""


@dataclass(frozen=True)
class Decoded:
    tokens: tuple[int, ...]  # sampled tokens, prompt and EOT stripped (long form: every kept segment's)
    frontend_ms: float
    encode_ms: float
    decode_ms: float
    n_steps: int  # decoder calls, the EOT step included
    n_windows: int = 1  # 30 s windows encoded and decoded
    mode: str = SHORT_FORM

    def costs(self) -> dict[str, float | int | str]:
        """What a result row records of how the transcript was made (the raw row's columns)."""
        return {
            "frontend_ms": self.frontend_ms,
            "encode_ms": self.encode_ms,
            "decode_ms": self.decode_ms,
            "n_steps": self.n_steps,
            "n_windows": self.n_windows,
            "decoding": self.mode,
        }


@dataclass(frozen=True)
class Sampled:
    """The greedy loop's output on one window."""

    tokens: tuple[int, ...]  # sampled tokens, prompt and EOT stripped
    n_steps: int  # decoder calls, the EOT step included
    first_logits: np.ndarray  # the first step's raw logits: the position after the prompt's last token
    sum_logprob: float  # timestamped prompts: Σ log-probability of each sampled token, EOT included


def greedy_decode(runner: Runner, audio: np.ndarray, dims: Dims, prompt: Prompt) -> Decoded:
    """Transcribe one ≤30 s utterance: front end, `encode`, then the greedy loop (or the engine's own).

    Longer audio raises `TooLong`: Whisper sees 30 s at a time, and trimming would score a
    transcript of the first 30 s against the whole file's text."""
    if audio.size > N_SAMPLES:
        raise TooLong(
            f"audio is {audio.size / SAMPLE_RATE:.1f} s, longer than the 30 s window of short-form decoding "
            "(decoding.long_form: false); set decoding.long_form to auto or true to decode it in 30 s windows"
        )
    t0 = time.perf_counter()
    mel = log_mel(audio, dims.n_mels)
    t1 = time.perf_counter()
    features = runner.encode(mel)
    t2 = time.perf_counter()
    tokens, steps = decode_features(runner, features, prompt)
    return Decoded(tokens, (t1 - t0) * 1e3, (t2 - t1) * 1e3, (time.perf_counter() - t2) * 1e3, steps)


def decode_features(runner: Runner, features: Any, prompt: Prompt) -> tuple[tuple[int, ...], int]:
    """Greedy decoding of one window's audio features: the shared loop, or the engine's own
    `generate` under the same prompt. Returns the sampled tokens (prompt and EOT stripped) and the
    decoder steps taken."""
    if isinstance(runner, SelfDecodingRunner):
        tokens, steps = runner.generate(features, prompt)
        return tuple(tokens), steps
    out = sample(runner, features, prompt)
    return out.tokens, out.n_steps


def suppress(logits: np.ndarray, prompt: Prompt, first_step: bool) -> None:
    """Mask, in place, what the prompt never samples, and at the first sampled step also what it
    never samples first (blank, EOT)."""
    if first_step:
        logits[np.asarray(prompt.suppress_at_begin)] = -np.inf
    logits[np.asarray(prompt.suppress)] = -np.inf


def sample(runner: Runner, features: Any, prompt: Prompt) -> Sampled:
    """The greedy loop on one window's audio features, under `prompt`'s rules, in whisper's order:
    blank suppression at the first step, the suppressed tokens, then the timestamp rules."""
    import torch
    import torch.nn.functional as F

    tokens = list(prompt.tokens)
    cache = first_logits = None
    steps = 0
    # whisper.decoding.GreedyDecoder's float32 sum, read by long form's no-speech rule
    sum_logprob = np.float32(0.0)
    for _ in range(prompt.step_limit):
        raw, cache = runner.step(tokens, features, cache)
        steps += 1
        logits = np.array(raw, dtype=np.float32, copy=True)
        if first_logits is None:  # kept unmasked; a copy, since a runner may reuse its output buffer
            first_logits = logits.copy()
        suppress(logits, prompt, first_step=len(tokens) == len(prompt.tokens))
        if prompt.timestamps is not None:
            apply_timestamp_rules(logits, tokens[len(prompt.tokens) :], prompt.timestamps)
        token = int(logits.argmax())
        if prompt.timestamps is not None:
            logprob = F.log_softmax(torch.from_numpy(logits)[None], dim=-1)[0, token].item()
            sum_logprob = np.float32(sum_logprob + np.float32(logprob))
        tokens.append(token)
        if token == prompt.eot:
            break
    text_tokens = tokens[len(prompt.tokens) :]
    if prompt.eot in text_tokens:
        text_tokens = text_tokens[: text_tokens.index(prompt.eot)]
    assert first_logits is not None, "a prompt leaves no room to sample"
    return Sampled(tuple(text_tokens), steps, first_logits, float(sum_logprob))
