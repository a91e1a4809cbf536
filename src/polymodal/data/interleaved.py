"""Interleaved image-text episodes for Flamingo, built from the scenes, emoji and moving-shape clip sets.

An episode is a list of media items (each a list of frame files: one for an image, several for a
clip) and a text with one `<image>` marker per item, cut into segments that are scored (the model
learns to write them) or not (the prompt). Four kinds (Alayrac et al. 2022 train on interleaved web
pages, image-text pairs and video-text pairs; these are their small, checkable stand-ins):

    captions   <image>Caption: a red circle.\\n<image>Caption: two squares ...\\n     (scenes)
    vqa        <image>Question: q Answer: a\\n x (shots + 1), every answer scored   (scenes, few-shot)
    emoji      <image>Caption: an emoji of a cat.\\n ...                           (emoji)
    video      <image>Video: a red circle moves left to right.\\n                  (clips, F frames)

Data sets are the builders' folders (`polymodal data scenes|emoji|clips`): scenes' captions.jsonl
(image, text, qa, split), emoji's (image, text, split, dataset "emoji"), clips' clips.jsonl
(frames, text, motion, shape, colour, split). `encode_episode` turns an episode into ids and targets.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

IMAGE = "<image>"
IGNORE_INDEX = -100


@dataclass
class Episode:
    kind: str
    media: list[list[str]]  # per item, its frame files in order (one for an image)
    segments: list[tuple[str, bool]]  # (text, scored); the text holds one IMAGE marker per item
    answer: str | None = None  # vqa / video: what the last item's text should say (evaluation)
    meta: dict = field(default_factory=dict)

    @property
    def text(self) -> str:
        return "".join(t for t, _ in self.segments)


def encode_interleaved(text: str, encode: Callable[[str], list[int]], image_token_id: int) -> list[int]:
    """Token ids of `text`, each IMAGE marker replaced by `image_token_id` (the text between markers
    is tokenized on its own, so a marker never merges with its neighbours)."""
    ids: list[int] = []
    for k, piece in enumerate(text.split(IMAGE)):
        if k:
            ids.append(image_token_id)
        if piece:
            ids.extend(encode(piece))
    return ids


def encode_episode(episode: Episode, encode: Callable[[str], list[int]], image_token_id: int,
                   bos_id: int | None = None) -> tuple[list[int], list[int]]:
    """(ids, targets): targets are the ids on scored segments and -100 elsewhere."""
    ids, targets = ([bos_id], [IGNORE_INDEX]) if bos_id is not None else ([], [])
    for text, scored in episode.segments:
        piece = encode_interleaved(text, encode, image_token_id)
        ids += piece
        targets += piece if scored else [IGNORE_INDEX] * len(piece)
    return ids, targets


# --- reading the builders' folders --------------------------------------------------------------


def _lines(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (build the data set first: polymodal data ...)")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def read_scenes(root, split: str) -> list[dict]:
    """One record per scene of `split`: {"image": absolute path, "captions": [...], "qa": [...]}."""
    root = Path(root)
    scenes: dict[str, dict] = {}
    for r in _lines(root / "captions.jsonl"):
        if r.get("split") != split or "qa" not in r:
            continue
        s = scenes.setdefault(r["image"], {"image": str(root / r["image"]), "captions": [], "qa": r["qa"]})
        s["captions"].append(r["text"])
    return list(scenes.values())


def read_emoji(root, split: str) -> list[dict]:
    """{"image", "captions"} per emoji image of `split` (a mix folder's or an emoji folder's captions.jsonl)."""
    root = Path(root)
    items: dict[str, dict] = {}
    for r in _lines(root / "captions.jsonl"):
        if r.get("split") != split or r.get("dataset", "emoji") != "emoji" or "emoji" not in r:
            continue
        items.setdefault(r["image"], {"image": str(root / r["image"]), "captions": []})["captions"].append(r["text"])
    return [v for v in items.values() if any(c.startswith("an emoji of") for c in v["captions"])]


def read_clips(root, split: str) -> list[dict]:
    """{"frames": [absolute paths], "captions", "motion", "shape", "colour"} per clip of `split`."""
    root = Path(root)
    clips: dict[str, dict] = {}
    for r in _lines(root / "clips.jsonl"):
        if r.get("split") != split:
            continue
        key = r["frames"][0]
        c = clips.setdefault(key, {"frames": [str(root / f) for f in r["frames"]], "captions": [],
                                   "motion": r["motion"], "shape": r["shape"], "colour": r["colour"]})
        c["captions"].append(r["text"])
    return list(clips.values())


# --- episodes -----------------------------------------------------------------------------------


def caption_episode(rng: random.Random, scenes: list[dict], k: int = 3, kind: str = "captions") -> Episode:
    picks = rng.sample(scenes, k)
    segments = []
    for s in picks:
        segments += [(f"{IMAGE}Caption:", False), (f" {rng.choice(s['captions'])}.\n", True)]
    return Episode(kind, [[s["image"]] for s in picks], segments)


def vqa_episode(rng: random.Random, scenes: list[dict], shots: int = 2, *, score_shots: bool = True) -> Episode:
    """shots solved examples, then the query; every answer scored (or only the query's)."""
    picks = rng.sample(scenes, shots + 1)
    segments, answer, meta = [], None, {}
    for k, s in enumerate(picks):
        qa = rng.choice(s["qa"])
        last = k == shots
        segments += [(f"{IMAGE}Question: {qa['q']} Answer:", False), (f" {qa['a']}\n", last or score_shots)]
        if last:
            answer, meta = qa["a"], {"type": qa.get("type")}
    return Episode("vqa", [[s["image"]] for s in picks], segments, answer=answer, meta=meta)


def video_episode(rng: random.Random, clips: list[dict]) -> Episode:
    c = rng.choice(clips)
    text = next((t for t in c["captions"] if t.endswith(c["motion"])), c["captions"][0])
    return Episode("video", [c["frames"]], [(f"{IMAGE}Video:", False), (f" {text}.\n", True)], answer=text,
                   meta={"motion": c["motion"], "shape": c["shape"], "colour": c["colour"]})


def training_episodes(rng: random.Random, *, scenes: list[dict], emoji: list[dict] | None = None,
                      clips: list[dict] | None = None, weights: dict[str, float] | None = None):
    """An endless stream of training episodes of the kinds the data allow, drawn by `weights`."""
    weights = weights or {"captions": 1.0, "vqa": 2.0, "emoji": 0.5, "video": 1.5}
    makers = {"captions": lambda: caption_episode(rng, scenes, rng.randint(1, 3)),
              "vqa": lambda: vqa_episode(rng, scenes, rng.randint(0, 2))}
    if emoji:
        makers["emoji"] = lambda: caption_episode(rng, emoji, rng.randint(1, 3), kind="emoji")
    if clips:
        makers["video"] = lambda: video_episode(rng, clips)
    kinds = [k for k in makers if weights.get(k, 0) > 0]
    while True:
        yield makers[rng.choices(kinds, [weights[k] for k in kinds])[0]]()


__all__ = ["IMAGE", "Episode", "caption_episode", "encode_episode", "encode_interleaved", "read_clips",
           "read_emoji", "read_scenes", "training_episodes", "video_episode", "vqa_episode"]
