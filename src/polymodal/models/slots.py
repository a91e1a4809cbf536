"""Object slots: a DETR-style read-out of a vision tower's tokens, one vector per object.

Carion et al. 2020, "End-to-End Object Detection with Transformers": `count` learned queries read the
tower's tokens through a small transformer decoder (self-attention among the queries, cross-attention
to the tokens). Trained with the object-set loss of train/scene_tower.py, each drawn object is claimed
by one query, which then holds that object's colour, shape, size and centre together. A vision tower's
patch tokens spread an object over several patches, and a reader that must find "the triangle" and
say its colour loses which colour goes with which shape (MODEL_CARD.md, "The binding is lost"); the
slots keep it. BLIP-2's Q-Former reads them beside the tokens (Blip2Config.object_slots).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ObjectSlots(nn.Module):
    """tokens (B, N, width) -> slots (B, count, width)."""

    def __init__(self, width: int, count: int = 16, layers: int = 2, heads: int = 4):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(count, width) * 0.02)
        layer = nn.TransformerDecoderLayer(width, heads, 4 * width, 0.0, batch_first=True, norm_first=True)
        self.decoder = nn.TransformerDecoder(layer, layers)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.decoder(self.queries.expand(tokens.shape[0], -1, -1).to(tokens.dtype), tokens)


__all__ = ["ObjectSlots"]
