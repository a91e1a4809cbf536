"""Safe image loading and CLIP preprocessing.

`load_image` turns a path, bytes, a file object or a PIL image into an RGB image, refusing
bad input with a one-line `ImageError`: missing, empty, not an image, truncated, too many
pixels (checked from the header, before any pixel is decoded), too thin.

`transform` / `preprocess` turn RGB images into the normalised tensor a vision tower reads.
Mode "crop" reproduces `transformers.CLIPImageProcessor` (its PIL backend) exactly: same
output-size rounding, same PIL resampling, same centre-crop offsets and zero padding, same
float64 rescale then float32 normalisation.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from polymodal.config import ImageTransformConfig

# Pillow refuses images over 2 * Image.MAX_IMAGE_PIXELS (89_478_485) as decompression bombs;
# we use the same number, so one cap holds whichever check fires first. To go above it,
# raise both `max_pixels` and PIL.Image.MAX_IMAGE_PIXELS (process-wide; we never change it).
MAX_PIXELS = 178_956_970

_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}


class ImageError(ValueError):
    """An input that is not a usable image; the message is one line naming the input."""


def _sci(n: float) -> str:
    """2.5e9, not 2.5e+09."""
    return f"{n:.3g}".replace("e+0", "e").replace("e+", "e")


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()).rstrip(".") or type(e).__name__


def _read(src) -> tuple[str, bytes]:
    """The name to report and the encoded bytes of a path, bytes or file object."""
    if isinstance(src, (str, os.PathLike)):
        name, path = str(src), Path(src)
        if path.is_dir():
            raise ImageError(f"{name}: is a directory, not an image file")
        if not path.is_file():
            raise ImageError(f"{name}: no such file")
        try:
            return name, path.read_bytes()
        except OSError as e:
            raise ImageError(f"{name}: cannot read ({e.strerror})") from None
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
        return f"<bytes, {len(data)} bytes>", data
    if hasattr(src, "read"):
        return str(getattr(src, "name", "<file object>")), src.read()
    raise TypeError(f"load_image: cannot read an image from {type(src).__name__}")


def _check_size(name: str, size: tuple[int, int], max_pixels: int, max_aspect: float) -> None:
    w, h = size
    if min(w, h) < 1:
        raise ImageError(f"{name}: {w} x {h} pixels is empty")
    if w * h > max_pixels:
        raise ImageError(
            f"{name}: {w} x {h} = {_sci(w * h)} pixels is over the cap of {_sci(max_pixels)} "
            "(set max_pixels to raise it)"
        )
    if max(w, h) / min(w, h) > max_aspect:
        raise ImageError(f"{name}: {w} x {h} pixels is too thin (aspect ratio over {max_aspect:g}:1)")


def _to_uint8(a: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any mode to RGB; transparency is composited onto white, as transformers does."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):  # "I" is read as 16-bit data
        im = Image.fromarray(_to_uint8(np.asarray(im, dtype=np.float64) / 257))  # 65535 -> 255
    elif im.mode == "F":  # floats in [0, 1] are scaled; otherwise read as 0..255, like Pillow
        a = np.asarray(im, dtype=np.float64)
        im = Image.fromarray(_to_uint8(a * 255 if a.min() >= 0 and a.max() <= 1 else a))
    bands = im.getbands()
    if "A" in bands or "a" in bands or im.info.get("transparency") is not None:
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, im.convert("RGBA"))
    return im.convert("RGB")


def load_image(src, *, max_pixels: int = MAX_PIXELS, max_aspect: float = 200.0) -> Image.Image:
    """Open, check and fully decode an image; return it upright (EXIF) in RGB mode.

    `src`: a path, bytes / bytearray / memoryview, a binary file object or a PIL image.
    Animated images give their first frame (a PIL image gives its current frame).
    """
    if isinstance(src, Image.Image):
        name, im = "<PIL image>", src
    else:
        name, data = _read(src)
        if not data:
            raise ImageError(f"{name}: empty file (0 bytes)")
        try:
            im = Image.open(io.BytesIO(data))  # reads the header only
        except UnidentifiedImageError:
            raise ImageError(f"{name}: not an image (cannot identify image file)") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageError(
                f"{name}: refused by Pillow as a decompression bomb ({_one_line(e)}); "
                "raise PIL.Image.MAX_IMAGE_PIXELS as well as max_pixels to allow it"
            ) from None
        except Exception as e:  # plugins raise many types (SyntaxError, struct.error, ...)
            raise ImageError(f"{name}: truncated or corrupt image ({_one_line(e)})") from None
    _check_size(name, im.size, max_pixels, max_aspect)
    try:
        im.load()  # decode every pixel now, so a truncated file fails here
        im = ImageOps.exif_transpose(im)
        return _to_rgb(im)
    except MemoryError:
        raise
    except Exception as e:
        raise ImageError(f"{name}: truncated or corrupt image ({_one_line(e)})") from None


# --- preprocessing --------------------------------------------------------------------


def _resize_shortest_edge(image: Image.Image, edge: int, resample: int) -> Image.Image:
    """transformers' get_resize_output_image_size(default_to_square=False): long side truncated."""
    w, h = image.size
    size = (edge, int(edge * h / w)) if w <= h else (int(edge * w / h), edge)  # (W, H)
    return image.resize(size, resample=resample)


