"""Training-time image augmentation, applied to the RGB image before the normal `transform`.

A random-resized crop (the area and aspect-ratio sampling of Szegedy et al. 2015, as
torchvision's `RandomResizedCrop` draws it; the resize is left to `transform`), an optional
horizontal flip, and a small colour jitter (brightness, contrast, saturation). Pure PIL and
NumPy.

Randomness comes only from the `rng` passed in; `augment_rng(seed, epoch, index)` makes the
one the loader uses, so a sample's augmentation is a function of (seed, epoch, sample index)
and does not change with the number of workers or ranks, or when a run resumes. `augment`
always draws the same amount of randomness, whatever the config.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageEnhance

_ATTEMPTS = 10  # crops tried before falling back to the centre crop, as torchvision
_DOMAIN = 0x41554721  # "AUG!": keeps augmentation draws apart from the shuffle draws of the same seed


@dataclass(frozen=True)
class AugmentConfig:
    """scale: range of the crop's area as a fraction of the image's; ratio: range of its aspect
    ratio (width / height), drawn log-uniformly. flip: mirror half the images left-right; off by
    default, because captions say "left" and "right". jitter: brightness, contrast and saturation
    are each multiplied by a factor drawn from [1 - jitter, 1 + jitter]; 0 turns it off.
    seed: the augmentation seed; None uses the stream's seed."""

    scale: tuple[float, float] = (0.8, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = False
    jitter: float = 0.1
    seed: int | None = None

    def __post_init__(self):
        lo, hi = self.scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"AugmentConfig.scale must satisfy 0 < low <= high <= 1, got {self.scale}")
        lo, hi = self.ratio
        if not 0 < lo <= hi:
            raise ValueError(f"AugmentConfig.ratio must satisfy 0 < low <= high, got {self.ratio}")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"AugmentConfig.jitter must be in [0, 1), got {self.jitter}")
        if self.seed is not None and self.seed < 0:
            raise ValueError(f"AugmentConfig.seed must be >= 0, got {self.seed}")


def augment_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator for one sample's augmentation: a pure function of (seed, epoch, index)."""
    return np.random.default_rng([seed, epoch, index, _DOMAIN])


def _crop_box(width: int, height: int, cfg: AugmentConfig, draws: np.ndarray) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a random crop; `draws` is (_ATTEMPTS, 4) uniforms in [0, 1)."""
    area = width * height
    log_lo, log_hi = math.log(cfg.ratio[0]), math.log(cfg.ratio[1])
    for u_area, u_ratio, u_left, u_top in draws:
        target = area * (cfg.scale[0] + (cfg.scale[1] - cfg.scale[0]) * u_area)
        aspect = math.exp(log_lo + (log_hi - log_lo) * u_ratio)
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left = int(u_left * (width - w + 1))
            top = int(u_top * (height - h + 1))
            return left, top, left + w, top + h
    # Fallback: the largest centred crop whose aspect ratio is inside the range.
    aspect = width / height
    if aspect < cfg.ratio[0]:
        w, h = width, max(1, min(height, round(width / cfg.ratio[0])))
    elif aspect > cfg.ratio[1]:
        w, h = max(1, min(width, round(height * cfg.ratio[1]))), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def augment(image: Image.Image, cfg: AugmentConfig, rng: np.random.Generator) -> Image.Image:
    """A randomly cropped (and, if asked, flipped and colour-jittered) copy of an RGB image."""
    draws = rng.random((_ATTEMPTS, 4))
    flip_draw = rng.random()
    factors = rng.uniform(1 - cfg.jitter, 1 + cfg.jitter, size=3)  # brightness, contrast, saturation
    if image.mode != "RGB":
        image = image.convert("RGB")
    out = image.crop(_crop_box(*image.size, cfg, draws))
    if cfg.flip and flip_draw < 0.5:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if cfg.jitter > 0:
        for enhancer, factor in zip(
            (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color), factors, strict=True
        ):
            out = enhancer(out).enhance(float(factor))
    return out
