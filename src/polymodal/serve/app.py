"""The FastAPI application: routers over `Services` (the models, loaded once at start).

    from polymodal.serve import Services, ServeConfig, create_app
    app = create_app(Services(ServeConfig(), collection=Collection.open("photos.db"), vlm=load_vlm(...)))

The app is a composition of routers (health, OpenAI-compatible, polymodal's own, the web page);
another face passes its router to `create_app(services, routers=[...])` (or calls
`app.include_router`) and finds the models on `request.app.state.services`. Two pure-ASGI layers sit in front of every route: the request size
cap (413, before the body is parsed) and the optional API key (401).
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import unquote

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from polymodal import __version__
from polymodal.serve import api, audio_api, errors, openai_api
from polymodal.serve.errors import error_body
from polymodal.serve.services import ServeConfig, Services

STATIC = Path(__file__).parent / "static"
OPEN_PATHS = ("/health", "/static/", "/favicon.ico")  # never need the key (the page asks for it)

health_router = APIRouter(tags=["health"])
web_router = APIRouter(tags=["web"])


@health_router.get("/health")
async def health(request: Request):
    s: Services = request.app.state.services
    doc = {"status": "ok", "version": __version__, "model": s.model_name if s.embedder is not None else None,
           "dim": s.embedder.dim if s.embedder is not None else None, "vlm": s.vlm_name,
           "asr": s.speech.name if s.speech is not None else None, "batching": s.stats()}
    if s.collection is not None:
        doc["collection"] = {"path": str(s.collection.path), "images": len(s.collection)}
    return doc


@web_router.get("/", include_in_schema=False)
async def index_page():
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


@web_router.get("/image/{item_id}", include_in_schema=False)
async def image_page(item_id: int):
    return FileResponse(STATIC / "image.html", headers={"Cache-Control": "no-cache"})


class Limits:
    """Pure ASGI: a body over `max_bytes` is answered 413 (from Content-Length at once, or while
    reading a chunked body); a protected path without the API key is answered 401."""

    def __init__(self, app, cfg: ServeConfig):
        self.app, self.cfg = app, cfg

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        path = scope["path"]
        if self.cfg.api_key and self._protected(path) and not self._authorised(headers):
            return await _reply(send, 401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                                {"WWW-Authenticate": "Bearer"})
        cap = self.cfg.max_body_bytes
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > cap:
            return await _reply(send, 413, f"the request body is {int(length)} bytes, more than this "
                                f"server's cap of {cap} bytes")
        if scope["method"] in ("GET", "HEAD", "OPTIONS") or length is not None:
            return await self.app(scope, receive, send)
        # a chunked body: read it all (up to the cap) before the app sees it
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > cap:
                return await _reply(send, 413, f"the request body is more than this server's cap of {cap} bytes")
            if not message.get("more_body"):
                break
        body, sent = b"".join(chunks), False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    @staticmethod
    def _protected(path: str) -> bool:
        # the pages themselves hold nothing; what they fetch is protected
        return not (path.startswith(OPEN_PATHS) or path == "/" or path.startswith("/image/"))

    def _authorised(self, headers: dict) -> bool:
        key = self.cfg.api_key.encode()
        auth = headers.get("authorization", "")
        if auth[:7].lower() == "bearer " and hmac.compare_digest(auth[7:].strip().encode(), key):
            return True
        for part in headers.get("cookie", "").split(";"):  # the page's <img> tags carry it as a cookie
            name, _, value = part.strip().partition("=")
            if name == "polymodal_key" and hmac.compare_digest(unquote(value).encode(), key):
                return True
        return False


async def _reply(send, status: int, message: str, headers: dict | None = None) -> None:
    body = json.dumps(error_body(status, message)).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def create_app(services: Services, routers: Iterable[APIRouter] = ()) -> FastAPI:
    """The app over `services`; `routers`: more endpoints (another face's), mounted after ours."""
    app = FastAPI(title="polymodal", version=__version__,
                  description="Embeddings, search, zero-shot classification, captions and chat about images.")
    app.state.services = services
    errors.install(app)
    for router in (health_router, openai_api.router, audio_api.router, api.router, web_router, *routers):
        app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(Limits, cfg=services.cfg)
    return app


def run(services: Services) -> None:
    """Serve until interrupted (uvicorn, one process: the models are in this process's memory)."""
    import uvicorn

    cfg = services.cfg
    try:
        uvicorn.run(create_app(services), host=cfg.host, port=cfg.port, log_level="info", access_log=False)
    finally:
        services.close()
