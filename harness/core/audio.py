"""Audio in, log-mel out: the one front end every model shares.

soundfile + soxr decode and resample (no FFmpeg); openai-whisper's own `log_mel_spectrogram`
makes the features, so every model sees exactly the reference's input.
"""

from __future__ import annotations

import io

import numpy as np

SAMPLE_RATE = 16_000  # what Whisper's front end expects
N_FRAMES = 3000  # 30 s of 10 ms mel frames: Whisper always sees one padded/trimmed window


def decode_audio(source: str | io.BytesIO) -> np.ndarray:
    """Any file soundfile reads (FLAC, WAV, OGG, MP3) → 16 kHz mono float32."""
    import soundfile
    import soxr

    audio, rate = soundfile.read(source, dtype="float32", always_2d=True)
    audio = audio.mean(axis=1)
    if rate != SAMPLE_RATE:
        audio = soxr.resample(audio, rate, SAMPLE_RATE, quality="VHQ")
    if audio.size == 0:
        raise ValueError("no samples")
    return np.ascontiguousarray(audio, dtype=np.float32)


def log_mel(audio: np.ndarray, n_mels: int) -> np.ndarray:
    """openai-whisper's front end on one 30 s window: float32 [1, n_mels, N_FRAMES]."""
    import torch
    import whisper

    mel = whisper.log_mel_spectrogram(whisper.pad_or_trim(torch.from_numpy(audio)), n_mels)
    return mel.numpy()[None]
