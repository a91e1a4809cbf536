"""Fixtures shared by the training tests (test_train.py, test_fsdp.py)."""

import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

from polymodal.config import CLIPConfig, ImageTransformConfig, TextConfig, VisionConfig, save_config

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
