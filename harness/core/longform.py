"""Long-form decoding: `whisper.transcribe`'s sequential 30 s windows on the shared greedy loop.

`transcribe` is the one entry per utterance: the job's `decoding.long_form` decides
(`DecodingOptions.long_form_for`) between one short-form window (`greedy_decode`) and the windows
below. They mirror `whisper.transcribe(model, audio, temperature=0.0,
condition_on_previous_text=True, fp16=False, language=...)` exactly, and a test holds the
reference to it token for token:

- front end: the log-mel of the whole file with 30 s of silence appended, read in windows of up
  to 3000 frames starting at `seek` (`WindowedMel`, computed a window at a time);
- prompt: `<|startofprev|>`, the last 223 tokens kept so far (condition_on_previous_text), then
  the SOT sequence without `<|notimestamps|>`; the short-form rules plus whisper's timestamp
  rules (`harness.core.timestamps`), at most `max_new_tokens` (default 224) tokens per window;
- no-speech rule: a window where P(`<|nospeech|>`) at SOT > 0.6 and the average log-probability
  of its tokens ≤ -1.0 is dropped, and the next window starts after it;
- the sampled tokens split into segments at timestamp pairs; the next window starts at the last
  closed segment's end; segments of zero length or without text are emptied.

Temperature stays 0, without whisper's fallback (re-decoding a window at 0.2, 0.4, … 1.0 when its
gzip compression ratio > 2.4 or average log-probability < -1.0): sampling is random, and a
comparison of models must decode deterministically. So the compression ratio is never computed,
and the prompt is never reset (whisper resets it only after a temperature above 0.5). Options
off by default in whisper are left out too: initial_prompt, carry_initial_prompt,
clip_timestamps, word_timestamps, hallucination_silence_threshold.

Language: as whisper.transcribe, detected once per file on its first window (multilingual models;
for `language: auto`, every window is then decoded in it). Whisper detects on the first 30 s of
the padded spectrogram; that is the first window here whenever the file is longer than 30 s (what
long form is for); a shorter file decoded in long form (`long_form: true`) is detected on its
zero-padded window instead. Long form needs the full audio context: at a trimmed `audio_ctx`
items longer than the encoder's window are refused (`TooLong`), as in short form.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import replace as changed
from functools import lru_cache

import numpy as np

from harness.core.audio import WindowedMel
from harness.core.decoding import (
    AUTO,
    LONG_FORM,
    Decoded,
    DecodingOptions,
    Detection,
    Dims,
    Prompt,
    Sampled,
    build_prompt,
    choose_language,
    sample,
    short_form_decode,
    tokenizer_for,
)
from harness.core.target import Runner, SelfDecodingRunner, Unavailable
from harness.core.timestamps import TimestampRules, split_window
from harness.core.window import FULL_AUDIO_CTX, N_FRAMES, SAMPLE_RATE

NO_SPEECH_THRESHOLD = 0.6  # whisper.transcribe's defaults, both needed for a window to be silence
LOGPROB_THRESHOLD = -1.0


def transcribe(runner: Runner, audio: np.ndarray, dims: Dims, options: DecodingOptions) -> Decoded:
    """One utterance under the job's rules: long form, or one short-form window (longer audio is
    refused there, never trimmed); long form only at the full audio context."""
    if dims.n_audio_ctx == FULL_AUDIO_CTX and options.long_form_for(audio.size):
        return long_form_decode(runner, audio, dims, options)
    return short_form_decode(runner, audio, dims, options)


@dataclass(frozen=True)
class WindowPrompts:
    """The prompt of each long-form window, and the tokens the no-speech rule reads."""

    first: Prompt  # the SOT sequence without <|notimestamps|>, timestamps on
    sot_prev: int
    no_speech: int

    def after(self, previous: Sequence[int]) -> Prompt:
        """The prompt of a window that follows the tokens kept so far: whisper keeps the last
        n_text_ctx // 2 - 1 of them, so prompt and sampled tokens fit the decoder's context."""
        if not previous:
            return self.first
        kept = previous[-(self.first.n_ctx // 2 - 1) :]
        return changed(self.first, tokens=(self.sot_prev, *kept, *self.first.tokens))

    def no_speech_prob(self, runner: Runner, features: object, prompt: Prompt, out: Sampled) -> tuple[float, int]:
        """P(<|nospeech|>) at the SOT position of `prompt`, as whisper scores it, and the decoder
        calls it took: none when SOT ends the prompt (English-only models: the first step's
        logits), else one fresh call on the prompt up to SOT (a causal decoder gives SOT the same
        logits either way, up to rounding; they only meet the 0.6 threshold)."""
        import torch

        sot_index = len(prompt.tokens) - len(self.first.tokens)
        extra = 0 if sot_index == len(prompt.tokens) - 1 else 1
        logits = out.first_logits if not extra else runner.step(prompt.tokens[: sot_index + 1], features, None)[0]
        probs = torch.from_numpy(np.asarray(logits, dtype=np.float32))[None].softmax(dim=-1)
        return probs[0, self.no_speech].item(), extra


@lru_cache(maxsize=256)  # as build_prompt's: one per (model, language)
def window_prompts(dims: Dims, options: DecodingOptions) -> WindowPrompts:
    tok = tokenizer_for(dims, options)
    rules = TimestampRules(begin=tok.timestamp_begin, eot=tok.eot, no_timestamps=tok.no_timestamps)
    first = changed(build_prompt(dims, options), tokens=tuple(tok.sot_sequence), timestamps=rules)
    return WindowPrompts(first=first, sot_prev=tok.sot_prev, no_speech=tok.no_speech)


def long_form_decode(runner: Runner, audio: np.ndarray, dims: Dims, options: DecodingOptions) -> Decoded:
    """Decode audio of any length in whisper.transcribe's windows (see the module's rules)."""
    if isinstance(runner, SelfDecodingRunner):
        raise Unavailable(
            f"long form ({audio.size / SAMPLE_RATE:.1f} s) applies whisper's timestamp rules at every step of the "
            f"shared loop; {type(runner).__name__} decodes by itself, and nothing holds its own timestamp "
            "handling to those rules, so its long-form items are not evaluated (its short-form ones are)"
        )
    t0 = time.perf_counter()
    mel = WindowedMel.of(audio, dims.n_mels)
    frontend_s, encode_s, decode_s = time.perf_counter() - t0, 0.0, 0.0
    kept: list[int] = []  # the transcript so far: every kept segment's tokens
    seek = steps = windows = 0
    detection: Detection | None = None
    while seek < mel.n_frames:
        size = min(N_FRAMES, mel.n_frames - seek)
        t0 = time.perf_counter()
        window = mel.window(seek, size)
        t1 = time.perf_counter()
        features = runner.encode(window)
        t2 = time.perf_counter()
        detect_s = 0.0
        if seek == 0:  # the file's language, from its first window (see the module's rules)
            asked = options.language
            options, detection = choose_language(runner, features, dims, options)
            if asked == AUTO and detection is not None:  # part of decoding, as in whisper.transcribe;
                steps, detect_s = steps + 1, time.perf_counter() - t2  # else for the record, untimed
            prompts, tokenizer = window_prompts(dims, options), tokenizer_for(dims, options)
            rules = prompts.first.timestamps
            assert rules is not None
        t3 = time.perf_counter()
        prompt = prompts.after(kept)
        out = sample(runner, features, prompt)
        no_speech, extra = prompts.no_speech_prob(runner, features, prompt, out)
        t4 = time.perf_counter()
        frontend_s, encode_s, decode_s = frontend_s + t1 - t0, encode_s + t2 - t1, decode_s + t4 - t3 + detect_s
        steps, windows = steps + out.n_steps + extra, windows + 1
        avg_logprob = out.sum_logprob / (len(out.tokens) + 1)  # whisper's: EOT counted
        if no_speech > NO_SPEECH_THRESHOLD and not avg_logprob > LOGPROB_THRESHOLD:
            seek += size  # silence: nothing kept, on to the next window
            continue
        split = split_window(out.tokens, seek, size, rules)
        for segment, (start, end) in zip(split.segments, split.starts_ends, strict=True):
            if start != end and tokenizer.decode([t for t in segment if t < rules.eot]).strip():
                kept.extend(segment)
        seek += split.advance
    language = options.language if dims.multilingual else "en"
    return Decoded(
        tuple(kept), frontend_s * 1e3, encode_s * 1e3, decode_s * 1e3, steps, windows, LONG_FORM, language, detection
    )
