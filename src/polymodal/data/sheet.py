"""A contact sheet: a grid of random pictures from a built data set with their captions, so a
person can see at a glance what the set holds (and what its captions say)."""

from __future__ import annotations

import math
import random
import textwrap
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from polymodal.data.common import CAPTIONS, CLIPS, read_jsonl
from polymodal.processing.image import load_image

THUMB = 144  # the picture's box in each cell, pixels
CELL_W = 176
FONT_SIZE = 11
LINES = 6  # caption lines per cell
LINE_H = FONT_SIZE + 3


def _thumb(dataset: Path, record: dict) -> Image.Image:
    """The picture fitted into THUMB x THUMB (a clip: its frames side by side, in two rows)."""
    if "frames" in record:
        frames = [load_image(dataset / f) for f in record["frames"]]
        cols = math.ceil(len(frames) / 2)
        side = THUMB // max(cols, 2)
        strip = Image.new("RGB", (side * cols, side * 2), "white")
        for i, frame in enumerate(frames):
            strip.paste(frame.resize((side, side)), ((i % cols) * side, (i // cols) * side))
        image = strip
    else:
        image = load_image(dataset / record["image"])
    scale = min(THUMB / image.width, THUMB / image.height)
    # small pictures are enlarged by whole pixels (nearest), so an emoji stays crisp
    resample = Image.Resampling.NEAREST if scale >= 2 else Image.Resampling.LANCZOS
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, resample)


def contact_sheet(dataset_dir, *, n: int = 24, seed: int = 0, split: str | None = None) -> Image.Image:
    """A grid of `n` random pictures (fixed by `seed`) of `split` (or all) with their captions.

    `dataset_dir` holds captions.jsonl (pictures) or clips.jsonl (clips: frames in two rows)."""
    dataset = Path(dataset_dir)
    groups: dict[str, list[dict]] = {}
    lines = dataset / (CLIPS if (dataset / CLIPS).exists() and not (dataset / CAPTIONS).exists() else CAPTIONS)
    for r in read_jsonl(lines):
        if split is None or r.get("split") == split:
            groups.setdefault(r.get("image") or "|".join(r["frames"]), []).append(r)
    if not groups:
        raise ValueError(f"{dataset}: no pictures" + (f" in split {split!r}" if split else ""))
    keys = sorted(groups)
    keys = random.Random(seed).sample(keys, min(n, len(keys)))
    count = len(keys)  # columns: 1 to 2.5 times the rows, with the fewest empty cells
    cols = min(range(max(1, math.ceil(math.sqrt(count))), math.ceil(math.sqrt(2.5 * count)) + 1),
               key=lambda c: (c * math.ceil(count / c) - count, -c))
    rows = math.ceil(len(keys) / cols)
    cell_h = 8 + THUMB + 6 + LINES * LINE_H + 6
    header = 28
    sheet = Image.new("RGB", (cols * CELL_W, header + rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=FONT_SIZE)
    what = "clips" if "|" in keys[0] else "pictures"
    title = f"{dataset.name}: {len(keys)} of {len(groups)} {what}" + (f", split {split}" if split else "")
    draw.text((8, 7), title, fill="black", font=ImageFont.load_default(size=14))
    width = max(8, (CELL_W - 10) * 2 // FONT_SIZE)  # characters per line, about
    for i, key in enumerate(keys):
        records = groups[key]
        x0, y0 = (i % cols) * CELL_W, header + (i // cols) * cell_h
        thumb = _thumb(dataset, records[0])
        sheet.paste(thumb, (x0 + (CELL_W - thumb.width) // 2, y0 + 8 + (THUMB - thumb.height) // 2))
        draw.rectangle((x0 + 4, y0 + 4, x0 + CELL_W - 4, y0 + cell_h - 2), outline=(210, 210, 210))
        lines = []  # (text, caption number): captions alternate dark grey and blue
        if records[0].get("split") == "test":
            lines.append(("[test]", 1))
        for j, r in enumerate(records):
            lines += [(w, j) for w in textwrap.wrap(r["text"], width, subsequent_indent="  ")]
        if len(lines) > LINES:
            lines = lines[: LINES - 1] + [(f"... ({len(records)} captions)", 1)]
        y = y0 + 8 + THUMB + 6
        for k, (line, j) in enumerate(lines):
            colour = (30, 30, 30) if j % 2 == 0 else (40, 70, 160)
            draw.text((x0 + 8, y + k * LINE_H), line, fill=colour, font=font)
    return sheet
