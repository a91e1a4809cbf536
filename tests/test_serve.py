"""The HTTP service on a tiny random CLIP, a 13-image collection built by polymodal.index and a
tiny random BLIP-2: every endpoint's answers equal the library's, bad input gets 422 with the
reason, 413 over the size cap, 401 without the key, 503 + Retry-After over capacity, and
concurrent requests are batched (and still get their own answers)."""

import asyncio
import base64
import json
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from fastapi.testclient import TestClient  # noqa: E402
from tests.serve_helpers import LiveServer, build_collection, data_uri, image_folder, tiny_clip  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

import polymodal  # noqa: E402
from polymodal.cli import app as cli_app  # noqa: E402
from polymodal.index import Collection  # noqa: E402
from polymodal.serve import Batcher, Overloaded, ServeConfig, Services, create_app  # noqa: E402


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    model_dir = tiny_clip(root / "clip")
    images = image_folder(root / "images")
    db = build_collection(images, root / "db", model_dir)
    return {"root": root, "model": model_dir, "images": images, "db": db}


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    from tests.test_vlm import checkpoint

    _, _, d = checkpoint("opt", str(tmp_path_factory.mktemp("vlm")))
    return polymodal.load_vlm(d)


@pytest.fixture(scope="module")
def coll(world):
    return Collection.open(world["db"], model=str(world["model"]), readonly=True)


@pytest.fixture(scope="module")
def services(coll, vlm):
    s = Services(ServeConfig(max_body_bytes=1 << 20), collection=coll, vlm=vlm, vlm_name="tiny-blip2")
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(services):
    return TestClient(create_app(services))


def error_of(r, status):
    assert r.status_code == status, (r.status_code, r.text)
    message = r.json()["error"]["message"]
    assert "\n" not in message
    return message


# --- health and embeddings -------------------------------------------------------------------------


def test_health(client, coll):
    doc = client.get("/health").json()
    assert doc["status"] == "ok" and doc["collection"]["images"] == len(coll) == 13
    assert doc["dim"] == coll.dim and doc["vlm"] == "tiny-blip2"


def test_embeddings_equal_the_library(client, coll, world):
    texts = ["a red square", "a blue circle", "x"]
    image = world["images"] / "green-1.png"
    r = client.post("/v1/embeddings", json={"input": texts + [data_uri(image)], "model": "m"})
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["object"] == "list" and doc["model"] == "m"
    assert [d["index"] for d in doc["data"]] == [0, 1, 2, 3]
    got = np.array([d["embedding"] for d in doc["data"]], np.float32)
    want = np.concatenate([coll.embedder.encode_text(texts), coll.embedder.encode_image([image])])
    assert np.abs(got - want).max() <= 1e-5
    assert doc["usage"]["prompt_tokens"] == sum(len(coll.embedder.tokenizer.encode(t)) for t in texts) > 0
    # one string, base64 (what the openai client asks for by default): little-endian float32
    doc = client.post("/v1/embeddings", json={"input": "a red square", "encoding_format": "base64"}).json()
    vec = np.frombuffer(base64.b64decode(doc["data"][0]["embedding"]), "<f4")
    assert np.abs(vec - want[0]).max() <= 1e-5


@pytest.mark.parametrize("body, where", [
    ({"input": ["a cat", "  "]}, "input[1]: empty text"),
    ({"input": []}, "input: empty list"),
    ({"inpt": "a cat"}, "input: Field required"),
    ({"input": [[1, 2, 3]]}, "token arrays are not supported"),
    ({"input": ["a", "data:image/png;base64,aGVsbG8="]}, "input[1]: not an image"),
    ({"input": ["data:image/png;base64,@@@"]}, "input[0]: the data URI's base64 payload is invalid"),
    ({"input": ["data:text/plain;base64,aGVsbG8="]}, "input[0]: a data URI of text/plain"),
    ({"input": "a", "dimensions": 3}, "dimensions: this model's embeddings have 16"),
    ({"input": "a", "encoding_format": "int8"}, "encoding_format"),
])
def test_embeddings_refuse_bad_input_with_the_reason(client, body, where):
    assert where in error_of(client.post("/v1/embeddings", json=body), 422)


def test_malformed_json_and_image_urls_are_422(client):
    r = client.post("/v1/embeddings", content=b'{"input": ["a"', headers={"Content-Type": "application/json"})
    assert "not valid JSON" in error_of(r, 422)
    # an http URL is not text to embed: it is refused unless the server allows URLs
    message = error_of(client.post("/v1/search", json={"image": "http://127.0.0.1:9/cat.png"}), 422)
    assert "URLs are off" in message


