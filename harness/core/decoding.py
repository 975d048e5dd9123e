"""The one decoding rule set every model shares: prompt, suppression, limits, the greedy loop.

Step runners implement only numeric steps (`harness.core.target.Runner`), so a difference between
two models measures the conversion, never the decoding code. An engine that decodes only by
itself (`SelfDecodingRunner`) is handed the same `Prompt` and applies it; it never re-derives a
rule. Short form (one ≤30 s window) mirrors `whisper.decode(model, mel, DecodingOptions(
language=..., without_timestamps=True, fp16=False))` at temperature 0, and a test holds the
reference to that token for token. Long form (`harness.core.longform`) runs the same loop on
timestamped windows, with whisper's timestamp rules (`harness.core.timestamps`).

Batching: `short_form_decode_batch` decodes several short utterances per decoder call (and encoder
call, on a GPU) on a runner that batches (`Runner.batching`), under the same rules and the same
per-row loop (`pick`), so with the same tokens, steps and languages as `short_form_decode` one at a
time. Kernels that round differently at another batch shape could still flip a near-tie: none did
on the 70 embedded utterances at batch 8 and 3 on any batching runner (tests/test_batching.py);
an artifact whose rows would change in a batch (onnx int8) does not batch. Long form stays one
utterance at a time.

Language: multilingual models detect the spoken language of every utterance as whisper's
`detect_language` does (`detect_language`, one decoder step on any runner), and decode in it when
the job says `language: auto`; otherwise in the job's (or the dataset's) language, the detection
kept for the record. Audio context: `Dims.n_audio_ctx` below the full 1500 trims the window the
encoder sees (`harness.core.audio.log_mel`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, is_dataclass, replace
from functools import lru_cache
from typing import Any

import numpy as np

from harness.core.audio import log_mel
from harness.core.errors import HarnessError
from harness.core.languages import TO_LANGUAGE_CODE
from harness.core.target import Runner, SelfDecodingRunner
from harness.core.timestamps import TimestampRules, apply_timestamp_rules
from harness.core.window import FULL_AUDIO_CTX, N_SAMPLES, SAMPLE_RATE, window_samples


@dataclass(frozen=True)
class DecodingOptions:
    """What a job may set about decoding (validated with the job file, `harness.job.spec`)."""

    language: str = "en"  # a language (code or name), or AUTO: detected per utterance
    task: str = "transcribe"
    max_new_tokens: int | None = None  # None: openai-whisper's default, n_text_ctx // 2 (per window)
    # true: every item in 30 s windows as whisper.transcribe does (harness.core.longform); false:
    # one window, and longer audio is an error row (never trimmed); auto: long form past 30 s
    long_form: bool | str = "auto"
    # short utterances per decoder call on a runner that batches (short_form_decode_batch); never
    # changes a token. 8: where benchmarks/batching.py (32 utterances, one thread, CPU time) found the
    # torch runners' best, x1.24 / x1.28 (reference, tiny.en / base) and x1.32 / x1.25 (transformers),
    # CTranslate2 x1.24 / x1.10; 16 gained no more (base: less) for twice the audio held and lost
    # when a worker dies; onnx gains nothing on a CPU at any size (converters/onnx_target.py says why)
    batch_size: int = 8

    def long_form_for(self, n_samples: int) -> bool:
        """Whether audio of `n_samples` is decoded in long form under this job's `long_form`."""
        return self.long_form is True or (self.long_form == "auto" and n_samples > N_SAMPLES)


AUTO = "auto"  # decoding.language: detect each utterance's language and decode in it


def english_only_refusal(options: DecodingOptions) -> str | None:
    """What an English-only (`.en`) model cannot do under `options`, or None: it has no language
    or task tokens, so it neither detects, nor transcribes another language, nor translates."""
    if options.language == AUTO:
        return "language auto (detection)"
    if TO_LANGUAGE_CODE.get(options.language.lower(), options.language.lower()) != "en":
        return f"language {options.language!r}"
    if options.task != "transcribe":
        return f"task {options.task!r}"
    return None


