"""BLIP-2's two training stages, one flat loop (Li et al. 2023, "BLIP-2", sections 3.2 and 3.3).

    stage 1 (Figure 2)  Blip2Stage1: the Q-Former, its query tokens, ITC projections, ITM and ITG
                        heads and temperature learn; the image encoder is frozen.
    stage 2 (Figure 3)  Blip2: the Q-Former and `language_projection` learn; the image encoder and
                        the language model are frozen.

A part is frozen by a learning rate of zero: requires_grad off, out of the optimizer, eval mode.
AdamW with weight decay on p.dim() >= 2 only, linear warmup then cosine decay (`lr_at`, the CLIP
trainer's), gradient clipping. Each step returns its named terms; the loop sums the `*_loss` keys.

`batches` yields dicts of tensors: `pixels` (B, C, H, W), `input_ids` and `attention_mask` (B, T)
and `targets` (B, T) with -100 where no loss is wanted. Stage 1 without `targets` scores every
real token; stage 2 needs them. `caption_batches` builds stage-2 batches from a `PairDataset`.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from polymodal.config import ImageTransformConfig
from polymodal.data.pairs import PairDataset
from polymodal.models.blip2 import Blip2, Blip2Stage1
from polymodal.models.lm import IGNORE_INDEX
from polymodal.processing.image import load_image, preprocess
from polymodal.train.losses import clamp_logit_scale_, total_loss
from polymodal.train.trainer import lr_at

# What each stage trains: the learning rate of a part as a multiple of the base rate (0 freezes it).
# Parts are top-level modules; any other name (the stage-1 heads, `logit_scale`) is "head".
STAGE_PARTS = {
    1: {"visual": 0.0, "slots": 0.0, "views": 1.0, "qformer": 1.0, "head": 1.0},
    2: {"visual": 0.0, "slots": 0.0, "views": 1.0, "qformer": 1.0, "language_projection": 1.0, "instruction_proj": 1.0, "lm": 0.0},
}


@dataclass(frozen=True)
class Blip2TrainConfig:
    """The optimizer and schedule; `steps`, `warmup` and `min_lr` are what `lr_at` reads."""

    steps: int = 1000
    lr: float = 1e-4
    warmup: int = 100
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0: off
    bf16: bool = False  # bfloat16 autocast (weights, gradients and the optimizer stay fp32): on CPUs with
    # AVX512-BF16 (Zen 4/5, Sapphire Rapids) a large product runs ~4x faster than in fp32
    # (a default-VLM training step ~1.8x), and on GPUs

    def __post_init__(self):
        if self.steps < 1 or self.warmup < 0 or self.lr < 0:
            raise ValueError("Blip2TrainConfig needs steps >= 1, warmup >= 0 and lr >= 0")


def stage_of(model: nn.Module) -> int:
    if isinstance(model, Blip2Stage1):
        return 1
    if isinstance(model, Blip2):
        return 2
    raise TypeError(f"train_blip2 trains Blip2Stage1 (stage 1) or Blip2 (stage 2), not {type(model).__name__}")


def _part(name: str, parts: dict[str, float]) -> str:
    top = name.split(".", 1)[0]
    return top if top in parts else "head"


def param_groups(model: nn.Module, cfg: Blip2TrainConfig) -> list[dict]:
    """AdamW's groups per trained part and decay. A part whose learning rate is 0 is frozen:
    requires_grad off, not in any group."""
    parts = STAGE_PARTS[stage_of(model)]
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        part = _part(name, parts)
        if parts[part] == 0:
            p.requires_grad_(False)
            continue
        p.requires_grad_(True)
        groups.setdefault((part, p.dim() >= 2), []).append(p)
    return [{"params": ps, "base_lr": cfg.lr * parts[part], "lr": cfg.lr * parts[part],
             "name": f"{part}{'' if decay else '-no-decay'}", "weight_decay": cfg.weight_decay if decay else 0.0}
            for (part, decay), ps in groups.items()]


def frozen_modules(model: nn.Module) -> list[nn.Module]:
    """The frozen parts, kept in eval mode while the rest trains."""
    parts = STAGE_PARTS[stage_of(model)]
    return [getattr(model, part) for part, scale in parts.items() if scale == 0 and getattr(model, part, None) is not None]


def stage1_terms(model: Blip2Stage1, batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """ITC, ITM and ITG losses of one batch. ITG targets default to the real text tokens."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    targets = batch.get("targets")
    if targets is None:
        targets = ids.masked_fill(mask == 0, IGNORE_INDEX)
    negatives = batch.get("negative_ids")
    if negatives is not None:  # false captions of the batch's own images (train/vlm.py stage1_batches)
        negatives = (negatives, batch["negative_mask"], batch["negative_rows"])
    generator = None  # `seed`: the batch's own ITM negatives, the same in a resumed run
    if batch.get("seed") is not None:
        generator = torch.Generator(device=ids.device).manual_seed(int(batch["seed"]))
    out = model(batch.get("pixels"), ids, mask, targets=targets, features=batch.get("features"), negatives=negatives,
                generator=generator)
    terms = {"itc_loss": out.itc_loss, "itm_loss": out.itm_loss}
    if out.itg_loss is not None:
        terms["itg_loss"] = out.itg_loss
    return terms