def test_size_cap_is_413(client):
    big = "a" * (1 << 20)
    assert "cap of 1048576 bytes" in error_of(client.post("/v1/embeddings", json={"input": big}), 413)

    def chunks():  # no Content-Length: the cap is counted while reading
        for _ in range(20):
            yield b"x" * 65536

    r = client.post("/v1/embeddings", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413


def test_api_key(coll):
    s = Services(ServeConfig(api_key="sekret"), collection=coll)
    try:
        c = TestClient(create_app(s))
        assert c.get("/health").status_code == 200  # open, like the page itself
        assert c.get("/").status_code == 200
        assert "API key" in error_of(c.post("/v1/embeddings", json={"input": "a"}), 401)
        r = c.post("/v1/embeddings", json={"input": "a"}, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert c.get("/images/1?size=32").status_code == 401
        ok = c.post("/v1/embeddings", json={"input": "a"}, headers={"Authorization": "Bearer sekret"})
        assert ok.status_code == 200
        assert c.get("/images/1?size=32", cookies={"polymodal_key": "sekret"}).status_code == 200
    finally:
        s.close()


# --- search, classify, caption, images ---------------------------------------------------------------


def test_search_equals_the_collection(client, coll, world):
    doc = client.post("/v1/search", json={"query": "a red shape", "k": 5}).json()
    want = coll.search_text("a red shape", k=5)
    assert [h["id"] for h in doc["data"]] == [h.id for h in want]
    assert np.allclose([h["score"] for h in doc["data"]], [h.score for h in want], atol=1e-5)
    assert doc["total"] == 13 and doc["data"][0]["thumbnail"] == f"/images/{want[0].id}?size=256"
    # an image finds itself first
    image = world["images"] / "blue-2.png"
    doc = client.post("/v1/search", json={"image": data_uri(image), "k": 3}).json()
    assert doc["data"][0]["path"] == str(image) and doc["data"][0]["score"] > 0.9999
    # a vector is used as given (after normalising)
    vec = coll.embedder.encode_image([image])[0] * 3
    doc = client.post("/v1/search", json={"vector": vec.tolist(), "k": 1}).json()
    assert doc["data"][0]["path"] == str(image)


@pytest.mark.parametrize("body, where", [
    ({"query": "a", "image": "data:image/png;base64,AA=="}, "exactly one of query"),
    ({}, "exactly one of query"),
    ({"vector": [1.0, 2.0]}, "vector: 2 numbers, the collection's vectors have 16"),
    ({"vector": [0.0] * 16}, "not all zero"),
    ({"query": "a", "k": 0}, "k: Input should be greater than or equal to 1"),
    ({"query": ""}, "query: empty text"),
])
def test_search_refuses_bad_input(client, body, where):
    assert where in error_of(client.post("/v1/search", json=body), 422)


def test_classify_equals_the_library(client, coll, world):
    image = world["images"] / "yellow-0.png"
    labels = ["red", "green", "blue", "yellow"]
    doc = client.post("/v1/classify", json={"image": data_uri(image), "labels": labels}).json()
    want = coll.embedder.classify([image], labels)[0]
    assert [d["label"] for d in doc["data"]] == [label for label, _ in want]
    assert np.allclose([d["probability"] for d in doc["data"]], [p for _, p in want], atol=1e-5)
    by_id = client.post("/v1/classify", json={"id": coll.get(str(image)).id, "labels": labels}).json()
    assert [d["label"] for d in by_id["data"]] == [d["label"] for d in doc["data"]]
    assert "template" in error_of(client.post("/v1/classify", json={"id": 1, "labels": ["a"], "template": "x"}), 422)
    assert "labels[1]: empty" in error_of(client.post("/v1/classify", json={"id": 1, "labels": ["a", " "]}), 422)
    assert "no image with id 999" in error_of(client.post("/v1/classify", json={"id": 999, "labels": ["a"]}), 404)


def test_caption_equals_the_library(client, vlm, coll, world):
    image = world["images"] / "red-1.png"
    want = vlm.caption(image, max_new_tokens=8)
    assert want
    doc = client.post("/v1/caption", json={"image": data_uri(image), "max_tokens": 8}).json()
    assert doc["caption"] == want
    item = coll.get(str(image)).id
    first = client.post("/v1/caption", json={"id": item}).json()
    assert first["caption"] == vlm.caption(image) and not first["cached"]
    assert client.post("/v1/caption", json={"id": item}).json()["cached"]
    assert "not an image" in error_of(client.post("/v1/caption", json={"image": data_uri(b"nope")}), 422)


def test_image_metadata_near_duplicates_and_thumbnails(client, coll, world):
    from PIL import Image

    red0 = coll.get(str(world["images"] / "red-0.png"))
    doc = client.get(f"/v1/images/{red0.id}?threshold=0.99999").json()
    assert [d["name"] for d in doc["near_duplicates"]] == ["copy.png"]
    assert (doc["width"], doc["height"]) == (48, 48)
    r = client.get(f"/images/{red0.id}?size=32")
    assert r.headers["content-type"] == "image/png"
    import io

    assert max(Image.open(io.BytesIO(r.content)).size) == 32
    assert client.get(f"/images/{red0.id}").content == (world["images"] / "red-0.png").read_bytes()
    assert client.get("/images/999").status_code == 404
    assert client.get("/v1/images/999").status_code == 404


# --- batching and capacity -----------------------------------------------------------------------------


def post(url, body, headers=None):
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json",
                                                                 **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


def test_concurrent_requests_are_batched_and_answered_alone(coll):
    s = Services(ServeConfig(max_wait_ms=50), collection=coll)
    texts = [f"a picture number {i}" for i in range(24)]
    want = coll.embedder.encode_text(texts)
    try:
        with LiveServer(create_app(s)) as live, ThreadPoolExecutor(24) as pool:
            answers = list(pool.map(lambda t: post(live.url + "/v1/embeddings", {"input": t}), texts))
        assert all(status == 200 for status, _, _ in answers)
        got = np.array([doc["data"][0]["embedding"] for _, _, doc in answers], np.float32)
        assert np.abs(got - want).max() <= 1e-5  # each request got its own text's vector
        stats = s.embed_batcher.stats
        assert stats.items == 24 and stats.largest > 1 and stats.batches < 24
    finally:
        s.close()


def test_captions_batched_equal_one_at_a_time(coll, vlm, world):
    s = Services(ServeConfig(max_wait_ms=100), collection=coll, vlm=vlm)
    images = sorted(world["images"].glob("*.png"))[:6]
    want = [vlm.caption(p, max_new_tokens=6) for p in images]
    try:
        with LiveServer(create_app(s)) as live, ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda p: post(live.url + "/v1/caption",
                                                   {"image": data_uri(p), "max_tokens": 6}), images))
        assert [doc["caption"] for _, _, doc in answers] == want
        assert s.vlm_batcher.stats.largest > 1
    finally:
        s.close()


