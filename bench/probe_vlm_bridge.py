"""Where does the image get lost on its way into the LLM? Linear probes along a trained VLM's bridge.

    python bench/probe_vlm_bridge.py --run runs/vlm --data data/mix [--n 4000]

For generated scenes of the training split, ridge-regression probes read five facts from each stage
of the bridge: which colours are in the scene, which shapes, how many objects, and where: which
colours are in the left and the right half, and the colour of the leftmost object. The stages: the
frozen ViT's class token, its mean patch token and all its patch tokens side by side, the
Q-Former's queries after stage 1 (stage1.safetensors) and the final visual prompt
(model.safetensors). 80% of the scenes fit the
probe, 20% score it. A fact the ViT does not hold, no bridge can pass on; a fact the visual prompt
holds but the answers miss is the LLM side's to learn. Also printed: how long the prompt's
image-dependent part is against its part that is the same for every image.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from polymodal.models.blip2 import read_image
from polymodal.train.vlm import VLMRecipe, build_models, load_examples


def scene_objects(data: Path, examples: list[dict]) -> list[list[dict]]:
    """Each example's objects (shape, colour, size, x, y) from the data set's captions.jsonl."""
    rows = {}
    with open(data / "captions.jsonl", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if row.get("dataset") == "scenes":
                rows[str(data / row["image"])] = row
    return [rows[ex["image"]]["objects"] for ex in examples]


def scene_labels(objects: list[list[dict]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list]:
    """Multi-hot colours (N, C), multi-hot shapes (N, S), object counts (N,) and the colour names."""
    colours = sorted({o["colour"] for objs in objects for o in objs})
    shapes = sorted({o["shape"] for objs in objects for o in objs})
    C = torch.zeros(len(objects), len(colours))
    S = torch.zeros(len(objects), len(shapes))
    for i, objs in enumerate(objects):
        for o in objs:
            C[i, colours.index(o["colour"])] = 1
            S[i, shapes.index(o["shape"])] = 1
    return C, S, torch.tensor([len(objs) for objs in objects]), colours


def spatial_labels(objects: list[list[dict]], colours: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Where things are, the facts position questions need: multi-hot (colour, side) for each colour
    and the left or right half of the picture (N, 2C), and the colour of the leftmost object, one-hot (N, C)."""
    sides = torch.zeros(len(objects), 2 * len(colours))
    leftmost = torch.zeros(len(objects), len(colours))
    for i, objs in enumerate(objects):
        for o in objs:
            sides[i, 2 * colours.index(o["colour"]) + int(o["x"] >= 0.5)] = 1
        leftmost[i, colours.index(min(objs, key=lambda o: o["x"])["colour"])] = 1
    return sides, leftmost


def ridge_probe(X: torch.Tensor, Y: torch.Tensor, *, multi_hot: bool) -> float:
    """Held-out accuracy of the best of four ridge penalties: per label for multi-hot targets, of the
    argmax for one-hot ones."""
    X = X.reshape(len(X), -1).double()
    X = torch.cat([(X - X.mean(0)) / (X.std(0) + 1e-6), torch.ones(len(X), 1, dtype=X.dtype)], 1)
    Y = Y.double()
    n = int(0.8 * len(X))
    best = 0.0
    for lam in (1.0, 10.0, 100.0, 1000.0):
        A = X[:n]
        if A.shape[1] <= n:  # primal: (A'A + lam I) W = A'Y
            W = torch.linalg.solve(A.T @ A + lam * torch.eye(A.shape[1], dtype=A.dtype), A.T @ Y[:n])
        else:  # dual, the same W with an n x n system when features outnumber samples
            W = A.T @ torch.linalg.solve(A @ A.T + lam * torch.eye(n, dtype=A.dtype), Y[:n])
        P = X[n:] @ W
        acc = ((P > 0.5) == (Y[n:] > 0.5)).double().mean() if multi_hot else (P.argmax(1) == Y[n:].argmax(1)).double().mean()
        best = max(best, acc.item())
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, required=True, help="A `polymodal train vlm` output folder.")
    ap.add_argument("--data", type=Path, required=True, help="The data it trained on (captions.jsonl).")
    ap.add_argument("--n", type=int, default=4000, help="Training-split scenes to probe.")
    args = ap.parse_args()
    t0 = time.time()
    recipe = VLMRecipe.from_dict(json.loads((args.run / "recipe.json").read_text()))
    stage1, stage2, *_ = build_models(recipe)
    examples = load_examples(args.data)
    with safe_open(str(args.run / "features.safetensors"), "pt") as f:  # the run's cached ViT features
        features = f.get_tensor("features")
    if len(features) != len(examples):
        raise SystemExit(f"{args.run}: its features are for another data set than {args.data}")
    idx = [i for i, ex in enumerate(examples) if ex["dataset"] == "scenes"][:args.n]
    F = features[idx]
    objects = scene_objects(args.data, [examples[i] for i in idx])
    C, S, N, colours = scene_labels(objects)
    counts = torch.nn.functional.one_hot(N - N.min()).float()
    sides, leftmost = spatial_labels(objects, colours)

    stage1.load_state_dict(load_file(str(args.run / "stage1.safetensors")))
    trained = (args.run / "model.safetensors").is_file()  # a run still in stage 2 has stage 1's only
    if trained:
        stage2.load_state_dict(load_file(str(args.run / "model.safetensors")), strict=False)  # frozen parts: as built
    with torch.no_grad():
        queries = torch.cat([stage1.qformer(read_image(stage1, None, F[i:i + 256], False)).queries
                             for i in range(0, len(F), 256)])
        prompt = torch.cat([stage2.visual_prompt(None, features=F[i:i + 256]) for i in range(0, len(F), 256)]) \
            if trained else None

    print(f"{len(idx)} training scenes; baselines: the most common value of each label")
    base = lambda Y: ((Y.mean(0) > 0.5).float() == Y).float().mean().item()  # noqa: E731
    print(f"| {'stage':34s} | colours present | shapes present | object count | colour x side | leftmost colour |")
    print(f"| {'-' * 34} | --- | --- | --- | --- | --- |")
    top = lambda Y: (Y.argmax(1) == Y.sum(0).argmax()).float().mean().item()  # noqa: E731
    print(f"| {'majority baseline':34s} | {base(C):.3f} | {base(S):.3f} | {(N.mode().values == N).float().mean():.3f} "
          f"| {base(sides):.3f} | {top(leftmost):.3f} |")
    stages = [("ViT class token", F[:, 0]), ("ViT mean patch token", F[:, 1:].mean(1)),
              ("ViT patch tokens (all)", F[:, 1:]), ("Q-Former queries after stage 1", queries)]
    for name, X in stages + ([("visual prompt after stage 2", prompt)] if trained else []):
        print(f"| {name:34s} | {ridge_probe(X, C, multi_hot=True):.3f} | {ridge_probe(X, S, multi_hot=True):.3f} "
              f"| {ridge_probe(X, counts, multi_hot=False):.3f} | {ridge_probe(X, sides, multi_hot=True):.3f} "
              f"| {ridge_probe(X, leftmost, multi_hot=False):.3f} |")
    if trained:
        constant = prompt.mean(0)
        print(f"visual prompt per token: image-dependent part {(prompt - constant).norm(dim=-1).mean():.2f}, "
              f"part shared by every image {constant.norm(dim=-1).mean():.2f}")
    print(f"({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
