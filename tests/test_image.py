"""Image loading (every bad input refused in one line) and CLIP preprocessing (parity with transformers)."""

from __future__ import annotations

import io
import struct
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
import skimage
import torch
from PIL import Image

from polymodal.config import ImageTransformConfig
from polymodal.processing.image import ImageError, load_image, preprocess, to_pil, transform

SKIMAGE_DATA = Path(skimage.__file__).parent / "data"
# Photos shipped inside scikit-image (no download): colour, greyscale (camera) and RGBA (logo).
PHOTOS = [
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "rocket.jpg",
    "hubble_deep_field.jpg",
    "retina.jpg",
    "motorcycle_left.png",
    "ihc.png",
    "camera.png",
    "logo.png",
]


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _noise(w: int, h: int) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _refused(src, match: str, **kwargs) -> str:
    with pytest.raises(ImageError, match=match) as info:
        load_image(src, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# --- parity with transformers ---------------------------------------------------------


@pytest.fixture(scope="module")
def photos() -> dict[str, Path]:
    return {name: SKIMAGE_DATA / name for name in PHOTOS}


@pytest.mark.parametrize(("size", "resize"), [(224, 224), (64, 64), (32, 40), (40, 32)])
def test_crop_matches_transformers(photos, size, resize):
    transformers = pytest.importorskip("transformers")
    if (size, resize) == (224, 224):
        reference = transformers.CLIPImageProcessor()  # its defaults are CLIP's
    else:  # (40, 32): the resized image is smaller than the crop, so transformers pads
        reference = transformers.CLIPImageProcessor(
            size={"shortest_edge": resize}, crop_size={"height": size, "width": size}
        )
    cfg = ImageTransformConfig(size=size, resize=resize)
    # transformers gets the raw file (it converts L and composites RGBA itself); we load ours.
    raw = [Image.open(path) for path in photos.values()]
    expected = reference(images=raw, return_tensors="pt").pixel_values
    ours = preprocess((load_image(path) for path in photos.values()), cfg)
    assert ours.shape == expected.shape == (len(PHOTOS), 3, size, size)
    assert ours.dtype == torch.float32
    assert (ours - expected).abs().max().item() <= 1e-5


# --- bad input ------------------------------------------------------------------------


def test_missing_file(tmp_path):
    msg = _refused(tmp_path / "x.png", "no such file")
    assert msg == f"{tmp_path / 'x.png'}: no such file"


def test_not_an_image(tmp_path):
    path = tmp_path / "cat.png"
    path.write_text("meow, I am text\n")
    assert _refused(path, "not an image") == f"{path}: not an image (cannot identify image file)"


def test_empty_file(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    assert _refused(path, "empty file") == f"{path}: empty file (0 bytes)"


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated(tmp_path, fmt):
    buf = io.BytesIO()
    _noise(64, 64).save(buf, format=fmt)
    path = tmp_path / f"trunc.{fmt.lower()}"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    assert _refused(path, "truncated or corrupt").startswith(f"{path}: truncated or corrupt image (")


def test_too_thin(tmp_path):
    path = tmp_path / "strip.png"
    path.write_bytes(_png(Image.new("RGB", (1, 20_000))))
    assert _refused(path, "too thin") == f"{path}: 1 x 20000 pixels is too thin (aspect ratio over 200:1)"
    assert load_image(path, max_aspect=20_000).size == (1, 20_000)


def test_over_pixel_cap(tmp_path):
    path = tmp_path / "big.png"
    path.write_bytes(_png(Image.new("RGB", (100, 50))))
    msg = _refused(path, "over the cap", max_pixels=1000)
    assert msg == f"{path}: 100 x 50 = 5e3 pixels is over the cap of 1e3 (set max_pixels to raise it)"
    assert load_image(path, max_pixels=5000).size == (100, 50)


def _lying_png(width: int, height: int) -> bytes:
    """A real 1 x 1 PNG whose IHDR claims width x height (CRC fixed, pixel data unchanged)."""
    data = bytearray(_png(Image.new("RGB", (1, 1))))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


@pytest.mark.parametrize(
    ("width", "max_pixels", "match"),
    [
        (5_000, 1_000_000, "5000 x 5000 = 2.5e7 pixels is over the cap of 1e6"),  # our header check
        (100_000, None, "decompression bomb"),  # over Pillow's own limit too
    ],
)
def test_bomb_refused_from_header(tmp_path, width, max_pixels, match):
    path = tmp_path / "bomb.png"
    path.write_bytes(_lying_png(width, width))
    kwargs = {} if max_pixels is None else {"max_pixels": max_pixels}
    tracemalloc.start()
    try:
        msg = _refused(path, match, **kwargs)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert msg.startswith(f"{path}: ")
    assert peak < 5_000_000  # decoding would need width**2 * 3 bytes


def test_bad_input_names():
    assert _refused(b"not an image", "not an image").startswith("<bytes, 12 bytes>: ")
    assert _refused(io.BytesIO(b""), "empty").startswith("<file object>: ")
    thin = Image.new("RGB", (300, 1))
    assert _refused(thin, "too thin") == "<PIL image>: 300 x 1 pixels is too thin (aspect ratio over 200:1)"


# --- modes and sources ----------------------------------------------------------------


def _pixel(src) -> tuple[int, ...]:
    im = load_image(src)
    assert im.mode == "RGB"
    return im.getpixel((0, 0))


@pytest.mark.parametrize(
    ("mode", "value", "rgb"),
    [
        ("RGBA", (255, 0, 0, 0), (255, 255, 255)),  # fully transparent red -> white
        ("RGBA", (255, 0, 0, 255), (255, 0, 0)),
        ("LA", (0, 0), (255, 255, 255)),
        ("LA", (77, 255), (77, 77, 77)),
        ("RGBa", (0, 0, 0, 0), (255, 255, 255)),
        ("L", 77, (77, 77, 77)),
        ("1", 1, (255, 255, 255)),
        ("I", 65535, (255, 255, 255)),
        ("I;16", 65535, (255, 255, 255)),
        ("I;16", 257 * 100, (100, 100, 100)),
        ("F", 1.0, (255, 255, 255)),
        ("F", 200.0, (200, 200, 200)),
        ("CMYK", (0, 0, 0, 0), (255, 255, 255)),
        ("CMYK", (0, 255, 255, 0), (255, 0, 0)),
    ],
)
def test_modes_to_rgb(mode, value, rgb):
    assert _pixel(Image.new(mode, (2, 2), value)) == rgb


def test_16_bit_big_endian():
    im = Image.frombytes("I;16B", (2, 1), struct.pack(">HH", 65535, 257 * 7))
    assert np.asarray(load_image(im))[0].tolist() == [[255, 255, 255], [7, 7, 7]]


def test_16_bit_png_file(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.array([[0, 65535]], dtype=np.uint16)).save(path)
    assert np.asarray(load_image(path))[0].tolist() == [[0, 0, 0], [255, 255, 255]]


def test_palette_with_transparency():
    im = Image.new("P", (2, 1))
    im.putpalette([255, 0, 0, 0, 0, 255])  # index 0 red, 1 blue
    im.putpixel((1, 0), 1)
    im.info["transparency"] = 0
    decoded = Image.open(io.BytesIO(_png(im)))
    assert decoded.mode == "P" and decoded.info.get("transparency") == 0
    assert np.asarray(load_image(decoded))[0].tolist() == [[255, 255, 255], [0, 0, 255]]

    pa = im.convert("PA")  # palette + alpha band
    assert pa.mode == "PA"
    assert np.asarray(load_image(pa))[0].tolist() == [[255, 255, 255], [0, 0, 255]]


def test_cmyk_jpeg():
    buf = io.BytesIO()
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(buf, format="JPEG", quality=100)
    assert np.abs(np.subtract(_pixel(buf.getvalue()), (255, 0, 0))).max() <= 3


def test_exif_orientation():
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    buf = io.BytesIO()
    Image.new("RGB", (40, 20), "red").save(buf, format="JPEG", exif=exif)
    assert Image.open(io.BytesIO(buf.getvalue())).size == (40, 20)
    assert load_image(buf.getvalue()).size == (20, 40)


def test_sources(tmp_path):
    data = _png(Image.new("RGB", (3, 2), (1, 2, 3)))
    path = tmp_path / "ok.png"
    path.write_bytes(data)
    with path.open("rb") as f:
        from_file = load_image(f)
    sources = [str(path), path, data, bytearray(data), memoryview(data), io.BytesIO(data), from_file]
    for src in sources:
        im = load_image(src)
        assert (im.mode, im.size, im.getpixel((0, 0))) == ("RGB", (3, 2), (1, 2, 3))
    with path.open("rb") as f:
        path.write_bytes(b"")  # an open file's error names its path
        assert _refused(f, "empty").startswith(f"{path}: ")


def test_animated_gif_first_frame():
    frames = [Image.new("RGB", (4, 4), colour) for colour in ("red", "blue")]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    assert Image.open(io.BytesIO(buf.getvalue())).n_frames == 2
    assert _pixel(buf.getvalue()) == (255, 0, 0)
    assert load_image(SKIMAGE_DATA / "no_time_for_that_tiny.gif").size == (14, 25)


# --- letterbox, squash, to_pil --------------------------------------------------------


def _normalised(rgb, cfg) -> torch.Tensor:
    x = (torch.tensor(rgb, dtype=torch.float64) / 255 - torch.tensor(cfg.mean)) / torch.tensor(cfg.std)
    return x.float()[:, None, None]  # (3, 1, 1)


def test_letterbox_pads_top_and_bottom():
    cfg = ImageTransformConfig(mode="letterbox", fill=(0, 128, 255))
    colour = (10, 200, 30)
    x = transform(Image.new("RGB", (400, 100), colour), cfg)
    assert x.shape == (3, 224, 224)
    # 400 x 100 -> 224 x 56, pasted at rows 84..139
    fill, image = _normalised(cfg.fill, cfg), _normalised(colour, cfg)
    assert torch.allclose(x[:, :84], fill.expand(3, 84, 224), atol=1e-6)
    assert torch.allclose(x[:, 140:], fill.expand(3, 84, 224), atol=1e-6)
    assert torch.allclose(x[:, 84:140], image.expand(3, 56, 224), atol=1e-6)


def test_letterbox_keeps_one_pixel():
    x = transform(Image.new("RGB", (199, 1), "red"), ImageTransformConfig(size=32, mode="letterbox"))
    assert x.shape == (3, 32, 32)


def test_squash_and_batch():
    cfg = ImageTransformConfig(size=32, mode="squash")
    x = preprocess([Image.new("RGB", (400, 100), (10, 200, 30)), _noise(17, 90)], cfg)
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32
    assert torch.allclose(x[0], _normalised((10, 200, 30), cfg).expand(3, 32, 32), atol=1e-6)
    assert preprocess(_noise(50, 60), cfg).shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match="no images"):
        preprocess([], cfg)


@pytest.mark.parametrize("mode", ["crop", "letterbox", "squash"])
def test_to_pil_round_trip(mode):
    cfg = ImageTransformConfig(size=48, resize=48, mode=mode)
    image = _noise(48, 48)
    seen = to_pil(transform(image, cfg), cfg)
    assert seen.mode == "RGB" and seen.size == (48, 48)
    diff = np.abs(np.asarray(seen, dtype=int) - np.asarray(image, dtype=int))
    assert diff.max() <= 1


def test_a_directory_is_not_an_image(tmp_path):
    with pytest.raises(ImageError, match="is a directory"):
        load_image(tmp_path)
