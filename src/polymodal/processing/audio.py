"""Safe audio loading and Whisper's log-mel spectrogram.

`load_audio` reads WAV, FLAC and OGG (and MP3 where libsndfile reads it) with `soundfile`,
mixes down to mono and resamples to 16 kHz with `soxr`, refusing bad input with a one-line
`AudioError` that names the file: missing, empty, not audio, an unsupported codec, truncated.
`stream_audio` reads a long recording block by block (memory bounded by the window, not the
file) and yields 16 kHz mono windows.

`log_mel` is `transformers.WhisperFeatureExtractor` (Radford et al. 2022, "Robust Speech
Recognition via Large-Scale Weak Supervision", 2.2) in torch: pad or cut to 30 s, a periodic
Hann window of 400 samples every 160 (10 ms), |STFT|^2 without its last frame, 80 Slaney mel
filters up to 8 kHz, log10 clamped at 1e-10, floored 8 below the maximum, then (x + 4) / 4.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

SAMPLE_RATE = 16_000
N_FFT = 400
HOP = 160
N_MELS = 80
CHUNK_SECONDS = 30
N_SAMPLES = CHUNK_SECONDS * SAMPLE_RATE  # 480,000 samples: one encoder window
N_FRAMES = N_SAMPLES // HOP  # 3,000 mel frames
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aiff", ".aif", ".au", ".caf", ".w64",
                  ".m4a", ".aac", ".wma", ".webm", ".amr")  # the last five: listed so they are reported
UNSUPPORTED = {".m4a": "AAC in MP4", ".aac": "AAC", ".wma": "WMA", ".webm": "WebM", ".amr": "AMR"}


class AudioError(ValueError):
    """An input that is not usable audio; the message is one line naming the input."""


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()).rstrip(".") or type(e).__name__


def _open(path: str | os.PathLike):
    """A soundfile.SoundFile, or an AudioError naming the file and what is wrong with it."""
    import soundfile as sf

    name, p = str(path), Path(path)
    if p.is_dir():
        raise AudioError(f"{name}: is a directory, not an audio file")
    if not p.is_file():
        raise AudioError(f"{name}: no such file")
    if p.stat().st_size == 0:
        raise AudioError(f"{name}: empty file (0 bytes)")
    try:
        f = sf.SoundFile(name)
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        if p.suffix.lower() in UNSUPPORTED:
            raise AudioError(f"{name}: unsupported codec ({UNSUPPORTED[p.suffix.lower()]}); convert it to WAV, "
                             "FLAC or OGG first (ffmpeg -i IN OUT.flac)") from None
        reason = _one_line(e).replace(f"Error opening {name!r}: ", "")
        raise AudioError(f"{name}: not audio soundfile can read (WAV, FLAC, OGG, MP3): {reason}") from None
    if f.frames == 0 or f.samplerate <= 0:
        f.close()
        raise AudioError(f"{name}: holds no audio samples")
    return f


def _mono(block: np.ndarray) -> np.ndarray:
    """(frames, channels) -> (frames,) float32, channels averaged."""
    return block.mean(axis=1, dtype=np.float32) if block.ndim == 2 else block.astype(np.float32)


def resample(audio: np.ndarray, rate: int, target: int = SAMPLE_RATE) -> np.ndarray:
    """(N,) float32 at `rate` -> at `target` (soxr, high quality)."""
    if rate == target:
        return np.ascontiguousarray(audio, dtype=np.float32)
    import soxr

    return soxr.resample(audio.astype(np.float32), rate, target, quality="HQ").astype(np.float32)


def audio_info(path: str | os.PathLike) -> dict:
    """Sample rate, channels, duration (s) and format of a file, read from its header."""
    with _open(path) as f:
        return {"sample_rate": f.samplerate, "channels": f.channels, "seconds": f.frames / f.samplerate,
                "format": f.format, "subtype": f.subtype}


def load_audio(path: str | os.PathLike, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """A whole file -> (N,) float32 mono at `sample_rate`, values in [-1, 1]."""
    name = str(path)
    with _open(path) as f:
        try:
            data = f.read(dtype="float32", always_2d=True)  # (frames, channels)
        except Exception as e:  # libsndfile stops on a broken frame
            raise AudioError(f"{name}: cannot be decoded ({_one_line(e)})") from None
        rate = f.samplerate
    if data.shape[0] == 0:
        raise AudioError(f"{name}: holds no audio samples (truncated?)")
    audio = _mono(data)
    if not np.isfinite(audio).all():
        raise AudioError(f"{name}: holds samples that are not finite numbers")
    return resample(audio, rate, sample_rate)


def stream_audio(path: str | os.PathLike, window_seconds: float = CHUNK_SECONDS,
                 sample_rate: int = SAMPLE_RATE) -> Iterator[np.ndarray]:
    """Yields consecutive (window_seconds * sample_rate,) float32 mono windows of a file (the last
    shorter), reading and resampling block by block: a 3-hour recording never sits in memory."""
    import soxr

    name = str(path)
    size = int(window_seconds * sample_rate)
    with _open(path) as f:
        rate = f.samplerate
        stream = soxr.ResampleStream(rate, sample_rate, 1, dtype="float32", quality="HQ") if rate != sample_rate else None
        pending = np.zeros(0, dtype=np.float32)
        block = max(int(window_seconds * rate) // 4, 4096)
        while True:
            try:
                data = f.read(block, dtype="float32", always_2d=True)
            except Exception as e:
                raise AudioError(f"{name}: cannot be decoded ({_one_line(e)})") from None
            last = data.shape[0] < block
            chunk = _mono(data)
            if stream is not None:
                chunk = stream.resample_chunk(chunk, last=last)
            pending = np.concatenate([pending, chunk])
            while pending.shape[0] >= size:
                yield pending[:size]
                pending = pending[size:]
            if last:
                break
        if pending.shape[0]:
            yield pending


def quiet_spans(audio: np.ndarray, min_seconds: float = 20.0, max_seconds: float = CHUNK_SECONDS,
                sample_rate: int = SAMPLE_RATE, silence_dbfs: float = -60.0) -> list[tuple[int, int]]:
    """Cut a waveform into consecutive (start, stop) sample spans of at most max_seconds, each cut
    in the longest quiet stretch between min_seconds and max_seconds from its start (a pause between
    sentences, or between words in continuous speech), so no word is cut in two.

    Quiet: 20 ms frames whose energy (smoothed over 100 ms) is within 2x of the stretch's quietest.
    The cut is 0.3 s before the talk resumes (the middle of a shorter pause): a chunk that opens on
    a long silence gets its first timestamp wrong (Whisper starts at 0.00), and a chunk cut right at
    a sentence's end (the first quiet frame) let tiny.en drop the sentence. Likewise over a second of
    silence (below silence_dbfs) at a span's start becomes a span of its own."""
    frame, smooth = sample_rate // 50, 5  # 20 ms frames, smoothed over 5
    n = audio.shape[0]
    limit = int(max_seconds * sample_rate)
    if n <= limit:
        return [(0, n)]
    usable = n // frame * frame
    energy = np.square(audio[:usable], dtype=np.float64).reshape(-1, frame).mean(1)
    energy = np.convolve(energy, np.ones(smooth) / smooth, mode="same")
    silent = energy < 10 ** (silence_dbfs / 10)  # below silence_dbfs (mean square of full scale 1.0)
    spans, start = [], 0
    while n - start > limit:
        # a span that would open on over a second of silence: the silence is a span of its own (the
        # caller skips it), and the talk's span opens 0.3 s before the talk
        f0 = -(-start // frame)
        ahead = silent[f0:f0 + limit // frame]
        hush = ahead.size if ahead.all() else int(np.argmin(ahead))  # silent frames before the talk
        if hush >= 50:  # a second
            cut = min((f0 + hush - 15) * frame, start + limit)
            spans.append((start, cut))
            start = cut
            continue
        lo = (start + int(min_seconds * sample_rate)) // frame
        hi = max(lo + 1, (start + limit) // frame - smooth)  # the cut's frame must end inside the span
        quiet = energy[lo:hi] <= energy[lo:hi].min() * 2 + 1e-12
        # the longest run of quiet frames: its first index and length
        edges = np.flatnonzero(np.diff(np.concatenate([[0], quiet.astype(np.int8), [0]])))
        runs = edges.reshape(-1, 2)  # (first, one past the last) of each run
        first, end = runs[np.argmax(runs[:, 1] - runs[:, 0])]
        at = max((first + end) // 2, end - 15)  # 15 frames: 0.3 s
        cut = int(min((lo + at) * frame + frame // 2, start + limit))
        spans.append((start, cut))
        start = cut
    spans.append((start, n))
    return spans


def audio_input(src, sample_rate: int = SAMPLE_RATE) -> tuple[str, np.ndarray]:
    """A path or a (N,) array (already mono at `sample_rate`) -> (name, (N,) float32)."""
    if isinstance(src, (str, os.PathLike)):
        return str(src), load_audio(src, sample_rate)
    if isinstance(src, Tensor):
        src = src.detach().cpu().numpy()
    a = np.asarray(src, dtype=np.float32)
    if a.ndim != 1 or a.shape[0] == 0:
        raise AudioError(f"array input: expected a non-empty mono waveform (N,), got shape {a.shape}")
    if not np.isfinite(a).all():
        raise AudioError("array input: holds samples that are not finite numbers")
    return "array", a


# --- the log-mel spectrogram ---------------------------------------------------------


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear below 1 kHz, logarithmic above."""
    f = np.asarray(f, dtype=np.float64)
    return np.where(f < 1000.0, 3.0 * f / 200.0, 15.0 + 27.0 * np.log(np.maximum(f, 1e-10) / 1000.0) / np.log(6.4))


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    return np.where(m < 15.0, 200.0 * m / 3.0, 1000.0 * np.exp(np.log(6.4) * (m - 15.0) / 27.0))


@lru_cache(maxsize=4)
def mel_filters(n_mels: int = N_MELS, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """(n_fft // 2 + 1, n_mels) float64 triangular filters with Slaney's area normalisation
    (librosa's `filters.mel(htk=False, norm="slaney")`, as WhisperFeatureExtractor builds them)."""
    fft_freqs = np.linspace(0, sample_rate // 2, n_fft // 2 + 1)
    mels = np.linspace(_hz_to_mel(0.0), _hz_to_mel(sample_rate / 2), n_mels + 2)
    edges = _mel_to_hz(mels)  # (n_mels + 2,)
    widths = np.diff(edges)
    slopes = edges[None, :] - fft_freqs[:, None]  # (n_freq, n_mels + 2)
    down = -slopes[:, :-2] / widths[:-1]
    up = slopes[:, 2:] / widths[1:]
    filters = np.maximum(0.0, np.minimum(down, up))
    return filters * (2.0 / (edges[2:] - edges[:-2]))[None, :]


def pad_or_trim(audio: Tensor, length: int = N_SAMPLES) -> Tensor:
    """(..., N) -> (..., length): zeros after, or cut."""
    n = audio.shape[-1]
    if n >= length:
        return audio[..., :length]
    return torch.nn.functional.pad(audio, (0, length - n))


def log_mel(audio, n_samples: int | None = N_SAMPLES, n_mels: int = N_MELS) -> Tensor:
    """(N,) or (B, N) 16 kHz waveforms -> (n_mels, frames) or (B, n_mels, frames) float32.

    n_samples pads or cuts first (30 s: 3,000 frames, WhisperFeatureExtractor's default); None keeps
    the length (frames = N // 160). The floor at max - 8 is taken per waveform."""
    a = torch.as_tensor(np.asarray(audio, dtype=np.float32) if not isinstance(audio, Tensor) else audio)
    a = a.float()
    if n_samples is not None:
        a = pad_or_trim(a, n_samples)
    window = torch.hann_window(N_FFT, device=a.device)
    stft = torch.stft(a, N_FFT, HOP, window=window, return_complex=True)  # (..., n_freq, frames + 1)
    power = stft[..., :-1].abs() ** 2  # (..., n_freq, frames)
    filters = torch.from_numpy(mel_filters(n_mels)).to(a.device, torch.float32)  # (n_freq, n_mels)
    mel = filters.T @ power  # (..., n_mels, frames)
    logs = mel.clamp(min=1e-10).log10()
    peak = logs.amax(dim=(-2, -1), keepdim=True)
    logs = torch.maximum(logs, peak - 8.0)
    return (logs + 4.0) / 4.0


def frames_to_seconds(frames: int) -> float:
    return frames * HOP / SAMPLE_RATE


__all__ = ["AUDIO_SUFFIXES", "AudioError", "N_FRAMES", "N_SAMPLES", "SAMPLE_RATE", "audio_info", "audio_input",
           "load_audio", "log_mel", "mel_filters", "pad_or_trim", "resample", "stream_audio"]