def test_over_capacity_is_503_with_retry_after(coll):
    s = Services(ServeConfig(queue_size=2), collection=coll)
    gate, model = threading.Event(), s.embed_batcher.fn
    s.embed_batcher.fn = lambda items: (gate.wait(30), model(items))[1]  # hold the model busy
    try:
        with LiveServer(create_app(s)) as live, ThreadPoolExecutor(2) as pool:
            held = [pool.submit(post, live.url + "/v1/embeddings", {"input": f"text {i}"}) for i in range(2)]
            for _ in range(3000):  # both requests are in (one running, one waiting), at most 30 s
                if s.embed_batcher.pending == 2:
                    break
                threading.Event().wait(0.01)
            assert s.embed_batcher.pending == 2
            status, headers, doc = post(live.url + "/v1/embeddings", {"input": "one more"})
            assert status == 503 and int(headers["retry-after"]) >= 1
            assert "queue is full" in doc["error"]["message"]
            gate.set()
            assert [f.result()[0] for f in held] == [200, 200]
            assert post(live.url + "/v1/embeddings", {"input": "now there is room"})[0] == 200
            # the queue counts requests: one with more inputs than its capacity still fits
            status, _, doc = post(live.url + "/v1/embeddings", {"input": [f"t{i}" for i in range(10)]})
            assert status == 200 and len(doc["data"]) == 10
    finally:
        gate.set()
        s.close()


def test_batcher_keys_errors_and_capacity():
    seen = []

    def fn(items):
        seen.append(list(items))
        return [ValueError(f"bad {x}") if x < 0 else x * 10 for x in items]

    b = Batcher(fn, max_batch=8, max_wait=0.05, capacity=16, key=lambda x: x % 2)

    async def go():
        futures = [b.submit(x) for x in (1, 2, 3, 4, -1)]
        return await asyncio.gather(*futures, return_exceptions=True)

    out = asyncio.run(go())
    assert out[:4] == [10, 20, 30, 40] and isinstance(out[4], ValueError)
    assert all(len({x % 2 for x in batch}) == 1 for batch in seen)  # odd and even never share a call
    gate = threading.Event()
    slow = Batcher(lambda items: (gate.wait(10), items)[1], capacity=1)

    async def full():
        first = slow.submit(1)
        with pytest.raises(Overloaded):
            slow.submit(2)
        gate.set()
        return await first

    assert asyncio.run(full()) == 1
    b.close()
    slow.close()


