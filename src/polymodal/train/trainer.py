"""The contrastive trainer: one flat loop, from one CPU to many GPUs under torchrun.

    out/                      a run directory
      train_config.json       the TrainConfig it ran with
      config.json, model.safetensors, tokenizer*   the latest weights: polymodal.load(out) reads them
      state.pt                optimizer, step, data position and RNG: what resume needs
                              (full tensors, keyed by parameter name, whatever the parallelism)
      metrics.jsonl           one line per logged step

AdamW with weight decay on weights with p.dim() >= 2, linear warmup then cosine decay,
a learning rate per part where 0 freezes it (LiT: Zhai et al. 2022), gradient clipping,
bf16 autocast (GPUs, and CPUs with AVX512-BF16), GradCache accumulation, checkpoints written
atomically so a kill at any moment leaves the last complete one, and resume that continues
the same loss curve. Under torchrun the model is replicated (DDP) or, with `parallel="fsdp"`,
sharded (FSDP2: each transformer block a unit); checkpoints hold full tensors either way, so a
run resumes under DDP, FSDP or one process alike.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from polymodal.checkpoints.pretrained import load_clip, save_pretrained
from polymodal.config import CLIPConfig, config_from_dict, preset
from polymodal.models.clip import CLIP, with_image_size
from polymodal.processing.tokenizer import Tokenizer, clip_tokenizer
from polymodal.train.accumulate import accumulated_backward
from polymodal.train.config import TrainConfig
from polymodal.train.distributed import fully_shard_model, init_from_env, is_dist, is_main, rank, world_size
from polymodal.train.lit import FrozenTextCache, lit_model
from polymodal.train.losses import ClipLoss, clamp_logit_scale_, total_loss


def lr_at(step: int, cfg: TrainConfig, base: float) -> float:
    """Linear warmup to `base` over cfg.warmup steps, then cosine decay to cfg.min_lr."""
    if step < cfg.warmup:
        return base * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr + (base - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def build_model(cfg: TrainConfig) -> tuple[CLIP, Tokenizer]:
    if cfg.init:
        model, tokenizer = load_clip(cfg.init)
        return (with_image_size(model, cfg.image_size) if cfg.image_size else model), tokenizer
    if cfg.image_size:
        raise ValueError("image_size resizes the checkpoint named by init; a new model takes its size from its config")
    if cfg.model.endswith(".json"):
        model_cfg = config_from_dict(json.loads(Path(cfg.model).read_text()))
    else:
        model_cfg = preset(cfg.model)
    if not isinstance(model_cfg, CLIPConfig):
        raise ValueError(f"{cfg.model}: not a CLIP config")
    if cfg.text_tower:
        return lit_model(model_cfg, cfg.text_tower)
    return CLIP(model_cfg), clip_tokenizer(context_length=model_cfg.text.context_length)


def param_groups(model: CLIP, cfg: TrainConfig) -> list[dict]:
    """Per part (image tower, text tower, head) and per decay: AdamW's groups. A part whose
    learning rate is 0 is frozen: requires_grad off, not in any group."""
    lrs = {"image": cfg.lr_image, "text": cfg.lr_text, "head": cfg.lr_head}
    lrs = {part: cfg.lr if lr is None else lr for part, lr in lrs.items()}
    if cfg.freeze != "none":
        lrs[cfg.freeze] = 0.0
    if cfg.text_tower:
        lrs["text"] = 0.0  # LiT: the pretrained tower is locked
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        part = "image" if name.startswith("visual.") else "text" if name.startswith("text.") else "head"
        if lrs[part] == 0:
            p.requires_grad_(False)
            continue
        groups.setdefault((part, p.dim() >= 2), []).append(p)
    return [{"params": ps, "base_lr": lrs[part], "lr": lrs[part], "name": f"{part}{'' if decay else '-no-decay'}",
             "weight_decay": cfg.weight_decay if decay else 0.0} for (part, decay), ps in groups.items()]


def _rng_state() -> dict:
    """Every generator's state, in types `torch.load(weights_only=True)` accepts."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, cached))


FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)  # whole tensors; saving: on rank 0, in CPU memory


def save_checkpoint(out: Path, model: CLIP, tokenizer: Tokenizer, optimizer, step: int, data_state: list[dict]) -> None:
    """Weights in our format, then the training state, each file written under a temporary
    name and renamed: a kill leaves either the old or the new file, never half of one.
    A collective under torchrun (FSDP gathers the shards): every rank calls it, rank 0 writes."""
    weights = get_model_state_dict(model, options=FULL)
    optim = get_optimizer_state_dict(model, optimizer, options=FULL)  # keyed by parameter name
    if not is_main():
        return
    with torch.device("meta"):
        bare = CLIP(model.cfg)
    bare.load_state_dict(weights, assign=True)  # a plain CLIP over the full weights, no copy
    tmp = out / ".tmp-weights"
    save_pretrained(bare, tmp, tokenizer)
    for f in sorted(tmp.iterdir()):
        os.replace(f, out / f.name)
    tmp.rmdir()
    state = {"step": step, "optimizer": optim, "data": data_state, "rng": _rng_state(), "model": weights}
    torch.save(state, out / "state.pt.tmp")
    os.replace(out / "state.pt.tmp", out / "state.pt")  # the commit point


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop the lines a killed run logged after its last checkpoint: they will be redone."""
    if path.is_file():
        keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in keep))


def train(cfg: TrainConfig, out: str | Path, *, progress: bool = True,
          on_step: Callable[[int, dict], None] | None = None) -> dict:
    """Train (or resume, when `out` holds a state.pt) and return the last metrics."""
    from polymodal.data.augment import AugmentConfig
    from polymodal.data.loader import TrainStream, gather_states

    out = Path(out)
    device = init_from_env()
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)

    model, tokenizer = build_model(cfg)
    fsdp = is_dist() and cfg.parallel == "fsdp"
    if fsdp:  # before .to(device): only the shards reach the device
        fully_shard_model(model, [*model.visual.blocks, *model.text.blocks],
                          methods=["image_features", "text_features"])  # GradCache calls these
    model.to(device).train()
    groups = param_groups(model, cfg)
    optimizer = torch.optim.AdamW(groups, betas=cfg.betas, eps=cfg.eps, foreach=True)
    start, data_state = 0, None
    if (out / "state.pt").is_file():  # resume; every rank reads the full state and keeps its part
        state = torch.load(out / "state.pt", map_location="cpu", weights_only=True)
        set_model_state_dict(model, state["model"], options=FULL)
        set_optimizer_state_dict(model, optimizer, state["optimizer"], options=FULL)
        start, data_state = state["step"], state["data"]
        _set_rng_state(state["rng"])
        if is_main():  # rank 0 alone owns the metrics file
            _truncate_metrics(out / "metrics.jsonl", start)
    if is_main():
        cfg.save(out / "train_config.json")

    if cfg.batch_size % (world_size() * cfg.accum):
        raise ValueError(f"batch_size {cfg.batch_size} does not split into {world_size()} ranks x {cfg.accum} micro-batches")
    local_batch = cfg.batch_size // world_size()
    stream = TrainStream(cfg.data, transform=model.cfg.image_transform, tokenizer=tokenizer,
                         batch_size=local_batch, seed=cfg.seed, rank=rank(), world_size=world_size(),
                         workers=cfg.workers, augment=AugmentConfig() if cfg.augment else None,
                         split=cfg.split, start=data_state, negatives=cfg.hard_negatives)
    batches = iter(stream)
    net = model
    if is_dist() and cfg.accum == 1 and not fsdp:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    if cfg.compile:
        net = torch.compile(net)
    loss_fn = ClipLoss(local_loss=cfg.local_loss)
    # A locked text tower gives each caption one output: compute it once (not under FSDP,
    # whose sharded embeddings are whole only inside the model's forward).
    text_locked = not any(p.requires_grad for p in model.text.parameters())
    text_cache = FrozenTextCache(model.text) if text_locked and not fsdp else None
    regions = phrase_tokens = None
    if cfg.regions:
        from polymodal.train.regions import PHRASES, RegionBatches

        if is_dist():
            raise ValueError("--regions runs on one process (no torchrun) for now")
        regions = RegionBatches(cfg.regions, model.cfg.image_transform, batch_size=cfg.region_batch, seed=cfg.seed)
        phrase_tokens = tokenizer(list(PHRASES))
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if cfg.precision == "bf16" else nullcontext())

    bar = _progress_bar(cfg.steps, start) if progress and is_main() else None
    metrics: dict = {}
    t0, samples, skipped = time.perf_counter(), 0, 0
    for step in range(start, cfg.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg, group["base_lr"])
        batch = next(batches)
        pixels, ids, mask = (batch[k].to(device) for k in ("pixels", "input_ids", "attention_mask"))
        with autocast:
            if cfg.accum > 1:
                terms = accumulated_backward(net, loss_fn, pixels.chunk(cfg.accum), ids.chunk(cfg.accum),
                                             mask.chunk(cfg.accum))
            else:
                B, negatives = ids.shape[0], {}
                if cfg.hard_negatives:  # the negative captions go through the same forward, after the true ones
                    ids = torch.cat([ids, batch["negative_ids"].to(device)])  # (2B, L)
                    mask = torch.cat([mask, batch["negative_mask"].to(device)])
                output = net(pixels, ids, mask, text_pooled=text_cache(ids, mask) if text_cache else None)
                text = output.text_embeds
                if cfg.hard_negatives:
                    text, neg = text[:B], text[B:]
                    negatives = {"negatives": neg, "has_negative": batch["has_negative"].to(device)}
                terms = loss_fn(output.image_embeds, text, output.logit_scale, **negatives)
                if regions is not None:
                    terms.update(_region_terms(model, regions.batch(step), phrase_tokens, text_cache, cfg.region_weight))
                total_loss(terms).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        clamp_logit_scale_(model)
        samples += pixels.shape[0] * world_size()
        skipped += int(batch.get("skipped", 0))

        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            elapsed = time.perf_counter() - t0
            metrics = {"step": done, "loss": total_loss(terms).item(), "lr": optimizer.param_groups[0]["lr"],
                       "logit_scale": terms["logit_scale"].item(), "grad_norm": grad_norm.item(),
                       "samples_per_s": samples / elapsed, "skipped": skipped}
            if "region_loss" in terms:
                metrics.update(region_loss=terms["region_loss"].item(), region_acc=terms["region_acc"].item())
            if is_main():
                with open(out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(metrics) + "\n")
            t0, samples = time.perf_counter(), 0
        if done % cfg.save_every == 0 or done == cfg.steps:
            data_states = gather_states(stream)  # a collective: every rank's data position
            save_checkpoint(out, model, tokenizer, optimizer, done, data_states)  # a collective too
        if bar is not None:
            bar.update(bar.task_ids[0], completed=done, info=f"loss {metrics['loss']:.3f}" if metrics else "")
        if on_step is not None:
            on_step(done, metrics)
    if bar is not None:
        bar.stop()
    stream.close()
    return metrics


def _region_terms(model: CLIP, batch, phrase_tokens: dict, text_cache, weight: float) -> dict:
    """The region loss of one scene batch (train/regions.py), scaled by `weight`."""
    from polymodal.train.regions import RegionBatch, region_terms

    device = model.logit_scale.device
    batch = RegionBatch(batch.pixels.to(device), batch.where.to(device), batch.labels.to(device))
    ids, mask = phrase_tokens["input_ids"].to(device), phrase_tokens["attention_mask"].to(device)
    phrases = model.text_features(ids, mask, pooled=text_cache(ids, mask) if text_cache else None)  # normalised
    terms = region_terms(model, batch, phrases)
    terms["region_loss"] = weight * terms["region_loss"]
    return terms


def _progress_bar(total: int, start: int):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("training"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                   TimeRemainingColumn())
    bar.add_task("train", total=total, completed=start, info="")
    bar.start()
    return bar
