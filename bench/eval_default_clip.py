"""The figures of MODEL_CARD.md: the default CLIP (or any --model) on held-out data.

    .venv/bin/python bench/eval_default_clip.py --emoji DATA/emoji --clipart DATA/clipart --scenes DATA/scenes

DATA/emoji must hold the Apple style too (`polymodal data emoji DATA/emoji --style google
--style twitter --style openmoji --style apple`). Prints one JSON document, then (to stderr) the
MODEL_CARD's table rows. `--stamps DATA/stamps` (`polymodal data stamps`) adds Tux Paint's held-out
subjects, each asked once by name (found when any of its pictures is among the ten best).
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

SYNONYMS = {  # a query no caption contains -> words of the emoji names it should find
    "kitty": ("cat",), "automobile": ("car", "automobile", "taxi"), "puppy": ("dog", "poodle"),
    "sweetheart": ("heart", "kiss", "love"), "beverage": ("coffee", "tea", "beer", "wine", "drink", "cocktail",
                                                           "milk", "juice", "sake", "bottle", "cup", "glass"),
}
TEMPLATES = ("{}", "an emoji of {}", "a picture of {}")


def emoji_hierarchy(root) -> dict[str, list[str]]:
    """Each emoji category's subcategories, in words ("animals-nature": ["animal bird", ...])."""
    subs: dict[str, set[str]] = {}
    with open(f"{root}/captions.jsonl") as f:
        for line in f:
            row = json.loads(line)
            subs.setdefault(row["category"], set()).add(row["subcategory"].replace("-", " "))
    return {c: sorted(s) for c, s in subs.items()}


def name_ceiling(embedder, root, hierarchy) -> dict:
    """Zero-shot category accuracy of the held-out emoji's *names* ("an emoji of {name}") through the
    text tower: what a vision tower that put every image exactly on its name would score."""
    from polymodal.tasks.evaluate import zero_shot

    names: dict[str, str] = {}
    with open(f"{root}/captions.jsonl") as f:
        for line in f:
            row = json.loads(line)
            if row["split"] == "test" and row["style"] == "google":
                names[row["name"]] = row["category"]
    vectors = embedder.encode_text([f"an emoji of {n}" for n in names])
    labels = list(names.values())
    return {"names": len(names), "category_prompts": zero_shot(embedder, vectors, labels, templates=TEMPLATES).accuracy,
            "with_subcategories": zero_shot(embedder, vectors, labels, templates=TEMPLATES,
                                            subclasses=hierarchy).accuracy}