def test_cli_serve_needs_a_collection_that_exists(tmp_path):
    r = CliRunner().invoke(cli_app, ["serve", "--db", str(tmp_path / "nothing"), "--port", "0"])
    assert r.exit_code == 2 and "not a polymodal collection" in r.stderr


def test_image_urls_only_when_allowed(coll, world):
    import functools
    import http.server

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(world["images"]))
    handler.log_message = lambda *a: None
    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{files.server_address[1]}"
    s = Services(ServeConfig(allow_urls=True), collection=coll)
    try:
        c = TestClient(create_app(s))
        doc = c.post("/v1/embeddings", json={"input": [url + "/blue-1.png", "a blue circle"]}).json()
        want = coll.embedder.encode_image([world["images"] / "blue-1.png"])[0]
        assert np.abs(np.array(doc["data"][0]["embedding"]) - want).max() <= 1e-5
        assert "could not fetch" in error_of(c.post("/v1/embeddings", json={"input": url + "/gone.png"}), 422)
    finally:
        s.close()
        files.shutdown()


def test_polymodal_serve_command(world):
    """The command itself: loads the collection's model once, binds loopback, answers, stops."""
    import os
    import subprocess
    import sys

    from tests.serve_helpers import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "polymodal", "serve", "--db", str(world["db"]), "--port",
                             str(port), "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        started = json.loads(proc.stdout.readline())
        assert started["url"] == f"http://127.0.0.1:{port}/" and started["images"] == 13
        for _ in range(300):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    health = json.loads(r.read())
                break
            except OSError:
                threading.Event().wait(0.1)
        assert health["collection"]["images"] == 13
        status, _, doc = post(f"http://127.0.0.1:{port}/v1/search", {"query": "a green shape", "k": 2})
        assert status == 200 and len(doc["data"]) == 2
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_another_face_adds_its_router(coll):
    """Issue 12's audio endpoint will come as a router: it sees the services and the API key."""
    from fastapi import APIRouter, Request

    extra = APIRouter()

    @extra.post("/v1/echo")
    async def echo(request: Request):
        return {"images": len(request.app.state.services.collection)}

    s = Services(ServeConfig(api_key="k"), collection=coll)
    try:
        c = TestClient(create_app(s, routers=[extra]))
        assert c.post("/v1/echo").status_code == 401
        assert c.post("/v1/echo", headers={"Authorization": "Bearer k"}).json() == {"images": 13}
    finally:
        s.close()


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels (and holds none): a decompression bomb's shape."""
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk + struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))


def test_huge_images_and_chat_limits(client, coll):
    bomb = data_uri(_png_claiming(15000, 15000))
    message = error_of(client.post("/v1/embeddings", json={"input": ["a", bomb]}), 422)
    assert message.startswith("input[1]:") and "pixels" in message
    image = data_uri(_png_claiming(1, 1))
    chat = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 1000}
    assert "too long" in error_of(client.post("/v1/chat/completions", json=chat), 422)
    assert "last message must be the user's" in error_of(client.post("/v1/chat/completions", json={
        "messages": [{"role": "assistant", "content": "hi"}]}), 422)
    assert "messages[0].role" in error_of(client.post("/v1/chat/completions", json={
        "messages": [{"role": "robot", "content": "hi"}]}), 422)
    assert "stop sequences" in error_of(client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}], "stop": ["x"]}), 422)
    s = Services(ServeConfig(), collection=coll)  # no VLM
    try:
        c = TestClient(create_app(s))
        body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                                          {"type": "text", "text": "what"}]}]}
        assert "--vlm" in error_of(c.post("/v1/chat/completions", json=body), 404)
        assert "--vlm" in error_of(c.post("/v1/caption", json={"id": 1}), 404)
    finally:
        s.close()


def test_only_blip2_is_served_as_the_vlm(coll):
    from polymodal.tasks.flamingo import FlamingoVLM

    flamingo = FlamingoVLM.__new__(FlamingoVLM)  # the type is what is refused, before any use
    with pytest.raises(ValueError, match="Flamingo"):
        Services(ServeConfig(), collection=coll, vlm=flamingo)
