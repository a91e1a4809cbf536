"""polymodal's own endpoints: search the collection, zero-shot classification, captions, and the
collection's images (files, thumbnails, metadata with near-duplicates) for the web page.

    POST /v1/search    {"query": "a red car"} | {"image": "data:..."} | {"vector": [...]}, "k": 12
    POST /v1/classify  {"image": "data:..." | "id": 3, "labels": ["cat", "dog"], "template": "a photo of a {}."}
    POST /v1/caption   {"image": "data:..." | "id": 3, "max_tokens": 30, "num_beams": 1}
    GET  /v1/images/{id}?threshold=0.9   metadata and near-duplicates
    GET  /images/{id}[?size=256]         the file, or a thumbnail at most size px on its longer side
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, Response
from starlette.concurrency import run_in_threadpool

from polymodal.processing.image import ImageError
from polymodal.serve.errors import APIError, reason
from polymodal.serve.openai_api import embed_refs, services
from polymodal.serve.schemas import CaptionRequest, ClassifyRequest, SearchRequest, image_bytes
from polymodal.serve.services import CaptionJob, Services

router = APIRouter(tags=["polymodal"])
THUMB_CACHE = 1024  # thumbnails kept in memory


def _collection(s: Services):
    if s.collection is None:
        raise APIError(404, "this server has no collection loaded (start it with --db COLLECTION)")
    return s.collection


def hit_json(h) -> dict:
    return {"id": h.id, "path": h.path, "name": Path(h.path).name, "score": round(float(h.score), 6),
            "width": h.width, "height": h.height, "url": f"/images/{h.id}", "thumbnail": f"/images/{h.id}?size=256",
            "page": f"/image/{h.id}"}


def _record(s: Services, item_id: int):
    coll = _collection(s)
    record = coll.get(int(item_id))
    if record is None:
        raise APIError(404, f"no image with id {item_id} in the collection")
    return record


async def _item_bytes(s: Services, item_id: int) -> bytes:
    record = _record(s, item_id)
    try:
        return await run_in_threadpool(Path(record.path).read_bytes)
    except OSError as e:
        raise APIError(404, f"image {item_id}: its file {record.path} cannot be read ({e.strerror})") from None


def _one_image(body, what: str = "image") -> None:
    if (body.image is None) == (body.id is None):
        raise APIError(422, f"give exactly one of {what} (a data URI) and id (an item of the collection)",
                       param=what)


@router.post("/v1/search")
async def search(body: SearchRequest, request: Request):
    s = services(request)
    coll = _collection(s)
    given = [name for name in ("query", "image", "vector") if getattr(body, name) is not None]
    if len(given) != 1:
        raise APIError(422, "give exactly one of query (text), image (a data URI) and vector", param="query")
    if body.vector is not None:
        vec = np.asarray(body.vector, np.float32)
        if vec.shape != (coll.dim,):
            raise APIError(422, f"vector: {vec.shape[0]} numbers, the collection's vectors have {coll.dim}",
                           param="vector")
        if not np.isfinite(vec).all() or not np.linalg.norm(vec):
            raise APIError(422, "vector: must be finite and not all zero", param="vector")
        vec = vec / np.linalg.norm(vec)
    else:
        name = given[0]
        [(vec, _)] = await embed_refs(s, [getattr(body, name)], name, images=name == "image")
    hits = await run_in_threadpool(coll.search_vector, vec, body.k)
    return {"object": "list", "k": body.k, "total": len(coll), "data": [hit_json(h) for h in hits]}


@router.post("/v1/classify")
async def classify(body: ClassifyRequest, request: Request):
    s = services(request)
    if s.embedder is None:
        raise APIError(404, "this server has no CLIP model loaded")
    _one_image(body)
    if "{}" not in body.template:
        raise APIError(422, f"template: {body.template!r} has no '{{}}' for the label", param="template")
    labels = [label.strip() for label in body.labels]
    if not all(labels):
        raise APIError(422, f"labels[{labels.index('')}]: empty label", param="labels")
    if body.id is not None:
        data = await _item_bytes(s, body.id)
        image_item = ("image", data)
    else:
        try:
            image_item = ("image", image_bytes(body.image, "image", allow_urls=s.cfg.allow_urls,
                                               max_bytes=s.cfg.max_body_bytes))
        except ValueError as e:
            raise APIError(422, str(e), param="image") from None
    results = await s.embed([image_item] + [("text", body.template.format(x)) for x in labels])
    if isinstance(results[0], ValueError):
        raise APIError(422, f"image: {reason(results[0])}", param="image")
    image = results[0][0][None]
    texts = np.stack([v for v, _ in results[1:]])
    probs = s.embedder.probs(image, texts)[0]
    ranked = sorted(zip(labels, map(float, probs), strict=True), key=lambda x: -x[1])
    return {"object": "classification", "template": body.template,
            "data": [{"label": label, "probability": round(p, 6)} for label, p in ranked]}


@router.post("/v1/caption")
async def caption(body: CaptionRequest, request: Request):
    s = services(request)
    if s.vlm is None:
        raise APIError(404, "this server has no VLM loaded (start it with --vlm PATH)")
    _one_image(body)
    cacheable = body.id is not None and body.prompt is None and body.max_tokens == 30 and body.num_beams == 1
    if cacheable and body.id in s.captions:
        return {"object": "caption", "id": body.id, "caption": s.captions[body.id], "cached": True}
    if body.id is not None:
        data = await _item_bytes(s, body.id)
    else:
        try:
            data = image_bytes(body.image, "image", allow_urls=s.cfg.allow_urls, max_bytes=s.cfg.max_body_bytes)
        except ValueError as e:
            raise APIError(422, str(e), param="image") from None
    if body.prompt is not None and not body.prompt.strip():
        raise APIError(422, "prompt: empty; leave it out for a plain caption", param="prompt")
    try:
        result = await s.run_vlm(CaptionJob(data, body.max_tokens, body.num_beams, body.prompt))
    except ValueError as e:  # an unreadable image, a prompt too long for the LLM
        raise APIError(422, f"image: {reason(e)}" if isinstance(e, ImageError) else reason(e)) from None
    if cacheable:
        s.captions[body.id] = result
        while len(s.captions) > 4096:
            s.captions.popitem(last=False)
    return {"object": "caption", "id": body.id, "caption": result, "cached": False}


@router.get("/v1/images/{item_id}")
async def image_info(item_id: int, request: Request, threshold: float = Query(0.9, ge=-1, le=1),
                     limit: int = Query(24, ge=1, le=500)):
    s = services(request)
    record = _record(s, item_id)
    coll = _collection(s)
    dups = await run_in_threadpool(coll.near_duplicates, record.id, threshold)
    return {"id": record.id, "path": record.path, "name": Path(record.path).name, "width": record.width,
            "height": record.height, "url": f"/images/{record.id}", "threshold": threshold,
            "near_duplicates": [hit_json(h) for h in dups[:limit]], "captions": s.vlm is not None}


def _thumbnail(path: str, size: int) -> bytes:
    from PIL import Image

    from polymodal.processing.image import load_image

    image = load_image(path)
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


@router.get("/images/{item_id}")
async def image_file(item_id: int, request: Request, size: int | None = Query(None, ge=16, le=1024)):
    s = services(request)
    record = _record(s, item_id)
    if not Path(record.path).is_file():
        raise APIError(404, f"image {item_id}: its file {record.path} is gone")
    headers = {"Cache-Control": "private, max-age=3600"}
    if size is None:
        return FileResponse(record.path, headers=headers)
    key = (record.id, size)
    thumbs = s.thumbnails
    data = thumbs.get(key)
    if data is None:
        try:
            data = await run_in_threadpool(_thumbnail, record.path, size)
        except ValueError as e:
            raise APIError(422, f"image {item_id}: {e}") from None
        thumbs[key] = data
        while len(thumbs) > THUMB_CACHE:
            thumbs.popitem(last=False)
    return Response(data, media_type="image/png", headers=headers)
