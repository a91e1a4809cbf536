"""Evaluating a shared space: zero-shot classification and cross-modal retrieval.

Zero-shot (Radford et al. 2021, section 3.1.4): each class name goes through several prompt
templates; the class embedding is the mean of the L2-normalised template embeddings,
normalised again (prompt ensembling); an image is assigned its most similar class.
With a label hierarchy (CHiLS, Novack et al. 2023), a class also speaks through its subclasses'
names ("animals-nature": "animal mammal", "animal bird", ...): its score is the best of its own
prompt and theirs, so a broad category is found through the narrow words an image sits near.
With examples (`members`), a class is described by the names of things it holds ("food-drink":
"hamburger", "red apple", ...): an image takes the classes of its k most similar names, each vote
weighted exp(cosine / temperature), a k-nearest-neighbour vote in the text tower's space. Only
text describes the classes, so it is still zero-shot; it finds a broad class through whichever
narrow thing an image resembles.
Retrieval: recall@k, image->text (any of the image's captions in the top k) and
text->image (the caption's image in the top k).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from polymodal.tasks.embed import Embedder

TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.", "{}")


def class_embeddings(embedder: Embedder, classes: Sequence[str], templates: Sequence[str] = TEMPLATES) -> np.ndarray:
    """(C, D): prompt-ensembled, L2-normalised class embeddings."""
    texts = [t.format(c) for c in classes for t in templates]
    e = embedder.encode_text(texts).reshape(len(classes), len(templates), -1)  # (C, T, D)
    mean = e.mean(axis=1)  # (C, D)
    return mean / np.linalg.norm(mean, axis=1, keepdims=True)


def class_scores(embedder: Embedder, image_embeds: np.ndarray, classes: Sequence[str],
                 templates: Sequence[str] = TEMPLATES,
                 subclasses: dict[str, Sequence[str]] | None = None) -> np.ndarray:
    """(N, C) image-class similarities; with `subclasses`, each class scores the maximum over its
    own name and its subclasses' names."""
    if not subclasses:
        return image_embeds @ class_embeddings(embedder, classes, templates).T
    names, owner = [], []
    for c, cls in enumerate(classes):
        for name in dict.fromkeys([cls, *subclasses.get(cls, ())]):
            names.append(name)
            owner.append(c)
    sim = image_embeds @ class_embeddings(embedder, names, templates).T  # (N, names)
    owner = np.asarray(owner)
    return np.stack([sim[:, owner == c].max(axis=1) for c in range(len(classes))], axis=1)


def member_votes(embedder: Embedder, image_embeds: np.ndarray, classes: Sequence[str],
                 members: dict[str, Sequence[str]], templates: Sequence[str] = ("{}",), k: int = 20,
                 temperature: float = 0.05) -> np.ndarray:
    """(N, C) each class's share of the image's k nearest member names, each vote weighted
    exp(cosine / temperature); rows sum to 1. A class without members gets no votes."""
    names = [(name, c) for c, cls in enumerate(classes) for name in dict.fromkeys(members.get(cls, ()))]
    if not names:
        raise ValueError("members: no class has any member names")
    if k < 1 or temperature <= 0:
        raise ValueError(f"members: need k >= 1 and temperature > 0 (got {k}, {temperature})")
    bank = class_embeddings(embedder, [name for name, _ in names], templates)  # (M, D)
    owner = np.array([c for _, c in names])
    sims = image_embeds @ bank.T  # (N, M)
    top = np.argsort(-sims, axis=1, kind="stable")[:, :k]  # (N, k)
    near = np.take_along_axis(sims, top, axis=1)
    weights = np.exp((near - near[:, :1]) / temperature)  # the best vote weighs 1; no overflow
    votes = np.zeros((len(image_embeds), len(classes)))
    for r in range(len(image_embeds)):
        np.add.at(votes[r], owner[top[r]], weights[r])
    return votes / votes.sum(axis=1, keepdims=True)


@dataclass
class ZeroShotResult:
    accuracy: float
    per_class: dict[str, float]
    confusion: np.ndarray  # (C, C): row = true class, column = predicted
    classes: list[str]
    predictions: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"accuracy": self.accuracy, "per_class": self.per_class, "classes": self.classes,
                "confusion": self.confusion.tolist()}


def zero_shot(embedder: Embedder, image_embeds: np.ndarray, labels: Sequence[str],
              classes: Sequence[str] | None = None, templates: Sequence[str] = TEMPLATES,
              subclasses: dict[str, Sequence[str]] | None = None,
              members: dict[str, Sequence[str]] | None = None, k: int = 20,
              temperature: float = 0.05) -> ZeroShotResult:
    """Accuracy of assigning each image (its embedding) to the nearest class embedding (through
    its subclasses' names too, when given: `class_scores`), or, given `members`, to the class
    of most of its nearest member names (`member_votes`, each name through `templates`)."""
    classes = sorted(set(labels)) if classes is None else list(classes)
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(labels) - set(index))
    if unknown:
        raise ValueError(f"labels not among the classes: {unknown[:5]}")
    if members:
        scores = member_votes(embedder, image_embeds, classes, members, templates, k, temperature)
    else:
        scores = class_scores(embedder, image_embeds, classes, templates, subclasses)
    pred = scores.argmax(axis=1)  # (N,)
    true = np.array([index[label] for label in labels])
    confusion = np.zeros((len(classes), len(classes)), dtype=np.int64)
    np.add.at(confusion, (true, pred), 1)
    per_class = {c: float(confusion[i, i] / confusion[i].sum()) for i, c in enumerate(classes) if confusion[i].sum()}
    return ZeroShotResult(accuracy=float((pred == true).mean()), per_class=per_class, confusion=confusion,
                          classes=classes, predictions=[classes[p] for p in pred])