def member_names(embedder, root, where: dict[str, str], k: int = 20, temperature: float = 0.05) -> dict:
    """Category accuracy when each category is described by the names of its *training* emoji
    ("an emoji of {name}"), not by its own name: each held-out image takes the categories of its k
    most similar names, each vote weighted exp(cosine / temperature) (`member_votes`; `polymodal
    classify --members`). Only text describes the classes (no labelled image), so it is still
    zero-shot; the held-out emoji's own names are in no list. `ceiling`: the same done with the
    held-out emoji's names in place of their images."""
    from polymodal.data.pairs import PairDataset
    from polymodal.tasks.evaluate import member_votes

    members: dict[str, set[str]] = {}
    held: dict[str, str] = {}
    ceiling_names: dict[str, str] = {}
    with open(f"{root}/captions.jsonl") as f:
        for line in f:
            row = json.loads(line)
            if row["split"] == "train":
                members.setdefault(row["category"], set()).add(row["name"])
            elif all(str(row.get(key)) == value for key, value in where.items()):
                ceiling_names[row["name"]] = row["category"]
    data = PairDataset(root, split="test")
    for p in data.pairs:
        if all(str(p.meta.get(key)) == value for key, value in where.items()):
            held[p.image] = str(p.meta["category"])
    classes = sorted(set(held.values()))
    groups = {c: sorted(members.get(c, ())) for c in classes}

    def vote(vectors: np.ndarray) -> np.ndarray:
        return member_votes(embedder, _unit(vectors), classes, groups, ("an emoji of {}",), k, temperature).argmax(1)

    images = sorted(held)
    truth = np.array([classes.index(held[i]) for i in images])
    accuracy = float((vote(embedder.encode_image([str(data.root / i) for i in images])) == truth).mean())
    texts = [(n, c) for n, c in ceiling_names.items() if c in classes]
    ceiling = vote(embedder.encode_text([f"an emoji of {n}" for n, _ in texts]))
    return {"images": len(images), "accuracy": round(accuracy, 3),
            "ceiling": round(float((ceiling == np.array([classes.index(c) for _, c in texts])).mean()), 3)}


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def synonym_search(embedder, root, style: str = "apple", k: int = 10) -> dict:
    """For each query: is any image whose name holds one of its words in the top k, and how many."""
    from polymodal.data.pairs import PairDataset

    data = PairDataset(root, split="test")
    names = {}
    for p in data.pairs:
        if p.meta.get("style") == style:
            names.setdefault(p.image, str(p.meta.get("name", "")))
    images = list(names)
    vectors = embedder.encode_image([str(data.root / i) for i in images])
    out = {}
    for query, words in SYNONYMS.items():
        scores = vectors @ embedder.encode_text([query])[0]
        top = np.argsort(-scores)[:k]
        relevant = [any(w in names[images[i]].split() for w in words) for i in top]
        out[query] = {"hit": bool(any(relevant)), "relevant_in_top": int(sum(relevant)),
                      "top": [names[images[i]] for i in top[:5]]}
    return {"pool": len(images), "style": style, "queries": out}


