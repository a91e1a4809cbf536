"""The main job (`make run`): the embedded default CLIP on images it never trained on.

It builds (or reuses) a sample collection: Apple-style emoji (a style the model never saw),
held-out clip art (subjects never seen) and scikit-image's photos; embeds it; runs text
searches (some with words no caption contains), an image search and zero-shot
classification of emoji held out of training (each category described by the names of the
other emoji in it: `zero_shot(members=...)`); and writes `report.html` with the result grids, a similarity heatmap and
the patch picture. The terminal gets the top results.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import shutil
from collections.abc import Callable
from importlib import resources
from pathlib import Path

from PIL import Image

QUERIES = ["a smiling face", "a crying face", "a cat", "a dog", "kitty", "puppy", "automobile", "a red car",
           "a bird", "fruit", "a flag", "a musical instrument", "a rocket", "the moon", "a house", "a clock"]
HEATMAP_TEXTS = ["a cat", "a car", "a face", "a flag", "food", "a tree"]
LABELS = ["smileys and emotion", "people and body", "animals and nature", "food and drink", "travel and places",
          "activities", "objects", "symbols", "flags"]
PHOTOS = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "camera.png",
          "horse.png", "hubble_deep_field.jpg"]


def build_collection(root: Path, *, emoji_limit: int | None, clipart_limit: int | None, progress: bool,
                     on_note: Callable[[str], None]) -> list[dict]:
    """[{"path", "source", "caption", "category"}] of the sample collection, built under `root`."""
    from polymodal.data.clipart import build_clipart
    from polymodal.data.emoji import build_emoji
    from polymodal.data.pairs import PairDataset

    items: list[dict] = []
    on_note("collection: Apple-style emoji (a style the model never trained on)")
    build_emoji(root / "emoji-apple", styles=("apple",), limit=emoji_limit, progress=progress)
    on_note("collection: held-out clip art (subjects the model never trained on)")
    build_clipart(root / "clipart", limit=clipart_limit, progress=progress)
    for name, keep in (("emoji-apple", lambda p: True), ("clipart", lambda p: p.meta.get("split") == "test")):
        data = PairDataset(root / name)
        seen = set()
        for p in data.pairs:
            if keep(p) and p.image not in seen:
                seen.add(p.image)
                items.append({"path": str(data.root / p.image), "source": name,
                              "caption": str(p.meta.get("name") or p.meta.get("subject") or p.text),
                              "category": str(p.meta.get("category", "")),
                              "heldout": bool(p.meta.get("heldout", name == "clipart"))})
    folder = Path(str(resources.files("skimage") / "data")) if _has_skimage() else None
    for photo in PHOTOS if folder else []:
        items.append({"path": str(folder / photo), "source": "photo", "caption": photo, "category": "photo"})
    return items


def _has_skimage() -> bool:
    import importlib.util

    return importlib.util.find_spec("skimage") is not None


def _thumb(path: str, size: int = 96) -> str:
    """A PNG thumbnail as a data URI, so report.html is one self-contained file."""
    from polymodal.processing.image import load_image

    im = load_image(path)
    im.thumbnail((size, size))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _picture(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def run_showcase(out: Path, *, model=None, emoji_limit: int | None = 2000, clipart_limit: int | None = 1500,
                 k: int = 5, progress: bool = False, on_note: Callable[[str], None] = print) -> dict:
    import polymodal
    from polymodal.index import Collection, build
    from polymodal.processing.image import load_image
    from polymodal.viz import draw_patches, draw_similarity

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    embedder = polymodal.load(model)
    items = build_collection(out / "collection", emoji_limit=emoji_limit, clipart_limit=clipart_limit,
                             progress=progress, on_note=on_note)
    # One folder of links to the collection's pictures, indexed as any user's folder would be
    # (polymodal index): a rerun finds them committed and embeds nothing again.
    images = (out / "collection" / "images").resolve()
    for it in items:
        link = images / it["source"] / Path(it["path"]).name
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            try:
                os.link(it["path"], link)  # a hard link: no copy, and the path stays the folder's own
            except OSError:
                shutil.copy2(it["path"], link)
        it["path"] = str(link)
    on_note(f"indexing {len(items)} images into {out / 'collection' / 'db'}")
    report = build(images, out / "collection" / "db", model=model, progress=progress, workers=0,
                   on_bad=lambda m: on_note(f"skipped: {m}"))
    collection = Collection.open(out / "collection" / "db")  # the model recorded in it: the one above
    by_path = {it["path"]: it for it in items}
    paths = {r.id: r.path for r in collection.records()}
    ids, vectors = collection.vectors()  # (N,), (N, D) in id order
    keep = [i for i, id_ in enumerate(ids) if paths.get(int(id_)) in by_path]
    items, vectors = [by_path[paths[int(ids[i])]] for i in keep], vectors[keep]

    def top(hits, exclude: str | None = None) -> list[dict]:
        return [{**by_path[h.path], "score": h.score} for h in hits if h.path != exclude and h.path in by_path][:k]

    searches = {q: top(collection.search_text(q, k)) for q in QUERIES}
    photo = next((i for i, it in enumerate(items) if it["caption"] == "chelsea.png"), 0)
    image_search = {"query": items[photo],
                    "results": top(collection.search_image(items[photo]["path"], k + 1), exclude=items[photo]["path"])}
    # emoji held out of training, classified into categories described by the names of the emoji
    # that were trained on (in other styles): the pictured emoji's own name is in no list
    members: dict[str, list[str]] = {}
    for it in items:
        if it["source"] == "emoji-apple" and not it["heldout"]:
            members.setdefault(it["category"].replace("-", " and "), []).append(it["caption"])
    held = [i for i, it in enumerate(items) if it["source"] == "emoji-apple" and it["heldout"]]
    emoji = held[:: max(1, len(held) // 8)][:8]
    labels = [label for label in LABELS if label in members]
    ranked = embedder.zero_shot(vectors[emoji], labels, template="an emoji of {}", members=members) if (
        emoji and labels) else []
    zero_shot = [{**items[i], "labels": r[:3]} for i, r in zip(emoji, ranked, strict=True)]

    heat_rows = [i for i, it in enumerate(items) if it["source"] == "photo"][:6] or list(range(min(6, len(items))))
    sim = embedder.similarity(vectors[heat_rows], embedder.encode_text(HEATMAP_TEXTS))
    heatmap = draw_similarity(sim, [items[i]["caption"] for i in heat_rows], HEATMAP_TEXTS,
                              [load_image(items[i]["path"]) for i in heat_rows], "cosine similarity (default model)")
    patches = draw_patches(load_image(items[photo]["path"]), embedder.model.cfg.vision.patch_size, embedder.transform)
    heatmap.save(out / "similarity.png")
    patches.save(out / "patches.png")
    report = {"images": len(items), "index": {"kind": collection.kind, "added": report.added,
                                              "unchanged": report.unchanged, "bad": len(report.bad)},
              "searches": searches, "image_search": image_search, "zero_shot": zero_shot}
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.html").write_text(_html(report, heatmap, patches))
    return report


def _card(item: dict, note: str = "") -> str:
    return (f'<figure><img src="{_thumb(item["path"])}"><figcaption>{html.escape(item["caption"])}'
            f'<br><small>{html.escape(item["source"])}{html.escape(note)}</small></figcaption></figure>')


def _html(report: dict, heatmap: Image.Image, patches: Image.Image) -> str:
    parts = ["<!doctype html><meta charset='utf-8'><title>polymodal: the default CLIP</title>",
             "<style>body{font-family:sans-serif;margin:2em;max-width:1200px}figure{display:inline-block;"
             "width:120px;margin:4px;text-align:center;vertical-align:top}figure img{width:96px;height:96px;"
             "object-fit:contain;border:1px solid #ddd}figcaption{font-size:12px}h3{margin:1.2em 0 .2em}</style>",
             f"<h1>polymodal: the default CLIP on {report['images']} images it never trained on</h1>",
             "<p>Apple-style emoji (a style absent from training), held-out clip art (subjects absent from "
             "training) and scikit-image's photos. Words such as <i>kitty</i>, <i>puppy</i> and <i>automobile</i> "
             "appear in no training caption: the locked pretrained text tower knows them.</p>",
             f"<p>Searched through a polymodal collection ({html.escape(report['index']['kind'])} FAISS index over "
             "SQLite; <code>polymodal search --db COLLECTION/db</code> queries it too).</p>",
             "<h2>Text search</h2>"]
    for query, results in report["searches"].items():
        parts.append(f"<h3>{html.escape(query)}</h3>")
        parts += [_card(r, f" · {r['score']:.2f}") for r in results]
    q = report["image_search"]
    parts += ["<h2>Image search</h2>", _card(q["query"], " · query"), " &rarr; "]
    parts += [_card(r, f" · {r['score']:.2f}") for r in q["results"]]
    parts.append("<h2>Zero-shot classification (emoji categories)</h2>")
    parts.append("<p>Emoji held out of training, in the unseen Apple style. Each category is described by "
                 "the names of the emoji in it that were trained on (never the pictured one's); an image takes "
                 "the categories of its 20 nearest names, each vote weighted by similarity.</p>")
    for z in report["zero_shot"]:
        labels = "; ".join(f"{label} {p:.2f}" for label, p in z["labels"])
        parts.append(_card(z, f" · {labels}"))
    parts += ["<h2>Similarity</h2>", f"<img src='{_picture(heatmap)}' style='max-width:100%'>",
              "<h2>What the ViT reads</h2>", f"<img src='{_picture(patches)}' style='max-width:100%'>"]
    return "\n".join(parts)
