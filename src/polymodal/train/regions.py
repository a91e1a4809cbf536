"""Object-level alignment on generated scenes: the patch tokens where an object is drawn must name it.

Contrastive training on whole pictures teaches the image tower what tells a batch's pictures apart,
and in a batch of scenes that is mostly colours and the large shapes. A small shape (about 11 pixels
across in a 64-pixel scene) hardly moves that loss. Probes on the default CLIP v2 show the result:
the 3 x 3 patch tokens around an object name its shape at 0.99 for large objects but 0.55 for small
ones (chance 0.25), while a small CNN on the raw pixels of the same crops reads both at 1.00. The
default VLM reads these patch tokens, so it cannot say what shape a small object is.

Generated scenes know where each object is. So, beside the usual contrastive batch, a batch of
scenes goes through the tower, the last layer's patch tokens (through `norm_post` and the visual
projection, as the VLM reads them) are pooled around each object with Gaussian weights, and the
pooled vector must pick the object's phrase ("a small red square") among all 64 phrases of sizes,
colours and shapes, scored against the text tower's embeddings of those phrases. This is region-text
alignment in the spirit of RegionCLIP (Zhong et al. 2022), with the regions known by construction.

Batches are a pure function of (seed, step), so a resumed run draws the same ones.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from polymodal.data.scenes import COLOURS, RADIUS, SHAPES
from polymodal.processing.image import ImageError, load_image, preprocess

_DOMAIN = 0x52454731  # "REG1": keeps these draws apart from the loader's of the same seed

PHRASES = tuple(f"a {size} {colour} {shape}" for size in RADIUS for colour in COLOURS for shape in SHAPES)


def phrase_of(obj: dict) -> int:
    """The index in PHRASES of an object's phrase ('a small red square')."""
    return PHRASES.index(f"a {obj['size']} {obj['colour']} {obj['shape']}")


@dataclass
class RegionBatch:
    pixels: Tensor  # (B, 3, H, W), through the model's transform, no augmentation
    where: Tensor  # (M, 4): image index in the batch, centre x, centre y (0..1, y down), circumradius (0..1)
    labels: Tensor  # (M,): index in PHRASES


class RegionBatches:
    """Batches of generated scenes with their objects, from a `polymodal data scenes` folder (or a mix
    holding one): the rows of `split` that list `objects`, each image once."""

    def __init__(self, folder: str | Path, transform, *, batch_size: int, seed: int = 0, split: str | None = "train"):
        folder = Path(folder)
        rows, seen = [], set()
        with open(folder / "captions.jsonl", encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                if not row.get("objects") or (split is not None and row.get("split", split) != split):
                    continue
                if row["image"] not in seen:
                    seen.add(row["image"])
                    rows.append((str(folder / row["image"]), row["objects"]))
        if not rows:
            raise ValueError(f"{folder}: no rows with `objects` (a `polymodal data scenes` folder) in split {split!r}")
        self.rows, self.transform, self.batch_size, self.seed = rows, transform, batch_size, seed

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, step: int) -> RegionBatch:
        rng = np.random.default_rng([self.seed, step, _DOMAIN])
        picks = rng.choice(len(self.rows), size=min(self.batch_size, len(self.rows)), replace=False)
        images, where, labels = [], [], []
        for i in picks:
            path, objects = self.rows[i]
            try:
                image = load_image(path)
            except ImageError:
                continue  # an unreadable file only shrinks this batch
            if image.width != image.height:
                raise ValueError(f"{path}: a scene must be square ({image.width}x{image.height})")
            for obj in objects:
                where.append((len(images), obj["x"], obj["y"], RADIUS[obj["size"]]))
                labels.append(phrase_of(obj))
            images.append(image)
        if not images:
            raise ValueError(f"no scene of step {step}'s batch could be read")
        return RegionBatch(preprocess(images, self.transform), torch.tensor(where, dtype=torch.float32),
                           torch.tensor(labels))


def pooling_weights(where: Tensor, grid: int) -> Tensor:
    """(M, grid * grid) weights over the patches, summing to 1: a Gaussian around each object's centre
    with a standard deviation of 0.75 of its circumradius (at least half a patch)."""
    centres = (torch.arange(grid, dtype=torch.float32, device=where.device) + 0.5) / grid
    cy, cx = torch.meshgrid(centres, centres, indexing="ij")  # row-major like the patch sequence
    d2 = (cx.flatten()[None] - where[:, 1:2]) ** 2 + (cy.flatten()[None] - where[:, 2:3]) ** 2  # (M, P)
    sigma = torch.clamp(0.75 * where[:, 3:4], min=0.5 / grid)
    return torch.softmax(-d2 / (2 * sigma**2), dim=1)


def region_embeddings(model, batch: RegionBatch) -> Tensor:
    """(M, embed_dim), L2-normalised: each object's pooled patch tokens in the joint space."""
    visual = model.visual
    tokens = visual.norm_post(visual(batch.pixels).tokens[:, 1:])  # (B, P, width): the VLM reads these
    return pool_regions(model, tokens, batch.where)


def pool_regions(model, tokens: Tensor, where: Tensor) -> Tensor:
    """tokens (B, P, width): patch tokens through norm_post; where (M, 4) as RegionBatch.where ->
    (M, embed_dim), L2-normalised: each object's pooled tokens through the visual projection."""
    weights = pooling_weights(where, int(round(tokens.shape[1] ** 0.5)))  # (M, P)
    pooled = torch.einsum("mp,mpw->mw", weights, tokens[where[:, 0].long()])  # (M, width)
    return F.normalize(model.visual_proj(pooled), dim=-1)


def region_terms(model, batch: RegionBatch, phrase_embeds: Tensor) -> dict[str, Tensor]:
    """region_loss: cross-entropy of each object's phrase among PHRASES, at the model's temperature;
    region_acc: how often the phrase is the top one. phrase_embeds (len(PHRASES), embed_dim), normalised."""
    logits = model.logit_scale.exp() * region_embeddings(model, batch) @ phrase_embeds.t()  # (M, K)
    return {"region_loss": F.cross_entropy(logits, batch.labels),
            "region_acc": (logits.argmax(1) == batch.labels).float().mean().detach()}


__all__ = ["PHRASES", "RegionBatch", "RegionBatches", "phrase_of", "pool_regions", "pooling_weights", "region_embeddings",
           "region_terms"]
