"""The training config: every option of `polymodal train clip` is a field here (the CLI is
generated from it), saved with the run so a run can be resumed and repeated."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal


@dataclass(frozen=True)
class TrainConfig:
    # what to train
    model: str = "tiny"  # a preset name (polymodal.list_models()) or a model config .json
    init: str | None = None  # start from this checkpoint (any layout polymodal.load reads)
    freeze: Literal["none", "text", "image"] = "none"  # LiT: lock a pretrained tower
    # data
    data: str = ""  # a folder with captions.jsonl / .csv, or shards (dir, glob, {000..009}.tar)
    split: str | None = "train"  # records with a "split" field: train on this one
    augment: bool = True
    workers: int = 0
    # optimisation
    batch_size: int = 64  # global batch: the negatives of the contrastive loss
    accum: int = 1  # micro-batches per step (GradCache: same gradients as the full batch)
    steps: int = 1000
    lr: float = 5e-4
    lr_image: float | None = None  # per-part learning rates; None: `lr`, 0: frozen
    lr_text: float | None = None
    lr_head: float | None = None  # projections and logit_scale
    weight_decay: float = 0.2  # on weights with p.dim() >= 2 only
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup: int = 100
    min_lr: float = 0.0  # the cosine ends here
    grad_clip: float = 1.0  # 0: off
    local_loss: bool = False
    # machinery
    seed: int = 0
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16 autocast is for GPUs; this CPU has no fast bf16
    compile: bool = False
    save_every: int = 100
    log_every: int = 10

    def __post_init__(self):
        if self.batch_size % self.accum:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by accum {self.accum}")
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
