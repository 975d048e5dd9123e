"""Whisper's 30 s window in numbers: sample rate, mel frames, and the encoder's audio context.

Integers only (no numpy): a job's audio context is checked, and a manifest's shapes are written,
without loading any numerics. The front end itself is `harness.core.audio`.
"""

from __future__ import annotations

SAMPLE_RATE = 16_000  # what Whisper's front end expects
HOP_LENGTH = 160  # samples per 10 ms mel frame
N_FFT = 400  # samples each frame's STFT sees, centred on the frame
N_FRAMES = 3000  # 30 s of 10 ms mel frames: Whisper always sees one padded/trimmed window
N_SAMPLES = N_FRAMES * HOP_LENGTH  # one window of audio: longer audio needs long-form decoding
# Audio positions the encoder sees in one 30 s window: its stride-2 convolution halves the frames.
# A smaller audio context (`decoding.audio_ctx`, whisper.cpp's `-ac`) sees the first 2 x audio_ctx
# frames of the window, the positional embedding sliced to match (`harness.core.weights.with_audio_ctx`).
FULL_AUDIO_CTX = N_FRAMES // 2
FRAMES_PER_POSITION = N_FRAMES // FULL_AUDIO_CTX


def mel_frames(audio_ctx: int) -> int:
    """Mel frames the encoder takes at `audio_ctx` (N_FRAMES at the full 1500)."""
    return audio_ctx * FRAMES_PER_POSITION


def window_samples(audio_ctx: int) -> int:
    """Samples of audio the encoder sees at `audio_ctx` (N_SAMPLES at the full 1500)."""
    return mel_frames(audio_ctx) * HOP_LENGTH
