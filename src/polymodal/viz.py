"""Pictures a person would rather look at than read, drawn with Pillow alone.

- `draw_patches`: the figure a reader of the ViT paper has in mind (Dosovitskiy et al. 2020,
  Figure 1): the image the model sees, cut into numbered patches, and the sequence the
  transformer reads, `[CLS]` first.
- `draw_similarity`: a cosine-similarity heatmap, images as rows (with thumbnails), texts
  as columns, the value in every cell and a colour bar.
- `draw_preprocess`: the original next to what the model sees after resize / crop.

Pillow's default font covers ASCII (and the ellipsis) only, so labels stay in ASCII.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from polymodal.config import ImageTransformConfig
from polymodal.processing.image import to_pil, transform

BG = (255, 255, 255)
INK = (30, 30, 30)
MUTED = (110, 110, 110)
CLS_FILL = (230, 120, 30)

# Viridis (van der Walt & Smith, matplotlib's default map), sampled at 9 points.
_VIRIDIS = np.array(
    [
        [68, 1, 84],
        [71, 44, 122],
        [59, 81, 139],
        [44, 113, 142],
        [33, 144, 141],
        [39, 173, 129],
        [92, 200, 99],
        [170, 220, 50],
        [253, 231, 37],
    ],
    dtype=np.float64,
)


def font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def viridis(x: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (any shape) -> uint8 RGB (shape + (3,)), by linear interpolation."""
    x = np.clip(np.nan_to_num(np.asarray(x, np.float64)), 0, 1) * (len(_VIRIDIS) - 1)
    lo = np.floor(x).astype(int).clip(0, len(_VIRIDIS) - 2)
    t = (x - lo)[..., None]
    return np.rint(_VIRIDIS[lo] * (1 - t) + _VIRIDIS[lo + 1] * t).astype(np.uint8)


def text_size(draw: ImageDraw.ImageDraw, text: str, f) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=f)
    return right - left, bottom - top


def fit(draw: ImageDraw.ImageDraw, text: str, f, width: int) -> str:
    """`text`, cut with an ellipsis so it fits in `width` pixels."""
    if draw.textlength(text, font=f) <= width:
        return text
    while text and draw.textlength(text + "…", font=f) > width:
        text = text[:-1]
    return text.rstrip() + "…"


