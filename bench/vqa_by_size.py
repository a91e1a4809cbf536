"""A VLM's colour and shape answers on held-out scenes, split by the size of the object asked about.

    python bench/vqa_by_size.py [--model PATH] --data data/scenes [--per-cell 40]

"What colour is the star?" must find the star; "what shape is the red object?" must read its shape.
Only questions whose object is the one of its colour (or shape) in the scene count. An answer is right
when its first word is the expected one, as in bench/eval_default_vlm.py. Small shapes are what the
default CLIP's patch tokens hold worst (bench/probe_objects.py).
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections import Counter, defaultdict
from pathlib import Path

import polymodal

PATTERNS = {"colour": re.compile(r"what colou?r is the (\w+)\?"), "shape": re.compile(r"what shape is the (\w+) object\?")}


def questions(data: Path, split: str = "test") -> list[tuple[str, str, str, str, str]]:
    """(image, question, answer, kind, size of the object asked about) for every usable question."""
    seen, out = set(), []
    for line in (data / "captions.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row.get("split") != split or not row.get("qa") or row["image"] in seen:
            continue
        seen.add(row["image"])
        for qa in row["qa"]:
            pattern = PATTERNS.get(qa["type"])
            match = pattern.fullmatch(qa["q"]) if pattern else None
            if not match:
                continue
            key = "shape" if qa["type"] == "colour" else "colour"  # the attribute the question names
            objects = [o for o in row["objects"] if o[key] == match.group(1)]
            if len(objects) == 1:
                out.append((str(data / row["image"]), qa["q"], qa["a"], qa["type"], objects[0]["size"]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="A VLM (default: the shipped default VLM).")
    ap.add_argument("--data", type=Path, required=True, help="A `polymodal data scenes` folder.")
    ap.add_argument("--per-cell", type=int, default=40, help="Questions per kind and size.")
    args = ap.parse_args()
    t0 = time.time()
    vlm = polymodal.load_vlm(args.model)
    right, asked = defaultdict(list), Counter()
    for image, question, answer, kind, size in questions(args.data):
        if asked[kind, size] >= args.per_cell:
            continue
        asked[kind, size] += 1
        words = vlm.ask(image, question, max_new_tokens=4).strip().lower().split()
        right[kind, size].append(bool(words) and words[0].strip(".,!") == answer)
    print("| question | asked object large | asked object small |")
    print("| --- | --- | --- |")
    for kind in ("colour", "shape"):
        cells = [right[kind, size] for size in ("large", "small")]
        print(f"| {kind} | " + " | ".join(f"{sum(c) / max(len(c), 1):.2f} ({len(c)})" for c in cells) + " |")
    print(f"({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
