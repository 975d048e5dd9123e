"""The one decoding loop every backend shares: front end, prompt, suppression, greedy search.

Backends implement only numeric steps (`converters.protocol.Runner`), so a difference between
two models measures the conversion, never the decoding code. The rules mirror
`whisper.decode(model, mel, DecodingOptions(language=..., without_timestamps=True, fp16=False))`
at temperature 0, and a test holds the reference to that token for token.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from harness.spec import DecodingSpec

N_FRAMES = 3000  # 30 s of 10 ms mel frames: Whisper always sees one padded/trimmed window


@dataclass(frozen=True)
class Dims:
    """The checkpoint facts decoding needs (a subset of whisper.model.ModelDimensions)."""

    n_mels: int
    n_vocab: int
    n_text_ctx: int

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


def tokenizer_for(dims: Dims, options: DecodingSpec):  # -> whisper.tokenizer.Tokenizer
    from whisper.tokenizer import get_tokenizer

    if not dims.multilingual:
        return get_tokenizer(False, num_languages=dims.num_languages)
    return get_tokenizer(True, num_languages=dims.num_languages, language=options.language or "en", task=options.task)


@lru_cache(maxsize=8)
def build_prompt(dims: Dims, options: DecodingSpec) -> Prompt:
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


def log_mel(audio: np.ndarray, n_mels: int) -> np.ndarray:
    """openai-whisper's front end on one 30 s window: float32 [1, n_mels, 3000]."""
    import torch
    import whisper

    mel = whisper.log_mel_spectrogram(whisper.pad_or_trim(torch.from_numpy(audio)), n_mels)
    return mel.numpy()[None]


@dataclass(frozen=True)
class Decoded:
    tokens: tuple[int, ...]  # sampled text tokens: prompt and EOT stripped
    frontend_ms: float
    encode_ms: float
    decode_ms: float
    n_steps: int  # decoder calls, the EOT step included


def greedy_decode(runner, audio: np.ndarray, dims: Dims, prompt: Prompt) -> Decoded:
    """Transcribe one ≤30 s utterance; `runner` follows converters.protocol.Runner."""
    t0 = time.perf_counter()
    mel = log_mel(audio, dims.n_mels)
    t1 = time.perf_counter()
    features = runner.encode(mel)
    t2 = time.perf_counter()
    if hasattr(runner, "generate"):  # an engine that decodes only by itself, under these same rules
        text_tokens, steps = runner.generate(features, prompt)
        return Decoded(tuple(text_tokens), (t1 - t0) * 1e3, (t2 - t1) * 1e3, (time.perf_counter() - t2) * 1e3, steps)
    tokens = list(prompt.tokens)
    suppress = np.array(prompt.suppress)
    suppress_at_begin = np.array(prompt.suppress_at_begin)
    cache = None
    steps = 0
    for _ in range(prompt.max_new_tokens):
        logits, cache = runner.step(tokens, features, cache)
        steps += 1
        logits = np.array(logits, dtype=np.float32, copy=True)
        logits[suppress] = -np.inf
        if len(tokens) == len(prompt.tokens):
            logits[suppress_at_begin] = -np.inf
        token = int(logits.argmax())
        tokens.append(token)
        if token == prompt.eot or len(tokens) > prompt.n_ctx:
            break
    t3 = time.perf_counter()
    text_tokens = tokens[len(prompt.tokens) :]
    if prompt.eot in text_tokens:
        text_tokens = text_tokens[: text_tokens.index(prompt.eot)]
    return Decoded(tuple(text_tokens), (t1 - t0) * 1e3, (t2 - t1) * 1e3, (t3 - t2) * 1e3, steps)
