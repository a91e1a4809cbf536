"""Request bodies of the HTTP API (pydantic), and how an image reference in one becomes bytes.

The OpenAI-compatible ones follow the OpenAI API reference (embeddings, chat completions) closely
enough that the official `openai` client works unchanged; fields polymodal cannot honour are
refused with 422 and the reason, never silently ignored. Unknown fields are ignored, as OpenAI's
own server does for fields it does not know.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

DATA_URI = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[^;,]*)*)(?P<b64>;base64)?,",
                      re.IGNORECASE)


class Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


# --- OpenAI-compatible ----------------------------------------------------------------------------


class EmbeddingRequest(Body):
    input: str | list[str] | list[int] | list[list[int]] = Field(
        ..., description="A string or a list of strings; a string that is a data URI (or, when the server "
        "allows it, an http(s) URL) of an image is embedded as that image.")
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


class ImageURL(Body):
    url: str
    detail: str | None = None


class ContentPart(Body):
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | str | None = None


class ChatMessage(Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None


class StreamOptions(Body):
    include_usage: bool = False


class ChatRequest(Body):
    model: str | None = None
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None


# --- polymodal's own ------------------------------------------------------------------------------


class SearchRequest(Body):
    """Exactly one of query (text), image (data URI / URL), vector or id (an item of the collection)."""

    query: str | None = None
    image: str | None = None
    vector: list[float] | None = None
    id: int | None = None
    k: int = Field(12, ge=1, le=1000)


class ClassifyRequest(Body):
    """Zero-shot classification of one image (data URI / URL, or `id` of a collection item)."""

    image: str | None = None
    id: int | None = None
    labels: list[str] = Field(..., min_length=1, max_length=1000)
    template: str = "a photo of a {}."


class CaptionRequest(Body):
    image: str | None = None
    id: int | None = None
    prompt: str | None = None
    max_tokens: int = Field(30, ge=1, le=512)
    num_beams: int = Field(1, ge=1, le=8)


# --- image references -----------------------------------------------------------------------------


def is_image_ref(s: str, allow_urls: bool) -> bool:
    """Whether an embeddings `input` string names an image rather than being text to embed."""
    return bool(DATA_URI.match(s)) or (allow_urls and s.startswith(("http://", "https://")))


def decode_data_uri(uri: str, what: str) -> bytes:
    m = DATA_URI.match(uri)
    if not m:
        raise ValueError(f"{what}: not a data URI (expected data:image/...;base64,...)")
    mime = (m.group("mime") or "").lower()
    if mime and not mime.startswith("image/"):
        raise ValueError(f"{what}: a data URI of {mime}, not of an image")
    payload = uri[m.end():]
    if not m.group("b64"):
        raise ValueError(f"{what}: the data URI is not base64 (expected ';base64,')")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{what}: the data URI's base64 payload is invalid") from None
    if not data:
        raise ValueError(f"{what}: the data URI holds no bytes")
    return data


def fetch_url(url: str, what: str, max_bytes: int, timeout: float = 10.0) -> bytes:
    """GET an http(s) image URL (only when the server was started with --allow-urls)."""
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, headers={"User-Agent": "polymodal"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310 (scheme checked by the caller)
            data = r.read(max_bytes + 1)
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise ValueError(f"{what}: could not fetch {url} ({e})") from None
    if len(data) > max_bytes:
        raise ValueError(f"{what}: {url} is larger than {max_bytes} bytes")
    return data


def image_bytes(ref: str, what: str, *, allow_urls: bool, max_bytes: int) -> bytes:
    """A data URI (or an http(s) URL when allowed) -> the image file's bytes; ValueError names `what`."""
    if not isinstance(ref, str) or not ref:
        raise ValueError(f"{what}: empty image reference")
    if ref.startswith(("http://", "https://")):
        if not allow_urls:
            raise ValueError(f"{what}: image URLs are off on this server (start it with --allow-urls); "
                             "send the image as a data URI")
        return fetch_url(ref, what, max_bytes)
    if ref[:5].lower() == "data:":
        return decode_data_uri(ref, what)
    raise ValueError(f"{what}: expected a data URI (data:image/png;base64,...)"
                     + (" or an http(s) URL" if allow_urls else ""))
