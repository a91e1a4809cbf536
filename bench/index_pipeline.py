"""Indexing images/s end to end (walk + read + hash + decode + preprocess in worker processes,
embed, commit to SQLite, save the FAISS index) against embedding alone on tensors already
preprocessed: how much of the pipeline the encoder is.

    nice -n 10 .venv/bin/python bench/index_pipeline.py                  # the embedded default model
    .venv/bin/python bench/index_pipeline.py --model path/to/clip --images 2000 --workers 3

The images are generated JPEGs of camera-like size (default 1024 x 768, smooth shapes and
noise), so decoding costs what it costs on photos. The two measurements are alternated
(bench/timing.py) so drifts in machine load hit both.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter
from timing import timed_pair

import polymodal
from polymodal.index import build
from polymodal.processing.image import load_image, transform


def make_photos(folder: Path, n: int, size: tuple[int, int], seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    w, h = size
    for i in range(n):
        base = np.linspace(rng.integers(0, 255, 3), rng.integers(0, 255, 3), w, dtype=np.float32)  # (w, 3)
        a = np.broadcast_to(base[None], (h, w, 3)).copy()
        a += rng.normal(0, 12, (h, w, 3)).astype(np.float32)
        im = Image.fromarray(a.clip(0, 255).astype(np.uint8))
        d = ImageDraw.Draw(im)
        for _ in range(6):
            x0, y0 = int(rng.integers(0, w - 50)), int(rng.integers(0, h - 50))
            box = (x0, y0, x0 + int(rng.integers(40, w // 2)), y0 + int(rng.integers(40, h // 2)))
            colour = tuple(int(v) for v in rng.integers(0, 255, 3))
            (d.ellipse if rng.random() < 0.5 else d.rectangle)(box, fill=colour)
        im.filter(ImageFilter.GaussianBlur(1.5)).save(folder / f"{i:05d}.jpg", quality=90)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="a CLIP checkpoint (default: the embedded default model)")
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--size", default="1024x768")
    ap.add_argument("--workers", type=int, default=None, help="decoding processes (default: CPUs - 1)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    root = Path(tempfile.mkdtemp(prefix="index-pipeline-"))
    w, h = (int(v) for v in args.size.split("x"))
    make_photos(root / "images", args.images, (w, h))
    embedder = polymodal.load(args.model)
    embedder.batch_size = args.batch_size
    paths = sorted(str(p) for p in (root / "images").iterdir())

    t0 = time.perf_counter()
    pixels = torch.stack([transform(load_image(p), embedder.transform) for p in paths])  # (N, 3, S, S)
    prep_s = time.perf_counter() - t0

    def end_to_end():
        shutil.rmtree(root / "db", ignore_errors=True)
        report = build(root / "images", root / "db", embedder, progress=False, workers=args.workers,
                       batch_size=args.batch_size)
        assert report.added == len(paths), report.as_dict()

    def embed_only():
        for s in range(0, len(pixels), args.batch_size):
            embedder._image_vectors(pixels[s:s + args.batch_size])

    e2e_s, embed_s = timed_pair(end_to_end, embed_only, args.repeats)
    n = len(paths)
    cfg = embedder.model.cfg
    print(f"model: {args.model or 'embedded default'} (ViT {cfg.vision.width}w x {cfg.vision.layers}L, "
          f"{cfg.image_transform.size} px), {n} JPEGs of {w}x{h}, batch {args.batch_size}, "
          f"torch threads {torch.get_num_threads()}")
    print("| stage | images/s |")
    print("| --- | --- |")
    print(f"| decode + preprocess, one process (once, not alternated) | {n / prep_s:.1f} |")
    print(f"| embed alone on preprocessed tensors | {n / embed_s:.1f} |")
    print(f"| index end to end (decode in workers + embed + SQLite + FAISS) | {n / e2e_s:.1f} |")
    print(f"the encoder is {100 * embed_s / e2e_s:.0f}% of the end-to-end time "
          f"(median of {args.repeats}: end to end {e2e_s:.2f} s, embedding {embed_s:.2f} s)")
    shutil.rmtree(root)


if __name__ == "__main__":
    main()
