"""Embedding images and texts into CLIP's shared space, and what that space is for:
similarity, probabilities over texts, zero-shot classification.

`Embedder` is what `polymodal.load()` returns for a CLIP checkpoint: the model with its
image transform and tokenizer, taking paths, bytes, PIL images and strings and returning
L2-normalised float32 NumPy arrays.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from polymodal.models.clip import CLIP
from polymodal.processing.image import ImageError, load_image, preprocess
from polymodal.processing.tokenizer import Tokenizer

MAX_TEXT_CHARS = 1 << 20  # longer texts are cut before tokenising; 77 tokens need far fewer


class TextError(ValueError):
    """A text that cannot be embedded (empty, not a string)."""


@dataclass
class BatchResult:
    """Embeddings of the good inputs of a batch; the bad ones are skipped and listed."""

    vectors: np.ndarray  # (len(ok), D)
    ok: list[int] = field(default_factory=list)  # indices of the inputs that were embedded
    errors: list[tuple[int, str]] = field(default_factory=list)  # (index, one-line message)


def check_text(text, i: int = 0) -> str:
    if not isinstance(text, str):
        raise TextError(f"text {i + 1}: expected a string, got {type(text).__name__}")
    if not text.strip():
        raise TextError(f"text {i + 1}: empty text")
    return text[:MAX_TEXT_CHARS]


def _batches(n: int, size: int, progress: bool, what: str, ends: list[int] | None = None) -> Iterable[range]:
    """Ranges of `size` items, or ending at `ends` (exclusive, ascending, the last = n) when given."""
    if ends is None:
        ends = [min(s + size, n) for s in range(0, n, size)]
    starts = list(zip([0, *ends[:-1]], ends, strict=True))
    if progress and len(starts) > 1:
        from rich.progress import track

        starts = track(starts, description=f"embedding {n} {what}", transient=True)
    for s, e in starts:
        yield range(s, e)


def _token_budget_ends(lengths: list[int], budget: int) -> list[int]:
    """Batch ends over texts sorted by ascending length: each batch holds as many texts as fit in
    `budget` padded positions (count x its longest), at least one. Short captions then run in
    large batches (fewer, larger matmuls), long ones in small, never more positions than budget."""
    ends, start = [], 0
    for i, length in enumerate(lengths):
        if i > start and (i - start + 1) * length > budget:
            ends.append(i)
            start = i
    return [*ends, len(lengths)] if lengths else []


class Embedder:
    def __init__(self, model: CLIP, tokenizer: Tokenizer, *, device: str | torch.device | None = None,
                 batch_size: int = 32, int8: bool = False, compile: bool = False, bf16: bool | None = None):
        """int8: Linear layers dynamically quantized to int8 (CPU only; cosine to fp32 >= 0.99 on
        our checks, see BENCHMARKS.md). compile: `torch.compile` the two towers (the first call of
        each shape compiles, slowly). bf16: bfloat16 autocast; by default on for CUDA, off on the CPU."""
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if int8:
            from polymodal.nn.quant import quantize_int8

            if self.device.type != "cpu":
                raise ValueError(f"int8 runs on the CPU only, not on {self.device}; drop int8 or use device='cpu'")
            model = quantize_int8(model.cpu())
        self.model = model.eval().to(self.device)
        self.tokenizer = tokenizer
        self.transform = model.cfg.image_transform
        self.batch_size = batch_size
        self.int8 = int8
        self.bf16 = self.device.type == "cuda" if bf16 is None else bf16
        self._image_fn, self._text_fn = self.model.image_features, self.model.text_features
        if compile:
            self._image_fn = torch.compile(self._image_fn)
            self._text_fn = torch.compile(self._text_fn, dynamic=True)  # batches differ in length

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs) -> Embedder:
        from polymodal.checkpoints.pretrained import load_clip

        model, tokenizer = load_clip(path)
        return cls(model, tokenizer, **kwargs)

    def save_pretrained(self, directory: str | Path) -> Path:
        from polymodal.checkpoints.pretrained import save_pretrained

        return save_pretrained(self.model, directory, self.tokenizer)

    @property
    def dim(self) -> int:
        return self.model.cfg.embed_dim

    # --- images -----------------------------------------------------------------------

    def embed_images(self, images: Sequence, *, progress: bool = False,
                     on_error: Callable[[int, str], None] | None = None) -> BatchResult:
        """Embed what can be embedded; a bad image is skipped, reported to `on_error` and listed."""
        result = BatchResult(vectors=np.zeros((0, self.dim), np.float32))
        chunks = []
        for batch in _batches(len(images), self.batch_size, progress, "images"):
            pixels, kept = [], []
            for i in batch:
                try:
                    pixels.append(preprocess(load_image(images[i]), self.transform))
                    kept.append(i)
                except ImageError as e:
                    result.errors.append((i, str(e)))
                    if on_error is not None:
                        on_error(i, str(e))
            if pixels:
                chunks.append(self._image_vectors(torch.cat(pixels)))
                result.ok.extend(kept)
        if chunks:
            result.vectors = np.concatenate(chunks)
        return result

    def encode_image(self, images, *, progress: bool = False) -> np.ndarray:
        """(N, D) for paths, bytes or PIL images; the first bad image raises ImageError."""
        images = list(images) if isinstance(images, list | tuple) else [images]

        def stop(i: int, message: str):
            raise ImageError(message)

        return self.embed_images(images, progress=progress, on_error=stop).vectors

    @torch.inference_mode()
    def _image_vectors(self, pixels: torch.Tensor) -> np.ndarray:
        with self._autocast():
            return self._image_fn(pixels.to(self.device)).float().cpu().numpy()

    # --- texts ------------------------------------------------------------------------

    @torch.inference_mode()
    def encode_text(self, texts: str | Sequence[str], *, progress: bool = False) -> np.ndarray:
        """(M, D). Texts are batched by token length, so short captions never pad to 77: sorted,
        then cut into batches of at most batch_size x context_length padded positions (a batch of
        batch_size full-length texts), results put back in input order."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        ids = self.tokenizer.encode_batch([check_text(t, i) for i, t in enumerate(texts)])
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out = np.zeros((len(ids), self.dim), np.float32)
        ends = _token_budget_ends([len(ids[i]) for i in order], self.batch_size * self.tokenizer.context_length)
        for batch in _batches(len(order), self.batch_size, progress, "texts", ends):
            rows = [ids[order[j]] for j in batch]
            L = max(map(len, rows))
            tokens = torch.full((len(rows), L), self.tokenizer.pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), L), dtype=torch.long)
            for r, row in enumerate(rows):
                tokens[r, :len(row)] = torch.tensor(row)
                mask[r, :len(row)] = 1
            with self._autocast():
                vecs = self._text_fn(tokens.to(self.device), mask.to(self.device))
            out[[order[j] for j in batch]] = vecs.float().cpu().numpy()
        return out

    # --- the shared space -------------------------------------------------------------

    @staticmethod
    def similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Cosine similarity matrix (N, M) of two sets of L2-normalised embeddings."""
        return np.asarray(a, np.float32) @ np.asarray(b, np.float32).T

    def probs(self, image_embeds: np.ndarray, text_embeds: np.ndarray) -> np.ndarray:
        """softmax over texts of exp(logit_scale) * cosine, one row per image."""
        logits = self.model.logit_scale.exp().item() * self.similarity(image_embeds, text_embeds)
        logits = logits - logits.max(axis=1, keepdims=True)
        e = np.exp(logits)
        return e / e.sum(axis=1, keepdims=True)

    def zero_shot(self, image_embeds: np.ndarray, labels: Sequence[str], template: str = "a photo of a {}.",
                  members: dict[str, Sequence[str]] | None = None) -> list[list[tuple[str, float]]]:
        """Zero-shot classification (CLIP section 3.1.2): each label becomes a caption through
        the template; for each image, (label, probability) best first. With `members` (names of
        things each label holds, each through the template), a label's share of the votes of the
        image's nearest member names (tasks/evaluate.member_votes) stands for its probability."""
        if not labels:
            raise ValueError("zero-shot classification needs at least one label")
        if "{}" not in template:
            raise ValueError(f"template {template!r} has no '{{}}' for the label")
        if members:
            from polymodal.tasks.evaluate import member_votes

            p = member_votes(self, image_embeds, labels, members, (template,))
        else:
            p = self.probs(image_embeds, self.encode_text([template.format(label) for label in labels]))
        return [sorted(zip(labels, map(float, row), strict=True), key=lambda x: -x[1]) for row in p]

    def classify(self, images, labels: Sequence[str], template: str = "a photo of a {}.",
                 *, progress: bool = False) -> list[list[tuple[str, float]]]:
        """`zero_shot` from images (paths, bytes, PIL); the first bad image raises ImageError."""
        return self.zero_shot(self.encode_image(images, progress=progress), labels, template)
