"""Does a bridge keep each object's colour bound to its shape? A supervised binding probe.

    python bench/probe_binding.py --run runs/vlm11 --data data/mix2 [--vlm DIR | --stage1 FILE] [--steps 1500]

"What colour is the triangle?" about a scene of two to four shapes asks for binding: which colour
goes with which shape. The scenes' colour questions (training split: fit; test split: scored) are
answered by a small transformer (2 layers, width 128) that reads a learned embedding of the asked
shape beside a set of vectors, and names one of the 8 colours. It is trained on those questions
alone, so it is an upper bound of what a bridge could read from the vectors, not what a VLM answers.

  - without --vlm the vectors are the frozen tower's tokens, as cached by a VLM training run
    (`RUN/features.safetensors`, `RUN/recipe.json`): what any bridge starts from;
  - with --vlm DIR they are that VLM's visual prompt (its queries through the projection): what its
    LLM is given. A plain (not instruction-aware) VLM on the same tower as RUN;
  - with --stage1 FILE (a run's `stage1.safetensors`, of RUN's recipe) they are the stage-1
    Q-Former's query outputs: what stage 2 could pass on, known before stage 2 is run.

Accuracy is reported over all held-out questions and split by the asked object's size.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from polymodal.data.scenes import COLOURS, SHAPES
from polymodal.train.vlm import VLMRecipe, build_models, cached_features, load_examples, vision_features

COLOUR_NAMES = list(COLOURS)


def colour_questions(examples: list[dict], objects: dict[str, list[dict]]) -> list[tuple[int, int, int, str]]:
    """(example index, asked shape, colour, the asked object's size) of every colour question about a
    scene of more than one object."""
    out = []
    for i, ex in enumerate(examples):
        objs = objects.get(ex["image"], [])
        if ex["dataset"] != "scenes" or len(objs) < 2:
            continue
        for qa in ex["qa"]:
            if qa["type"] == "colour":
                shape = qa["q"].split("the ", 1)[1].rstrip("?")
                size = next(o["size"] for o in objs if o["shape"] == shape)
                out.append((i, SHAPES.index(shape), COLOUR_NAMES.index(qa["a"]), size))
    return out


READERS = ("joint", "cross")


class BindingProbe(nn.Module):
    """The asked shape reads the vectors through 2 pre-norm transformer layers; 8 colour logits.

    How it reads them (`reader`):
      - "joint": one sequence [asked shape; vectors], self-attention over all of it, so the vectors
        also attend to each other and to the question;
      - "cross": as a Q-Former query does: the asked shape cross-attends to the vectors, which are
        never mixed (each key and value is linear in one vector)."""

    def __init__(self, dim: int, tokens: int, width: int = 128, reader: str = "joint"):
        super().__init__()
        if reader not in READERS:
            raise ValueError(f"reader {reader!r}: expected one of {READERS}")
        self.reader = reader
        self.inp = nn.Linear(dim, width)
        self.pos = nn.Parameter(torch.zeros(tokens, width))
        self.shape = nn.Embedding(len(SHAPES), width)
        if reader == "joint":
            layer = nn.TransformerEncoderLayer(width, 4, 4 * width, 0.0, batch_first=True, norm_first=True)
            self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        else:
            layer = nn.TransformerDecoderLayer(width, 4, 4 * width, 0.0, batch_first=True, norm_first=True)
            self.decoder = nn.TransformerDecoder(layer, 2)
        self.out = nn.Linear(width, len(COLOUR_NAMES))

    def forward(self, vectors: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
        tokens, question = self.inp(vectors) + self.pos, self.shape(shape)[:, None]
        if self.reader == "joint":
            return self.out(self.encoder(torch.cat([question, tokens], 1))[:, 0])
        return self.out(self.decoder(question, tokens)[:, 0])


def visual_prompts(vlm_dir: str, features: torch.Tensor) -> torch.Tensor:
    """A VLM's visual prompt (N, queries, embed_dim) for cached tower features (N, tokens, width)."""
    import polymodal

    model = polymodal.load_vlm(vlm_dir).model.eval()
    if model.instruction_proj is not None:
        raise SystemExit(f"{vlm_dir}: an instruction-aware VLM's prompt depends on the question; probe a plain one")
    out = []
    with torch.no_grad():
        for k in range(0, features.shape[0], 256):
            out.append(model.visual_prompt(None, features=features[k:k + 256].float()).float())
    return torch.cat(out)


def stage1_queries(stage1, weights: str, features: torch.Tensor) -> torch.Tensor:
    """A stage-1 Q-Former's query outputs (N, queries, width) for cached tower features."""
    from safetensors.torch import load_file

    from polymodal.models.blip2 import read_image

    stage1.load_state_dict(load_file(weights))
    stage1.eval()
    out = []
    with torch.no_grad():
        for k in range(0, features.shape[0], 256):
            image = read_image(stage1, None, features[k:k + 256].float(), False)
            out.append(stage1.qformer(image).queries.float())
    return torch.cat(out)


def load_run(run: Path, data: Path):
    """(recipe, stage-1 model, scene objects by image path, train examples, test examples, the train
    examples' cached tower features) of a VLM training run and its data."""
    recipe = VLMRecipe.from_dict(json.loads((run / "recipe.json").read_text()))
    stage1 = build_models(recipe)[0]
    objects = {}
    with open(data / "captions.jsonl", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if "objects" in row:
                objects[str(data / row["image"])] = row["objects"]
    train, test = load_examples(data, "train"), load_examples(data, "test")
    features, _ = cached_features(run / "features.safetensors", stage1, recipe.vision, [e["image"] for e in train])
    return recipe, stage1, objects, train, test, features


def run_probe(loaded, read: Callable[[torch.Tensor], torch.Tensor] | None = None, *, what: str = "the tower's tokens",
              steps: int = 1500, seed: int = 0, reader: str = "joint") -> dict:
    """Fit the binding probe on read(tower features) of the training scenes asked about, score it on
    the held-out ones (printed every 250 steps); returns the last accuracies."""
    recipe, stage1, objects, train, test, features = loaded
    fit, scored = colour_questions(train, objects), colour_questions(test, objects)
    used = sorted({i for i, *_ in fit})  # the images asked about, in their own order
    at = {i: k for k, i in enumerate(used)}
    fit, fit_vectors = [(at[i], *rest) for i, *rest in fit], features[used]
    held = sorted({i for i, *_ in scored})
    where = {i: k for k, i in enumerate(held)}
    test_vectors, _ = vision_features(stage1.visual, [test[i]["image"] for i in held], stage1.cfg.image_transform,
                                      tiles=recipe.tiles, tile_pool=recipe.tile_pool)
    scored = [(where[i], *rest) for i, *rest in scored]
    if read is not None:
        fit_vectors, test_vectors = read(fit_vectors), read(test_vectors)
    print(f"{what}, read {reader}: {tuple(fit_vectors.shape[1:])} a scene; {len(fit)} questions to fit, {len(scored)} held out")

    probe = BindingProbe(fit_vectors.shape[-1], fit_vectors.shape[1], reader=reader)
    opt = torch.optim.AdamW(probe.parameters(), lr=1e-3)
    rng = random.Random(seed)
    shapes_t = torch.tensor([s for _, s, _, _ in scored])
    colours_t = torch.tensor([c for _, _, c, _ in scored])
    large = torch.tensor([size == "large" for *_, size in scored])
    rows_t = torch.tensor([i for i, *_ in scored])

    def accuracy() -> dict:
        probe.eval()
        with torch.no_grad():
            right = probe(test_vectors[rows_t].float(), shapes_t).argmax(-1) == colours_t
        probe.train()
        return {"all": round(right.float().mean().item(), 3), "large": round(right[large].float().mean().item(), 3),
                "small": round(right[~large].float().mean().item(), 3)}

    t0 = time.time()
    result = {}
    for step in range(1, steps + 1):
        batch = [fit[rng.randrange(len(fit))] for _ in range(64)]
        logits = probe(fit_vectors[[i for i, *_ in batch]].float(), torch.tensor([s for _, s, _, _ in batch]))
        loss = F.cross_entropy(logits, torch.tensor([c for _, _, c, _ in batch]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 250 == 0 or step == steps:
            result = accuracy()
            print(f"step {step}: loss {loss.item():.3f}, held-out accuracy {result} ({time.time() - t0:.0f} s)")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a VLM training run: recipe.json and the cached tower features")
    ap.add_argument("--data", required=True, help="the mix the run trained on (captions.jsonl with scenes)")
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--vlm", default=None, help="probe this VLM's visual prompt instead of the tower's tokens")
    group.add_argument("--stage1", default=None, help="probe these stage-1 weights' queries (a stage1.safetensors)")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reader", choices=READERS, default="joint", help="how the probe reads the vectors (see BindingProbe)")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    loaded = load_run(Path(args.run), Path(args.data))
    stage1 = loaded[1]
    if args.vlm:
        run_probe(loaded, lambda f: visual_prompts(args.vlm, f), what=f"the visual prompt of {args.vlm}",
                  steps=args.steps, seed=args.seed, reader=args.reader)
    elif args.stage1:
        run_probe(loaded, lambda f: stage1_queries(stage1, args.stage1, f), what=f"the stage-1 queries of {args.stage1}",
                  steps=args.steps, seed=args.seed, reader=args.reader)
    else:
        run_probe(loaded, steps=args.steps, seed=args.seed, reader=args.reader)


if __name__ == "__main__":
    main()
