"""The Perceiver Resampler: any number of frames x patches in, a fixed number of visual tokens out.

Alayrac et al. 2022, "Flamingo", Figure 5 (after Jaegle et al. 2021, "Perceiver"): a learned
media-time embedding is added to the features of each frame, the frames' patches are flattened
into one sequence, and `latents` learned queries attend `depth` times to [features; latents]
(keys and values from both, queries from the latents), each time followed by a feed-forward layer,
both residual. The result is `latents` tokens per media item whatever its frames and patches.
IDEFICS (`transformers`' IdeficsPerceiverResampler) is this without time embeddings (one frame),
with optional LayerNorms on each head's queries and keys; the layout here follows it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from polymodal.config import PerceiverConfig
from polymodal.nn import MLP, Attention


class PerceiverLayer(nn.Module):
    """latents = latents + attn(norm(latents), [norm(media); norm(latents)]); latents += ffw(latents)."""

    def __init__(self, dim: int, cfg: PerceiverConfig):
        super().__init__()
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.attn = Attention(dim, cfg.heads, head_dim=cfg.head_dim, bias=False, cross=True,
                              qk_norm="layer" if cfg.qk_norm else None, qk_norm_eps=1e-5)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = MLP(dim, cfg.mlp_ratio * dim, "relu", bias=False)

    def forward(self, media: Tensor, latents: Tensor, *, eager: bool = False) -> Tensor:
        """media: (B, S, dim); latents: (B, L, dim) -> (B, L, dim)."""
        lat = self.norm_latents(latents)
        context = torch.cat([self.norm_media(media), lat], dim=1)  # (B, S + L, dim)
        latents = latents + self.attn(lat, context, eager=eager)
        return latents + self.mlp(self.norm_mlp(latents))


class PerceiverResampler(nn.Module):
    def __init__(self, dim: int, cfg: PerceiverConfig):
        super().__init__()
        self.cfg = cfg
        self.latents = nn.Parameter(torch.randn(cfg.latents, dim))
        # media-time embeddings, one per frame (Flamingo); none for IDEFICS. Unit scale, as
        # flamingo-pytorch: at 0.02 they vanish next to the features and frames cannot be told apart
        self.time_embed = nn.Parameter(torch.randn(cfg.max_frames, dim)) if cfg.max_frames else None
        self.layers = nn.ModuleList(PerceiverLayer(dim, cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, media: Tensor, *, eager: bool = False) -> Tensor:
        """media: (B, F, N, dim) frames x patches, or (B, N, dim) one image -> (B, latents, dim)."""
        if media.dim() == 3:
            media = media[:, None]  # (B, 1, N, dim)
        B, F, N, D = media.shape
        if self.time_embed is not None:
            if self.time_embed.shape[0] < F:
                raise ValueError(f"{F} frames: the resampler has time embeddings for at most "
                                 f"{self.time_embed.shape[0]} (PerceiverConfig.max_frames)")
            media = media + self.time_embed[:F, None].to(media.dtype)  # (B, F, N, dim)
        elif F > 1:
            raise ValueError(f"{F} frames: this resampler has no media-time embeddings (max_frames 0)")
        media = media.reshape(B, F * N, D)  # (B, F * N, dim)
        latents = self.latents.to(media.dtype).expand(B, -1, -1)  # (B, L, dim)
        for layer in self.layers:
            latents = layer(media, latents, eager=eager)
        return self.norm(latents)