def recall_at_k(image_embeds: np.ndarray, text_embeds: np.ndarray, text_image: Sequence[int],
                ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """text_image[j]: the index of text j's image. Returns image->text and text->image R@k."""
    text_image = np.asarray(text_image)
    sim = image_embeds @ text_embeds.T  # (N_img, N_txt)
    out = {}
    # text -> image: the rank of the right image among all images, for each text
    right = sim[text_image, np.arange(len(text_image))]  # (N_txt,)
    t2i_rank = (sim > right[None, :]).sum(axis=0)  # (N_txt,) images scoring strictly higher
    # image -> text: the best rank among the image's own captions
    i2t_rank = np.full(len(image_embeds), np.iinfo(np.int64).max)
    for j, i in enumerate(text_image):
        i2t_rank[i] = min(i2t_rank[i], int((sim[i] > sim[i, j]).sum()))
    has_text = i2t_rank < np.iinfo(np.int64).max
    for k in ks:
        out[f"text_to_image_R@{k}"] = float((t2i_rank < k).mean())
        out[f"image_to_text_R@{k}"] = float((i2t_rank[has_text] < k).mean())
    return out


def recall_by_text(image_embeds: np.ndarray, text_embeds: np.ndarray, relevant: Sequence[Sequence[int]],
                   ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Text -> image R@k when a query has several right images (a subject drawn several times):
    a query is a hit when any of its `relevant[j]` images is among the k best."""
    sim = text_embeds @ image_embeds.T  # (N_txt, N_img)
    order = np.argsort(-sim, axis=1, kind="stable")
    first = np.array([np.flatnonzero(np.isin(order[j], list(r)))[0] for j, r in enumerate(relevant)])
    return {f"text_to_image_R@{k}": float((first < k).mean()) for k in ks}


def evaluate_folder(embedder: Embedder, root, *, split: str | None = "test", label_key: str | None = "category",
                    templates: Sequence[str] = TEMPLATES, where: dict[str, str] | None = None,
                    text_key: str | None = None, label_names: dict[str, str] | None = None,
                    subclasses: dict[str, Sequence[str]] | None = None,
                    members: dict[str, Sequence[str]] | None = None,
                    progress: bool = False, on_error=None) -> dict:
    """Retrieval over the images and captions of a split of a folder data set and, when its
    records carry `label_key`, zero-shot accuracy over the labels found.

    where: keep only records whose fields equal these values (compared as strings, e.g.
    {"style": "apple"}). text_key: query with this record field (e.g. "name") instead of the
    captions, once per image. label_names: the words prompts use for labels ({"2": "two"}).
    subclasses: a label's narrower names, scored with it (`class_scores`).
    members: names of things each label holds; the labels are then found by their vote (`member_votes`).
    With `text_key`, "retrieval" scores each (image, query) pair against its own image, and
    "retrieval_by_text" each distinct query against all the images it names (`recall_by_text`).
    Bad images are skipped (reported to `on_error`) and counted."""
    from polymodal.data.pairs import PairDataset

    data = PairDataset(root, split=split)
    pairs = [p for p in data.pairs if all(str(p.meta.get(k)) == v for k, v in (where or {}).items())]
    if not pairs:
        raise ValueError(f"{root}: no records of split {split!r} match {where}")
    images = list(dict.fromkeys(p.image for p in pairs))
    result = embedder.embed_images([str(data.root / i) for i in images], progress=progress, on_error=on_error)
    position = {images[i]: n for n, i in enumerate(result.ok)}
    pairs = [p for p in pairs if p.image in position]
    if text_key:
        queries = {(p.image, str(p.meta[text_key])) for p in pairs if text_key in p.meta}
        texts = sorted(queries)
    else:
        texts = [(p.image, p.text) for p in pairs]
    text_embeds = embedder.encode_text([t for _, t in texts], progress=progress)
    report: dict = {"images": len(result.ok), "texts": len(texts), "skipped": len(result.errors),
                    "retrieval": recall_at_k(result.vectors, text_embeds, [position[i] for i, _ in texts])}
    if text_key:  # each distinct query once, right when any image it names is found
        relevant: dict[str, set[int]] = {}
        for i, t in texts:
            relevant.setdefault(t, set()).add(position[i])
        first = {t: n for n, (_, t) in reversed(list(enumerate(texts)))}
        report["retrieval_by_text"] = {"queries": len(relevant), **recall_by_text(
            result.vectors, text_embeds[[first[t] for t in relevant]], list(relevant.values()))}
    labels: dict[str, str] = {}
    for p in pairs:
        if label_key and label_key in p.meta:
            label = str(p.meta[label_key])
            labels.setdefault(p.image, (label_names or {}).get(label, label))
    if labels and len(labels) == len(position):
        ordered = sorted(position, key=position.get)
        report["zero_shot"] = zero_shot(embedder, result.vectors, [labels[i] for i in ordered], templates=templates,
                                         subclasses=subclasses, members=members)
    return report
