"""Parity of a converted artifact against PyTorch on fixed real inputs, and the gate on it.

The input is one real LibriSpeech train-clean-100 utterance shipped in `parity_audio/` (never an
evaluation utterance). Numbers: encoder output SNR and max abs error; logits of the first decoder
steps (prompt, then the reference's own next tokens, teacher-forced) as max abs error and top-1
agreement. The tolerances are each target's own (`Target.tolerances`, with their reasons).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from harness.core.audio import decode_audio, log_mel
from harness.core.decoding import Dims, Prompt
from harness.core.target import Runner, Tolerance

PARITY_AUDIO = Path(__file__).parent / "parity_audio" / "19-198-0001.flac"
TEACHER_FORCED_STEPS = 8


def snr_db(reference: np.ndarray, other: np.ndarray) -> float:
    noise = float(np.sum((reference.astype(np.float64) - other) ** 2))
    signal = float(np.sum(reference.astype(np.float64) ** 2))
    return float("inf") if noise == 0 else 10 * np.log10(signal / noise)


def measure(reference: Runner, runner: Runner, dims: Dims, prompt: Prompt) -> dict[str, Any]:
    """Compare `runner` with the reference runner step by step, at the audio context of `dims`
    (the reference slices its encoder to it; the runner was built for it)."""
    mel = log_mel(decode_audio(str(PARITY_AUDIO)), dims.n_mels, dims.n_audio_ctx)
    ref_features = reference.encode(mel)
    features = runner.encode(mel)
    ref_enc, enc = np.asarray(ref_features, dtype=np.float32), np.asarray(features, dtype=np.float32)
    tokens = list(prompt.tokens)
    ref_cache = cache = None
    errs, agree = [], []
    for _ in range(TEACHER_FORCED_STEPS):
        ref_logits, ref_cache = reference.step(tokens, ref_features, ref_cache)
        logits, cache = runner.step(tokens, features, cache)
        errs.append(float(np.max(np.abs(ref_logits - logits))))
        agree.append(int(np.argmax(ref_logits)) == int(np.argmax(logits)))
        tokens.append(int(np.argmax(ref_logits)))  # teacher-forced on the reference's choice
    return {
        "input": PARITY_AUDIO.name,
        "encoder_snr_db": round(snr_db(ref_enc, enc), 2),
        "encoder_max_abs_err": float(np.max(np.abs(ref_enc - enc))),
        "logits_max_abs_err": max(errs),
        "top1_agreement": sum(agree) / len(agree),
        "steps": TEACHER_FORCED_STEPS,
    }


def gate(tol: Tolerance, numbers: dict[str, Any]) -> list[str]:
    """The tolerances `numbers` break (empty: the artifact passes)."""
    failures = []
    # written as "not within", so a NaN (an artifact computing NaN anywhere) fails every check
    if not numbers["encoder_snr_db"] >= tol.min_encoder_snr_db:
        failures.append(f"encoder SNR {numbers['encoder_snr_db']} dB < {tol.min_encoder_snr_db}")
    if not numbers["logits_max_abs_err"] <= tol.max_logit_abs_err:
        failures.append(f"logits max abs err {numbers['logits_max_abs_err']:.3g} > {tol.max_logit_abs_err}")
    if not numbers["top1_agreement"] >= tol.min_top1_agreement:
        failures.append(f"top-1 agreement {numbers['top1_agreement']:.2f} < {tol.min_top1_agreement}")
    return failures
