"""Audio in, log-mel out: the one front end every model shares.

soundfile + soxr decode and resample (no FFmpeg); openai-whisper's own `log_mel_spectrogram`
makes the features, so every model sees exactly the reference's input. Long-form audio gets
`whisper.transcribe`'s front end, computed one window at a time (`WindowedMel`).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from harness.core.window import FULL_AUDIO_CTX, HOP_LENGTH, N_FFT, N_FRAMES, N_SAMPLES, SAMPLE_RATE, mel_frames


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


def log_mel(audio: np.ndarray, n_mels: int, audio_ctx: int = FULL_AUDIO_CTX) -> np.ndarray:
    """openai-whisper's front end on one 30 s window: float32 [1, n_mels, N_FRAMES]; at a smaller
    `audio_ctx`, the window's first 2 x audio_ctx frames, as whisper.cpp's `-ac` feeds its encoder
    (the log-mel floor is still the whole window's, as there)."""
    import torch
    import whisper

    mel = whisper.log_mel_spectrogram(whisper.pad_or_trim(torch.from_numpy(audio)), n_mels)
    return np.ascontiguousarray(mel.numpy()[None, :, : mel_frames(audio_ctx)])


@dataclass(frozen=True)
class WindowedMel:
    """`whisper.transcribe`'s front end — the log-mel of the whole file with 30 s of silence
    appended, sliced into windows — computed one window at a time.

    Whisper computes the whole file's STFT at once (about 1.5 GB per hour of audio). Every frame
    depends only on its own N_FFT samples, and the one whole-file quantity, the maximum that
    floors the log-mel at `max - 8`, is found first in a pass over 30 s chunks; so each window is
    bit-identical to whisper's slice (tested) while memory stays that of the audio plus one chunk.
    """

    audio: np.ndarray  # 16 kHz mono float32
    n_mels: int
    floor: float  # the whole padded file's log10 mel maximum, minus 8 (whisper's dynamic range)

    @classmethod
    def of(cls, audio: np.ndarray, n_mels: int) -> WindowedMel:
        n_total = (len(audio) + N_SAMPLES) // HOP_LENGTH  # whisper's frames, the padding's included
        peak = max(
            float(_log10_mel(audio, n_mels, start, min(start + N_FRAMES, n_total)).max())
            for start in range(0, n_total, N_FRAMES)
        )
        import torch

        return cls(audio, n_mels, float(torch.tensor(peak) - 8.0))  # in float32, as whisper subtracts

    @property
    def n_frames(self) -> int:
        """Frames of content, not counting the appended silence (whisper's `content_frames`)."""
        return len(self.audio) // HOP_LENGTH

    def window(self, seek: int, size: int) -> np.ndarray:
        """Frames [seek, seek + size) as the encoder takes them: float32 [1, n_mels, N_FRAMES],
        zero-padded after `size` frames as `whisper.pad_or_trim` pads the slice."""
        import torch

        # always a whole window's frames, then sliced: the matrix product keeps one shape, since
        # a narrow one (a window's last few frames) can round differently from whisper's
        log_spec = _log10_mel(self.audio, self.n_mels, seek, seek + N_FRAMES)[:, :size]
        log_spec = (torch.maximum(log_spec, torch.tensor(self.floor)) + 4.0) / 4.0
        out = np.zeros((1, self.n_mels, N_FRAMES), dtype=np.float32)
        out[0, :, :size] = log_spec.numpy()
        return out


def _log10_mel(audio: np.ndarray, n_mels: int, start: int, stop: int):  # -> torch.Tensor [n_mels, stop - start]
    """log10 mel power of frames [start, stop) of whisper's STFT of `audio` followed by N_SAMPLES
    zeros (centred frames, reflected at the start), before the dynamic-range floor."""
    import torch
    from whisper.audio import mel_filters

    lo, hi = start * HOP_LENGTH - N_FFT // 2, (stop - 1) * HOP_LENGTH + N_FFT // 2
    samples = np.zeros(hi - lo, dtype=np.float32)  # zeros past the audio: whisper's padding
    if lo < 0:  # torch.stft's centring reflects the signal about its first sample
        mirrored = np.arange(-lo, max(-hi, 0), -1)
        inside = mirrored < len(audio)
        samples[: len(mirrored)][inside] = audio[mirrored[inside]]
    first, last = max(lo, 0), min(hi, len(audio))
    if last > first:
        samples[first - lo : last - lo] = audio[first:last]
    window = torch.hann_window(N_FFT)
    stft = torch.stft(torch.from_numpy(samples), N_FFT, HOP_LENGTH, window=window, center=False, return_complex=True)
    mel = mel_filters("cpu", n_mels) @ (stft.abs() ** 2)
    return torch.clamp(mel, min=1e-10).log10()
