"""The machinery of CLIP (patches, preprocessing, embedding, similarity) on real photos with a
small RANDOM model: `polymodal demo --random`, fast and offline. The main job, with the
trained default model, is in showcase.py."""

from __future__ import annotations

from pathlib import Path

from polymodal.processing.image import ImageError, load_image


def _save(image, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return str(path)


# scikit-image's sample photos, each with a caption a trained CLIP would match to it.
DEMO = {
    "astronaut.png": "a photo of an astronaut",
    "chelsea.png": "a photo of a cat",
    "coffee.png": "a cup of coffee",
    "rocket.jpg": "a rocket on a launch pad",
    "motorcycle_left.png": "a red motorcycle",
    "camera.png": "a man with a camera",
}


def demo_photos(on_note) -> list[tuple[str, object]]:
    """(name, RGB image) for scikit-image's sample photos, or synthetic pictures without it."""
    from importlib import resources

    try:
        folder = resources.files("skimage") / "data"
        return [(name, load_image(folder / name)) for name in DEMO]
    except (ModuleNotFoundError, ImageError) as e:
        on_note(f"note: scikit-image's photos are not available ({e}); using synthetic pictures instead")
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:300, 0:450] / 300.0  # (H, W), 3:2 like most of the photos
    rings = (np.sin(20 * np.hypot(x - 0.75, y - 0.5)) + 1) / 2
    pictures = {
        "gradient": [x / 1.5, y, 1 - y],
        "rings": [rings, rings * 0.5, 1 - rings],
        "checks": [((x * 8).astype(int) + (y * 8).astype(int)) % 2] * 3,
        "stripes": [(np.sin(30 * x) + 1) / 2, 0.3 + 0 * x, (np.cos(30 * y) + 1) / 2],
    }
    return [(k, Image.fromarray((np.stack(v, -1) * 255).astype(np.uint8))) for k, v in pictures.items()]


def run_random_demo(out: Path, *, progress: bool = False, on_note=print) -> dict:
    """Write patches.png, preprocess.png, random-clip/ and similarity.png into `out`."""
    import torch

    import polymodal
    from polymodal.checkpoints.pretrained import save_pretrained
    from polymodal.config import CLIPConfig, TextConfig, VisionConfig
    from polymodal.models.clip import CLIP
    from polymodal.processing.image import to_pil, transform
    from polymodal.processing.tokenizer import clip_tokenizer
    from polymodal.viz import draw_patches, draw_preprocess, draw_similarity

    torch.manual_seed(0)
    cfg = CLIPConfig(
        vision=VisionConfig(image_size=224, patch_size=32, width=192, layers=4, heads=3, mlp_dim=768),
        text=TextConfig(width=192, layers=4, heads=3, mlp_dim=768),
        embed_dim=128,
    )
    photos = demo_photos(on_note)
    names, images = [n for n, _ in photos], [im for _, im in photos]
    tf = cfg.image_transform
    wide = max(images, key=lambda im: im.width / im.height)  # a crop shows best on a wide picture
    files = [
        _save(draw_patches(images[0], cfg.vision.patch_size, tf), out / "patches.png"),
        _save(draw_preprocess(wide, to_pil(transform(wide, tf), tf), tf), out / "preprocess.png"),
    ]
    files.append(str(save_pretrained(CLIP(cfg), out / "random-clip", clip_tokenizer())))
    embedder = polymodal.load(out / "random-clip")
    texts = list(DEMO.values())
    cosine = embedder.similarity(
        embedder.encode_image(images, progress=progress), embedder.encode_text(texts, progress=progress)
    )
    title = "cosine similarity of a RANDOM, untrained model (meaningless)"
    files.append(_save(draw_similarity(cosine, names, texts, images, title), out / "similarity.png"))
    return {"images": names, "texts": texts, "cosine": cosine.tolist(), "files": files}
