"""Speech to text as the OpenAI API serves it: `POST /v1/audio/transcriptions`.

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY or anything")
    client.audio.transcriptions.create(model="whisper-1", file=open("talk.wav", "rb"))
    client.audio.transcriptions.create(model="whisper-1", file=open("talk.wav", "rb"),
                                       response_format="verbose_json")  # duration, language, segments

A multipart upload: `file` (WAV, FLAC, OGG, MP3 where libsndfile reads it), `model` (any name:
the server has one speech model), `response_format` json | text | srt | verbose_json | vtt,
`language` (only "en": the default model, tiny.en, is English only), `timestamp_granularities[]`
("segment"; "word" is refused), `temperature` and `prompt` (accepted and ignored: decoding is
greedy and unprompted, so a transcript is reproducible). verbose_json's segments carry start, end,
text and tokens as OpenAI's do; avg_logprob and no_speech_prob are null (not computed).

The model is loaded once at start (`polymodal serve --asr`); requests queue on their own bounded
batcher (503 with Retry-After when full), and clips of at most 30 s that arrive together share
one encoder pass and one batched greedy decode (equal to one at a time: each clip is padded to
the 30 s window either way). Longer recordings run alone, streamed window by window.
"""

from __future__ import annotations

import os
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse
from starlette.datastructures import UploadFile

from polymodal.processing.audio import AUDIO_SUFFIXES, N_SAMPLES, SAMPLE_RATE, AudioError
from polymodal.serve.batching import Batcher
from polymodal.serve.errors import APIError

router = APIRouter(prefix="/v1", tags=["audio"])

FORMATS = ("json", "text", "srt", "verbose_json", "vtt")
LANGUAGES = {"en": "english", "english": "english"}


@dataclass
class TranscribeJob:
    path: str  # the upload, spooled to a temporary file
    name: str  # the upload's own file name, for error messages
    timestamps: bool


class Speech:
    """An `ASR` behind its own bounded batcher."""

    def __init__(self, asr, *, name: str = "whisper-tiny.en", max_batch: int = 8, max_wait_ms: float = 5.0,
                 capacity: int = 16):
        self.asr, self.name = asr, name
        self.batcher = Batcher(self._run, name="transcription", max_batch=max_batch, max_wait=max_wait_ms / 1000,
                               capacity=capacity, key=lambda job: job.timestamps)

    def close(self) -> None:
        self.batcher.close()

    async def transcribe(self, job: TranscribeJob) -> dict:
        return await self.batcher.submit(job)

    # --- the worker thread ---------------------------------------------------------------------

    def _run(self, jobs: list[TranscribeJob]) -> list:
        from polymodal.processing.audio import audio_info, load_audio
        from polymodal.tasks.asr import SILENCE_DBFS, dbfs, segments_of

        asr, out, short = self.asr, [None] * len(jobs), []
        for i, job in enumerate(jobs):
            try:
                if audio_info(job.path)["seconds"] > N_SAMPLES / SAMPLE_RATE:
                    r = asr.transcribe(job.path, timestamps=True)  # streamed in 30 s windows
                    for s in r["segments"]:
                        s["tokens"] = asr.tokenizer.encode(" " + s["text"], add_special_tokens=False).ids
                    out[i] = r
                    continue
                audio = load_audio(job.path)
                if dbfs(audio) <= SILENCE_DBFS:
                    raise AudioError(f"{job.path}: silent (below {SILENCE_DBFS:.0f} dBFS): nothing to transcribe")
                short.append((i, audio))
            except AudioError as e:
                out[i] = AudioError(str(e).replace(job.path, job.name))
        if short:
            results = asr._short([a for _, a in short], jobs[short[0][0]].timestamps, 1, asr.audio_ctx)
            for (i, _), r in zip(short, results, strict=True):
                tokens = r.pop("tokens")
                if jobs[i].timestamps:  # the text tokens of each segment, as OpenAI's verbose_json gives them
                    segs, _, _ = segments_of(tokens, asr.cfg, r["seconds"])
                    for s, (_, _, t) in zip(r["segments"], segs, strict=True):
                        s["tokens"] = list(t)
                else:
                    for s in r["segments"]:
                        s["tokens"] = [t for t in tokens if t < asr.cfg.eos_token_id]
                out[i] = r
        return out


