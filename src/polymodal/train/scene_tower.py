"""The VLM recipe's tower stage: the frozen CLIP tower is first taught the generated scenes' objects.

A probe of the default CLIP's tokens (bench/scene_tower.py, MODEL_CARD.md) reads which colour goes with
which shape far better after this: each drawn object must be claimed by one of 16 queries of a small
DETR-style head (Carion et al. 2020) on the tower's tokens, which names the object's phrase (size x
colour x shape, or "no object") and its centre; queries and objects are paired by Hungarian matching.
So that the captions' features are not forgotten, a second term holds the tower's tokens on the
recipe's other pictures (emoji, clip art) to the starting tower's. The tuned tower is then frozen, as
the starting one was, for stages 1 and 2.
"""

from __future__ import annotations

import copy
import math
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from polymodal.data.scenes import COLOURS, SHAPES
from polymodal.models.blip2 import image_features
from polymodal.models.slots import ObjectSlots
from polymodal.processing.image import load_image, preprocess

SIZES = ("small", "large")
NO_OBJECT = len(SIZES) * len(COLOURS) * len(SHAPES)  # the phrases, then "no object"


def phrase(obj: dict) -> int:
    """An object's phrase (size x colour x shape) as a class index."""
    return (SIZES.index(obj["size"]) * len(COLOURS) + list(COLOURS).index(obj["colour"])) * len(SHAPES) \
        + SHAPES.index(obj["shape"])


def set_loss(logp: Tensor, centres: Tensor, scenes: list[list[dict]], box_weight: float = 5.0,
             empty_weight: float = 0.1) -> Tensor:
    """logp (B, Q, NO_OBJECT + 1) phrase log-probabilities, centres (B, Q, 2) in [0, 1]: the queries
    matched to a scene's objects name them and their centres; the others say "no object" (weighted
    empty_weight)."""
    weight = torch.ones(NO_OBJECT + 1)
    weight[NO_OBJECT] = empty_weight
    total = logp.new_zeros(())
    for b, objs in enumerate(scenes):
        classes = torch.tensor([phrase(o) for o in objs])
        where = torch.tensor([[o["x"], o["y"]] for o in objs])
        cost = -logp[b][:, classes] + box_weight * torch.cdist(centres[b], where, p=1)
        rows, cols = linear_sum_assignment(cost.detach().numpy())
        target = torch.full((logp.shape[1],), NO_OBJECT)
        target[rows] = classes[cols]
        total = total + F.nll_loss(logp[b], target, weight=weight)
        total = total + box_weight * (centres[b][rows] - where[cols]).abs().sum() / len(objs)
    return total / len(scenes)


