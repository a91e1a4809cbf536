"""Does a trained Flamingo use its images? Its held-out scores with the right media against the same
episodes with the query's image (or clip) swapped for another episode's: a model that reads the image
drops to chance on the swapped set; one that learned only the answers' prior does not.

    nice -n 10 .venv/bin/python bench/flamingo_eval.py /work/runs/flamingo

Reads the run's recipe.json for the data and the held-out set (the recipe's seed) and its
eval_end.json for the right-media scores; prints one JSON doc.
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import replace
from pathlib import Path

from polymodal.checkpoints.flamingo_io import load_flamingo_checkpoint
from polymodal.data.interleaved import read_clips, read_scenes
from polymodal.train.flamingo import VisionCache, eval_episodes, evaluate_flamingo


def main(run: str) -> None:
    run_dir = Path(run)
    recipe = json.loads((run_dir / "recipe.json").read_text())
    model, tokenizer, _, _ = load_flamingo_checkpoint(run_dir)
    scenes = read_scenes(recipe["scenes"], "test")
    clips = read_clips(recipe["clips"], "test")[: recipe["eval_clips"]] if recipe["clips"] != "None" else None
    held_out = eval_episodes(random.Random(1234), scenes=scenes, clips=clips, vqa=recipe["eval_vqa"],
                             shots=recipe["shots"])
    # the same episodes, each query's media taken from the next episode of its kind
    swapped = []
    for kind in ("vqa", "video"):
        group = [e for e in held_out if e.kind == kind]
        for k, e in enumerate(group):
            other = group[(k + 1) % len(group)]
            swapped.append(replace(e, media=e.media[:-1] + [other.media[-1]]))
    encode = lambda text: tokenizer.backend.encode(text, add_special_tokens=False).ids  # noqa: E731
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    cache = VisionCache(model)
    bf16 = recipe["train"].get("bf16", False)
    end = run_dir / "eval_end.json"  # the run scored the right media already
    right = json.loads(end.read_text()) if end.is_file() else evaluate_flamingo(model, held_out, encode, decode,
                                                                                cache=cache, bf16=bf16)
    wrong = evaluate_flamingo(model, swapped, encode, decode, cache=cache, bf16=bf16)
    strip = lambda d: {k: {m: v for m, v in r.items() if m != "examples"} for k, r in d.items()}  # noqa: E731
    print(json.dumps({"right_media": strip(right), "swapped_media": strip(wrong)}, indent=2))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/work/runs/flamingo")
