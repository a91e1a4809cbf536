"""The official `openai` Python client, unchanged, against `polymodal serve` on a loopback port:
embeddings (its default base64 encoding and floats), chat completions about an image (streamed
and not) equal to the library's answers, the client's own typed errors, the API key."""

import numpy as np
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from tests.serve_helpers import LiveServer, data_uri, shape_image, tiny_clip  # noqa: E402

import polymodal  # noqa: E402
from polymodal.serve import ServeConfig, Services, create_app  # noqa: E402

KEY = "test-key"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from tests.test_vlm import checkpoint

    root = tmp_path_factory.mktemp("openai")
    embedder = polymodal.load(tiny_clip(root / "clip"), device="cpu")
    _, _, d = checkpoint("llama", str(root / "vlm"))  # a chat template: the chat-model path
    vlm = polymodal.load_vlm(d)
    s = Services(ServeConfig(api_key=KEY), embedder=embedder, vlm=vlm, model_name="tiny-clip",
                 vlm_name="tiny-blip2")
    image = root / "red.png"
    shape_image("red", 3).save(image)
    with LiveServer(create_app(s)) as live:
        client = openai.OpenAI(base_url=live.url + "/v1", api_key=KEY, max_retries=0)
        yield {"client": client, "embedder": embedder, "vlm": vlm, "image": image, "url": live.url}
    s.close()


def test_models(setup):
    assert sorted(m.id for m in setup["client"].models.list()) == ["tiny-blip2", "tiny-clip"]


def test_embeddings(setup):
    client, embedder = setup["client"], setup["embedder"]
    texts = ["a red circle", "a blue square"]
    for fmt in ({}, {"encoding_format": "float"}):  # the client asks for base64 unless told
        r = client.embeddings.create(model="tiny-clip", input=texts, **fmt)
        got = np.array([d.embedding for d in r.data], np.float32)
        assert np.abs(got - embedder.encode_text(texts)).max() <= 1e-5
        assert r.model == "tiny-clip" and r.usage.prompt_tokens > 0
    r = client.embeddings.create(model="tiny-clip", input=[data_uri(setup["image"])])
    assert np.abs(np.array(r.data[0].embedding) - embedder.encode_image([setup["image"]])[0]).max() <= 1e-5


def messages(image, question):
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(image)}},
                                         {"type": "text", "text": question}]}]


def test_chat_completion_equals_the_library(setup):
    client, vlm, image = setup["client"], setup["vlm"], setup["image"]
    question = "what is in the picture"
    want = vlm.ask(image, question, max_new_tokens=12)
    assert want
    r = client.chat.completions.create(model="tiny-blip2", messages=messages(image, question), max_tokens=12)
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens >= 1 and r.usage.prompt_tokens > vlm.num_queries
    # a second turn: the history is the conversation, as in the library's ChatSession
    chat = vlm.chat(image, max_new_tokens=12)
    chat.send(question)
    follow = chat.send("and the colour")
    history = messages(image, question) + [{"role": "assistant", "content": want},
                                           {"role": "user", "content": "and the colour"}]
    r = client.chat.completions.create(model="tiny-blip2", messages=history, max_tokens=12)
    assert r.choices[0].message.content == follow


def test_streaming_equals_non_streaming(setup):
    client, image = setup["client"], setup["image"]
    kwargs = dict(model="tiny-blip2", messages=messages(image, "hello there, how are you today"), max_tokens=16)
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == whole and len(pieces) >= 2  # streamed as it grew, not all at the end
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1


def test_typed_errors(setup):
    client, image = setup["client"], setup["image"]
    other = setup["image"].with_name("other.png")
    shape_image("blue", 4).save(other)
    with pytest.raises(openai.UnprocessableEntityError, match="one image per conversation"):
        two = messages(image, "a")[0]["content"][:1] + messages(other, "a")[0]["content"]
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": two}])
    with pytest.raises(openai.UnprocessableEntityError, match=r"input\[0\]: empty text"):
        client.embeddings.create(model="m", input=[""])
    with pytest.raises(openai.UnprocessableEntityError, match="image URLs are off"):
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
            {"type": "text", "text": "what"}]}])
    wrong = openai.OpenAI(base_url=setup["url"] + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.embeddings.create(model="m", input=["a"])


def test_sampling_and_the_same_image_sent_again(setup):
    client, vlm, image = setup["client"], setup["vlm"], setup["image"]
    kwargs = dict(model="m", messages=messages(image, "what is in the picture"), max_tokens=10)
    runs = [client.chat.completions.create(temperature=1.0, seed=s, **kwargs).choices[0].message.content
            for s in (1, 1)]
    assert runs[0] == runs[1]  # a seed makes sampling reproducible
    assert runs[0] == vlm.ask(image, "what is in the picture", max_new_tokens=10, do_sample=True,
                              temperature=1.0, seed=1)
    # a client that repeats the image in every user turn: one image all the same
    history = messages(image, "what is in the picture") + [{"role": "assistant", "content": "x"}]
    history += messages(image, "and the colour")
    r = client.chat.completions.create(model="m", messages=history, max_tokens=5)
    assert r.choices[0].message.content is not None
