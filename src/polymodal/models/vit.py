"""The Vision Transformer.

Dosovitskiy et al. 2020, "An Image is Worth 16x16 Words": cut the image into P x P
patches, flatten each and project it linearly, prepend a learned class token, add learned
position embeddings, run a transformer encoder. CLIP (Radford et al. 2021) adds a
LayerNorm before the encoder (`norm_pre`) and after it on the pooled token (`norm_post`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polymodal.config import VisionConfig
from polymodal.nn import Block


class PatchEmbed(nn.Module):
    """Flatten-and-project every P x P patch, as one strided convolution.

    A Conv2d with kernel = stride = P applies the same (C*P*P -> D) linear map to each
    non-overlapping patch: exactly the paper's x_p E, computed without materialising
    the (N, C*P*P) patch matrix (tests/test_vit.py proves the two equal).
    """

    def __init__(self, patch_size: int, channels: int, width: int, bias: bool = False):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(channels, width, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, pixels: Tensor) -> Tensor:
        x = self.proj(pixels)  # (B, width, H / P, W / P)
        return x.flatten(2).transpose(1, 2)  # (B, num_patches, width)


def patchify(pixels: Tensor, patch_size: int) -> Tensor:
    """The seed description: (B, C, H, W) -> (B, num_patches, C * P * P), row-major patches."""
    B, C, H, W = pixels.shape
    P = patch_size
    x = pixels.reshape(B, C, H // P, P, W // P, P)  # (B, C, gh, P, gw, P)
    x = x.permute(0, 2, 4, 1, 3, 5)  # (B, gh, gw, C, P, P)
    return x.reshape(B, (H // P) * (W // P), C * P * P)  # (B, N, C * P * P)


@dataclass
class VisionOutput:
    pooled: Tensor  # (B, width): the class token after norm_post (or the mean of patches)
    tokens: Tensor  # (B, 1 + num_patches, width): the encoder's last hidden states ((B, 1, width) if pooled_only)


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.channels, w, bias=cfg.patch_bias)
        self.class_token = nn.Parameter(torch.randn(w) * w**-0.5)
        self.pos_embed = nn.Parameter(torch.randn(1 + cfg.num_patches, w) * 0.02)
        self.norm_pre = nn.LayerNorm(w, eps=cfg.norm_eps) if cfg.pre_norm else nn.Identity()
        self.blocks = nn.ModuleList(
            Block(w, cfg.heads, cfg.mlp_dim, act=cfg.act, eps=cfg.norm_eps) for _ in range(cfg.layers)
        )
        self.norm_post = nn.LayerNorm(w, eps=cfg.norm_eps)

    def position_embeddings(self, grid_h: int, grid_w: int) -> Tensor:
        """(1 + grid_h * grid_w, width); bicubic interpolation for another resolution."""
        g = self.cfg.grid
        if (grid_h, grid_w) == (g, g):
            return self.pos_embed
        cls_pos, patch_pos = self.pos_embed[:1], self.pos_embed[1:]
        patch_pos = patch_pos.reshape(1, g, g, -1).permute(0, 3, 1, 2)  # (1, width, g, g)
        patch_pos = F.interpolate(patch_pos, size=(grid_h, grid_w), mode="bicubic", align_corners=False)
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(grid_h * grid_w, -1)  # (gh * gw, width)
        return torch.cat([cls_pos, patch_pos])

    def forward(self, pixels: Tensor, *, eager: bool = False, pooled_only: bool = False) -> VisionOutput:
        """pixels: (B, C, H, W) normalised; H and W multiples of the patch size.
        pooled_only: the caller reads `pooled` alone, so with class-token pooling the last block
        runs its output projection and MLP for the class token only (same result, ~6% less work
        for ViT-B/32); `tokens` is then the class token alone (B, 1, width)."""
        B, _, H, W = pixels.shape
        P = self.cfg.patch_size
        if H % P or W % P:
            raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {P}")
        x = self.patch_embed(pixels.to(self.pos_embed.dtype))  # (B, N, width)
        cls = self.class_token.expand(B, 1, -1)  # (B, 1, width)
        x = torch.cat([cls, x], dim=1) + self.position_embeddings(H // P, W // P)  # (B, 1 + N, width)
        x = self.norm_pre(x)
        last = len(self.blocks) - 1 if pooled_only and self.cfg.pool == "cls" else None
        for i, block in enumerate(self.blocks):
            x = block(x, eager=eager, keep=1 if i == last else None)  # (B, 1 + N, width); (B, 1, width) last
        pooled = x[:, 0] if self.cfg.pool == "cls" else x[:, 1:].mean(dim=1)  # (B, width)
        return VisionOutput(pooled=self.norm_post(pooled), tokens=x)
