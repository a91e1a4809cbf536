"""The OpenAI-compatible endpoints: /v1/models, /v1/embeddings, /v1/chat/completions.

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY or anything")
    client.embeddings.create(model="polymodal-clip", input=["a cat", "data:image/png;base64,..."])
    client.chat.completions.create(model="polymodal-vlm", stream=True, messages=[{"role": "user",
        "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}},
                    {"type": "text", "text": "What is in the picture?"}]}])

Embeddings: a string input is text, unless it is an image's data URI (or an http(s) URL, when the
server allows them). Chat: BLIP-2 sees one image per conversation, placed before the first user
turn. temperature 0 or absent is greedy decoding (reproducible); above 0 samples.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from polymodal.processing.image import ImageError
from polymodal.serve.errors import APIError, error_body, reason
from polymodal.serve.schemas import ChatRequest, EmbeddingRequest, image_bytes, is_image_ref
from polymodal.serve.services import ChatJob, ChatResult, Services
from polymodal.tasks.embed import TextError, check_text

router = APIRouter(prefix="/v1", tags=["openai"])


def services(request: Request) -> Services:
    return request.app.state.services


@router.get("/models")
async def models(request: Request):
    s = services(request)
    names = [n for n, m in ((s.model_name, s.embedder), (s.vlm_name, s.vlm)) if m is not None]
    if getattr(s, "speech", None) is not None:
        names.append(s.speech.name)
    return {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": "polymodal"}
                                       for n in names]}


async def embed_refs(s: Services, inputs: list[str], what: str = "input", *, images: bool = False) -> list:
    """Embed strings that are texts or image references (all images when `images`); a bad one is
    a 422 naming it."""
    items = []
    for i, x in enumerate(inputs):
        name = f"{what}[{i}]" if len(inputs) > 1 or what == "input" else what
        try:
            if images or is_image_ref(x, s.cfg.allow_urls):
                items.append(("image", image_bytes(x, name, allow_urls=s.cfg.allow_urls,
                                                   max_bytes=s.cfg.max_body_bytes)))
            else:
                items.append(("text", check_text(x, i)))
        except TextError as e:
            raise APIError(422, f"{name}: {str(e).split(': ', 1)[-1]}", param=what) from None
        except ValueError as e:
            raise APIError(422, str(e), param=what) from None
    results = await s.embed(items)
    for i, r in enumerate(results):
        if isinstance(r, ImageError):
            name = f"{what}[{i}]" if len(inputs) > 1 or what == "input" else what
            raise APIError(422, f"{name}: {reason(r)}", param=what)
    return results


@router.post("/embeddings")
async def embeddings(body: EmbeddingRequest, request: Request):
    s = services(request)
    if s.embedder is None:
        raise APIError(404, "this server has no CLIP model loaded")
    inputs = [body.input] if isinstance(body.input, str) else body.input
    if not inputs:
        raise APIError(422, "input: empty list: give at least one string", param="input")
    if not all(isinstance(x, str) for x in inputs):
        raise APIError(422, "input: token arrays are not supported (the tokenizer is the server's): "
                       "send strings", param="input")
    if len(inputs) > s.cfg.max_inputs:
        raise APIError(422, f"input: {len(inputs)} inputs, at most {s.cfg.max_inputs} per request", param="input")
    if body.dimensions is not None and body.dimensions != s.embedder.dim:
        raise APIError(422, f"dimensions: this model's embeddings have {s.embedder.dim} dimensions, "
                       f"not {body.dimensions}", param="dimensions")
    results = await embed_refs(s, inputs)
    data = []
    for i, (vec, _) in enumerate(results):
        if body.encoding_format == "base64":
            value = base64.b64encode(vec.astype("<f4").tobytes()).decode()
        else:
            value = vec.tolist()
        data.append({"object": "embedding", "index": i, "embedding": value})
    tokens = sum(n for _, n in results)
    return {"object": "list", "data": data, "model": body.model or s.model_name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


# --- chat -------------------------------------------------------------------------------------------


def _chat_job(s: Services, body: ChatRequest) -> ChatJob:
    if body.n != 1:
        raise APIError(422, "n: only n=1 is supported", param="n")
    if body.stop:
        raise APIError(422, "stop: stop sequences are not supported by this server", param="stop")
    images, turns = [], []
    for i, m in enumerate(body.messages):
        texts = []
        if isinstance(m.content, str):
            texts.append(m.content)
        elif m.content is not None:
            for j, part in enumerate(m.content):
                where = f"messages[{i}].content[{j}]"
                if part.type == "text":
                    texts.append(part.text or "")
                else:
                    if part.image_url is None:
                        raise APIError(422, f"{where}: an image_url part without image_url", param="messages")
                    url = part.image_url if isinstance(part.image_url, str) else part.image_url.url
                    try:
                        images.append(image_bytes(url, where, allow_urls=s.cfg.allow_urls,
                                                  max_bytes=s.cfg.max_body_bytes))
                    except ValueError as e:
                        raise APIError(422, str(e), param="messages") from None
        role = "system" if m.role == "developer" else m.role
        turns.append({"role": role, "content": "\n".join(t for t in texts if t)})
    images = list(dict.fromkeys(images))  # a client that sends the image again with every turn
    if len(images) > 1:
        raise APIError(422, f"messages: {len(images)} different images; BLIP-2 sees one image per "
                       "conversation", param="messages")
    if turns[-1]["role"] != "user":
        raise APIError(422, "messages: the last message must be the user's", param="messages")
    if not turns[-1]["content"].strip():
        raise APIError(422, f"messages[{len(turns) - 1}]: the user message has no text", param="messages")
    cap = max(1, min(s.cfg.max_new_tokens, s.vlm.context_length // 2))
    options = {"max_new_tokens": body.max_completion_tokens or body.max_tokens or cap}
    if body.temperature:
        options.update(do_sample=True, temperature=body.temperature)
        if body.top_p is not None:
            options["top_p"] = body.top_p
        if body.seed is not None:
            options["seed"] = body.seed
    return ChatJob(image=images[0] if images else None, history=turns[:-1], text=turns[-1]["content"],
                   options=options)


def _completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def _usage(r: ChatResult) -> dict:
    return {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
            "total_tokens": r.prompt_tokens + r.completion_tokens}


@router.post("/chat/completions")
async def chat_completions(body: ChatRequest, request: Request):
    s = services(request)
    if s.vlm is None:
        raise APIError(404, "this server has no VLM loaded (start it with --vlm PATH)")
    job = _chat_job(s, body)
    model = body.model or s.vlm_name
    cid, created = _completion_id(), int(time.time())
    if not body.stream:
        try:
            result = await s.run_vlm(job)
        except ValueError as e:  # an unreadable image, a prompt too long for the LLM's context
            raise APIError(422, f"messages: {reason(e)}", param="messages") from None
        return {"id": cid, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                             "logprobs": None, "finish_reason": result.finish_reason}],
                "usage": _usage(result)}

    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue = asyncio.Queue()
    job.stream = lambda piece: loop.call_soon_threadsafe(pieces.put_nowait, piece)
    future = s.vlm_batcher.submit(job)  # Overloaded here is still a 503, before the stream starts
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunk(delta: dict, finish: str | None = None, **extra) -> str:
        doc = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
               "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **extra}
        return f"data: {json.dumps(doc)}\n\n"

    async def events():
        yield chunk({"role": "assistant", "content": ""})
        done, getter = asyncio.ensure_future(_wait(future)), None
        try:
            while True:
                getter = asyncio.ensure_future(pieces.get())
                finished, _ = await asyncio.wait({getter, done}, return_when=asyncio.FIRST_COMPLETED)
                if getter in finished:
                    yield chunk({"content": getter.result()})
                    continue
                while not pieces.empty():
                    yield chunk({"content": pieces.get_nowait()})
                break
        finally:  # also when the client went away: the turn finishes in the worker, unheard
            if getter is not None:
                getter.cancel()
            if not done.done():
                done.cancel()
        result = done.result()
        if isinstance(result, Exception):
            status = 422 if isinstance(result, ValueError) else 500
            yield f"data: {json.dumps(error_body(status, reason(result)))}\n\n"
        else:
            yield chunk({}, result.finish_reason)
            if include_usage:
                doc = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                       "choices": [], "usage": _usage(result)}
                yield f"data: {json.dumps(doc)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _wait(future):
    try:
        return await future
    except Exception as e:  # the batch itself failed
        return e
