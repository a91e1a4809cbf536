"""Fixtures shared by the training tests (test_train.py, test_fsdp.py), and one thread per worker."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from polymodal.config import CLIPConfig, ImageTransformConfig, TextConfig, VisionConfig, save_config

# `make test` runs two xdist workers on two cores. Each worker's torch would start two threads, four
# on two cores: measured on the heaviest tests, two workers of one thread each finish 15-25% sooner.
# Subprocesses the tests start inherit OMP_NUM_THREADS. A module that wants two threads (the speech
# tests: ASR's two-thread path) sets them itself; the fixture below puts one back after it.
ONE_THREAD = bool(os.environ.get("PYTEST_XDIST_WORKER"))
if ONE_THREAD:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="module")
def _one_thread_per_worker():
    yield
    if ONE_THREAD:
        torch.set_num_threads(1)


COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 60, 220), "yellow": (235, 210, 30)}
SHAPES = ("circle", "square", "triangle")


def draw(colour, shape, rng, size=32):
    bg = tuple(int(v) for v in rng.integers(150, 256, 3))
    im = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(im)
    r = int(rng.integers(7, 13))
    cx, cy = (int(v) for v in rng.integers(r, size - r, 2))
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        d.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        d.rectangle(box, fill=COLOURS[colour])
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLOURS[colour])
    return im


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory):
    """Coloured shapes at random places on random light backgrounds; test images are new draws."""
    root = tmp_path_factory.mktemp("shapes")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    lines = []
    for split, per_class in (("train", 24), ("test", 4)):
        for colour in COLOURS:
            for shape in SHAPES:
                for k in range(per_class):
                    name = f"images/{split}-{colour}-{shape}-{k}.png"
                    draw(colour, shape, rng).save(root / name)
                    for text in (f"a {colour} {shape}", f"a picture of a {colour} {shape}"):
                        lines.append({"image": name, "text": text, "split": split, "category": f"{colour} {shape}"})
    (root / "captions.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    model = CLIPConfig(vision=VisionConfig(image_size=32, patch_size=8, width=64, layers=2, heads=4, mlp_dim=128),
                       text=TextConfig(context_length=16, width=64, layers=2, heads=4, mlp_dim=128),
                       embed_dim=64, image_transform=ImageTransformConfig(size=32, resize=32))
    save_config(model, root / "model.json")
    return root


def read_metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
