"""The lookup stage of the default VLM: between BLIP-2's stages 1 and 2, the instruction-aware
Q-Former learns to fetch what a question asks of a scene, without the LLM.

    stage 1 -> lookup -> stage 2          (recipe "lookup": a StageConfig; needs "instruction": true)

"What colour is the triangle?" about four shapes asks which colour goes with which shape. Stage 2
alone teaches that slowly: a step costs the frozen LLM's 30 layers, and few of its rows are such
questions. Here the visual prompt must *point* at the answer: each answer's first LLM token (the 19
of the scenes: colours, shapes, numbers, yes, no) is scored by its best query, the largest cosine
between a query's prompt vector and the LLM's word embedding of that token (a logsumexp over the
queries at a fixed temperature), and the right one gets the cross-entropy. A step of 64 questions
costs about a quarter of a stage-2 step of 16. Stage 2 then only has to make the LLM say the word the
prompt points at; `lookup_weight` keeps the pointing loss on in stage 2 too. (MODEL_CARD.md, "The
lookup stage".)
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from polymodal.train.chat_rows import ChatFormat
from polymodal.train.vlm_data import _padded, pairs_by_kind

SCALE = 20.0  # the pointer's inverse temperature: cosines in [-1, 1] -> logits in [-20, 20]


def scene_questions(examples: list[dict], fmt: ChatFormat) -> list[tuple[int, str, str, int]]:
    """(example index, question type, question, the answer's first LLM token) of every question (the scenes'
    `qa`),
    worded as stage 2 words it (pairs_by_kind) and its answer tokenized in the assistant's turn."""
    out = []
    for i, ex in enumerate(examples):
        for kind, pairs in pairs_by_kind(ex).items():
            if kind in ("caption", "name"):
                continue
            for q, a in pairs:
                ids, spans = fmt.turns([(q, a)])
                out.append((i, kind, q, ids[spans[0][0]]))
    return out


def point_scores(prompt: Tensor, answer_embeds: Tensor, scale: float = SCALE) -> Tensor:
    """Scores (B, C) of C answer tokens for visual prompts (B, Q, E): each token's best query by cosine
    with its word embedding (answer_embeds (C, E)), a logsumexp over the queries at `scale`."""
    cos = F.normalize(prompt.float(), dim=-1) @ F.normalize(answer_embeds.float(), dim=-1).t()  # (B, Q, C)
    return torch.logsumexp(scale * cos, dim=1)


class Pointer:
    """The scenes' questions and their answer tokens, for the lookup loss and its scoring."""

    def __init__(self, examples: list[dict], fmt: ChatFormat, context: int):
        self.items = scene_questions(examples, fmt)
        if not self.items:
            raise ValueError("the lookup stage needs questions in the training data (the scenes' qa)")
        self.answers = sorted({token for *_, token in self.items})  # LLM token ids (C,)
        self.index = {t: k for k, t in enumerate(self.answers)}
        self.by_kind: dict[str, list[int]] = {}
        for n, (_, kind, _, _) in enumerate(self.items):
            self.by_kind.setdefault(kind, []).append(n)
        self.encode = fmt.tokenizer.backend.encode
        self.pad = fmt.tokenizer.pad_id
        self.context = context

    def batch(self, rows: list[tuple[int, str, str, int]], features: Tensor) -> dict[str, Tensor]:
        ids, mask = _padded([self.encode(q, add_special_tokens=False).ids[:self.context] for _, _, q, _ in rows],
                            self.pad)
        return {"features": features[[i for i, *_ in rows]], "instruction": ids, "instruction_mask": mask,
                "answer": torch.tensor([self.index[token] for *_, token in rows])}

    def batches(self, features: Tensor, batch_size: int, seed: int) -> Iterator[dict[str, Tensor]]:
        """Batches forever, each question's type drawn first and uniformly (colour questions are 14%
        of all, but a type's lookup is learnt from its own questions)."""
        rng = random.Random(seed)
        kinds = sorted(self.by_kind)
        while True:
            rows = [self.items[rng.choice(self.by_kind[rng.choice(kinds)])] for _ in range(batch_size)]
            yield self.batch(rows, features)

    def loss(self, model, batch: dict[str, Tensor]) -> Tensor:
        prompt = model.visual_prompt(None, features=batch["features"], instruction=batch["instruction"],
                                     instruction_mask=batch["instruction_mask"])
        return F.cross_entropy(point_scores(prompt, model.lm.token_embed.weight[self.answers]), batch["answer"])


def lookup_stage(recipe, stage2, pointer: Pointer, features: Tensor, out: Path, metrics: Path,
                 log: Callable[[int, dict], None]) -> None:
    """Train the lookup stage in place (between stages 1 and 2), or load it from `out`/lookup.safetensors
    when a rerun finds it done; its state is kept every `save_every` steps, so a kill resumes."""
    from safetensors.torch import save_file

    from polymodal.train.blip2 import train_blip2
    from polymodal.train.vlm import FROZEN, _checkpoints, _log, _train_config, load_stage2_init

    done = out / "lookup.safetensors"
    if done.is_file():
        load_stage2_init(stage2, done)
        _log(metrics, {"stage": "lookup", "reused": str(done)})
        return
    resume, save = _checkpoints(out, stage2, "lookup", metrics, recipe.save_every, recipe.lookup.steps)
    train_blip2(stage2, pointer.batches(features, recipe.lookup.batch_size, recipe.seed + 2),
                _train_config(recipe.lookup), on_step=log, terms=lambda m, b: {"lookup_loss": pointer.loss(m, b)},
                resume=resume, save=save)
    trained = {k: v.contiguous() for k, v in stage2.state_dict().items() if not k.startswith(FROZEN)}
    save_file(trained, str(done.with_suffix(".tmp")))
    done.with_suffix(".tmp").replace(done)


__all__ = ["Pointer", "lookup_stage", "point_scores", "scene_questions", "SCALE"]