def _center_crop(a: np.ndarray, size: int) -> np.ndarray:
    """transformers' center_crop: offset floor(diff / 2); a side too small is zero-padded,
    ceil(diff / 2) before it."""
    h, w = a.shape[:2]
    ph, pw = max(size - h, 0), max(size - w, 0)
    a = np.pad(a, (((ph + 1) // 2, ph // 2), ((pw + 1) // 2, pw // 2), (0, 0)))
    top, left = (a.shape[0] - size) // 2, (a.shape[1] - size) // 2
    return a[top : top + size, left : left + size]  # (size, size, 3)


def _letterbox(image: Image.Image, cfg: ImageTransformConfig, resample: int) -> Image.Image:
    w, h = image.size
    scale = cfg.size / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    canvas = Image.new("RGB", (cfg.size, cfg.size), tuple(cfg.fill))
    canvas.paste(image.resize((nw, nh), resample=resample), ((cfg.size - nw) // 2, (cfg.size - nh) // 2))
    return canvas


def _normalize(a: np.ndarray, cfg: ImageTransformConfig) -> torch.Tensor:
    """uint8 (H, W, 3) -> float32 (3, H, W); rescale in float64 then normalise in float32,
    the order transformers uses, so the result is bit-identical."""
    x = (a.astype(np.float64) * (1 / 255)).astype(np.float32)  # (H, W, 3)
    x = (x - np.array(cfg.mean, np.float32)) / np.array(cfg.std, np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))  # (3, H, W)


def transform(image: Image.Image, cfg: ImageTransformConfig) -> torch.Tensor:
    """One RGB image -> the (3, cfg.size, cfg.size) float32 tensor the model reads."""
    if image.mode != "RGB":
        image = _to_rgb(image)
    resample = _RESAMPLE[cfg.resample]
    if cfg.mode == "crop":
        a = _center_crop(np.asarray(_resize_shortest_edge(image, cfg.resize, resample)), cfg.size)
    elif cfg.mode == "letterbox":
        a = np.asarray(_letterbox(image, cfg, resample))
    elif cfg.mode == "squash":
        a = np.asarray(image.resize((cfg.size, cfg.size), resample=resample))
    else:
        raise ValueError(f"unknown image transform mode {cfg.mode!r}; known: crop, letterbox, squash")
    return _normalize(a, cfg)


def preprocess(images: Image.Image | Iterable[Image.Image], cfg: ImageTransformConfig) -> torch.Tensor:
    """RGB images (or one image) -> a (N, 3, cfg.size, cfg.size) float32 batch."""
    if isinstance(images, Image.Image):
        images = [images]
    tensors = [transform(image, cfg) for image in images]
    if not tensors:
        raise ValueError("preprocess: no images")
    return torch.stack(tensors)  # (N, 3, size, size)


def to_pil(tensor: torch.Tensor, cfg: ImageTransformConfig) -> Image.Image:
    """Undo the normalisation of a (3, H, W) tensor: the image the model sees."""
    x = tensor.detach().cpu().double().numpy().transpose(1, 2, 0)  # (H, W, 3)
    x = x * np.array(cfg.std) + np.array(cfg.mean)
    return Image.fromarray(_to_uint8(x * 255))
