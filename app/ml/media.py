"""Decoding media bytes: PNG and JPEG images (Pillow), PCM WAV audio (the standard
library's `wave`), and the log-mel spectrogram (`torch.stft`).

The same functions serve ingest (which refuses what they cannot decode), training and
predict, so a file that was accepted decodes the same way everywhere. Every step is
deterministic on CPU: fixed resampling, fixed window, fixed filter bank.
"""

from __future__ import annotations

import io
import math
import wave
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

IMAGE_FORMATS = ("PNG", "JPEG")


class MediaError(ValueError):
    """A file that is not what its column says (the message says why)."""


@dataclass(frozen=True)
class MediaLimits:
    max_file_bytes: int = 16 * 2**20
    max_image_pixels: int = 4096 * 4096
    max_audio_seconds: float = 60.0


def open_image(data: bytes, limits: MediaLimits = MediaLimits()) -> Image.Image:
    """The decoded image, after its header has been checked against the limits."""
    if len(data) > limits.max_file_bytes:
        raise MediaError(f"{len(data)} bytes, more than the {limits.max_file_bytes} allowed")
    try:
        im = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise MediaError("not a PNG or JPEG image") from exc
    if im.format not in IMAGE_FORMATS:
        raise MediaError(f"image format {im.format}, expected PNG or JPEG")
    w, h = im.size
    if w * h > limits.max_image_pixels or w <= 0 or h <= 0:
        raise MediaError(
            f"image of {w}x{h} pixels, more than the {limits.max_image_pixels} allowed"
        )
    try:
        im.load()
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise MediaError(f"the image does not decode: {exc}") from exc
    return im


def image_array(
    data: bytes, size: int, channels: int, limits: MediaLimits = MediaLimits()
) -> np.ndarray:
    """(channels, size, size) float32 in [0, 1]: grey (1) or RGB (3), resized bilinearly."""
    im = open_image(data, limits).convert("L" if channels == 1 else "RGB")
    im = im.resize((size, size), Image.Resampling.BILINEAR)
    arr = np.asarray(im, dtype=np.float32) / 255.0
    if channels == 1:
        return arr[None, :, :]
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def read_wav(data: bytes, limits: MediaLimits = MediaLimits()) -> tuple[np.ndarray, int]:
    """(mono float32 samples in [-1, 1], sample rate) of a 16-bit PCM WAV file."""
    if len(data) > limits.max_file_bytes:
        raise MediaError(f"{len(data)} bytes, more than the {limits.max_file_bytes} allowed")
    try:
        with wave.open(io.BytesIO(data), "rb") as wf:
            width = wf.getsampwidth()
            channels = wf.getnchannels()
            rate = wf.getframerate()
            n = wf.getnframes()
            if width != 2:
                raise MediaError(f"sample width of {width * 8} bits, expected 16-bit PCM")
            if rate <= 0 or channels <= 0:
                raise MediaError("a WAV header without channels or sample rate")
            # Streamed WAVs (espeak-ng --stdout) declare a huge frame count: the length
            # is what the file holds, bounded by its size.
            raw = wf.readframes(min(n, len(data) // max(1, width * channels)))
    except MediaError:
        raise
    except (wave.Error, EOFError, OSError, ValueError) as exc:
        raise MediaError(f"not a PCM WAV file: {exc}") from exc
    seconds = len(raw) / (width * channels * rate)
    if seconds > limits.max_audio_seconds:
        raise MediaError(
            f"{seconds:.1f} s of audio, more than the {limits.max_audio_seconds:g} s allowed"
        )
    samples = np.frombuffer(raw[: len(raw) - len(raw) % (2 * channels)], dtype="<i2")
    x = samples.reshape(-1, channels).astype(np.float32).mean(axis=1) / 32768.0
    return np.ascontiguousarray(x, dtype=np.float32), rate


def resample(x: np.ndarray, rate: int, target: int) -> np.ndarray:
    """Linear interpolation onto the target rate's grid (deterministic, no filter)."""
    if rate == target or len(x) == 0:
        return x
    n = math.floor(len(x) * target / rate)
    t = np.arange(n, dtype=np.float64) * (rate / target)
    return np.interp(t, np.arange(len(x), dtype=np.float64), x.astype(np.float64)).astype(
        np.float32
    )


@lru_cache(maxsize=16)
def mel_filters(n_mels: int, n_fft: int, sample_rate: int) -> torch.Tensor:
    """Triangular mel filter bank (n_mels, n_fft // 2 + 1), HTK mel scale."""

    def mel(f: np.ndarray) -> np.ndarray:
        return 2595.0 * np.log10(1.0 + f / 700.0)

    def hz(m: np.ndarray) -> np.ndarray:
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)

    n_freqs = n_fft // 2 + 1
    freqs = np.linspace(0.0, sample_rate / 2, n_freqs)
    points = hz(np.linspace(mel(np.array(0.0)), mel(np.array(sample_rate / 2)), n_mels + 2))
    fb = np.zeros((n_mels, n_freqs), dtype=np.float64)
    for i in range(n_mels):
        lo, mid, hi = points[i], points[i + 1], points[i + 2]
        up = (freqs - lo) / max(mid - lo, 1e-9)
        down = (hi - freqs) / max(hi - mid, 1e-9)
        fb[i] = np.maximum(0.0, np.minimum(up, down))
    return torch.from_numpy(fb.astype(np.float32))


def frames(sample_rate: int, seconds: float, hop: int) -> int:
    return round(sample_rate * seconds) // hop + 1


def log_mel(
    data: bytes,
    *,
    sample_rate: int,
    seconds: float,
    n_mels: int,
    n_fft: int,
    hop: int,
    limits: MediaLimits = MediaLimits(),
) -> np.ndarray:
    """(n_mels, frames) float32 log-mel spectrogram of a WAV file, resampled to
    `sample_rate` and cut or zero-padded to `seconds`."""
    x, rate = read_wav(data, limits)
    x = resample(x, rate, sample_rate)
    n = round(sample_rate * seconds)
    fixed = np.zeros(n, dtype=np.float32)
    fixed[: min(n, len(x))] = x[:n]
    spec = torch.stft(
        torch.from_numpy(fixed),
        n_fft=n_fft,
        hop_length=hop,
        window=torch.hann_window(n_fft),
        center=True,
        return_complex=True,
    )
    power = spec.abs() ** 2
    mel_power = mel_filters(n_mels, n_fft, sample_rate) @ power
    return torch.log(mel_power + 1e-6).numpy().astype(np.float32)
