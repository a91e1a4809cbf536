"""Does bf16 autocast cost the VLM's stage 1 anything? The same steps in bf16 and in fp32, from one init.

    python bench/stage1_precision.py --data data/mix2 [--recipe default-vlm-v10] [--tiles 0] [--steps 300]

Builds the recipe's stage-1 model (the frozen tower's features cached in --work), trains it --steps
steps in each precision from the same initial weights and the same batches, and prints the 50-step
means of the ITC, ITM and ITG losses and the seconds a step (MODEL_CARD.md, "Does bf16 cost stage 1
anything?").
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from polymodal.cli.train import recipe_path
from polymodal.train.blip2 import Blip2TrainConfig, train_blip2
from polymodal.train.vlm import VLMRecipe, build_models, cached_features, load_examples, stage1_batches


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="The mix the recipe trains on.")
    ap.add_argument("--recipe", default="default-vlm-v10", help="A recipe .json or a shipped recipe name.")
    ap.add_argument("--tiles", type=int, default=0, help="Override the recipe's tiles (0: the whole picture only).")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--work", type=Path, default=Path("runs/stage1-precision"), help="Where the features are kept.")
    args = ap.parse_args(argv)

    recipe = replace(VLMRecipe.from_dict(json.loads(recipe_path(args.recipe).read_text())), tiles=args.tiles)
    torch.manual_seed(recipe.seed)
    stage1, _, _, _, qtok = build_models(recipe)
    examples = load_examples(args.data, "train")
    args.work.mkdir(parents=True, exist_ok=True)
    features, bad = cached_features(args.work / "features.safetensors", stage1, recipe.vision,
                                    [ex["image"] for ex in examples])
    keep = [i for i in range(len(examples)) if i not in set(bad)]
    examples, features = [examples[i] for i in keep], features[keep]
    init = copy.deepcopy(stage1.state_dict())
    s = recipe.stage1
    for bf16 in (True, False):
        stage1.load_state_dict(init)
        batches = stage1_batches(examples, features, qtok, batch_size=s.batch_size, max_text=recipe.max_text,
                                 weights=recipe.weights, seed=recipe.seed, qa_text=recipe.qa_text)
        started = time.perf_counter()
        history = train_blip2(stage1, batches, Blip2TrainConfig(steps=args.steps, lr=s.lr, warmup=s.warmup,
                                                                weight_decay=s.weight_decay, bf16=bf16))
        seconds = (time.perf_counter() - started) / args.steps
        print(f"{'bf16' if bf16 else 'fp32'}: {seconds:.2f} s a step")
        for i in range(0, args.steps, 50):
            span = history[i:i + 50]
            means = {k: sum(m[k] for m in span) / len(span) for k in ("itc_loss", "itm_loss", "itg_loss")}
            print(f"  steps {i + 1}-{i + len(span)}: " + ", ".join(f"{k} {v:.3f}" for k, v in means.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
