"""What the default VLM's two stages read (train/vlm.py): examples from a folder data set, their
question-answer pairs, and the stage-1 and stage-2 batches drawn from them over cached features."""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from polymodal.data.scenes import swap_relation
from polymodal.models.lm import IGNORE_INDEX
from polymodal.tasks.vlm import CAPTION_PROMPT
from polymodal.train.chat_rows import ChatFormat


def _dataset_of(row: dict) -> str:
    return row.get("dataset") or row["image"].split("/", 1)[0]


def load_examples(folder: str | Path, split: str = "train") -> list[dict]:
    """One example per image of `split`: {"image" (path), "dataset", "captions" [...], "qa" [{q, a, type}],
    "name" (emoji and clip-art subjects), "objects" (a scene's, else None)}. Scenes bring their
    question-answer pairs; emoji and clip art are asked what they are (their name)."""
    folder = Path(folder)
    by_image: dict[str, dict] = {}
    with open(folder / "captions.jsonl", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if row.get("split", "train") != split:
                continue
            ex = by_image.setdefault(row["image"], {
                "image": str(folder / row["image"]), "dataset": _dataset_of(row), "captions": [],
                "qa": list(row.get("qa") or []), "name": row.get("name") or row.get("subject"),
                "objects": row.get("objects")})
            if row["text"] not in ex["captions"]:
                ex["captions"].append(row["text"])
    return list(by_image.values())


def pairs_by_kind(example: dict) -> dict[str, list[tuple[str, str]]]:
    """An example's (question, answer) pairs for stage 2 by kind: "caption" (the caption prompt with
    the first, fullest caption), a scene's questions under their type (colour, shape, count, ...),
    and "name" ("What is this?" with the emoji's or clip art's name)."""
    kinds: dict[str, list[tuple[str, str]]] = {"caption": [(CAPTION_PROMPT, example["captions"][0])]}
    for qa in example["qa"]:
        kinds.setdefault(qa.get("type", "question"), []).append((qa["q"][:1].upper() + qa["q"][1:], qa["a"]))
    if example.get("name"):
        kinds["name"] = [("What is this?", example["name"])]
    return kinds


def answer_pairs(example: dict) -> list[tuple[str, str]]:
    """All of an example's pairs_by_kind, the caption first."""
    return [pair for pairs in pairs_by_kind(example).values() for pair in pairs]


def pick_pair(example: dict, rng: random.Random) -> tuple[str, str]:
    """One of an example's pairs, its kind drawn first and uniformly, so rare question types are asked
    as often as common ones (a scene has a shape question per object, a colour question or none)."""
    kinds = pairs_by_kind(example)
    return rng.choice(kinds[rng.choice(sorted(kinds))])


def _pick(examples: list[dict], weights: dict[str, float], rng: random.Random) -> Iterator[int]:
    """Example indices forever: a data set drawn by `weights`, then one of its examples."""
    groups: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        groups.setdefault(ex["dataset"], []).append(i)
    names = [n for n in groups if weights.get(n, 0) > 0] or list(groups)
    w = [weights.get(n, 1.0) for n in names]
    while True:
        yield rng.choice(groups[rng.choices(names, w)[0]])


def stage1_batches(examples: list[dict], features: Tensor, tokenizer, *, batch_size: int, max_text: int,
                   weights: dict[str, float], seed: int = 0,
                   relation_negatives: float = 0.0, qa_text: float = 0.0) -> Iterator[dict[str, Tensor]]:
    """Stage-1 batches of distinct images (ITC's in-batch negatives are then true ones), one random
    caption each: `features`, `input_ids`, `attention_mask` ([CLS] text [SEP], right-padded), and
    `seed`, which seeds the batch's ITM negative mining: a run resumed mid-stage mines the same ones.
    With relation_negatives, that share of the scenes with a relation caption take it, and the
    batch also carries it swapped (`negative_ids`, `negative_mask`, `negative_rows`: the row whose
    image it does not match). With qa_text, that share of the images with question-answer pairs take
    one of them as their text instead, the question and its answer ("what colour is the star? red")."""
    rng = random.Random(seed)
    picks = _pick(examples, weights, rng)
    for n in itertools.count():
        chosen: list[int] = []
        while len(chosen) < batch_size:
            i = next(picks)
            if i not in chosen:
                chosen.append(i)
        texts, false, rows = [], [], []
        for r, i in enumerate(chosen):
            related = [(c, swap_relation(c)) for c in examples[i]["captions"]]
            related = [(c, f) for c, f in related if f is not None]
            qa = examples[i]["qa"]
            if qa and qa_text > 0 and rng.random() < qa_text:
                pair = rng.choice(qa)
                texts.append(f"{pair['q']} {pair['a']}")
            elif related and relation_negatives > 0 and rng.random() < relation_negatives:
                caption, swapped = rng.choice(related)
                texts.append(caption)
                false.append(swapped)
                rows.append(r)
            else:
                texts.append(rng.choice(examples[i]["captions"]))
        input_ids, mask = _padded([tokenizer.encode(t)[:max_text] for t in texts], tokenizer.pad_id)
        batch = {"features": features[chosen], "input_ids": input_ids, "attention_mask": mask,
                 "seed": torch.tensor(seed * 1_000_003 + n)}
        if false:
            batch["negative_ids"], batch["negative_mask"] = _padded(
                [tokenizer.encode(t)[:max_text] for t in false], tokenizer.pad_id)
            batch["negative_rows"] = torch.tensor(rows)
        yield batch


def _padded(ids: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-padded ids (B, T) and their attention mask."""
    input_ids = torch.full((len(ids), max(len(r) for r in ids)), pad_id, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for r, row in enumerate(ids):
        input_ids[r, :len(row)] = torch.tensor(row)
        mask[r, :len(row)] = 1
    return input_ids, mask


def stage2_batches(examples: list[dict], features: Tensor, fmt: ChatFormat, *, batch_size: int,
                   weights: dict[str, float], seed: int = 0, chats: list[dict] | None = None,
                   chat_weight: float = 0.0, instructions: int = 0) -> Iterator[dict[str, Tensor]]:
    """Stage-2 batches: `features`, `input_ids` (B, T) after the visual prompt (right-padded) and
    `targets` (B, T): the answers and their end-of-turn tokens, -100 elsewhere. A row is one of an
    example's answer_pairs (`pick_pair`); with probability chat_weight a batch is
    instead batch_size // 2 of the two-turn `chats` (about twice as long: a batch of one kind pads less).
    instructions > 0: also `instruction`, `instruction_mask` (B, at most that many tokens): each row's
    first question in the LLM's tokens, which an instruction-aware model's queries read."""
    rng = random.Random(seed)
    picks = _pick(examples, weights, rng)
    pad = fmt.tokenizer.pad_id
    while True:
        if chats and rng.random() < chat_weight:
            picked = [rng.choice(chats) for _ in range(max(1, batch_size // 2))]
            chosen = [chat["example"] for chat in picked]
            conversations = [[tuple(t) for t in chat["turns"]] for chat in picked]
        else:
            chosen = [next(picks) for _ in range(batch_size)]
            conversations = [[pick_pair(examples[i], rng)] for i in chosen]
        rows = [fmt.turns(pairs) for pairs in conversations]
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        targets = torch.full_like(input_ids, IGNORE_INDEX)
        for r, (ids, spans) in enumerate(rows):
            input_ids[r, :len(ids)] = torch.tensor(ids)
            for start, end in spans:
                targets[r, start:end] = torch.tensor(ids[start:end])
        batch = {"features": features[chosen], "input_ids": input_ids, "targets": targets}
        if instructions:
            encode = fmt.tokenizer.backend.encode
            batch["instruction"], batch["instruction_mask"] = _padded(
                [encode(pairs[0][0], add_special_tokens=False).ids[:instructions] for pairs in conversations], pad)
        yield batch


__all__ = ["answer_pairs", "load_examples", "pairs_by_kind", "pick_pair", "stage1_batches", "stage2_batches"]