def wrap(draw: ImageDraw.ImageDraw, text: str, f, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap into at most `max_lines` lines of `width` pixels; the last is ellipsised."""
    lines: list[str] = []
    words = text.split()
    while words and len(lines) < max_lines:
        line = words.pop(0)
        while words and draw.textlength(line + " " + words[0], font=f) <= width:
            line += " " + words.pop(0)
        lines.append(line)
    if words:
        lines[-1] = lines[-1] + " " + " ".join(words)
    return [fit(draw, line, f, width) for line in lines]


def label_box(
    draw: ImageDraw.ImageDraw,
    xy: tuple[int, int],
    text: str,
    f,
    *,
    fill=(0, 0, 0, 170),
    color=(255, 255, 255),
    pad: int = 2,
) -> None:
    """`text` on a dark box whose top-left corner is `xy` (readable on any background)."""
    x, y = xy
    left, top, right, bottom = draw.textbbox((x + pad, y + pad), text, font=f)
    draw.rectangle((x, y, right + pad, bottom + pad), fill=fill)
    draw.text((x + pad, y + pad), text, font=f, fill=color)


def centered(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], text: str, f, fill=INK) -> None:
    x0, y0, x1, y1 = box
    draw.text(((x0 + x1) / 2, (y0 + y1) / 2), text, font=f, fill=fill, anchor="mm")


# --- the ViT figure -----------------------------------------------------------------------------


def draw_patches(image: Image.Image, patch_size: int, cfg: ImageTransformConfig | None = None) -> Image.Image:
    """Left: the image the model sees with its patch grid, patches numbered in reading order.
    Right: the flattened sequence, `[CLS]` then patches 1..N, and what happens to each."""
    cfg = cfg or ImageTransformConfig(size=224, resize=224)
    if patch_size < 1 or cfg.size % patch_size:
        raise ValueError(f"patch size {patch_size} does not divide the image size {cfg.size}")
    seen = to_pil(transform(image, cfg), cfg)  # (size, size) RGB
    S, P = cfg.size, patch_size
    g = S // P
    n = g * g

    # Scale the picture up (nearest: the model's own pixels) until a patch is ~44 px on screen
    # (without passing 900 px), and at least until the picture is 448 px wide.
    scale = max(1, min(math.ceil(44 / P), 900 // S), math.ceil(448 / S))
    cell = P * scale
    big = seen.resize((S * scale, S * scale), Image.Resampling.NEAREST)

    # The sequence: tiles of the patches, wrapped so the panel is about as tall as the picture.
    tile = 48 if n <= 64 else 36 if n <= 256 else 24
    gap, label_h = 6, 16
    pitch_x, pitch_y = tile + gap, tile + label_h + gap
    per_row = max(4, math.ceil((n + 1) / max(1, (S * scale) // pitch_y)))

    margin, title_h, head_h, caption_h = 24, 44, 30, 56
    left_w = S * scale
    right_w = per_row * pitch_x - gap
    caption = (
        f"{n} patches of {P}x{P}x3 = {P * P * 3} values each -> linear projection "
        f"-> + position embedding (positions 0..{n}, [CLS] is 0)"
    )
    width = margin + left_w + 2 * margin + right_w + margin
    header = f"the sequence the transformer reads: [CLS] + {n} patch tokens"
    width = max(
        width,
        int(font(16).getlength(caption)) + 2 * margin,
        3 * margin + left_w + int(font(15).getlength(header)) + margin,
    )
    per_row = min(n + 1, max(per_row, (width - 4 * margin - left_w + gap) // pitch_x))  # fill the width
    rows = math.ceil((n + 1) / per_row)
    body_h = max(S * scale, rows * pitch_y)
    height = title_h + head_h + body_h + caption_h + margin
    canvas = Image.new("RGB", (width, height), BG)
    draw = ImageDraw.Draw(canvas)
    draw.text((margin, 12), f"An image is {g}x{g} = {n} words of {P}x{P} pixels", font=font(22), fill=INK)

    # Left panel: picture, grid, numbers.
    x0, y0 = margin, title_h + head_h
    draw.text(
        (x0, title_h + 4), f"what the model sees: {S}x{S}, cut into a {g}x{g} grid", font=font(15), fill=MUTED
    )
    overlay = Image.new("RGBA", big.size, (0, 0, 0, 0))
    od = ImageDraw.Draw(overlay)
    line = 2 if cell >= 40 else 1
    for k in range(1, g):
        od.line((k * cell, 0, k * cell, S * scale), fill=(255, 255, 255, 200), width=line)
        od.line((0, k * cell, S * scale, k * cell), fill=(255, 255, 255, 200), width=line)
    if cell >= 20:
        f = font(max(9, min(16, cell // 3)))
        for i in range(n):
            r, c = divmod(i, g)
            label_box(od, (c * cell + line, r * cell + line), str(i + 1), f, pad=1 if cell < 40 else 2)
    picture = Image.alpha_composite(big.convert("RGBA"), overlay).convert("RGB")
    canvas.paste(picture, (x0, y0))
    draw.rectangle((x0 - 1, y0 - 1, x0 + left_w, y0 + left_w), outline=INK)

    # Right panel: the sequence.
    x1 = x0 + left_w + 2 * margin
    draw.text((x1, title_h + 4), header, font=font(15), fill=MUTED)
    small = font(11)
    tiles = seen.resize(
        (g * tile, g * tile), Image.Resampling.NEAREST if tile >= P else Image.Resampling.LANCZOS
    )
    for j in range(n + 1):
        r, c = divmod(j, per_row)
        tx, ty = x1 + c * pitch_x, y0 + r * pitch_y
        if j == 0:
            draw.rectangle((tx, ty, tx + tile - 1, ty + tile - 1), fill=CLS_FILL)
            centered(
                draw, (tx, ty, tx + tile, ty + tile), "CLS", font(max(10, tile // 4)), fill=(255, 255, 255)
            )
            centered(draw, (tx, ty + tile, tx + tile, ty + tile + label_h), "[CLS]", small, fill=CLS_FILL)
            continue
        pr, pc = divmod(j - 1, g)
        canvas.paste(tiles.crop((pc * tile, pr * tile, (pc + 1) * tile, (pr + 1) * tile)), (tx, ty))
        draw.rectangle((tx - 1, ty - 1, tx + tile, ty + tile), outline=(190, 190, 190))
        centered(draw, (tx, ty + tile, tx + tile, ty + tile + label_h), str(j), small, fill=INK)

    cy = title_h + head_h + body_h + 14
    draw.text((margin, cy), caption, font=font(16), fill=INK)
    return canvas


# --- similarity heatmap -------------------------------------------------------------------------


def _name(label) -> str:
    text = str(label)
    return text.replace("\\", "/").rsplit("/", 1)[-1] if "/" in text or "\\" in text else text


def draw_similarity(
    matrix: np.ndarray,
    row_labels: Sequence,
    col_labels: Sequence,
    images: Sequence[Image.Image] | None = None,
    title: str = "cosine similarity",
    fmt: str = ".3f",
) -> Image.Image:
    """A heatmap of `matrix` (rows x cols): every value printed, rows labelled by thumbnail and file
    name, columns by (wrapped) text, a colour bar from the minimum to the maximum."""
    m = np.asarray(matrix, np.float64)
    if m.ndim != 2 or m.shape != (len(row_labels), len(col_labels)):
        raise ValueError(
            f"matrix of shape {m.shape} does not match {len(row_labels)} row and "
            f"{len(col_labels)} column labels"
        )
    if images is not None and len(images) != len(row_labels):
        raise ValueError(f"{len(images)} images for {len(row_labels)} rows")
    R, C = m.shape
    lo, hi = (float(m.min()), float(m.max())) if m.size else (0.0, 1.0)
    span = hi - lo if hi > lo else 1.0

    cw, ch = 112, 72 if images is not None else 40
    thumb = ch - 8 if images is not None else 0
    name_w = 170
    margin, title_h, head_h, bar_w = 24, 48, 62, 18
    row_w = (thumb + 10 if thumb else 0) + name_w
    grid_x, grid_y = margin + row_w + 8, title_h + head_h
    width = grid_x + C * cw + 30 + bar_w + 60
    height = grid_y + max(R * ch, 160) + margin
    canvas = Image.new("RGB", (width, height), BG)
    draw = ImageDraw.Draw(canvas)
    draw.text((margin, 12), fit(draw, title, font(20), width - 2 * margin), font=font(20), fill=INK)

    head = font(13)
    for j, label in enumerate(col_labels):
        lines = wrap(draw, str(label), head, cw - 10, 3)
        top = grid_y - 6 - 16 * len(lines)
        for k, text in enumerate(lines):
            draw.text((grid_x + j * cw + cw / 2, top + 16 * k), text, font=head, fill=INK, anchor="ma")

    colours = viridis((m - lo) / span)  # (R, C, 3)
    value_font = font(15)
    for i in range(R):
        y = grid_y + i * ch
        x = margin
        if images is not None:
            im = images[i].copy()
            im.thumbnail((thumb, thumb))
            canvas.paste(im, (x + (thumb - im.width) // 2, y + (ch - im.height) // 2))
            x += thumb + 10
        draw.text(
            (x, y + ch / 2),
            fit(draw, _name(row_labels[i]), head, name_w - 4),
            font=head,
            fill=INK,
            anchor="lm",
        )
        for j in range(C):
            rgb = tuple(int(v) for v in colours[i, j])
            x0 = grid_x + j * cw
            draw.rectangle((x0, y, x0 + cw - 1, y + ch - 1), fill=rgb, outline=BG)
            ink = (0, 0, 0) if 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] > 140 else (255, 255, 255)
            centered(
                draw,
                (x0, y, x0 + cw, y + ch),
                format(m[i, j], fmt).replace("-0.000", "0.000"),
                value_font,
                fill=ink,
            )

    # Colour bar, maximum on top.
    bx, by, bh = grid_x + C * cw + 30, grid_y, max(R * ch, 160)
    ramp = viridis(np.linspace(1, 0, bh))[:, None, :].repeat(bar_w, axis=1)  # (bh, bar_w, 3)
    canvas.paste(Image.fromarray(ramp), (bx, by))
    draw.rectangle((bx - 1, by - 1, bx + bar_w, by + bh), outline=INK)
    small = font(12)
    draw.text((bx + bar_w + 6, by), f"max\n{format(hi, fmt)}", font=small, fill=INK, anchor="la")
    draw.text((bx + bar_w + 6, by + bh), f"{format(lo, fmt)}\nmin", font=small, fill=INK, anchor="ld")
    return canvas


# --- preprocessing ------------------------------------------------------------------------------


def _crop_box(size: tuple[int, int], cfg: ImageTransformConfig) -> tuple[float, float, float, float]:
    """The part of an original of `size` (W, H) that a "crop" transform keeps, in its own pixels."""
    w, h = size
    k = cfg.resize / min(w, h)  # shortest side -> cfg.resize
    side_w, side_h = min(w, cfg.size / k), min(h, cfg.size / k)
    return ((w - side_w) / 2, (h - side_h) / 2, (w + side_w) / 2, (h + side_h) / 2)


def draw_preprocess(
    original: Image.Image, seen: Image.Image, cfg: ImageTransformConfig | None = None, box: int = 448
) -> Image.Image:
    """The original ("original WxH") beside what the model sees ("SxS"), each fitted into `box` pixels.
    With a crop `cfg`, a dashed frame on the original marks the part that survives the crop."""
    W, H = original.size
    S = seen.size[0]
    left = original.convert("RGB")
    left.thumbnail((box, box), Image.Resampling.LANCZOS)
    k = box / S
    right = seen.resize((box, box), Image.Resampling.NEAREST if k >= 1 else Image.Resampling.LANCZOS)

    margin, title_h, caption_h = 24, 16, 54
    width = margin + box + 2 * margin + box + margin
    height = title_h + box + caption_h
    canvas = Image.new("RGB", (width, height), BG)
    draw = ImageDraw.Draw(canvas)
    lx, ly = margin + (box - left.width) // 2, title_h + (box - left.height) // 2
    canvas.paste(left, (lx, ly))
    rx = margin + box + 2 * margin
    canvas.paste(right, (rx, title_h))
    draw.rectangle((rx - 1, title_h - 1, rx + box, title_h + box), outline=INK)
    draw.text((margin + box + margin, title_h + box / 2), "->", font=font(24), fill=MUTED, anchor="mm")

    if cfg is not None and cfg.mode == "crop":
        s = left.width / W
        x0, y0, x1, y1 = (v * s for v in _crop_box((W, H), cfg))
        _dashed_rect(draw, (lx + x0, ly + y0, lx + x1 - 1, ly + y1 - 1))

    how = {
        "crop": "resized and centre-cropped",
        "letterbox": "resized and padded",
        "squash": "squashed to a square",
    }.get(cfg.mode if cfg else "", "")
    y = title_h + box + 10
    draw.text((margin + box / 2, y), f"original {W}x{H}", font=font(17), fill=INK, anchor="ma")
    draw.text((rx + box / 2, y), f"what the model sees {S}x{S}", font=font(17), fill=INK, anchor="ma")
    if how:
        draw.text((rx + box / 2, y + 22), how, font=font(13), fill=MUTED, anchor="ma")
    if cfg is not None and cfg.mode == "crop":
        draw.text(
            (margin + box / 2, y + 22),
            "dashed: the part the model keeps",
            font=font(13),
            fill=MUTED,
            anchor="ma",
        )
    return canvas


def _dashed_rect(draw: ImageDraw.ImageDraw, box, dash: int = 8) -> None:
    x0, y0, x1, y1 = box
    for a, b, horizontal, at in (
        (x0, x1, True, y0),
        (x0, x1, True, y1),
        (y0, y1, False, x0),
        (y0, y1, False, x1),
    ):
        t = a
        while t < b:
            e = min(t + dash, b)
            for colour, w in (((0, 0, 0), 4), ((255, 255, 255), 2)):
                seg = (t, at, e, at) if horizontal else (at, t, at, e)
                draw.line(seg, fill=colour, width=w)
            t += 2 * dash


def draw_curves(rows: Sequence[dict], keys: Sequence[str], title: str = "", width: int = 900,
                panel_height: int = 220) -> Image.Image:
    """Training curves: one panel per metric, step on the x axis, min/max labelled."""
    pad, left = 16, 70
    head = 40 if title else pad
    img = Image.new("RGB", (width, head + len(keys) * (panel_height + pad)), BG)
    draw = ImageDraw.Draw(img)
    if title:
        draw.text((pad, 10), fit(draw, title, font(18), width - 2 * pad), fill=INK, font=font(18))
    steps = np.array([r["step"] for r in rows], dtype=np.float64)
    for n, key in enumerate(keys):
        y0 = head + n * (panel_height + pad)
        box = (left, y0 + 22, width - pad, y0 + panel_height - 18)  # the plot area
        draw.text((pad, y0), key, fill=INK, font=font(15))
        values = np.array([r.get(key, np.nan) for r in rows], dtype=np.float64)
        ok = np.isfinite(values)
        draw.rectangle(box, outline=MUTED)
        if not ok.any():
            continue
        lo, hi = values[ok].min(), values[ok].max()
        span = hi - lo or 1.0
        s_lo, s_hi = steps.min(), steps.max()
        xs = box[0] + (steps - s_lo) / ((s_hi - s_lo) or 1.0) * (box[2] - box[0])
        ys = box[3] - (values - lo) / span * (box[3] - box[1])
        points = [(float(x), float(y)) for x, y, k in zip(xs, ys, ok, strict=True) if k]
        if len(points) > 1:
            draw.line(points, fill=tuple(int(c) for c in viridis(np.array(0.3))), width=2)
        else:
            draw.ellipse((points[0][0] - 3, points[0][1] - 3, points[0][0] + 3, points[0][1] + 3), fill=INK)
        small = font(12)
        draw.text((pad, box[1]), f"{hi:.4g}", fill=MUTED, font=small)
        draw.text((pad, box[3] - 14), f"{lo:.4g}", fill=MUTED, font=small)
        draw.text((box[0], box[3] + 2), f"step {int(s_lo)}", fill=MUTED, font=small)
        last = f"step {int(s_hi)}"
        draw.text((box[2] - text_size(draw, last, small)[0], box[3] + 2), last, fill=MUTED, font=small)
    return img
