"""Do stage 1's queries hold what the scenes questions ask? Read by the Q-Former's own decoder.

    python bench/probe_stage1_qa.py --run runs/vlm --data data/mix2 [--per-type 300]

Stage 2 can only pass on what the 16 queries hold, and stage 1 is cheap next to stage 2 (the
Q-Former alone against the frozen LLM's 30 layers). So before stage 2, ask stage 1: for held-out
scenes (split "test"), each question's candidate answers (every answer of its type in the training
split) are scored by the ITG head's log-likelihood of "question answer" given the queries, and the
best one is the model's answer. Its ITG head reads the queries alone, never the image, so a right
answer here is one the queries carry. Reads `stage1.safetensors`, or the last `stage1-state` of a
run still in stage 1. Meaningful for a run trained with `qa_text` > 0 (else the ITG head has never
seen a question).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch
from safetensors import safe_open

from polymodal.models.blip2 import read_image
from polymodal.models.lm import IGNORE_INDEX
from polymodal.train.vlm import VLMRecipe, _padded, build_models, load_examples, vision_features


def stage1_weights(run: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The run's stage-1 weights and where they came from (the finished stage, or its last saved step)."""
    for name in ("stage1.safetensors", "stage1-state.safetensors"):
        if (run / name).is_file():
            with safe_open(str(run / name), "pt") as f:
                step = (f.metadata() or {}).get("step", "done")
                return {k: f.get_tensor(k) for k in f.keys()}, f"{name} (step {step})"  # noqa: SIM118
    raise FileNotFoundError(f"{run}: no stage1.safetensors or stage1-state.safetensors")


@torch.no_grad()
def answer_scores(stage1, qtok, features: torch.Tensor, question: str, candidates: list[str],
                  max_text: int) -> torch.Tensor:
    """(len(candidates),) log-likelihoods of each answer (and the closing [SEP]) after the question,
    the ITG head reading one image's queries."""
    ids, mask = _padded([qtok.encode(f"{question} {c}")[:max_text] for c in candidates], qtok.pad_id)
    asked = len(qtok.encode(question)) - 1  # [CLS] question: not scored
    logits = stage1._itg(features.expand(len(candidates), -1, -1), ids, mask, False)[:, :-1].float()
    targets = ids.masked_fill(mask == 0, IGNORE_INDEX)[:, 1:].clone()
    targets[:, :asked - 1] = IGNORE_INDEX
    picked = logits.log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    return (picked * (targets != IGNORE_INDEX)).sum(1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, required=True, help="A `polymodal train vlm` output directory.")
    ap.add_argument("--data", type=Path, required=True, help="The mix it trains on (its test split).")
    ap.add_argument("--per-type", type=int, default=300, help="Questions per type (two draws of 100 differed by up to 0.2).")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    started = time.perf_counter()
    recipe = VLMRecipe.from_dict(json.loads((args.run / "recipe.json").read_text()))
    stage1, _, _, _, qtok = build_models(recipe)
    weights, source = stage1_weights(args.run)
    stage1.load_state_dict(weights, strict=False)  # the frozen ViT is not in a saved state
    stage1.eval()
    answers: dict[str, set[str]] = defaultdict(set)
    for ex in load_examples(args.data, "train"):
        for qa in ex["qa"]:
            answers[qa["type"]].add(qa["a"])
    test = [ex for ex in load_examples(args.data, "test") if ex["dataset"] == "scenes"]
    features, _ = vision_features(stage1.visual, [ex["image"] for ex in test], stage1.cfg.image_transform,
                                  tiles=stage1.cfg.tiles, tile_pool=stage1.cfg.tile_pool)
    features = read_image(stage1, None, features, False)  # with a tiled model's view embedding
    items: dict[str, list] = defaultdict(list)
    for i, ex in enumerate(test):
        for qa in ex["qa"]:
            items[qa["type"]].append((i, qa["q"], qa["a"]))
    rng = random.Random(args.seed)
    print(f"{args.run}: {source}, {recipe.qa_text=}\n\n| question type | accuracy | majority answer | questions |")
    print("| --- | --- | --- | --- |")
    for kind in sorted(items):
        picked = rng.sample(items[kind], min(args.per_type, len(items[kind])))
        candidates = sorted(answers[kind])
        right = sum(candidates[int(answer_scores(stage1, qtok, features[i:i + 1], q, candidates,
                                                 recipe.max_text).argmax())] == a for i, q, a in picked)
        majority = Counter(a for _, _, a in picked).most_common(1)[0][1]
        print(f"| {kind} | {right / len(picked):.2f} | {majority / len(picked):.2f} | {len(picked)} |")
    print(f"\n{time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