@dataclass(frozen=True)
class Dims:
    """The model facts decoding needs (a subset of whisper.model.ModelDimensions). `n_audio_ctx`
    below the full 1500 is the trimmed audio context of `decoding.audio_ctx`."""

    n_mels: int
    n_vocab: int
    n_text_ctx: int
    n_audio_ctx: int = FULL_AUDIO_CTX

    @classmethod
    def of(cls, dims: Any) -> Dims:
        """From whisper's ModelDimensions or a manifest's `dims` mapping."""
        d: Mapping[str, Any] = asdict(dims) if is_dataclass(dims) else dims
        return cls(d["n_mels"], d["n_vocab"], d["n_text_ctx"], d.get("n_audio_ctx", FULL_AUDIO_CTX))

    @property
    def window_samples(self) -> int:
        """Audio the encoder sees in one window: 30 s, or less at a trimmed audio context."""
        return window_samples(self.n_audio_ctx)

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
        if refused := english_only_refusal(options):
            raise HarnessError(f"decoding: an English-only model cannot take {refused}")
        return get_tokenizer(False, num_languages=dims.num_languages)
    # `auto` before detection (the tokens every language shares: SOT, the language table)
    language = "en" if options.language == AUTO else options.language
    return get_tokenizer(True, num_languages=dims.num_languages, language=language, task=options.task)


@dataclass(frozen=True)
class Detection:
    """A detected spoken language and its probability among the model's languages."""

    language: str  # whisper's code, e.g. "en"
    probability: float


def detect_language(runner: Runner, features: Any, dims: Dims) -> Detection:
    """whisper's `Whisper.detect_language` on any runner, with its own decoder: the logits of one
    `step` on `<|startoftranscript|>`, every token but the languages masked, the most likely
    language and its softmax probability (computed in torch, as whisper does). An engine that
    decodes by itself detects by its own means (`SelfDecodingRunner.detect_language`)."""
    if isinstance(runner, SelfDecodingRunner):
        return Detection(*runner.detect_language(features))
    tok = tokenizer_for(dims, DecodingOptions(language=AUTO))
    raw, _ = runner.step([tok.sot], features, None)
    return language_of(raw, tok)


def detect_languages(runner: Runner, features: Any, dims: Dims, n: int) -> list[Detection]:
    """`detect_language` of each of the `n` rows of batched `features` (`Runner.encode_batch`), in
    one decoder call."""
    if isinstance(runner, SelfDecodingRunner):
        return [Detection(*d) for d in runner.detect_language_batch(features)]
    tok = tokenizer_for(dims, DecodingOptions(language=AUTO))
    raw, _ = runner.step_batch([[tok.sot]] * n, features, None)
    return [language_of(row, tok) for row in raw]


def language_of(raw: np.ndarray, tok) -> Detection:
    """The detection that one row of logits after `<|startoftranscript|>` gives: every token but the
    languages masked, the most likely language and its softmax probability (in torch, as whisper)."""
    import torch

    logits = torch.from_numpy(np.array(raw, dtype=np.float32, copy=True))
    mask = torch.ones(logits.shape[-1], dtype=torch.bool)
    mask[list(tok.all_language_tokens)] = False
    logits[mask] = -np.inf
    best = int(logits.argmax())
    code = tok.all_language_codes[tok.all_language_tokens.index(best)]
    return Detection(code, float(logits.softmax(dim=-1)[best]))


def choose_language(
    runner: Runner, features: Any, dims: Dims, options: DecodingOptions
) -> tuple[DecodingOptions, Detection | None]:
    """The options to decode this utterance with (with `language: auto`, its detected language),
    and the detection: on every multilingual model, for the record; none on an English-only one."""
    if not dims.multilingual:
        return options, None
    detection = detect_language(runner, features, dims)
    return (replace(options, language=detection.language) if options.language == AUTO else options), detection


@lru_cache(maxsize=256)  # a prompt per (model, language): a multilingual set brings many languages
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


def too_long(audio: np.ndarray, dims: Dims) -> TooLong | None:
    """Why short form refuses `audio` (longer than the window the encoder sees), or None."""
    if audio.size <= dims.window_samples:
        return None
    seconds = audio.size / SAMPLE_RATE
    if dims.n_audio_ctx == FULL_AUDIO_CTX:
        return TooLong(
            f"audio is {seconds:.1f} s, longer than the 30 s window of short-form decoding "
            "(decoding.long_form: false); set decoding.long_form to auto or true to decode it in 30 s windows"
        )
    return TooLong(
        f"audio is {seconds:.1f} s, longer than the {dims.window_samples / SAMPLE_RATE:.1f} s the encoder sees at "
        f"decoding.audio_ctx {dims.n_audio_ctx} (whisper.cpp's -ac drops the rest; scoring its transcript "
        "against the whole text would count the dropped words as errors of the model)"
    )


