"""Flamingo: a frozen language model that looks at images through new gated cross-attention layers.

Alayrac et al. 2022, "Flamingo: a Visual Language Model for Few-Shot Learning", Figure 3:
  frozen vision encoder -> Perceiver Resampler (a fixed number of visual tokens per image or video)
  -> gated cross-attention dense blocks, one before every `cross_every`-th layer of the frozen LM
  (from layer `cross_start` on: a cheap recipe leaves the lower layers alone, and no gradient
  flows through them).
The text is interleaved with `<image>` markers (`image_token_id`); each text token cross-attends only
to the visual tokens of the latest image at or before it (Figure 7's masking), or to none, and keeps
self-attending to all the text before it. With every gate at zero the model IS the frozen LM.

The layout and details follow IDEFICS (`transformers`' IdeficsForVisionText2Text, the open
reproduction): vision features are the encoder's last hidden states (before the post-LayerNorm), the
cross-attention block sits before layer i when i % cross_every == 0, and tokens after an
end-of-chunk token see no image until the next one. While generating, new tokens see what the
prompt's last token saw.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polymodal.config import FlamingoConfig
from polymodal.generation import GenerateOutput, GenerationConfig, generate
from polymodal.models.lm import IGNORE_INDEX, DecoderLM
from polymodal.models.perceiver import PerceiverResampler
from polymodal.models.vit import VisionTransformer
from polymodal.nn import KVCache
from polymodal.nn.gated import GatedCrossAttentionBlock


def media_index(ids: Tensor, image_token_id: int, end_of_chunk_token_id: int | None = None) -> Tensor:
    """ids (B, T) -> (B, T) index of the image each token sees: the latest `image_token_id` at or
    before it (0 for the first image of the row), -1 for none (no image yet, or an end-of-chunk token
    came after the latest image and before this token)."""
    B, T = ids.shape
    pos = torch.arange(T, device=ids.device).expand(B, T)
    is_image = ids == image_token_id
    index = is_image.long().cumsum(-1) - 1  # (B, T)
    if end_of_chunk_token_id is not None:
        last_image = torch.where(is_image, pos, -1).cummax(-1).values  # (B, T)
        last_end = torch.where(ids == end_of_chunk_token_id, pos, -1).cummax(-1).values
        before = F.pad(last_end, (1, 0), value=-1)[:, :-1]  # latest end-of-chunk strictly before t
        index = torch.where(before > last_image, -1, index)
    return index


def media_mask_from_index(index: Tensor, num_media: int) -> Tensor:
    """(B, T) image index (-1: none) -> (B, T, num_media) bool, True where token t sees image m."""
    if int(index.max()) >= num_media:
        raise ValueError(f"the text has {int(index.max()) + 1} image markers but {num_media} images were given")
    return F.one_hot(index + 1, num_media + 1)[..., 1:].bool()


class FlamingoCache(KVCache):
    """The LM's KV cache, plus what the last prompt token saw (B, num_media): new tokens see the same."""

    media_mask: Tensor | None = None

    def reorder(self, index: Tensor) -> None:
        super().reorder(index)
        if self.media_mask is not None:
            self.media_mask = self.media_mask.index_select(0, index)


@dataclass
class FlamingoOutput:
    logits: Tensor  # (B, T, vocab)
    loss: Tensor | None = None  # next-token cross-entropy when targets are given
    media: Tensor | None = None  # (B, M, latents, vision_width): the resampled visual tokens


