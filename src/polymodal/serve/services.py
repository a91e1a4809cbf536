"""What the server serves: the models, loaded once at start, each behind its own batcher.

`Services` holds the CLIP embedder (the collection's, when there is one), the collection and the
optional VLM. Every model call goes through a `Batcher` (batching.py): concurrent embedding
requests (texts and images, from /v1/embeddings, /v1/search and /v1/classify alike) share one
forward pass per batch; captions with the same options share one batched `generate`; a chat turn
runs alone (its prompt and KV cache are its own) but waits in the same bounded queue.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from polymodal.processing.image import ImageError, load_image
from polymodal.serve.batching import Batcher


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # when set, /v1/* and /images/* need `Authorization: Bearer KEY`
    max_body_bytes: int = 16 << 20  # a bigger request body is answered 413
    max_inputs: int = 2048  # at most this many inputs in one embeddings request
    max_pixels: int = 40_000_000  # an uploaded image with more pixels is refused (422)
    allow_urls: bool = False  # fetch http(s) image URLs given in requests
    max_batch: int = 32  # at most this many embedding requests share one batch
    max_wait_ms: float = 5.0  # how long the first request of a batch waits for company
    queue_size: int = 256  # embedding requests (of any number of inputs) waiting or running; more get 503
    vlm_queue_size: int = 16  # VLM requests (captions, chat turns) waiting or running
    max_new_tokens: int = 256  # a chat answer's length when the request gives none (and at most half the LLM's context)


@dataclass
class CaptionJob:
    image: bytes
    max_new_tokens: int = 30
    num_beams: int = 1
    prompt: str | None = None


@dataclass
class ChatJob:
    image: bytes | None
    history: list[dict]  # {"role", "content"} before the last user message
    text: str  # the last user message
    options: dict = field(default_factory=dict)  # GenerationConfig fields
    stream: Callable[[str], None] | None = None


@dataclass
class ChatResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


class Services:
    """The loaded models and the batchers in front of them. The collection is searched from the
    server's threads (it locks its index itself; SQLite is in serialized mode)."""

    def __init__(self, cfg: ServeConfig, *, embedder=None, collection=None, vlm=None,
                 model_name: str = "polymodal-clip", vlm_name: str | None = None, speech=None):
        if embedder is None and collection is not None:
            embedder = collection.embedder
        if vlm is not None:
            from polymodal.tasks.vlm import VLM

            if not isinstance(vlm, VLM):
                raise ValueError(f"--vlm: the server speaks to a BLIP-2 VLM; a {type(vlm).__name__} "
                                 "(Flamingo) is not served yet")
        self.cfg, self.embedder, self.collection, self.vlm = cfg, embedder, collection, vlm
        self.model_name, self.vlm_name = model_name, vlm_name
        self.speech = speech  # serve/audio_api.py's Speech (an ASR behind its batcher), or None
        self.captions: OrderedDict[int, str] = OrderedDict()  # caption cache for collection items
        self.thumbnails: OrderedDict[tuple[int, int], bytes] = OrderedDict()  # (id, size) -> PNG
        self.embed_batcher = None
        self.vlm_batcher = None
        if embedder is not None:
            self.embed_batcher = Batcher(self._embed, name="embedding", max_batch=cfg.max_batch,
                                         max_wait=cfg.max_wait_ms / 1000, capacity=cfg.queue_size)
        if vlm is not None:
            self.vlm_batcher = Batcher(self._vlm, name="vlm", max_batch=8, max_wait=cfg.max_wait_ms / 1000,
                                       capacity=cfg.vlm_queue_size, key=_vlm_key)

    def close(self) -> None:
        for b in (self.embed_batcher, self.vlm_batcher):
            if b is not None:
                b.close()
        if self.speech is not None:
            self.speech.close()

    # --- CLIP: a request is a list of ("text", str) / ("image", bytes) ------------------------------

    def _embed(self, requests: list[list[tuple[str, object]]]) -> list[list]:
        """One batch of requests -> for each, a list of (vector (D,), token count) per input, or the
        input's ImageError. Every text of the batch goes through one encode_text (which sorts them
        by length and runs Embedder.batch_size at a time), every image through one encode_image."""
        emb = self.embedder
        items = [item for request in requests for item in request]
        out: list = [None] * len(items)
        texts = [i for i, (kind, _) in enumerate(items) if kind == "text"]
        if texts:
            strings = [items[i][1] for i in texts]
            vectors = emb.encode_text(strings)
            lengths = [len(ids) for ids in emb.tokenizer.encode_batch(strings)]
            for j, i in enumerate(texts):
                out[i] = (vectors[j], lengths[j])
        images, kept = [], []
        for i, (kind, data) in enumerate(items):
            if kind == "image":
                try:
                    images.append(load_image(data, max_pixels=self.cfg.max_pixels))
                    kept.append(i)
                except ImageError as e:
                    out[i] = e
        if images:
            vectors = emb.encode_image(images)
            for j, i in enumerate(kept):
                out[i] = (vectors[j], 0)
        results, start = [], 0
        for request in requests:
            results.append(out[start:start + len(request)])
            start += len(request)
        return results

    async def embed(self, items: list[tuple[str, object]]) -> list:
        """(vector (D,), token count) of each text or image of one request, queued as one entry on
        the embedding batcher (Overloaded when it is full); an image that cannot be read gives its
        ImageError in its place."""
        if self.embed_batcher is None:
            raise RuntimeError("no CLIP model loaded")
        return await self.embed_batcher.submit(list(items))

    # --- VLM ------------------------------------------------------------------------------------

    def _vlm(self, jobs: list) -> list:
        if isinstance(jobs[0], ChatJob):
            return [self._chat(job) for job in jobs]
        if jobs[0].prompt is not None or len(jobs) == 1 or self.vlm.chat_template is not None:
            # a chat-template LLM captions through a chat turn (VLM.caption): one at a time
            return [self._caption_one(job) for job in jobs]
        return self._caption_batch(jobs)

    def _caption_one(self, job: CaptionJob):
        try:
            image = load_image(job.image, max_pixels=self.cfg.max_pixels)
            return self.vlm.caption(image, max_new_tokens=job.max_new_tokens, num_beams=job.num_beams,
                                    prompt=job.prompt)
        except ValueError as e:
            return e

    def _caption_batch(self, jobs: list[CaptionJob]) -> list:
        """Captions from the BOS token alone (as VLM.caption for an LLM without a chat template),
        one `generate` for all: (B, 3, H, W) pixels. Equal to one at a time (tested)."""
        import torch

        vlm, out, pixels, kept = self.vlm, [None] * len(jobs), [], []
        for i, job in enumerate(jobs):
            try:
                pixels.append(vlm.pixels(load_image(job.image, max_pixels=self.cfg.max_pixels)))
                kept.append(i)
            except ValueError as e:
                out[i] = e
        if pixels:
            job = jobs[kept[0]]
            try:
                vlm._check_length(1 + vlm.num_queries, job.max_new_tokens)
            except ValueError as e:
                return [e if o is None else o for o in out]
            cfg = vlm.generation_config(max_new_tokens=job.max_new_tokens, num_beams=job.num_beams)
            with torch.no_grad():
                gen = vlm.model.generate(torch.cat(pixels), None, config=cfg)
            for row, i in enumerate(kept):
                out[i] = vlm.decode(gen.tokens[row, : int(gen.lengths[row])])
        return out

    def _chat(self, job: ChatJob):
        vlm = self.vlm
        try:
            image = None if job.image is None else load_image(job.image, max_pixels=self.cfg.max_pixels)
            session = vlm.chat(image)
            session.messages = list(job.history)
            answer = session.send(job.text, stream=job.stream, **job.options)
        except ValueError as e:
            return e
        before, after = session._prompt_ids(job.text, session.messages[:-2])
        prompt_tokens = len(before) + len(after) + (vlm.num_queries if image is not None else 0)
        tokens = session.last_tokens
        eos = vlm.generation_config().eos_ids
        max_new = job.options.get("max_new_tokens", session.gen["max_new_tokens"])
        ended = bool(tokens) and tokens[-1] in eos
        finish = "length" if not ended and len(tokens) >= max_new else "stop"
        return ChatResult(answer, prompt_tokens, len(tokens), finish)

    async def run_vlm(self, job):
        if self.vlm_batcher is None:
            raise RuntimeError("no VLM loaded")
        return await self.vlm_batcher.submit(job)

    # --- the collection ---------------------------------------------------------------------------

    def item_path(self, record) -> Path:
        return Path(record.path)

    def stats(self) -> dict:
        doc = {}
        speech = self.speech.batcher if self.speech is not None else None
        for name, b in (("embedding", self.embed_batcher), ("vlm", self.vlm_batcher), ("transcription", speech)):
            if b is not None:
                doc[name] = {**b.stats.as_dict(), "pending": b.pending, "capacity": b.capacity}
        return doc


def _vlm_key(job):
    if isinstance(job, ChatJob):
        return ("chat", id(job))  # a chat turn runs alone
    if job.prompt is not None:
        return ("caption-prompt", id(job))
    return ("caption", job.max_new_tokens, job.num_beams)
