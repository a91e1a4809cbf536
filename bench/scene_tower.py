"""What can a bridge read from a vision tower about the generated scenes, and does an object-set
objective on the tower itself teach it more?

    python bench/scene_tower.py --scenes data/scenes36k                              # probe the default tower
    python bench/scene_tower.py --scenes data/scenes36k --finetune 2000 --save runs/tower1 [--keep data/emoji4]
    python bench/scene_tower.py --scenes data/scenes36k --tower runs/tower1           # probe a saved tower
    python bench/scene_tower.py --scenes data/scenes36k --tower runs/vlm20/tower --slots   # probe its object slots

An experiment for the default VLM (MODEL_CARD.md, issue 10); the fine-tune is also the VLM recipe's
"tower" stage.

**The QA probe** is an upper bound of what any bridge can answer from the tower's tokens: a small
transformer (2 pre-norm layers, width 128) reads the question's words (a learned embedding of the
scenes' few dozen words) beside the tower's tokens, all attending to each other, and picks the answer
among the scenes' answer words. It is fit on the training scenes' questions, the five question types
drawn evenly, and scored per type on the held-out scenes. Unlike bench/probe_binding.py (colour
questions only) it asks every type, position and yes/no included.

**The object-set fine-tune** (`--finetune N`) trains the tower itself, with a DETR-style head (16
queries, 2 decoder layers) on its tokens: each drawn object must be claimed by one query, which names
its phrase (size x colour x shape) and its centre, paired by Hungarian matching
(`polymodal.train.scene_tower`, which the VLM recipe's "tower" stage runs). With `--keep DIR` (a data
set of other pictures: emoji, clip art) a second term holds the tower's tokens on those pictures to the
starting tower's, so what the captions need is not forgotten. Then the probe runs again on the tuned
tower, and `--save DIR` writes it as a CLIP of our format (the start's text side, the tuned vision side), which a VLM recipe's
`"vision"` can name, with the object head's slots beside it (slots.safetensors).

`--slots` probes the object slots (models/slots.py) saved beside a tuned tower instead of its tokens:
16 vectors, each one object's, which a VLM recipe with `"tower_slots": true` gives its Q-Former.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from polymodal.checkpoints.vlm_io import load_vision
from polymodal.models.blip2 import image_features
from polymodal.processing.image import load_image, preprocess
from polymodal.train.scene_tower import load_slots, save_tuned_tower, tune_tower
from polymodal.train.vlm_data import load_examples

TYPES = ("colour", "count", "position", "shape", "yes/no")


def read_scenes(folder: Path) -> tuple[list[dict], list[dict]]:
    """(train, test) scenes of a scenes data set: one example per picture (image, objects, qa)."""
    return tuple([ex for ex in load_examples(folder, split) if ex["objects"]] for split in ("train", "test"))


def tower_tokens(visual, transform, paths: list[str], batch: int = 256, slots=None) -> torch.Tensor:
    """image_features (N, tokens, width) of the pictures, as a VLM reads them; with `slots`, the object
    slots alone (N, slots, width)."""
    visual.eval()
    out = []
    with torch.no_grad():
        for k in range(0, len(paths), batch):
            pixels = preprocess([load_image(p) for p in paths[k:k + batch]], transform)
            feats = image_features(visual, pixels, slots=slots).float()
            out.append(feats if slots is None else feats[:, -len(slots.queries):])
    return torch.cat(out)


class QAProbe(nn.Module):
    """[question words; tower tokens] through 2 pre-norm transformer layers; the first word's output
    names the answer."""

    def __init__(self, dim: int, tokens: int, words: int, answers: int, width: int = 128, max_words: int = 12):
        super().__init__()
        self.inp = nn.Linear(dim, width)
        self.pos = nn.Parameter(torch.zeros(tokens, width))
        self.word = nn.Embedding(words + 1, width, padding_idx=0)
        self.word_pos = nn.Parameter(torch.zeros(max_words, width))
        layer = nn.TransformerEncoderLayer(width, 4, 4 * width, 0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.out = nn.Linear(width, answers)

    def forward(self, vectors: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
        q = self.word(words) + self.word_pos[: words.shape[1]]
        x = torch.cat([q, self.inp(vectors) + self.pos], 1)
        pad = torch.cat([words == 0, torch.zeros(vectors.shape[:2], dtype=torch.bool)], 1)
        return self.out(self.encoder(x, src_key_padding_mask=pad)[:, 0])


def questions(scenes: list[dict]) -> list[tuple[int, str, str, str]]:
    """(scene index, question, answer, type) of every question."""
    return [(i, qa["q"], qa["a"], qa["type"]) for i, s in enumerate(scenes) for qa in s["qa"]]


def run_probe(fit_vectors: torch.Tensor, fit: list, test_vectors: torch.Tensor, scored: list, *,
              steps: int, seed: int, what: str) -> dict[str, float]:
    """Fit the QA probe on `fit` (types drawn evenly), report held-out accuracy per type every 1,000
    steps; returns the last."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    vocab = sorted({w for _, q, _, _ in fit + scored for w in q.rstrip("?").split()})
    answers = sorted({a for _, _, a, _ in fit + scored})
    index = {w: k + 1 for k, w in enumerate(vocab)}

    def encode(qs: list[str]) -> torch.Tensor:
        rows = [[index[w] for w in q.rstrip("?").split()] for q in qs]
        out = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
        for k, r in enumerate(rows):
            out[k, : len(r)] = torch.tensor(r)
        return out

    by_type = {t: [x for x in fit if x[3] == t] for t in TYPES}
    probe = QAProbe(fit_vectors.shape[-1], fit_vectors.shape[1], len(vocab), len(answers))
    opt = torch.optim.AdamW(probe.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100) * max(0.05, 1 - s / steps))
    test_words = encode([q for _, q, _, _ in scored])
    test_answers = torch.tensor([answers.index(a) for _, _, a, _ in scored])
    test_rows = torch.tensor([i for i, *_ in scored])
    kinds = [t for *_, t in scored]

    def accuracy() -> dict[str, float]:
        probe.eval()
        right = []
        with torch.no_grad():
            for k in range(0, len(scored), 512):
                logits = probe(test_vectors[test_rows[k:k + 512]], test_words[k:k + 512])
                right.append(logits.argmax(-1) == test_answers[k:k + 512])
        probe.train()
        right_t = torch.cat(right)
        return {t: round(right_t[[k for k, x in enumerate(kinds) if x == t]].float().mean().item(), 3) for t in TYPES}

    print(f"{what}: {len(fit)} questions to fit, {len(scored)} held out", flush=True)
    t0, result = time.time(), {}
    for step in range(1, steps + 1):
        batch = [rng.choice(by_type[rng.choice(TYPES)]) for _ in range(64)]
        logits = probe(fit_vectors[[i for i, *_ in batch]], encode([q for _, q, _, _ in batch]))
        loss = F.cross_entropy(logits, torch.tensor([answers.index(a) for _, _, a, _ in batch]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 1000 == 0 or step == steps:
            result = accuracy()
            print(f"  step {step}: loss {loss.item():.3f}, held-out {result} ({time.time() - t0:.0f} s)", flush=True)
    return result


def keep_paths(folder: Path) -> list[str]:
    return [ex["image"] for ex in load_examples(folder, "train")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenes", required=True, help="a scenes data set (polymodal data scenes)")
    ap.add_argument("--tower", default="polymodal:default-clip", help="the CLIP whose vision tower is read")
    ap.add_argument("--fit", type=int, default=12000, help="training scenes the probe fits on")
    ap.add_argument("--test", type=int, default=1000, help="held-out scenes the probe is scored on")
    ap.add_argument("--probe-steps", type=int, default=3000)
    ap.add_argument("--no-probe-first", action="store_true", help="skip the probe of the starting tower")
    ap.add_argument("--slots", action="store_true", help="probe the object slots saved beside --tower, not its tokens")
    ap.add_argument("--finetune", type=int, default=0, help="object-set fine-tune steps (0: none)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--keep", default=None, help="a data set whose pictures' tokens are held to the start's")
    ap.add_argument("--keep-weight", type=float, default=1.0)
    ap.add_argument("--save", default=None, help="write the tuned tower here (a CLIP of our format)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    train, test = read_scenes(Path(args.scenes))
    probe_train = random.Random(args.seed).sample(train, min(args.fit, len(train)))
    test = random.Random(args.seed + 1).sample(test, min(args.test, len(test)))
    fit, scored = questions(probe_train), questions(test)
    visual, transform = load_vision(args.tower)
    slots = load_slots(args.tower) if args.slots else None

    def probe(what: str) -> None:
        t0 = time.time()
        fv = tower_tokens(visual, transform, [s["image"] for s in probe_train], slots=slots)
        tv = tower_tokens(visual, transform, [s["image"] for s in test], slots=slots)
        print(f"{what}: tokens of {len(probe_train)} + {len(test)} scenes ({time.time() - t0:.0f} s)", flush=True)
        run_probe(fv, fit, tv, scored, steps=args.probe_steps, seed=args.seed, what=what)

    if not args.no_probe_first:
        probe(f"the {'object slots' if slots is not None else 'tower'} of {args.tower}")
    if args.finetune:
        keep = keep_paths(Path(args.keep)) if args.keep else []
        t0 = time.time()

        def log(step: int, row: dict) -> None:
            if step % 100 == 0 or step == args.finetune:
                print(f"  tune step {step}: object-set loss {row['object_loss']:.3f}, keep {row['keep_loss']:.2e} "
                      f"({time.time() - t0:.0f} s)", flush=True)

        visual, tuned_slots = tune_tower(visual, transform, train, keep, steps=args.finetune, batch_size=args.batch_size, lr=args.lr,
                   keep_weight=args.keep_weight, bf16=True, seed=args.seed, on_step=log)
        if args.save:
            print(f"saved the tuned tower as a CLIP: {save_tuned_tower(visual, args.tower, Path(args.save), tuned_slots)}")
        probe(f"the tower of {args.tower} after {args.finetune} object-set steps")


if __name__ == "__main__":
    main()
