"""Clustering a collection: spherical k-means over the embeddings, each cluster named by the
keywords nearest its centre (the CLIP clustering use case: the text tower names what the
image tower grouped), and a 2-D map of the clusters with thumbnails.

    clusters = coll.cluster(k=8)                         # default vocabulary: assets/keywords/words.txt
    clusters = coll.cluster(k=8, keywords=["cat", "dog", "car"])
    draw_cluster_map(coll, clusters).save("map.png")
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


@dataclass
class Cluster:
    id: int
    size: int
    names: list[tuple[str, float]]        # nearest keywords to the centre, (keyword, cosine)
    members: list[int]                    # collection ids, nearest the centre first
    centroid: np.ndarray = field(repr=False)
    examples: list = field(default_factory=list)  # Hits nearest the centre

    def as_dict(self) -> dict:
        return {"id": self.id, "size": self.size, "names": [{"keyword": w, "score": round(s, 4)} for w, s in self.names],
                "examples": [{"id": h.id, "path": h.path, "score": round(h.score, 4)} for h in self.examples]}


def default_keywords() -> list[str]:
    return read_keywords(Path(str(resources.files("polymodal") / "assets" / "keywords" / "words.txt")))


def read_keywords(path: str | Path) -> list[str]:
    """One keyword a line; blank lines and # comments skipped."""
    words = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    words = list(dict.fromkeys(w for w in words if w and not w.startswith("#")))
    if not words:
        raise ValueError(f"{path}: no keywords (one a line)")
    return words