class ObjectHead(nn.Module):
    """Object slots (16 learned queries read the tower's tokens through 2 decoder layers,
    models/slots.py); each slot names a phrase (or no object) and a centre."""

    def __init__(self, width: int, queries: int = 16):
        super().__init__()
        self.slots = ObjectSlots(width, queries)
        self.phrase, self.centre = nn.Linear(width, NO_OBJECT + 1), nn.Linear(width, 2)

    def forward(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        h = self.slots(tokens)
        return self.phrase(h).float().log_softmax(-1), self.centre(h).float().sigmoid()


def tune_tower(visual, transform, scenes: list[dict], keep: list[str], *, steps: int, batch_size: int = 64,
               lr: float = 1e-4, warmup: int = 50, weight_decay: float = 0.05, keep_weight: float = 1.0,
               bf16: bool = False, seed: int = 0,
               on_step: Callable[[int, dict], None] | None = None) -> tuple[nn.Module, ObjectSlots]:
    """The object-set fine-tune of `visual` in place: `scenes` are {"image", "objects"}, `keep` the
    paths of other pictures whose tokens are held to the starting tower's (half a batch a step).
    AdamW, the head at 5 x lr, a linear warmup then a cosine to 0 (a recipe's min_lr is not used).
    Returns `visual` and the head's trained object slots, both frozen, in eval mode."""
    if not scenes:
        raise ValueError("the tower stage needs scenes with their objects (polymodal data scenes)")
    rng = random.Random(seed)
    torch.manual_seed(seed)
    start = copy.deepcopy(visual).eval().requires_grad_(False)
    head = ObjectHead(visual.cfg.width)
    opt = torch.optim.AdamW([{"params": visual.parameters(), "lr": lr},
                             {"params": head.parameters(), "lr": 5 * lr}], weight_decay=weight_decay)
    peaks = [g["lr"] for g in opt.param_groups]
    visual.train().requires_grad_(True)
    for step in range(1, steps + 1):
        scale = min(1.0, step / max(1, warmup)) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group, peak in zip(opt.param_groups, peaks, strict=True):
            group["lr"] = peak * scale
        picked = [scenes[rng.randrange(len(scenes))] for _ in range(batch_size)]
        pixels = preprocess([load_image(s["image"]) for s in picked], transform)
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            logp, centres = head(image_features(visual, pixels))
        objects = set_loss(logp, centres, [s["objects"] for s in picked])
        held = objects.new_zeros(())
        if keep and keep_weight > 0:
            other = preprocess([load_image(keep[rng.randrange(len(keep))]) for _ in range(max(1, batch_size // 2))],
                               transform)
            with torch.no_grad():
                target = image_features(start, other).float()
            with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                now = image_features(visual, other)
            held = F.mse_loss(now.float(), target)
        loss = objects + keep_weight * held
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([*visual.parameters(), *head.parameters()], 1.0)
        opt.step()
        if on_step is not None:
            on_step(step, {"loss": loss.item(), "object_loss": objects.item(), "keep_loss": held.item(),
                           "lr": opt.param_groups[0]["lr"]})
    return visual.eval().requires_grad_(False), head.slots.eval().requires_grad_(False)


SLOTS_FILE = "slots.safetensors"  # a tuned tower's object slots, beside its CLIP


def save_tuned_tower(visual, source_ref: str, out: Path, slots: ObjectSlots | None = None) -> Path:
    """The CLIP that `source_ref` names (its config and tokenizer files), its vision side replaced by
    `visual`, written to `out` in our format (through a temporary folder, so `out` is whole or absent);
    with `slots`, their weights in out/slots.safetensors."""
    from safetensors.torch import save_file

    from polymodal.checkpoints.state import read_state_dict
    from polymodal.checkpoints.vlm_io import vision_file

    source, out = vision_file(source_ref), Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source.parent, tmp, ignore=shutil.ignore_patterns("model.safetensors", "*.jsonl"))
    state = read_state_dict(source)
    state.update({f"visual.{k}": v.detach().contiguous() for k, v in visual.state_dict().items()})
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt", "library": "polymodal"})
    if slots is not None:
        save_file({k: v.detach().contiguous() for k, v in slots.state_dict().items()}, str(tmp / SLOTS_FILE))
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    return out


def load_slots(vision_ref: str) -> ObjectSlots:
    """The object slots saved beside the tuned tower that `vision_ref` names (save_tuned_tower)."""
    from polymodal.checkpoints.state import CheckpointError, load_exact, read_state_dict
    from polymodal.checkpoints.vlm_io import vision_file

    path = vision_file(vision_ref).parent / SLOTS_FILE
    if not path.is_file():
        raise CheckpointError(f"{vision_ref}: no object slots ({SLOTS_FILE}) beside this tower; a recipe's "
                              f"tower stage writes them")
    state = read_state_dict(path)
    count, width = state["queries"].shape
    return load_exact(ObjectSlots(width, count), state, str(path)).eval().requires_grad_(False)


def tower_stage(recipe, data, out: Path, log: Callable[[dict], None]) -> Path:
    """A VLM recipe's tower stage (`recipe.tower`, `recipe.tower_keep`; train/vlm.py): recipe.vision's
    CLIP with its tower tuned on the training scenes' objects, the other training pictures kept, saved
    in out/tower, which then stands for recipe.vision. A rerun reuses it once it is saved (a run killed
    inside this stage starts it again)."""
    from polymodal.checkpoints.vlm_io import load_vision
    from polymodal.train.vlm_data import load_examples

    where = Path(out) / "tower"
    if (where / "model.safetensors").is_file():
        log({"stage": "tower", "reused": str(where)})
        return where
    visual, transform = load_vision(recipe.vision)
    examples = load_examples(data, "train")
    stage = recipe.tower
    visual, slots = tune_tower(visual, transform, [ex for ex in examples if ex["objects"]],
                               [ex["image"] for ex in examples if not ex["objects"]], steps=stage.steps,
                               batch_size=stage.batch_size, lr=stage.lr, warmup=stage.warmup,
                               weight_decay=stage.weight_decay, keep_weight=recipe.tower_keep, bf16=stage.bf16,
                               seed=recipe.seed, on_step=lambda step, row: log({"stage": "tower", "step": step, **row}))
    return save_tuned_tower(visual, recipe.vision, where, slots)
