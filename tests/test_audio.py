"""Audio loading (formats, channels, rates, bad files) and the log-mel spectrogram against
transformers' WhisperFeatureExtractor."""

import shutil
import subprocess

import numpy as np
import pytest
import soundfile as sf
import torch

from polymodal.processing.audio import (
    N_FRAMES,
    SAMPLE_RATE,
    AudioError,
    load_audio,
    log_mel,
    quiet_spans,
    stream_audio,
)

transformers = pytest.importorskip("transformers")


def tone(seconds, rate, freq=440.0, channels=1, amp=0.5):
    t = np.arange(int(seconds * rate)) / rate
    x = (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return np.stack([x] * channels, 1) if channels > 1 else x


def peak_hz(x, rate=SAMPLE_RATE):
    spec = np.abs(np.fft.rfft(x))
    return np.fft.rfftfreq(x.size, 1 / rate)[spec.argmax()]


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (make test installs it)")
    path = tmp_path_factory.mktemp("speech") / "fox.wav"
    subprocess.run(["espeak-ng", "-w", str(path), "The quick brown fox jumps over the lazy dog."], check=True)
    return path


def test_log_mel_equals_whisper_feature_extractor(speech):
    fe = transformers.WhisperFeatureExtractor()
    rng = np.random.default_rng(0)
    noise = (0.1 * rng.standard_normal(7 * SAMPLE_RATE)).astype(np.float32) + tone(7, SAMPLE_RATE)
    real = load_audio(speech)
    clipped = np.clip(3 * real, -1, 1)
    long = np.tile(real, 15)  # over 30 s: cut to one window
    for x in (noise, real, clipped, long, np.zeros(1000, np.float32)):
        ref = fe(x, sampling_rate=SAMPLE_RATE, return_tensors="np").input_features[0]
        ours = log_mel(x).numpy()
        assert ours.shape == (80, N_FRAMES)
        assert np.abs(ours - ref).max() <= 1e-4
    batch = [noise, real]
    ref = fe(batch, sampling_rate=SAMPLE_RATE, return_tensors="np").input_features
    ours = log_mel(torch.nn.utils.rnn.pad_sequence([torch.from_numpy(b) for b in batch], batch_first=True))
    assert np.abs(ours.numpy() - ref).max() <= 1e-4


@pytest.mark.parametrize("fmt,ext", [("WAV", "wav"), ("FLAC", "flac"), ("OGG", "ogg")])
def test_formats_channels_and_rates(tmp_path, fmt, ext):
    for rate, channels in ((48_000, 2), (8_000, 1), (16_000, 1)):
        path = tmp_path / f"t{rate}.{ext}"
        sf.write(path, tone(1.5, rate, 440.0, channels), rate, format=fmt)
        a = load_audio(path)
        assert a.dtype == np.float32 and a.ndim == 1
        assert abs(a.shape[0] - 1.5 * SAMPLE_RATE) <= 2
        assert abs(peak_hz(a) - 440.0) < 3  # the pitch survives mixing down and resampling


def test_stereo_is_mixed_down(tmp_path):
    left, right = tone(1, SAMPLE_RATE, 300.0), tone(1, SAMPLE_RATE, 700.0)
    sf.write(tmp_path / "s.wav", np.stack([left, right], 1), SAMPLE_RATE)
    np.testing.assert_allclose(load_audio(tmp_path / "s.wav"), (left + right) / 2, atol=1e-4)


def test_stream_matches_whole_file(tmp_path):
    path = tmp_path / "long.wav"
    sf.write(path, tone(70, 8_000, 500.0), 8_000)
    windows = list(stream_audio(path, window_seconds=30))
    assert [w.shape[0] for w in windows[:2]] == [30 * SAMPLE_RATE] * 2
    assert abs(sum(w.shape[0] for w in windows) - 70 * SAMPLE_RATE) <= 4
    whole = load_audio(path)
    joined = np.concatenate(windows)[: whole.shape[0]]
    assert np.abs(joined[1000:-1000] - whole[1000:-1000]).max() < 1e-3


def test_bad_files_get_one_line_naming_them(tmp_path):
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    text = tmp_path / "notes.wav"
    text.write_text("this is not audio at all\n" * 20)
    good = tmp_path / "good.wav"
    sf.write(good, tone(2, SAMPLE_RATE), SAMPLE_RATE)
    truncated = tmp_path / "cut.wav"
    truncated.write_bytes(good.read_bytes()[:40])  # the header alone, cut short
    aac = tmp_path / "voice.m4a"
    aac.write_bytes(b"\0\0\0\x20ftypM4A " + bytes(200))
    for path, words in ((empty, "empty"), (text, "not audio"), (tmp_path / "missing.wav", "no such file"),
                        (tmp_path, "directory"), (truncated, ""), (aac, "unsupported codec")):
        with pytest.raises(AudioError) as e:
            load_audio(path)
        message = str(e.value)
        assert str(path) in message and words in message and "\n" not in message


def test_a_long_recording_streams_in_bounded_memory(tmp_path):
    """20 minutes at 8 kHz: the 16 kHz float32 whole would be 77 MB; streaming holds a window or two."""
    import tracemalloc

    path = tmp_path / "hours.wav"
    with sf.SoundFile(path, "w", 8000, 1, subtype="PCM_16") as f:
        block = tone(60, 8000, 300.0, amp=0.1)
        for _ in range(20):
            f.write(block)
    tracemalloc.start()
    total = 0
    for w in stream_audio(path):
        total += w.shape[0]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert abs(total - 20 * 60 * SAMPLE_RATE) <= 4
    assert peak < 12e6, peak


def test_quiet_spans_cut_in_the_middle_of_pauses():
    """Bursts of noise (speech stand-ins) with pauses of known places: every cut lands inside a pause,
    in the longest one in reach, 0.3 s before the talk resumes, and the spans tile the recording, none
    over 30 s."""
    rng = np.random.default_rng(0)
    sr = 16000
    # talk 0-9 s, pause 9-10, talk 10-21, pause 21-24 (the longest in 20-30 s), talk 24-27, pause 27-27.5,
    # talk 27.5-52, pause 52-53, talk 53-70
    talk = [(0, 9), (10, 21), (24, 27), (27.5, 52), (53, 70)]
    audio = np.zeros(70 * sr, np.float32)
    for a, b in talk:
        audio[int(a * sr):int(b * sr)] = rng.normal(0, 0.1, int(b * sr) - int(a * sr))
    audio += rng.normal(0, 1e-4, audio.shape[0]).astype(np.float32)  # a quiet room, not digital silence
    spans = quiet_spans(audio)
    assert spans[0][0] == 0 and spans[-1][1] == audio.shape[0]
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))  # contiguous
    assert all(0 < b - a <= 30 * sr for a, b in spans)
    cuts = [b / sr for _, b in spans[:-1]]
    assert abs(cuts[0] - 23.7) < 0.1  # near the end of the 3 s pause, not its first quiet frame
    assert 52.5 < cuts[1] < 53  # in the 52-53 s pause: the only quiet between 43.7 and 53.7 s
    assert quiet_spans(audio[:20 * sr]) == [(0, 20 * sr)]
