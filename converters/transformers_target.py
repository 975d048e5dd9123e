"""`transformers`: Hugging Face `WhisperForConditionalGeneration` built from the same openai-whisper
weights, with no hub access, run with SDPA attention and its own KV cache.

The config is derived from the checkpoint's dims and the generation config from openai-whisper's
own tokenizer, so the folder is a complete HF model (`from_pretrained` works on it) and
CTranslate2's converter can take it as its input (converters/ctranslate2_target.py). The key mapping is
the inverse of transformers' `models/whisper/convert_openai_to_hf.py`, which the installed
transformers no longer ships.

The runner batches (`Runner.batching`): the batch's features, then decoder calls on the rows still
decoding, a row that has ended dropped from HF's cache (`batch_select_indices`). On
`device="cuda"` the model runs there in fp32.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from whisper.model import Whisper

from harness.core.checkpoint import Checkpoint
from harness.core.decoding import DecodingOptions, Dims, build_prompt, tokenizer_for
from harness.core.target import (
    CPU,
    DEFAULT_THREADS,
    Artifact,
    Implementation,
    Runner,
    encoder_io,
    require,
    torch_device,
)

WEIGHTS, CONFIG, GENERATION_CONFIG = "model.safetensors", "config.json", "generation_config.json"

# openai-whisper name fragment -> HF name fragment, applied in this order to every key. A leading
# "." keeps ".attn.*" from matching inside ".cross_attn.*" ("_attn" has no dot before it).
_RENAMES: tuple[tuple[str, str], ...] = (
    ("blocks", "layers"),
    ("mlp.0", "fc1"),
    ("mlp.2", "fc2"),
    ("mlp_ln", "final_layer_norm"),
    (".attn.query", ".self_attn.q_proj"),
    (".attn.key", ".self_attn.k_proj"),
    (".attn.value", ".self_attn.v_proj"),
    (".attn_ln", ".self_attn_layer_norm"),
    (".attn.out", ".self_attn.out_proj"),
    (".cross_attn.query", ".encoder_attn.q_proj"),
    (".cross_attn.key", ".encoder_attn.k_proj"),
    (".cross_attn.value", ".encoder_attn.v_proj"),
    (".cross_attn_ln", ".encoder_attn_layer_norm"),
    (".cross_attn.out", ".encoder_attn.out_proj"),
    ("decoder.ln.", "decoder.layer_norm."),
    ("encoder.ln_post.", "encoder.layer_norm."),
    ("token_embedding", "embed_tokens"),
    ("encoder.positional_embedding", "encoder.embed_positions.weight"),
    ("decoder.positional_embedding", "decoder.embed_positions.weight"),
)


def hf_key(key: str) -> str:
    """openai-whisper state-dict key -> WhisperForConditionalGeneration key."""
    for old, new in _RENAMES:
        key = key.replace(old, new)
    return f"model.{key}"


def _transformers():
    require("transformers")
    import transformers

    return transformers


def _configs(model: Whisper) -> tuple[Any, Any]:
    """WhisperConfig and GenerationConfig from the checkpoint dims and openai-whisper's tokenizer."""
    transformers = _transformers()
    d = model.dims
    dims = Dims.of(d)
    prompt = build_prompt(dims)
    tok = tokenizer_for(dims, DecodingOptions())
    ffn = model.encoder.blocks[0].mlp[0].out_features
    # the special tokens and the harness's suppression rules, in both configs: HF's own generate()
    # and CTranslate2 (which copies these into its config.json) then suppress what
    # harness.core.decoding suppresses
    shared = {
        "decoder_start_token_id": tok.sot,
        "bos_token_id": tok.eot,
        "eos_token_id": tok.eot,
        "pad_token_id": tok.eot,
        "suppress_tokens": list(prompt.suppress),
        "begin_suppress_tokens": list(prompt.suppress_at_begin),
    }
    config = transformers.WhisperConfig(
        vocab_size=d.n_vocab,
        num_mel_bins=d.n_mels,
        d_model=d.n_audio_state,
        encoder_layers=d.n_audio_layer,
        encoder_attention_heads=d.n_audio_head,
        decoder_layers=d.n_text_layer,
        decoder_attention_heads=d.n_text_head,
        encoder_ffn_dim=ffn,
        decoder_ffn_dim=model.decoder.blocks[0].mlp[0].out_features,
        max_source_positions=d.n_audio_ctx,
        max_target_positions=d.n_text_ctx,
        tie_word_embeddings=True,
        **shared,
    )
    # openai-whisper's alignment heads (its default, the upper half of the decoder, when the
    # checkpoint carries none), as [layer, head] pairs
    heads = model.alignment_heads.to_dense().nonzero().tolist()
    # only multilingual checkpoints get language and task tables (readers such as CTranslate2's
    # converter take a present-but-null table for a real one)
    multilingual = (
        {
            "lang_to_id": {f"<|{c}|>": t for c, t in zip(tok.all_language_codes, tok.all_language_tokens, strict=True)},
            "task_to_id": {"transcribe": tok.transcribe, "translate": tok.translate},
        }
        if dims.multilingual
        else {}
    )
    generation = transformers.GenerationConfig(
        max_length=d.n_text_ctx,
        **shared,
        no_timestamps_token_id=tok.no_timestamps,
        is_multilingual=dims.multilingual,
        alignment_heads=heads,
        **multilingual,
    )
    return config, generation


