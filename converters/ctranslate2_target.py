"""`ctranslate2`: the CTranslate2 model (the engine behind faster-whisper), the CPU speed
reference users compare against.

Built with CTranslate2's own `TransformersConverter` over the Hugging Face folder that the
`transformers` target writes (converters/transformers_target.py), quantized to float32 or int8. The
vocabulary comes from openai-whisper's tiktoken encoding in the byte-level spelling HF uses, so
no hub tokenizer is needed and the ids are the harness's ids.

CTranslate2 decodes only by itself, so the runner offers `generate` under the shared rules
(harness.core.decoding.Prompt). Its `step`, used only by the parity check, teacher-forces the tokens
as a prefix and reads the next position's raw logits (`return_logits_vocab`).

It batches (`Runner.batching`) with CTranslate2's own batching: the batch's features, then
`generate` with one prompt per row and `detect_language` on the batch.
`device="cuda"` runs it on a GPU with the artifact's own weight type.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from whisper.model import Whisper

from converters import transformers_target
from harness.core.checkpoint import Checkpoint
from harness.core.decoding import DecodingOptions, Dims, Prompt, tokenizer_for
from harness.core.errors import HarnessError
from harness.core.target import (
    CPU,
    DEFAULT_THREADS,
    Artifact,
    Implementation,
    SelfDecodingRunner,
    Unavailable,
    device_kind,
    encoder_io,
    require,
)

QUANTIZATION = {"fp32": "float32", "int8": "int8"}
MODEL, CONFIG, VOCABULARY = "model.bin", "config.json", "vocabulary.json"


class WhisperVocabulary:
    """The part of a HF tokenizer that CTranslate2's WhisperLoader reads, from openai-whisper's
    own encoding: token strings by id (byte-level BPE spelling, as faster-whisper's models ship)
    and the language tokens (its `lang_ids`, used by language detection)."""

    def __init__(self, dims: Dims) -> None:
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        tok = tokenizer_for(dims, DecodingOptions())
        enc = tok.encoding
        spelling = bytes_to_unicode()
        self._ids = {}
        for i in range(enc.n_vocab):
            raw = enc.decode_single_token_bytes(i)
            text = raw.decode("utf-8", errors="replace")
            self._ids[text if text in enc.special_tokens_set else "".join(spelling[b] for b in raw)] = i
        if len(self._ids) != enc.n_vocab:
            raise ValueError("openai-whisper's encoding spells two ids the same way")
        self.additional_special_tokens = [f"<|{code}|>" for code in tok.all_language_codes]

    def get_vocab(self) -> dict[str, int]:
        return dict(self._ids)

    def convert_tokens_to_ids(self, token: str) -> int:
        return self._ids[token]


def _convert_hf_folder(hf_dir: Path, vocabulary: WhisperVocabulary, quantization: str, out: Path) -> None:
    from ctranslate2.converters import TransformersConverter

    class Converter(TransformersConverter):
        def load_tokenizer(self, tokenizer_class, model_name_or_path, **kwargs):
            return vocabulary  # the HF folder holds no tokenizer files, and the hub is off limits

    Converter(str(hf_dir)).convert(str(out), quantization=quantization)


def convert(
    checkpoint: Checkpoint, model: Whisper, quant: str, out: Path, calibration: Sequence[np.ndarray]
) -> dict[str, Any]:
    require("ctranslate2", "transformers")
    d = model.dims
    vocabulary = WhisperVocabulary(Dims.of(d))
    with tempfile.TemporaryDirectory(prefix="ct2-") as work:
        hf_dir, ct2_dir = Path(work) / "hf", Path(work) / "ct2"
        hf_dir.mkdir()
        transformers_target.convert(checkpoint, model, "fp32", hf_dir, ())
        # the converter replaces its output folder, so it writes beside `out`, not into it
        _convert_hf_folder(hf_dir, vocabulary, QUANTIZATION[quant], ct2_dir)
        for path in ct2_dir.iterdir():
            shutil.move(path, out / path.name)
    facts: dict[str, Any] = {
        "path": f"transformers_target folder -> ctranslate2 TransformersConverter(quantization={QUANTIZATION[quant]})",
        "io": {
            MODEL: {
                "encode": encoder_io(d, "features", "encoder_output"),
                "generate": {
                    "inputs": {"encoder_output": [1, d.n_audio_ctx, d.n_audio_state], "prompt": ["P"]},
                    "outputs": {"sequences_ids": [1, "N"], "logits (parity only)": ["N", d.n_vocab]},
                    "max_N": d.n_text_ctx // 2,
                },
                "weights": QUANTIZATION[quant],
            },
        },
    }
    if "CTranslate2" in checkpoint.source:
        facts["source_note"] = (
            "the source is a packaged CTranslate2 model (float16) rebuilt bit-exactly into openai-whisper form "
            "(tensor sha256 pinned in harness.core.checkpoint); it is re-converted here like any other source"
        )
    return facts


class CTranslate2Runner(SelfDecodingRunner):
    """`generate` keeps CTranslate2's own KV cache; `step` (the parity check only) re-decodes the
    whole prefix on every call."""

    batching = True

    def __init__(self, artifact: Artifact, threads: int = DEFAULT_THREADS, device: str = CPU) -> None:
        require("ctranslate2")
        import ctranslate2 as ct2

        self._ct2 = ct2
        kind, _, index = device.partition(":")
        self._device = device_kind(device)
        if self._device != CPU:
            if int(index or 0) >= (count := ct2.get_cuda_device_count()):
                raise Unavailable(f"device {device!r}: ctranslate2 {ct2.__version__} sees {count} CUDA device(s)")
            self.runtime = "ctranslate2-cuda"
        # one thread per worker by default: the single-stream CPU number faster-whisper users compare with
        self.model = ct2.models.Whisper(
            str(artifact.path), device=kind, device_index=int(index or 0), inter_threads=1, intra_threads=threads
        )
        self._suppress_at_begin = tuple(json.loads(artifact.file(CONFIG).read_text())["suppress_ids_begin"])
        vocab = json.loads(artifact.file(VOCABULARY).read_text())
        self._n_vocab = len(vocab)
        self._sot, self._no_timestamps = vocab.index("<|startoftranscript|>"), vocab.index("<|notimestamps|>")

    def encode(self, mel: np.ndarray) -> Any:
        view = self._ct2.StorageView.from_array(np.ascontiguousarray(mel, dtype=np.float32))
        return self.model.encode(view, to_cpu=True)

    def encode_batch(self, mel: np.ndarray) -> Any:
        if self._device != CPU:
            return self.encode(mel)
        # a CPU encodes row by row (harness.core.target says why)
        rows = np.concatenate([np.asarray(self.encode(row[None])) for row in mel])
        return self._ct2.StorageView.from_array(rows)

    def _task_length(self, tokens: Sequence[int]) -> int:
        """CTranslate2's own split of a prompt: SOT and the task tokens after it (up to
        no-timestamps); anything later is a forced prefix that counts towards max_length."""
        n = list(tokens).index(self._sot)
        while n < len(tokens) and self._sot <= tokens[n] <= self._no_timestamps:
            n += 1
        return n

    def _generate(self, features: Any, prompts: Sequence[Sequence[int]], n_new: int, **options) -> list[Any]:
        # CTranslate2 forwards all task tokens but the last as the prompt (start_step of them) and
        # then generates at most min(max_length // 2, max_length - start_step) tokens, forced
        # prefix included; this max_length makes that exactly n_new (prompts of one length)
        start_step = self._task_length(prompts[0]) - 1
        return self.model.generate(
            features, [list(p) for p in prompts], beam_size=1, max_length=n_new + max(n_new, start_step), **options
        )

    def _check(self, prompt: Prompt) -> None:
        """Refuse a prompt CTranslate2 would not apply as the shared loop does."""
        if self._task_length(prompt.tokens) != len(prompt.tokens):
            raise HarnessError(f"CTranslate2 would take part of the prompt {prompt.tokens} as forced text")
        # blank suppression at the first sampled step can only come from the model's config.json
        if self._suppress_at_begin != tuple(prompt.suppress_at_begin):
            raise HarnessError(
                f"CTranslate2 model suppresses {self._suppress_at_begin} at the first step, "
                f"the decoding rules {tuple(prompt.suppress_at_begin)}; rebuild the artifact"
            )

    def generate(self, audio_features: Any, prompt: Prompt) -> tuple[list[int], int]:
        """Greedy decoding under the `Prompt`'s rules (see SelfDecodingRunner)."""
        return self.generate_batch(audio_features, [prompt])[0]

    def generate_batch(self, audio_features: Any, prompts: Sequence[Prompt]) -> list[tuple[list[int], int]]:
        """`generate` of every row under its own prompt, in one call: CTranslate2 takes one length,
        one step limit and one suppression list per call (short form's prompts differ only in
        their language token)."""
        for prompt in prompts:
            self._check(prompt)
        if len({(len(p.tokens), p.step_limit, p.suppress) for p in prompts}) > 1:
            raise HarnessError("CTranslate2 takes one prompt length, step limit and suppression list per batch")
        limit = prompts[0].step_limit
        results = self._generate(
            audio_features,
            [p.tokens for p in prompts],
            limit,
            suppress_tokens=list(prompts[0].suppress),
            suppress_blank=True,
        )
        out = []
        for result in results:
            tokens = list(result.sequences_ids[0])  # prompt and EOT already left out
            # decoder steps as the shared loop counts them: one per token, plus the one that chose
            # EOT unless the length limit stopped it first
            out.append((tokens, min(len(tokens) + 1, limit)))
        return out

    def detect_language(self, audio_features: Any) -> tuple[str, float]:
        """CTranslate2's own detection (whisper's: a softmax over the language tokens' logits
        after SOT); its `generate`, and so `step`, gives every language token the same masked
        logit after SOT, so the shared step-based detection cannot run on it."""
        return self.detect_language_batch(audio_features)[0]

    def detect_language_batch(self, audio_features: Any) -> list[tuple[str, float]]:
        return [
            (token.removeprefix("<|").removesuffix("|>"), float(probability))
            for (token, probability), *_ in self.model.detect_language(audio_features)
        ]

    def step(self, tokens: Sequence[int], audio_features: Any, cache: Any) -> tuple[np.ndarray, Any]:
        # no suppression: parity compares raw logits
        (result,) = self._generate(
            audio_features,
            [tokens],
            len(tokens) - self._task_length(tokens) + 1,
            suppress_tokens=[],
            suppress_blank=False,
            return_logits_vocab=True,
        )
        # logits come per decoding step, a forced prefix as one [prefix + 1, vocab] block: the
        # last row is the position after `tokens`
        return np.asarray(result.logits[-1], dtype=np.float32).reshape(-1, self._n_vocab)[-1], None


IMPLEMENTATION = Implementation(convert=convert, runner=CTranslate2Runner)