def kmeans(x: np.ndarray, k: int, *, seed: int = 0, iters: int = 30, restarts: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Spherical k-means (cosine) with k-means++ seeding, the best of `restarts` runs (highest
    total cosine to the centres): (centres (k, D) unit rows, labels (N,))."""
    n = len(x)
    if not 1 <= k <= n:
        raise ValueError(f"cannot make {k} clusters of {n} images (k must be 1..{n})")
    rng = np.random.default_rng(seed)
    best = None
    for _ in range(restarts):
        c, labels = _kmeans_once(x, k, rng, iters)
        score = sum(float((x[labels == j] @ c[j]).sum()) for j in range(k))
        if best is None or score > best[0]:
            best = (score, c, labels)
    return best[1].astype(np.float32), best[2]


def _assign(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    return np.concatenate([np.argmax(x[s:s + 65536] @ c.T, axis=1) for s in range(0, len(x), 65536)])


def _kmeans_once(x: np.ndarray, k: int, rng, iters: int) -> tuple[np.ndarray, np.ndarray]:
    n = len(x)
    centres = [x[rng.integers(n)]]
    dist = 1 - x @ centres[0]
    for _ in range(1, k):
        p = np.clip(dist, 0, None) ** 2
        i = rng.choice(n, p=p / p.sum()) if p.sum() > 0 else rng.integers(n)
        centres.append(x[i])
        dist = np.minimum(dist, 1 - x @ x[i])
    c = np.stack(centres).astype(np.float64)
    labels = np.full(n, -1)
    for _ in range(iters):
        new = _assign(x, c)
        if np.array_equal(new, labels):
            break
        labels = new
        for j in range(k):
            members = x[labels == j]
            if len(members):
                m = members.sum(0)
                c[j] = m / max(np.linalg.norm(m), 1e-12)
            else:  # an empty cluster takes the point farthest from its centre
                far = np.argmin(np.sum(x * c[labels], axis=1))
                c[j], labels[far] = x[far], j
    return c, labels


def cluster_collection(coll, k: int, keywords: list[str] | None = None, *, seed: int = 0,
                       template: str = "a photo of a {}.", names: int = 3, examples: int = 6) -> list[Cluster]:
    ids, x = coll.vectors()
    centres, labels = kmeans(x, k, seed=seed)
    words = default_keywords() if keywords is None else list(keywords)
    if not words:
        raise ValueError("no keywords to name the clusters with")
    if "{}" not in template:
        raise ValueError(f"template {template!r} has no '{{}}' for the keyword")
    text = coll.embedder.encode_text([template.format(w) for w in words])  # (W, D)
    sim = centres @ text.T  # (k, W)
    out = []
    for j in range(k):
        rows = np.flatnonzero(labels == j)
        order = rows[np.argsort(-(x[rows] @ centres[j]), kind="stable")]
        best = np.argsort(-sim[j], kind="stable")[:names]
        member_ids = [int(ids[i]) for i in order]
        recs = coll.store.records(member_ids[:examples])
        from polymodal.index.collection import Hit

        ex = [Hit(m, recs[m].path, float(x[i] @ centres[j]), recs[m].width, recs[m].height)
              for m, i in zip(member_ids[:examples], order[:examples], strict=True)]
        out.append(Cluster(j, len(rows), [(words[b], float(sim[j, b])) for b in best], member_ids, centres[j], ex))
    return sorted(out, key=lambda c: -c.size)


def project_2d(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """PCA to two dimensions (basis from at most 20,000 rows)."""
    rng = np.random.default_rng(seed)
    sample = x if len(x) <= 20000 else x[rng.choice(len(x), 20000, replace=False)]
    mean = sample.mean(0)
    _, _, vt = np.linalg.svd(sample - mean, full_matrices=False)
    return (x - mean) @ vt[:2].T


def draw_cluster_map(coll, clusters: list[Cluster], *, size: tuple[int, int] = (1400, 1000),
                     thumbs_per_cluster: int = 8, thumb: int = 44, max_points: int = 20000) -> Image.Image:
    """Every image a dot at its 2-D PCA position, coloured by cluster; the images nearest each
    centre drawn as thumbnails framed in the cluster's colour; a legend with the names."""
    from polymodal.processing.image import ImageError, load_image
    from polymodal.viz import BG, INK, font, label_box

    ids, x = coll.vectors()
    pos_of = {int(i): n for n, i in enumerate(ids)}
    xy = project_2d(x)
    W, H = size
    legend_w, pad = 360, 40
    lo, hi = xy.min(0), xy.max(0)
    scale = np.array([W - legend_w - 2 * pad - thumb, H - 2 * pad - thumb]) / np.maximum(hi - lo, 1e-9)
    px = ((xy - lo) * scale + pad + thumb / 2).astype(int)
    px[:, 1] = H - px[:, 1]  # y up

    canvas = Image.new("RGB", size, BG)
    d = ImageDraw.Draw(canvas, "RGBA")
    colour_of = {}
    for c in clusters:
        colour_of[c.id] = PALETTE[len(colour_of) % len(PALETTE)]
    label = np.zeros(len(ids), int)
    for c in clusters:
        label[[pos_of[m] for m in c.members]] = c.id
    show = np.arange(len(ids)) if len(ids) <= max_points else np.random.default_rng(0).choice(len(ids), max_points, replace=False)
    for i in show:
        cx, cy = px[i]
        d.ellipse((cx - 3, cy - 3, cx + 3, cy + 3), fill=colour_of[label[i]] + (150,))
    for c in clusters:
        for m in c.members[:thumbs_per_cluster]:
            try:
                im = load_image(coll.get(m).path)
            except (ImageError, AttributeError):
                continue  # the file moved or went bad since it was indexed: its dot stays
            im.thumbnail((thumb, thumb))
            cx, cy = px[pos_of[m]]
            x0, y0 = int(cx - im.width / 2), int(cy - im.height / 2)
            d.rectangle((x0 - 3, y0 - 3, x0 + im.width + 2, y0 + im.height + 2), fill=colour_of[c.id])
            canvas.paste(im, (x0, y0))
    for c in clusters:
        cx, cy = px[pos_of[c.members[0]]]
        label_box(d, (int(cx) + thumb // 2, int(cy) - thumb // 2 - 16), f"{c.id}: {c.names[0][0] if c.names else ''}",
                  font(13))
    f, small = font(18), font(14)
    lx = W - legend_w + 10
    d.text((lx, pad - 20), f"{len(clusters)} clusters of {len(ids):,} images", font=f, fill=INK)
    for n, c in enumerate(clusters):
        y = pad + 16 + n * 46
        d.rectangle((lx, y + 2, lx + 16, y + 18), fill=colour_of[c.id])
        d.text((lx + 24, y), f"{c.id}: {c.size:,} images", font=small, fill=INK)
        d.text((lx + 24, y + 18), ", ".join(w for w, _ in c.names), font=small, fill=(90, 90, 90))
    d.text((pad, H - 24), "2-D PCA of the embeddings; thumbnails: the images nearest each cluster centre",
           font=small, fill=(90, 90, 90))
    return canvas