class Flamingo(nn.Module):
    """vision (frozen) -> resampler -> [gated xattn before every k-th block of the frozen LM]."""

    def __init__(self, cfg: FlamingoConfig):
        super().__init__()
        self.cfg = cfg
        lm, dv = cfg.lm, cfg.vision.width
        self.vision = VisionTransformer(cfg.vision)
        self.resampler = PerceiverResampler(dv, cfg.perceiver)
        self.lm = DecoderLM(lm)
        self.xattn = nn.ModuleList(
            GatedCrossAttentionBlock(lm.width, lm.heads, dv, cfg.xattn_mlp_dim or lm.mlp_dim, act=lm.act,
                                     norm=lm.norm, eps=lm.norm_eps, qk_norm=cfg.xattn_qk_norm, gate=cfg.gate)
            for _ in range(cfg.cross_layers)
        )

    # --- the parts that train and the parts that stay frozen ---------------------------------

    def freeze_pretrained(self) -> None:
        """Freeze the vision tower and the LM: only the resampler and the gated blocks learn."""
        for part in (self.vision, self.lm):
            part.requires_grad_(False)

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"resampler": self.resampler, "xattn": self.xattn}

    # --- vision ------------------------------------------------------------------------------

    def encode_media(self, pixels: Tensor, *, eager: bool = False) -> Tensor:
        """pixels (B, M, C, H, W) images or (B, M, F, C, H, W) video frames -> (B, M, latents, width)."""
        if pixels.dim() == 5:
            pixels = pixels[:, :, None]  # one frame per image
        if pixels.dim() != 6:
            raise ValueError(f"pixels must be (B, M, C, H, W) or (B, M, F, C, H, W), got {tuple(pixels.shape)}")
        B, M, Fr = pixels.shape[:3]
        tokens = self.vision(pixels.flatten(0, 2), eager=eager).tokens  # (B * M * F, 1 + N, width)
        tokens = tokens.view(B * M, Fr, *tokens.shape[1:])  # (B * M, F, 1 + N, width)
        return self.resampler(tokens, eager=eager).view(B, M, self.cfg.perceiver.latents, -1)

    # --- the language model ------------------------------------------------------------------

    def new_cache(self, batch: int, max_len: int, *, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None) -> FlamingoCache:
        p = self.lm.token_embed.weight
        c = self.cfg.lm
        cache = FlamingoCache(c.layers, batch, c.kv_heads or c.heads, max_len, c.head_size,
                              dtype=dtype or p.dtype, device=device or p.device)
        return cache

    def embed(self, ids: Tensor) -> Tensor:
        return self.lm.embed(ids)

    def media_mask(self, ids: Tensor, num_media: int) -> Tensor:
        """(B, T, num_media) bool from the `<image>` markers in ids."""
        index = media_index(ids, self.cfg.image_token_id, self.cfg.end_of_chunk_token_id)
        return media_mask_from_index(index, num_media)

    def forward(self, ids: Tensor, *, pixels: Tensor | None = None, media: Tensor | None = None,
                media_mask: Tensor | None = None, attention_mask: Tensor | None = None,
                cache: KVCache | None = None, targets: Tensor | None = None,
                eager: bool = False) -> FlamingoOutput:
        """ids (B, T) with `<image>` markers; pixels (B, M, [F,] C, H, W) or media (B, M, latents, width)
        already resampled (neither: the plain LM). media_mask (B, T, M) bool overrides the masks
        computed from the markers (IDEFICS's image_attention_mask). attention_mask, cache, targets as
        DecoderLM's; targets (B, T) are the ids, -100 where no loss is wanted."""
        if pixels is not None and media is not None:
            raise ValueError("give pixels or media, not both")
        if pixels is not None:
            media = self.encode_media(pixels, eager=eager)
        hook = None
        if media is not None:
            B, M, L, D = media.shape
            if media_mask is None:
                if isinstance(cache, FlamingoCache) and cache.length() > 0 and cache.media_mask is not None:
                    media_mask = cache.media_mask[:, None].expand(B, ids.shape[1], M)
                else:
                    media_mask = self.media_mask(ids, M)
            if isinstance(cache, FlamingoCache):
                cache.media_mask = media_mask[:, -1]
            visual = media.reshape(B, M * L, D)  # (B, M * L, width): every image's tokens in a row
            mask = media_mask.repeat_interleave(L, dim=-1)  # (B, T, M * L)
            k, start = self.cfg.cross_every, self.cfg.cross_start

            def hook(i: int, x: Tensor) -> Tensor:
                if i < start or (i - start) % k:
                    return x
                return self.xattn[(i - start) // k](x, visual.to(x.dtype), mask, eager=eager)

        out = self.lm(ids, attention_mask=attention_mask, cache=cache, eager=eager, before_block=hook)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), targets[:, 1:].flatten(),
                                   ignore_index=IGNORE_INDEX)
        return FlamingoOutput(logits=out.logits, loss=loss, media=media)

    @torch.no_grad()
    def generate(self, ids: Tensor, *, pixels: Tensor | None = None, media: Tensor | None = None,
                 attention_mask: Tensor | None = None, config: GenerationConfig | None = None,
                 **options) -> GenerateOutput:
        """Continue left-padded interleaved prompts ids (B, P) about pixels / media; the new tokens only.
        The end-of-sequence and pad ids default to the LM's; options override fields of `config`."""
        if config is None:
            config = GenerationConfig(eos_token_id=self.cfg.lm.eos_token_id, pad_token_id=self.cfg.lm.pad_token_id)
        if pixels is not None:
            media = self.encode_media(pixels)
        model = self if media is None else _WithMedia(self, media)
        return generate(model, ids, attention_mask=attention_mask, config=config, **options)


class _WithMedia:
    """The model bound to its visual tokens, as the shared generation loop calls it (ids, mask, cache).
    Beam search repeats each prompt num_beams times: the media follow."""

    def __init__(self, model: Flamingo, media: Tensor):
        self.model, self.media = model, media

    def __call__(self, ids: Tensor, *, attention_mask: Tensor | None = None, cache=None) -> FlamingoOutput:
        media = self.media
        if ids.shape[0] != media.shape[0]:
            media = media.repeat_interleave(ids.shape[0] // media.shape[0], dim=0)
        return self.model(ids, media=media, attention_mask=attention_mask, cache=cache)

    def new_cache(self, batch: int, max_len: int) -> FlamingoCache:
        return self.model.new_cache(batch, max_len)

    def embed(self, ids: Tensor) -> Tensor:
        return self.model.embed(ids)