def negative_preference(embedder, root) -> dict:
    """Each held-out scene's full description against the same with one word changed, per kind of change
    (train/negatives.py): how often the picture scores its true caption higher (chance 0.5)."""
    import random
    from pathlib import Path

    from polymodal.train.negatives import KINDS, hard_negative

    first: dict[str, str] = {}
    with open(Path(root) / "captions.jsonl", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if row.get("split") == "test":
                first.setdefault(row["image"], row["text"])  # a scene's first caption names every object
    images = list(first)
    vectors = embedder.encode_image([str(Path(root) / i) for i in images])
    rng, right = random.Random(0), {k: [] for k in KINDS}
    for vector, image in zip(vectors, images, strict=True):
        for kind in KINDS:
            negative = hard_negative(first[image], rng, kinds=[kind])
            if negative is not None:
                true, false = embedder.encode_text([first[image], negative]) @ vector
                right[kind].append(bool(true > false))
    return {k: {"pairs": len(v), "true_wins": float(np.mean(v))} for k, v in right.items() if v}


def main() -> None:
    import polymodal
    from polymodal.tasks.evaluate import evaluate_folder

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=None)
    ap.add_argument("--emoji", required=True)
    ap.add_argument("--clipart", required=True)
    ap.add_argument("--scenes", required=True)
    ap.add_argument("--stamps", default=None)
    args = ap.parse_args()
    embedder = polymodal.load(args.model)

    def summary(report, per_class=False):
        out = {"images": report["images"], "texts": report["texts"], **report["retrieval"]}
        if "retrieval_by_text" in report:
            out["by_query"] = report["retrieval_by_text"]
        if "zero_shot" in report:
            out["zero_shot_accuracy"] = report["zero_shot"].accuracy
            if per_class:
                out["per_class"] = report["zero_shot"].per_class
        return out

    figures: dict = {"emoji_heldout": {}, "emoji_heldout_subcategories": {}, "emoji_member_names": {},
                     "emoji_names": {}}
    hierarchy = emoji_hierarchy(args.emoji)
    for style in ("google", "twitter", "openmoji", "apple"):
        where = {"style": style} if style != "apple" else {"style": "apple", "heldout": "True"}
        figures["emoji_heldout"][style] = summary(evaluate_folder(
            embedder, args.emoji, split="test", label_key="category", templates=TEMPLATES, where=where), True)
        # the same, each category also named by its subcategories (CHiLS)
        figures["emoji_heldout_subcategories"][style] = summary(evaluate_folder(
            embedder, args.emoji, split="test", label_key="category", templates=TEMPLATES, where=where,
            subclasses=hierarchy), True)
        figures["emoji_member_names"][style] = member_names(embedder, args.emoji, where)
        figures["emoji_names"][style] = summary(evaluate_folder(
            embedder, args.emoji, split="test", label_key=None, where=where, text_key="name"))
    figures["emoji_apple_all"] = summary(evaluate_folder(
        embedder, args.emoji, split="test", label_key="category", templates=TEMPLATES, where={"style": "apple"}), True)
    figures["emoji_name_ceiling"] = name_ceiling(embedder, args.emoji, hierarchy)
    figures["synonyms"] = synonym_search(embedder, args.emoji)
    figures["clipart_subjects"] = summary(evaluate_folder(embedder, args.clipart, split="test", label_key=None,
                                                          text_key="name"))
    # scenes with one object: its colour and its shape; all scenes: how many objects
    figures["scenes_colour"] = summary(evaluate_folder(embedder, args.scenes, split="test", label_key="colour",
                                                       where={"count": "1"}, templates=("a {} shape", "a {} object")))
    figures["scenes_shape"] = summary(evaluate_folder(embedder, args.scenes, split="test", label_key="shape",
                                                      where={"count": "1"}, templates=("a {}", "a picture of a {}")))
    figures["scenes_count"] = summary(evaluate_folder(
        embedder, args.scenes, split="test", label_key="count", templates=("{} shapes", "{} objects"),
        label_names={"1": "one", "2": "two", "3": "three", "4": "four"}), True)
    figures["scenes_negatives"] = negative_preference(embedder, args.scenes)
    if args.stamps:
        figures["stamps_subjects"] = summary(evaluate_folder(embedder, args.stamps, split="test", label_key=None,
                                                             text_key="name"))
    print(json.dumps(figures, indent=1))
    print(table(figures), file=sys.stderr)


def table(figures: dict) -> str:
    """The MODEL_CARD's rows (styles in the order Google / Twitter / OpenMoji / Apple held out)."""
    styles = ("google", "twitter", "openmoji", "apple")

    def row(values) -> str:
        return " / ".join(f"{v:.3f}" for v in values)

    apple, clipart = figures["emoji_apple_all"], figures["clipart_subjects"]
    lines = [
        f"through member names | {row(figures['emoji_member_names'][s]['accuracy'] for s in styles)}",
        f"category prompts | {row(figures['emoji_heldout'][s]['zero_shot_accuracy'] for s in styles)}",
        f"text->image R@10, names | {row(figures['emoji_names'][s]['text_to_image_R@10'] for s in styles)}",
        f"all Apple: zero-shot / R@10 | {apple['zero_shot_accuracy']:.3f} / {apple['text_to_image_R@10']:.3f}",
        f"clip art R@10, per picture / by subject | {clipart['text_to_image_R@10']:.3f} / "
        f"{clipart['by_query']['text_to_image_R@10']:.3f}",
        f"scenes colour / shape / count | {figures['scenes_colour']['zero_shot_accuracy']:.3f} / "
        f"{figures['scenes_shape']['zero_shot_accuracy']:.3f} / {figures['scenes_count']['zero_shot_accuracy']:.3f}",
        "synonyms that hit | " + ", ".join(q for q, r in figures["synonyms"]["queries"].items() if r["hit"]),
    ]
    if "stamps_subjects" in figures:
        lines.append(f"held-out stamps, R@10 by subject | {figures['stamps_subjects']['by_query']['text_to_image_R@10']:.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