def stage2_terms(model: Blip2, batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """The language-model loss on the text targets, after the visual prompt."""
    if "targets" not in batch:
        raise KeyError("a stage-2 batch needs `targets` (-100 on prompt and padding positions)")
    out = model(batch["pixels"], batch["input_ids"], batch["attention_mask"], targets=batch["targets"])
    return {"lm_loss": out.loss}


def train_blip2(model: Blip2Stage1 | Blip2, batches: Iterable[dict[str, Tensor]], cfg: Blip2TrainConfig, *,
                on_step: Callable[[int, dict], None] | None = None,
                terms: Callable[[nn.Module, dict], dict[str, Tensor]] | None = None,
                resume: Callable[[torch.optim.Optimizer], int] | None = None,
                save: Callable[[int, torch.optim.Optimizer], None] | None = None) -> list[dict]:
    """Train stage 1 (a Blip2Stage1) or stage 2 (a Blip2) for cfg.steps steps, in place, on the
    model's device. Returns one metrics dict per step: every loss term, `loss`, `lr`, `grad_norm`.
    `terms(model, batch)` replaces the stage's own loss terms (train/vlm.py's chat-formatted stage 2).
    A killed run resumes through the last two: `resume(optimizer)` loads a saved state and returns its
    step (the batches before it are drawn and skipped), `save(step, optimizer)` runs after each step."""
    stage = stage_of(model)
    terms_of = terms or (stage1_terms if stage == 1 else stage2_terms)
    device = next(model.parameters()).device
    groups = param_groups(model, cfg)
    trained = [p for group in groups for p in group["params"]]
    optimizer = torch.optim.AdamW(groups, betas=cfg.betas, eps=cfg.eps)
    model.train()
    for part in frozen_modules(model):
        part.eval()

    history: list[dict] = []
    stream = iter(batches)
    start = resume(optimizer) if resume is not None else 0
    for _ in range(start):
        next(stream)
    for step in range(start, cfg.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg, group["base_lr"])
        batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in next(stream).items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            named = terms_of(model, batch)
            loss = total_loss(named)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(trained, cfg.grad_clip or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if stage == 1:
            clamp_logit_scale_(model)

        metrics = {"step": step + 1, "loss": loss.item(), **{k: v.item() for k, v in named.items()},
                   "lr": optimizer.param_groups[0]["lr"], "grad_norm": grad_norm.item()}
        history.append(metrics)
        if on_step is not None:
            on_step(step + 1, metrics)
        if save is not None:
            save(step + 1, optimizer)
    return history


def caption_targets(captions: list[list[int]], *, bos_id: int | None, eos_id: int, pad_id: int,
                    max_length: int) -> dict[str, Tensor]:
    """Prompt-free captioning rows [BOS] caption EOS, padded on the right (the model reads
    [queries; text]): `input_ids`, `attention_mask` and `targets` (B, T), whose targets are the
    caption and its EOS; BOS (given at generation) and padding are -100."""
    rows = []
    for ids in captions:
        if bos_id is not None and ids[:1] == [bos_id]:
            ids = ids[1:]  # the tokenizer's own start/end tokens: ours are added below
        if ids[-1:] == [eos_id]:
            ids = ids[:-1]
        start = [] if bos_id is None else [bos_id]
        rows.append(start + ids[:max_length - len(start) - 1] + [eos_id])
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
    for i, row in enumerate(rows):
        input_ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    targets = input_ids.masked_fill(mask == 0, IGNORE_INDEX)
    if bos_id is not None:
        targets[:, 0] = IGNORE_INDEX
    return {"input_ids": input_ids, "attention_mask": mask, "targets": targets}


def caption_batches(dataset: PairDataset, transform: ImageTransformConfig, tokenizer, batch_size: int,
                    seed: int = 0, *, max_length: int = 32, epochs: int | None = None,
                    bos_id: int | None = None, eos_id: int | None = None,
                    pad_id: int | None = None) -> Iterator[dict[str, Tensor]]:
    """Stage-2 captioning batches from a folder of image-caption pairs, reshuffled each epoch
    (seeded), for `epochs` passes (None: forever). A short last batch is kept.

    tokenizer: a `Tokenizer` of the language model (`encode_batch`, `bos_id`, `eos_id`, `pad_id`);
    the ids override its own. Each batch holds `pixels` and `caption_targets`' tensors."""
    bos = tokenizer.bos_id if bos_id is None else bos_id
    eos = tokenizer.eos_id if eos_id is None else eos_id
    pad = tokenizer.pad_id if pad_id is None else pad_id
    if eos is None or pad is None:
        raise ValueError("captioning needs an end-of-sequence and a padding id")
    if len(dataset) == 0:
        raise ValueError(f"{dataset!r}: no pairs")
    rng = random.Random(seed)
    epoch = 0
    while epochs is None or epoch < epochs:
        order = list(range(len(dataset)))
        rng.shuffle(order)
        for start in range(0, len(order), batch_size):
            pairs = [dataset[i] for i in order[start:start + batch_size]]
            pixels = preprocess([load_image(path) for path, _ in pairs], transform)  # (B, C, H, W)
            ids = tokenizer.encode_batch([text for _, text in pairs])
            yield {"pixels": pixels, **caption_targets(ids, bos_id=bos, eos_id=eos, pad_id=pad,
                                                       max_length=max_length)}
        epoch += 1
