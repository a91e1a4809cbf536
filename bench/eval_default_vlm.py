"""Held-out results of a VLM trained with `polymodal train vlm` (MODEL_CARD.md's default-VLM figures).

    python bench/eval_default_vlm.py --model runs/vlm --data data/mix2 [--per-type 40] [--out eval.json]

- scenes VQA: questions about held-out scenes (split "test"), accuracy per question type (count,
  colour, shape, position, yes/no); an answer is right when its first word is the expected one.
- emoji captioning: held-out emoji (whole emoji never trained on); exact = the emoji's name appears
  in the caption, token-F1 against the reference caption.
- a chat about a held-out image whose follow-up needs the LLM's own knowledge.
Greedy decoding throughout; questions are drawn with a fixed seed.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import polymodal
from polymodal.tasks.vlm import CAPTION_PROMPT


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def token_f1(prediction: str, reference: str) -> float:
    p, r = Counter(words(prediction)), Counter(words(reference))
    common = sum((p & r).values())
    if common == 0:
        return 0.0
    precision, recall = common / sum(p.values()), common / sum(r.values())
    return 2 * precision * recall / (precision + recall)


def heldout_rows(data: Path, dataset: str) -> dict[str, list[dict]]:
    """The test rows of one data set in the mix, grouped by image."""
    rows: dict[str, list[dict]] = defaultdict(list)
    with open(data / "captions.jsonl", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if row.get("split") == "test" and (row.get("dataset") or row["image"].split("/")[0]) == dataset:
                rows[row["image"]].append(row)
    return rows


def scenes_vqa(vlm, data: Path, per_type: int, rng: random.Random) -> dict:
    by_type: dict[str, list[tuple[str, str, str]]] = defaultdict(list)
    for image, rows in heldout_rows(data, "scenes").items():
        for qa in rows[0].get("qa") or []:
            by_type[qa["type"]].append((str(data / image), qa["q"][:1].upper() + qa["q"][1:], qa["a"]))
    result, examples = {}, []
    for kind, items in sorted(by_type.items()):
        picked = rng.sample(items, min(per_type, len(items)))
        right = 0
        replies = vlm.ask_many([p for p, _, _ in picked], [q for _, q, _ in picked], max_new_tokens=6)
        for (path, question, answer), reply in zip(picked, replies, strict=True):
            ok = words(reply)[:1] == words(answer)[:1]
            right += ok
            if len(examples) < 12:
                examples.append({"image": path, "q": question, "expected": answer, "answer": reply, "right": ok})
        majority = Counter(a for _, _, a in picked).most_common(1)[0][1] / len(picked)
        result[kind] = {"questions": len(picked), "accuracy": right / len(picked), "majority_baseline": majority}
    return {"per_type": result, "examples": examples}


def emoji_captions(vlm, data: Path, limit: int, rng: random.Random) -> dict:
    images = [(image, rows) for image, rows in heldout_rows(data, "emoji").items()
              if rows[0].get("heldout") and rows[0].get("name")]
    picked = rng.sample(images, min(limit, len(images)))
    exact, f1, examples = 0, 0.0, []
    captions = vlm.caption_many([str(data / image) for image, _ in picked], max_new_tokens=16)
    for (image, rows), caption in zip(picked, captions, strict=True):
        name = rows[0]["name"].lower()
        hit = name in caption.lower()
        exact += hit
        f1 += token_f1(caption, rows[0]["text"])
        if len(examples) < 12:
            examples.append({"image": image, "name": name, "caption": caption, "exact": hit})
    n = max(len(picked), 1)
    return {"images": len(picked), "exact_name": exact / n, "token_f1": f1 / n, "examples": examples}


def chat_transcript(vlm, data: Path) -> dict:
    """A chat about a held-out emoji of an animal or a food: what is it, then a question whose answer
    is not in the picture."""
    rows = heldout_rows(data, "emoji")
    for image, rs in sorted(rows.items()):
        r = rs[0]
        if r.get("heldout") and r.get("category") in ("animals-nature", "food-drink") and r.get("style") == "apple":
            chat = vlm.chat(str(data / image), max_new_tokens=40)
            turns = []
            for question in ("What is in this picture?", "Tell me one interesting fact about it."):
                turns.append({"user": question, "assistant": chat.send(question)})
            return {"image": image, "name": r["name"], "turns": turns}
    return {}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="A VLM directory.")
    ap.add_argument("--data", type=Path, required=True, help="The mix the VLM was trained on (its test split).")
    ap.add_argument("--per-type", type=int, default=40, help="Scenes questions per type.")
    ap.add_argument("--emoji", type=int, default=80, help="Held-out emoji to caption.")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="Write the results as JSON here too.")
    args = ap.parse_args(argv)

    started = time.perf_counter()
    vlm = polymodal.load_vlm(args.model)
    results = {"model": args.model or "default", "caption_prompt": CAPTION_PROMPT,
               "scenes_vqa": scenes_vqa(vlm, args.data, args.per_type, random.Random(args.seed)),
               "emoji_captioning": emoji_captions(vlm, args.data, args.emoji, random.Random(args.seed)),
               "chat": chat_transcript(vlm, args.data)}
    results["seconds"] = round(time.perf_counter() - started, 1)
    text = json.dumps(results, indent=1, ensure_ascii=False)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    print("\n| question type | accuracy | majority baseline |\n| --- | --- | --- |", file=sys.stderr)
    for kind, r in results["scenes_vqa"]["per_type"].items():
        print(f"| {kind} | {r['accuracy']:.2f} | {r['majority_baseline']:.2f} |", file=sys.stderr)
    e = results["emoji_captioning"]
    print(f"emoji captions: exact name {e['exact_name']:.2f}, token-F1 {e['token_f1']:.2f}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