# --- the endpoint ------------------------------------------------------------------------------------


def _field(form, name: str, default: str | None = None) -> str | None:
    value = form.get(name)
    if value is None:
        return default
    if isinstance(value, UploadFile):
        raise APIError(422, f"{name}: expected a form field, got a file", param=name)
    return value.strip()


def _stamp(seconds: float, sep: str) -> str:
    ms = int(round(seconds * 1000))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def srt(segments: list[dict]) -> str:
    return "".join(f"{i}\n{_stamp(s['start'], ',')} --> {_stamp(s['end'], ',')}\n{s['text']}\n\n"
                   for i, s in enumerate(segments, 1))


def vtt(segments: list[dict]) -> str:
    return "WEBVTT\n\n" + "".join(f"{_stamp(s['start'], '.')} --> {_stamp(s['end'], '.')}\n{s['text']}\n\n"
                                  for s in segments)


def _compression_ratio(text: str) -> float:
    data = text.encode("utf-8")
    return round(len(data) / len(zlib.compress(data)), 4) if data else 0.0


def verbose(result: dict, language: str) -> dict:
    segments = [{"id": i, "seek": int(s["start"] * SAMPLE_RATE / 160) // 3000 * 3000, "start": s["start"],
                 "end": s["end"], "text": " " + s["text"], "tokens": s.get("tokens", []), "temperature": 0.0,
                 "avg_logprob": None, "compression_ratio": _compression_ratio(s["text"]), "no_speech_prob": None}
                for i, s in enumerate(result["segments"])]
    return {"task": "transcribe", "language": language, "duration": result["seconds"], "text": result["text"],
            "segments": segments, "usage": {"type": "duration", "seconds": int(-(-result["seconds"] // 1))}}


@router.post("/audio/transcriptions")
async def transcriptions(request: Request):
    speech: Speech | None = getattr(request.app.state.services, "speech", None)
    if speech is None:
        raise APIError(404, "this server has no speech model loaded (start it with --asr, or --asr PATH)")
    try:
        form = await request.form()
    except Exception as e:  # not multipart, or a broken one
        raise APIError(400, f"the body must be multipart/form-data with a 'file' part ({e})") from None
    try:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise APIError(422, "file: required: upload the audio as the multipart part 'file'", param="file")
        fmt = _field(form, "response_format", "json")
        if fmt not in FORMATS:
            raise APIError(422, f"response_format: {fmt!r} is not one of {', '.join(FORMATS)}",
                           param="response_format")
        language = _field(form, "language") or "en"
        if language.lower() not in LANGUAGES:
            raise APIError(422, f"language: {language!r}: this server's speech model ({speech.name}) transcribes "
                           "English only: give 'en' or leave it out", param="language")
        for g in form.getlist("timestamp_granularities[]") + form.getlist("timestamp_granularities"):
            if g != "segment":
                raise APIError(422, f"timestamp_granularities: {g!r}: only 'segment' timestamps are given",
                               param="timestamp_granularities")
        temperature = _field(form, "temperature")
        if temperature is not None:
            try:
                float(temperature)
            except ValueError:
                raise APIError(422, f"temperature: {temperature!r} is not a number", param="temperature") from None
        name = Path(upload.filename or "upload").name
        suffix = Path(name).suffix.lower()
        data = await upload.read()
        if not data:
            raise APIError(400, f"file: {name}: empty file (0 bytes)", param="file")
        fd, path = tempfile.mkstemp(suffix=suffix if suffix in AUDIO_SUFFIXES else ".audio",
                                    prefix="polymodal-upload-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            job = TranscribeJob(path=path, name=name, timestamps=fmt in ("srt", "vtt", "verbose_json"))
            try:
                result = await speech.transcribe(job)
            except AudioError as e:
                raise APIError(400, f"file: {e}", param="file") from None
        finally:
            os.unlink(path)
    finally:
        await form.close()
    if fmt == "json":
        return {"text": result["text"],
                "usage": {"type": "duration", "seconds": int(-(-result["seconds"] // 1))}}
    if fmt == "text":
        return PlainTextResponse(result["text"])
    if fmt == "srt":
        return PlainTextResponse(srt(result["segments"]))
    if fmt == "vtt":
        return PlainTextResponse(vtt(result["segments"]), media_type="text/vtt")
    return verbose(result, LANGUAGES[language.lower()])