@dataclass(frozen=True)
class Decoded:
    tokens: tuple[int, ...]  # sampled tokens, prompt and EOT stripped (long form: every kept segment's)
    frontend_ms: float
    encode_ms: float
    decode_ms: float
    n_steps: int  # decoder calls, the EOT step included
    n_windows: int = 1  # 30 s windows encoded and decoded
    mode: str = SHORT_FORM
    language: str | None = None  # the language it was decoded in (None: a fixed prompt's)
    detection: Detection | None = None  # multilingual models: the detected language
    # utterances that shared its decoder calls (short_form_decode_batch). Above 1, frontend, encode
    # and decode ms are the batch's shared equally among its rows: what throughput sums (RTFx, ms
    # per token) reads right, while a per-utterance latency is one only at batch 1
    batch: int = 1

    def costs(self) -> dict[str, float | int | str | None]:
        """What a result row records of how the transcript was made (the raw row's columns)."""
        return {
            "frontend_ms": self.frontend_ms,
            "encode_ms": self.encode_ms,
            "decode_ms": self.decode_ms,
            "n_steps": self.n_steps,
            "n_windows": self.n_windows,
            "decoding": self.mode,
            "language": self.language,
            "detected_language": self.detection.language if self.detection else None,
            "language_prob": self.detection.probability if self.detection else None,
            "batch": self.batch,
        }


@dataclass(frozen=True)
class Sampled:
    """The greedy loop's output on one window."""

    tokens: tuple[int, ...]  # sampled tokens, prompt and EOT stripped
    n_steps: int  # decoder calls, the EOT step included
    first_logits: np.ndarray  # the first step's raw logits: the position after the prompt's last token
    sum_logprob: float  # timestamped prompts: Σ log-probability of each sampled token, EOT included


def greedy_decode(runner: Runner, audio: np.ndarray, dims: Dims, prompt: Prompt) -> Decoded:
    """Transcribe one short utterance under a fixed prompt (no language detection): front end,
    `encode`, then the greedy loop (or the engine's own). `short_form_decode` is the job's path.

    Audio longer than the window raises `TooLong`: Whisper sees 30 s at a time (less at a trimmed
    audio context), and trimming would score a transcript of its start against the whole text."""
    mel, frontend_ms = front_end(audio, dims)
    t0 = time.perf_counter()
    features = runner.encode(mel)
    t1 = time.perf_counter()
    tokens, steps = decode_window(runner, features, prompt)
    return Decoded(tokens, frontend_ms, (t1 - t0) * 1e3, (time.perf_counter() - t1) * 1e3, steps)


def short_form_decode(runner: Runner, audio: np.ndarray, dims: Dims, options: DecodingOptions) -> Decoded:
    """One window under the job's rules, language included: detected on multilingual models, and
    decoded in when `language: auto` (the detection step then counts as decoding: it costs one
    step, as in whisper.decode); a given language's detection is for the record, untimed."""
    mel, frontend_ms = front_end(audio, dims)
    t0 = time.perf_counter()
    features = runner.encode(mel)
    t1 = time.perf_counter()
    decode_with, detection = choose_language(runner, features, dims, options)
    t2 = time.perf_counter()
    detect_ms, detect_steps = ((t2 - t1) * 1e3, 1) if options.language == AUTO and detection else (0.0, 0)
    tokens, steps = decode_window(runner, features, build_prompt(dims, decode_with))
    decode_ms = (time.perf_counter() - t2) * 1e3 + detect_ms
    language = decode_with.language if dims.multilingual else "en"
    return Decoded(
        tokens, frontend_ms, (t1 - t0) * 1e3, decode_ms, steps + detect_steps, language=language, detection=detection
    )


