"""Training: losses that return named terms, accumulation, distributed helpers."""

from polymodal.train.accumulate import accumulated_backward
from polymodal.train.distributed import unwrap
from polymodal.train.losses import ClipLoss, clamp_logit_scale_, total_loss

__all__ = ["ClipLoss", "accumulated_backward", "clamp_logit_scale_", "total_loss", "unwrap"]