def build_hf_model(model: Whisper):
    """WhisperForConditionalGeneration holding exactly `model`'s weights (fp32)."""
    transformers = _transformers()
    config, generation = _configs(model)
    with torch.device("meta"):  # no random init: every tensor is assigned below
        hf = transformers.WhisperForConditionalGeneration(config)
    state = {hf_key(k): v.detach().float().contiguous() for k, v in model.state_dict().items()}
    state["proj_out.weight"] = state["model.decoder.embed_tokens.weight"]  # tied, as in openai-whisper
    expected = set(hf.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"openai-whisper -> HF key mapping is off: missing {missing[:5]}, unexpected {unexpected[:5]}")
    hf.load_state_dict(state, strict=True, assign=True)
    hf.tie_weights()
    hf.generation_config = generation
    return hf.eval()


def convert(
    checkpoint: Checkpoint, model: Whisper, quant: str, out: Path, calibration: Sequence[np.ndarray]
) -> dict[str, Any]:
    hf = build_hf_model(model)
    hf.save_pretrained(out)
    d = model.dims
    return {
        "path": "openai-whisper state dict renamed onto WhisperForConditionalGeneration, save_pretrained",
        "io": {
            WEIGHTS: {
                "encoder": encoder_io(d, "input_features", "last_hidden_state"),
                "decoder": {
                    "inputs": {"decoder_input_ids": [1, "L"], "cache": "EncoderDecoderCache"},
                    "outputs": {"logits": [1, "L", d.n_vocab]},
                    "max_L": d.n_text_ctx,
                },
                "attn_implementation": "sdpa",
            },
        },
    }


@dataclass(frozen=True)
class BatchCache:
    """The rows a batch still decodes, their audio features, and HF's cache of exactly those rows."""

    rows: tuple[int, ...]
    features: torch.Tensor
    cache: Any  # transformers' EncoderDecoderCache


class TransformersRunner(Runner):
    batching = True

    def __init__(self, artifact: Artifact, threads: int = DEFAULT_THREADS, device: str = CPU) -> None:
        transformers = _transformers()
        self.device = torch_device(device)
        if self.device != CPU:
            self.runtime = "pytorch-cuda"
        self.model = (
            transformers.WhisperForConditionalGeneration.from_pretrained(
                artifact.path, attn_implementation="sdpa", dtype=torch.float32
            )
            .to(self.device)
            .eval()
        )

    @torch.inference_mode()
    def encode(self, mel: np.ndarray) -> torch.Tensor:
        return self.model.model.encoder(torch.from_numpy(mel).to(self.device)).last_hidden_state

    @torch.inference_mode()
    def encode_batch(self, mel: np.ndarray) -> torch.Tensor:
        # a CPU encodes row by row (harness.core.target says why)
        return torch.cat([self.encode(row[None]) for row in mel]) if self.device == CPU else self.encode(mel)

    @torch.inference_mode()
    def step(self, tokens: Sequence[int], audio_features: Any, cache: Any) -> tuple[np.ndarray, Any]:
        new = tokens if cache is None else tokens[-1:]  # HF's cache holds every earlier position
        logits, cache = self._decode([new], audio_features, cache)
        return logits[0], cache

    @torch.inference_mode()
    def step_batch(
        self, tokens: Sequence[Sequence[int]], audio_features: Any, cache: Any, rows: Sequence[int] | None = None
    ) -> tuple[np.ndarray, Any]:
        if cache is None:  # a new batch, every row
            logits, hf_cache = self._decode(tokens, audio_features, None)
            return logits, BatchCache(tuple(range(len(tokens))), audio_features, hf_cache)
        rows = cache.rows if rows is None else tuple(rows)
        features, hf_cache = cache.features, cache.cache
        if rows != cache.rows:  # rows that ended leave the cache: later calls compute only the others
            keep = torch.tensor([cache.rows.index(r) for r in rows], device=self.device)
            hf_cache.batch_select_indices(keep)
            features = features[keep]
        logits, hf_cache = self._decode([t[-1:] for t in tokens], features, hf_cache)
        return logits, BatchCache(rows, features, hf_cache)

    def _decode(self, new: Sequence[Sequence[int]], features: torch.Tensor, cache: Any) -> tuple[np.ndarray, Any]:
        """The last position's logits [rows, n_vocab] after feeding `new` (one list per row), and HF's cache."""
        from transformers.modeling_outputs import BaseModelOutput

        out = self.model(
            decoder_input_ids=torch.tensor([list(t) for t in new], device=self.device),
            encoder_outputs=BaseModelOutput(last_hidden_state=features),
            cache=cache,
            use_cache=True,
        )
        return out.logits[:, -1].cpu().numpy(), out.cache


IMPLEMENTATION = Implementation(convert=convert, runner=TransformersRunner)