def short_form_decode_batch(
    runner: Runner, audios: Sequence[np.ndarray], dims: Dims, options: Sequence[DecodingOptions]
) -> list[Decoded]:
    """`short_form_decode` of every item (`options[i]` for `audios[i]`), several per call on a
    runner that batches, `batch_size` at a time; one by one through `short_form_decode` on any
    other, so a caller needs no branch.

    A batch runs each item's front end, one `encode_batch`, the language detection of all its rows
    in one step (multilingual models), then the greedy loop on all rows at once, each row under its
    own prompt (`language: auto`: its detected language; the prompts differ in that token only)
    and its own EOT; an engine that decodes by itself gets the whole batch
    (`SelfDecodingRunner.generate_batch`). A row's `batch` is its batch's size, and its ms the
    batch's shared equally (`Decoded.batch`).

    Short form only: an item longer than the window raises its `TooLong`, as `front_end` does, before
    anything runs. A caller sends only the items that `too_long` lets through (long ones go to
    `harness.core.longform.transcribe`, or become error rows), so one long item costs no other."""
    if len(audios) != len(options):
        raise ValueError(f"{len(audios)} audios but {len(options)} options")
    if not runner.batching:
        return [short_form_decode(runner, a, dims, o) for a, o in zip(audios, options, strict=True)]
    for audio in audios:
        if refusal := too_long(audio, dims):
            raise refusal
    sizes = {o.batch_size for o in options}
    if len(sizes) > 1 or min(sizes, default=1) < 1:
        raise HarnessError(f"decoding.batch_size: one size of at least 1 for the items of a call, got {sorted(sizes)}")
    size = sizes.pop() if sizes else 1
    out: list[Decoded] = []
    for start in range(0, len(audios), size):
        out += _decode_batch(runner, audios[start : start + size], dims, options[start : start + size])
    return out


def _decode_batch(
    runner: Runner, audios: Sequence[np.ndarray], dims: Dims, options: Sequence[DecodingOptions]
) -> list[Decoded]:
    """One batch of `short_form_decode_batch`: its rows' transcripts, timings shared."""
    n = len(audios)
    t0 = time.perf_counter()
    mel = np.concatenate([log_mel(a, dims.n_mels, dims.n_audio_ctx) for a in audios])
    t1 = time.perf_counter()
    features = runner.encode_batch(mel)
    t2 = time.perf_counter()
    detections: list[Detection | None] = (
        detect_languages(runner, features, dims, n) if dims.multilingual else [None] * n
    )
    t3 = time.perf_counter()
    detect_ms = (t3 - t2) * 1e3 / n
    decode_with = [
        replace(o, language=d.language) if o.language == AUTO and d else o
        for o, d in zip(options, detections, strict=True)
    ]
    windows = decode_windows(runner, features, [build_prompt(dims, o) for o in decode_with])
    decode_ms = (time.perf_counter() - t3) * 1e3 / n  # prompts built and rows decoded
    out = []
    for o, used, detection, (tokens, steps) in zip(options, decode_with, detections, windows, strict=True):
        # as in short_form_decode: a detection that chose the language counts as decoding, one step
        detected = o.language == AUTO and detection is not None
        out.append(
            Decoded(
                tokens,
                (t1 - t0) * 1e3 / n,
                (t2 - t1) * 1e3 / n,
                decode_ms + (detect_ms if detected else 0.0),
                steps + int(detected),
                language=used.language if dims.multilingual else "en",
                detection=detection,
                batch=n,
            )
        )
    return out


def front_end(audio: np.ndarray, dims: Dims) -> tuple[np.ndarray, float]:
    """The log-mel of one window as the encoder takes it (`TooLong` past it), and its ms."""
    if refusal := too_long(audio, dims):
        raise refusal
    t0 = time.perf_counter()
    mel = log_mel(audio, dims.n_mels, dims.n_audio_ctx)
    return mel, (time.perf_counter() - t0) * 1e3


def decode_window(runner: Runner, features: Any, prompt: Prompt) -> tuple[tuple[int, ...], int]:
    """The sampled tokens of one window and the decoder steps taken: the shared loop, or the
    engine's own under the same `prompt`."""
    if isinstance(runner, SelfDecodingRunner):
        text_tokens, steps = runner.generate(features, prompt)
        return tuple(text_tokens), steps
    out = sample(runner, features, prompt)
    return out.tokens, out.n_steps


def decode_windows(runner: Runner, features: Any, prompts: Sequence[Prompt]) -> list[tuple[tuple[int, ...], int]]:
    """`decode_window` of every row of batched `features` (`prompts[i]` for row i, every prompt of
    one length: short form's prompts differ only in their language token): its sampled tokens and
    decoder steps, by the shared loop or the engine's own."""
    if isinstance(runner, SelfDecodingRunner):
        return [(tuple(tokens), steps) for tokens, steps in runner.generate_batch(features, prompts)]
    return sample_batch(runner, features, prompts)


