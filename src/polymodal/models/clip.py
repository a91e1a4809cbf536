"""CLIP: an image tower and a text tower projected into one space, compared by cosine.

Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision", Figure 1: I_e = norm(I_f W_i), T_e = norm(T_f W_t),
logits = I_e T_e^T * exp(t), trained with a symmetric cross-entropy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polymodal.config import CLIPConfig
from polymodal.models.text import build_text_tower
from polymodal.models.vit import VisionTransformer


@dataclass
class CLIPOutput:
    image_embeds: Tensor  # (N, embed_dim), L2-normalised
    text_embeds: Tensor  # (M, embed_dim), L2-normalised
    logits_per_image: Tensor  # (N, M) = exp(logit_scale) * cosine
    logit_scale: Tensor  # (), the log of the multiplier: the parameter as forward read it
    loss: Tensor | None = None

    @property
    def logits_per_text(self) -> Tensor:
        return self.logits_per_image.t()


class CLIP(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.cfg = cfg
        self.visual = VisionTransformer(cfg.vision)
        self.text = build_text_tower(cfg.text)
        self.visual_proj = nn.Linear(cfg.vision.width, cfg.embed_dim, bias=False)
        self.text_proj = nn.Linear(cfg.text.width, cfg.embed_dim, bias=cfg.text_proj_bias)
        self.logit_scale = nn.Parameter(torch.tensor(cfg.logit_scale_init))

    def image_features(self, pixels: Tensor, *, normalize: bool = True) -> Tensor:
        """pixels (N, 3, H, W) -> (N, embed_dim)."""
        x = self.visual_proj(self.visual(pixels, pooled_only=True).pooled)
        return F.normalize(x, dim=-1) if normalize else x

    def text_features(self, ids: Tensor, attention_mask: Tensor | None = None, *,
                      normalize: bool = True, pooled: Tensor | None = None) -> Tensor:
        """ids (M, T) -> (M, embed_dim). pooled: the text tower's output for these ids, when
        already known (a locked tower's cache): only the projection runs."""
        x = self.text_proj(self.text(ids, attention_mask).pooled if pooled is None else pooled)
        return F.normalize(x, dim=-1) if normalize else x

    def forward(self, pixels: Tensor, ids: Tensor, attention_mask: Tensor | None = None, *,
                targets: Tensor | None = None, text_pooled: Tensor | None = None) -> CLIPOutput:
        """targets (N,): the index of each image's text; sets the symmetric InfoNCE loss.
        text_pooled (M, text width): the text tower's output, when cached (see train/lit.py)."""
        img = self.image_features(pixels)
        txt = self.text_features(ids, attention_mask, pooled=text_pooled)
        logits = self.logit_scale.exp() * img @ txt.t()  # (N, M)
        loss = None
        if targets is not None:
            loss = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2
        # logit_scale goes out with the embeddings: a loss outside forward then never reads the
        # parameter itself, which FSDP holds sharded outside forward.
        return CLIPOutput(image_embeds=img, text_embeds=txt, logits_per_image=logits, logit_scale=self.logit_scale,
                          loss=loss)

    @property
    def temperature(self) -> float:
        return math.exp(-self.logit_scale.item())


def with_image_size(model: CLIP, size: int) -> CLIP:
    """The same CLIP reading `size`-pixel images (to fine-tune at a larger input): its position
    embeddings interpolated bicubically to the new patch grid, as `position_embeddings` does at
    inference, and the image transform's size (and its resize, in proportion) set to match."""
    cfg = model.cfg
    if size == cfg.vision.image_size:
        return model
    if size % cfg.vision.patch_size:
        raise ValueError(f"image size {size} is not a multiple of the patch size {cfg.vision.patch_size}")
    t, grid = cfg.image_transform, size // cfg.vision.patch_size
    resized = CLIP(replace(cfg, vision=replace(cfg.vision, image_size=size),
                           image_transform=replace(t, size=size, resize=round(t.resize * size / t.size))))
    state = model.state_dict()
    with torch.no_grad():
        state["visual.pos_embed"] = model.visual.position_embeddings(grid, grid).detach().clone()
    resized.load_state_dict(state)
    return resized.train(model.training)
