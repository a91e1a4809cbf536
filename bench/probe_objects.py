"""Does a CLIP image tower see each object of a scene? Probes at the patches where it is drawn.

    python bench/probe_objects.py [--model PATH] --data data/scenes-probe [--n 1500]

For generated scenes (`polymodal data scenes`; use a seed never trained on), the tower's last layer of
patch tokens through `norm_post` (what the default VLM reads) is read at each object, large and small
apart:
  - probe: a ridge probe on the 3 x 3 patch tokens around the object's centre, fit on 80% of the
    objects and scored on the rest, names its shape (chance 0.25) and its colour (chance 0.125);
  - zero-shot: the same tokens pooled around the object (train/regions.py) and projected into the
    joint space pick the object's phrase ("a small red square") among all 64, and its shape among the
    four phrases that share its size and colour. No fitting: this is what region training teaches.
A small CNN reads the shape of either size at 1.00 from the raw 24 x 24 pixels around the object, so
what a probe misses, the tower lost.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import polymodal
from polymodal.data.scenes import COLOURS, RADIUS, SHAPES
from polymodal.processing.image import load_image, preprocess
from polymodal.train.regions import PHRASES, phrase_of, pool_regions


def ridge(X: torch.Tensor, y: torch.Tensor, classes: int) -> torch.Tensor:
    """Whether each held-out row (the last 20%) is named right, under the best of four ridge penalties."""
    X = X.double()
    X = torch.cat([(X - X.mean(0)) / (X.std(0) + 1e-6), torch.ones(len(X), 1, dtype=X.dtype)], 1)
    Y = torch.nn.functional.one_hot(y, classes).double()
    n = int(0.8 * len(X))
    best, best_right = -1.0, None
    for lam in (1.0, 10.0, 100.0, 1000.0):
        W = torch.linalg.solve(X[:n].T @ X[:n] + lam * torch.eye(X.shape[1], dtype=X.dtype), X[:n].T @ Y[:n])
        right = (X[n:] @ W).argmax(1) == y[n:]
        if right.double().mean() > best:
            best, best_right = right.double().mean().item(), right
    return best_right


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="A CLIP (default: the shipped default CLIP).")
    ap.add_argument("--data", type=Path, required=True, help="A `polymodal data scenes` folder.")
    ap.add_argument("--n", type=int, default=1500, help="Scenes to read.")
    args = ap.parse_args()
    t0 = time.time()
    embedder = polymodal.load(args.model)
    model = embedder.model.eval()
    rows, seen = [], set()
    for line in (args.data / "captions.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row.get("objects") and row["image"] not in seen and len(rows) < args.n:
            seen.add(row["image"])
            rows.append(row)
    where, labels = [], []
    for i, row in enumerate(rows):
        for o in row["objects"]:
            where.append((i, o["x"], o["y"], RADIUS[o["size"]]))
            labels.append(phrase_of(o))
    where, labels = torch.tensor(where), torch.tensor(labels)
    objects = [o for row in rows for o in row["objects"]]
    large = torch.tensor([o["size"] == "large" for o in objects])
    shape = torch.tensor([SHAPES.index(o["shape"]) for o in objects])
    colour = torch.tensor([list(COLOURS).index(o["colour"]) for o in objects])

    tokens = []
    with torch.no_grad():
        for s in range(0, len(rows), 250):
            pixels = preprocess([load_image(args.data / r["image"]) for r in rows[s:s + 250]], model.cfg.image_transform)
            tokens.append(model.visual.norm_post(model.visual(pixels).tokens[:, 1:]))
        tokens = torch.cat(tokens)
        embeds = pool_regions(model, tokens, where)  # as region training pools them
        ids = embedder.tokenizer(list(PHRASES))
        phrases = model.text_features(ids["input_ids"], ids["attention_mask"])
    g = int(round(tokens.shape[1] ** 0.5))
    cx = (where[:, 1] * g).long().clamp(0, g - 1)
    cy = (where[:, 2] * g).long().clamp(0, g - 1)
    around = torch.stack([tokens[where[:, 0].long(), (cy + dy).clamp(0, g - 1) * g + (cx + dx).clamp(0, g - 1)]
                          for dy in (-1, 0, 1) for dx in (-1, 0, 1)], 1).flatten(1)  # (M, 9 * width)

    scores = embeds @ phrases.t()  # (M, 64)
    phrase_right = scores.argmax(1) == labels
    same = [[phrase_of({**o, "shape": s}) for s in SHAPES] for o in objects]  # its size and colour
    shape_right = scores.gather(1, torch.tensor(same)).argmax(1) == shape
    n = int(0.8 * len(objects))
    probe_shape, probe_colour = ridge(around, shape, len(SHAPES)), ridge(around, colour, len(COLOURS))
    print(f"{len(rows)} scenes, {len(objects)} objects ({args.model or 'the default CLIP'})")
    print("| objects | probe: shape | probe: colour | zero-shot: phrase of 64 | zero-shot: shape |")
    print("| --- | --- | --- | --- | --- |")
    for name, sel in (("large", large), ("small", ~large), ("all", torch.ones_like(large))):
        held = sel[n:]
        print(f"| {name} | {probe_shape[held].double().mean():.3f} | {probe_colour[held].double().mean():.3f} "
              f"| {phrase_right[sel].double().mean():.3f} | {shape_right[sel].double().mean():.3f} |")
    print(f"({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