def suppress(logits: np.ndarray, prompt: Prompt, first_step: bool) -> None:
    """Mask, in place, what the prompt never samples, and at the first sampled step also what it
    never samples first (blank, EOT)."""
    if first_step:
        logits[np.asarray(prompt.suppress_at_begin)] = -np.inf
    logits[np.asarray(prompt.suppress)] = -np.inf


def pick(logits: np.ndarray, prompt: Prompt, tokens: Sequence[int]) -> int:
    """One row's greedy choice after `tokens` (the prompt and what it sampled so far), in whisper's
    order: blank suppression at the first sampled step, the suppressed tokens, then the timestamp
    rules, then the most likely token. Masks `logits` in place: the one per-row rule of both loops."""
    suppress(logits, prompt, first_step=len(tokens) == len(prompt.tokens))
    if prompt.timestamps is not None:
        apply_timestamp_rules(logits, tokens[len(prompt.tokens) :], prompt.timestamps)
    return int(logits.argmax())


def check_room(prompt: Prompt) -> None:
    """Refuse a prompt that leaves the decoder no position to sample at."""
    if prompt.step_limit < 1:
        raise HarnessError(f"a prompt of {len(prompt.tokens)} tokens leaves no room to sample")


def ended(token: int, steps: int, prompt: Prompt) -> bool:
    """Whether a row stops after sampling `token` at its `steps`-th step: EOT, or its step limit."""
    return token == prompt.eot or steps >= prompt.step_limit


def text_of(tokens: Sequence[int], prompt: Prompt) -> tuple[int, ...]:
    """The sampled tokens of a row: its prompt and anything from EOT on stripped."""
    text = list(tokens[len(prompt.tokens) :])
    return tuple(text[: text.index(prompt.eot)] if prompt.eot in text else text)


def sample(runner: Runner, features: Any, prompt: Prompt) -> Sampled:
    """The greedy loop on one window's audio features, under `prompt`'s rules (`pick`)."""
    import torch
    import torch.nn.functional as F

    check_room(prompt)
    tokens = list(prompt.tokens)
    cache = first_logits = None
    steps = 0
    # whisper.decoding.GreedyDecoder's float32 sum, read by long form's no-speech rule
    sum_logprob = np.float32(0.0)
    while True:
        raw, cache = runner.step(tokens, features, cache)
        steps += 1
        logits = np.array(raw, dtype=np.float32, copy=True)
        if first_logits is None:  # kept unmasked; a copy, since a runner may reuse its output buffer
            first_logits = logits.copy()
        token = pick(logits, prompt, tokens)
        if prompt.timestamps is not None:
            logprob = F.log_softmax(torch.from_numpy(logits)[None], dim=-1)[0, token].item()
            sum_logprob = np.float32(sum_logprob + np.float32(logprob))
        tokens.append(token)
        if ended(token, steps, prompt):
            return Sampled(text_of(tokens, prompt), steps, first_logits, float(sum_logprob))


def sample_batch(runner: Runner, features: Any, prompts: Sequence[Prompt]) -> list[tuple[tuple[int, ...], int]]:
    """`sample` of every row of batched `features` at once (`prompts[i]` for row i, every prompt of
    one length, as `step_batch` feeds every row alike): each decoder call takes the rows still
    decoding, and each row follows `pick` and `ended` as `sample` does, so it stops, and stops
    counting steps, where it would alone. Returns each row's sampled tokens and decoder steps."""
    if len({len(p.tokens) for p in prompts}) > 1:
        raise ValueError(f"sample_batch: prompts of lengths {sorted({len(p.tokens) for p in prompts})} in one batch")
    for prompt in prompts:
        check_room(prompt)
    tokens = [list(p.tokens) for p in prompts]
    steps = [0] * len(prompts)
    active = list(range(len(prompts)))  # the rows still decoding
    cache = None
    while active:
        raw, cache = runner.step_batch([tokens[i] for i in active], features, cache, None if cache is None else active)
        logits = np.array(raw, dtype=np.float32, copy=True)
        for i, row in zip(active, logits, strict=True):
            steps[i] += 1
            tokens[i].append(pick(row, prompts[i], tokens[i]))
        active = [i for i in active if not ended(tokens[i][-1], steps[i], prompts[i])]
    return [(text_of(t, p), n) for t, p, n in zip(tokens, prompts, steps, strict=True)]
