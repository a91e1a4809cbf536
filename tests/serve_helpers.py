"""What the serve tests share: a tiny random CLIP, a small collection built by polymodal.index,
a tiny random BLIP-2 (test_vlm's), and a real uvicorn server on a free loopback port."""

from __future__ import annotations

import base64
import io
import socket
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 60, 220), "yellow": (235, 210, 30)}


def tiny_clip(directory: Path) -> Path:
    from polymodal.checkpoints.pretrained import save_pretrained
    from polymodal.config import CLIPConfig, ImageTransformConfig, TextConfig, VisionConfig
    from polymodal.models.clip import CLIP
    from polymodal.processing.tokenizer import clip_tokenizer

    torch.manual_seed(0)
    cfg = CLIPConfig(vision=VisionConfig(image_size=32, patch_size=8, width=32, layers=1, heads=2, mlp_dim=64),
                     text=TextConfig(width=32, layers=1, heads=2, mlp_dim=64), embed_dim=16,
                     image_transform=ImageTransformConfig(size=32, resize=32))
    return save_pretrained(CLIP(cfg), directory, clip_tokenizer())


def shape_image(colour: str, seed: int, size: int = 48) -> Image.Image:
    rng = np.random.default_rng(seed)
    im = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(150, 256, 3)))
    d = ImageDraw.Draw(im)
    r = int(rng.integers(8, 16))
    cx, cy = (int(v) for v in rng.integers(r, size - r, 2))
    (d.ellipse if seed % 2 else d.rectangle)((cx - r, cy - r, cx + r, cy + r), fill=COLOURS[colour])
    return im


def image_folder(directory: Path) -> Path:
    """12 shapes, plus `copy.png`: a near-copy of red-0 (one pixel changed)."""
    directory.mkdir(parents=True, exist_ok=True)
    for i, colour in enumerate(COLOURS):
        for j in range(3):
            shape_image(colour, 10 * i + j).save(directory / f"{colour}-{j}.png")
    im = shape_image("red", 0)
    im.putpixel((0, 0), (0, 0, 0))
    im.save(directory / "copy.png")
    return directory


def build_collection(images: Path, db: Path, model_dir: Path):
    from polymodal.index import build

    report = build(images, db, model=str(model_dir), progress=False, workers=0)
    assert report.added == 13, report.as_dict()
    return db


def data_uri(image: Image.Image | Path | bytes) -> str:
    if isinstance(image, Path):
        data = image.read_bytes()
    elif isinstance(image, bytes):
        data = image
    else:
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        data = buf.getvalue()
    return "data:image/png;base64," + base64.b64encode(data).decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn serving `app` in a thread on a free loopback port; `url` is its root."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)
