"""BLIP-2: a frozen image encoder, a Q-Former, and a frozen LLM prompted with the Q-Former's queries.

Li et al. 2023, "BLIP-2: Bootstrapping Language-Image Pre-training with Frozen Image Encoders
and Large Language Models".
  - Stage 1 (Figure 2), `Blip2Stage1`: the Q-Former learns to read the frozen ViT's features
    under three objectives: image-text contrastive (ITC), image-text matching (ITM) and
    image-grounded text generation (ITG).
  - Stage 2 (Figure 3), `Blip2`: one linear layer (`language_projection`) maps the query outputs
    into the LLM's input embedding space, where they are prepended to the text as a soft visual
    prompt; only the text is scored.

BLIP-2's image encoder (EVA ViT-g; `transformers`' Blip2VisionModel) is a `VisionTransformer`
without pre-LayerNorm and with a bias on the patch projection (VisionConfig `pre_norm=False`,
`patch_bias=True`), whose post-LayerNorm normalises every token, not only the class token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polymodal.config import Blip2Config, ConfigError
from polymodal.generation import GenerateOutput, GenerationConfig, generate
from polymodal.models.lm import IGNORE_INDEX, DecoderLM
from polymodal.models.qformer import QFormer, SharedImage
from polymodal.models.slots import ObjectSlots
from polymodal.models.vit import VisionTransformer

LABEL_SMOOTHING = 0.1  # LAVIS's Blip2Qformer smooths the ITC and ITG targets


def tile_views(pixels: Tensor, tiles: int) -> Tensor:
    """(B, C, H, W) -> (B, tiles * tiles, C, H, W): crops of half the picture's side whose corners lie on
    an evenly spaced tiles x tiles grid (they overlap when tiles > 2), row by row, each enlarged back to
    H x W (bicubic). An object then covers four times the patches it does in the whole picture (the
    multi-crop "AnyRes" input of LLaVA-NeXT, Liu et al. 2024, on a frozen tower's own resolution)."""
    B, C, H, W = pixels.shape
    h, w = H // 2, W // 2
    ys = [round(k * (H - h) / (tiles - 1)) for k in range(tiles)]
    xs = [round(k * (W - w) / (tiles - 1)) for k in range(tiles)]
    crops = torch.stack([pixels[:, :, y:y + h, x:x + w] for y in ys for x in xs], 1)  # (B, T, C, h, w)
    big = F.interpolate(crops.flatten(0, 1), size=(H, W), mode="bicubic", align_corners=False)
    return big.view(B, tiles * tiles, C, H, W)


def image_features(visual: VisionTransformer, pixels: Tensor, *, tiles: int = 0, tile_pool: int = 1,
                   eager: bool = False, slots: ObjectSlots | None = None) -> Tensor:
    """pixels (B, C, H, W) -> (B, 1 + N, width): every token of the last layer through norm_post.
    With tiles (>= 2), each tile's N patch tokens follow (`tile_views`), averaged in tile_pool x
    tile_pool blocks: (B, 1 + N + tiles^2 * N / tile_pool^2, width). With `slots` (models/slots.py),
    its object slots of those tokens follow instead: (B, 1 + N + count, width)."""
    whole = visual.norm_post(visual(pixels, eager=eager).tokens)
    if slots is not None:
        return torch.cat([whole, slots(whole)], dim=1)
    if tiles < 2:
        return whole
    views = tile_views(pixels, tiles).flatten(0, 1)  # (B * T, C, H, W)
    parts = visual.norm_post(visual(views, eager=eager).tokens)[:, 1:]  # (B * T, N, width)
    if tile_pool > 1:
        g = visual.cfg.image_size // visual.cfg.patch_size
        parts = F.avg_pool2d(parts.transpose(1, 2).unflatten(2, (g, g)), tile_pool).flatten(2).transpose(1, 2)
    return torch.cat([whole, parts.reshape(pixels.shape[0], -1, parts.shape[-1])], dim=1)


class ViewEmbedding(nn.Module):
    """Which view a token of `image_features` comes from, for the Q-Former: a learned vector per view
    (the whole picture, then each tile), added to its tokens. A tile's tokens carry the ViT's position
    embeddings of their place in the tile; this says which tile."""

    def __init__(self, cfg: Blip2Config):
        super().__init__()
        v = cfg.vision
        g = v.image_size // v.patch_size
        if cfg.tiles < 2 or cfg.tile_pool < 1 or g % cfg.tile_pool:
            raise ConfigError(f"tiles {cfg.tiles} (at least 2) and tile_pool {cfg.tile_pool} (dividing the "
                              f"{g} x {g} patch grid) do not describe a tiling")
        per_tile = (g // cfg.tile_pool) ** 2
        views = [0] * (1 + g * g) + [1 + t for t in range(cfg.tiles ** 2) for _ in range(per_tile)]
        self.weight = nn.Parameter(torch.zeros(1 + cfg.tiles ** 2, v.width))
        self.register_buffer("view", torch.tensor(views), persistent=False)

    def forward(self, features: Tensor) -> Tensor:
        if features.shape[1] != len(self.view):
            raise ValueError(f"image features of {features.shape[1]} tokens, but this tiling makes {len(self.view)}")
        return features + self.weight[self.view].to(features.dtype)


def read_image(model: nn.Module, pixels: Tensor | None, features: Tensor | None, eager: bool) -> Tensor:
    """What the Q-Former reads: the frozen ViT's features of `pixels` (or `features`, computed once
    by `image_features` under the model's tiling), with the view embedding of a tiled model."""
    cfg = model.cfg
    if features is None:
        features = image_features(model.visual, pixels, tiles=cfg.tiles, tile_pool=cfg.tile_pool, eager=eager,
                                  slots=model.slots)
    features = features.to(model.qformer.query_tokens.dtype)  # cached ones may be kept in float16
    return features if model.views is None else model.views(features)


@dataclass
class Stage1Output:
    itc: Tensor  # (N, N): max over queries of cos(query of image i, [CLS] of text j); unscaled
    itm: Tensor  # (N, 2): (no match, match) logits of the pairs (image i, text i)
    itg: Tensor | None  # (N, T, vocab): next-token logits of the text; None without an ITG head
    loss: Tensor | None = None  # itc_loss + itm_loss (+ itg_loss), when targets are given
    itc_loss: Tensor | None = None
    itm_loss: Tensor | None = None
    itg_loss: Tensor | None = None


class Blip2Stage1(nn.Module):
    """Frozen ViT -> Q-Former with the three stage-1 heads (Figure 2).

    ITC: image and text embed separately (unimodal mask): the query outputs and the text's [CLS]
    output are projected and L2-normalised; an image-text score is the best query's cosine.
    ITM: queries and text attend to each other (bidirectional mask); a linear head on every query
    output, averaged over queries, gives (no match, match) logits. ITG: the text, led by [DEC],
    decodes under the ITG mask through the Q-Former's LM head.
    """

    def __init__(self, cfg: Blip2Config):
        super().__init__()
        if not cfg.qformer.text_input:
            raise ConfigError("the stage-1 model needs the Q-Former's text side (QFormerConfig.text_input)")
        self.cfg = cfg
        w = cfg.qformer.width
        self.visual = VisionTransformer(cfg.vision)
        self.slots = ObjectSlots(cfg.vision.width, cfg.object_slots) if cfg.object_slots else None
        self.views = ViewEmbedding(cfg) if cfg.tiles else None
        self.qformer = QFormer(cfg.qformer, cfg.vision.width)
        self.vision_proj = nn.Linear(w, cfg.embed_dim)
        self.text_proj = nn.Linear(w, cfg.embed_dim)
        self.itm_head = nn.Linear(w, 2)
        self.logit_scale = nn.Parameter(torch.tensor(cfg.logit_scale_init))

    def image_embeds(self, pixels: Tensor, *, eager: bool = False) -> Tensor:
        """pixels (N, C, H, W) -> (N, Q, embed_dim): one normalised embedding per query."""
        queries = self.qformer(read_image(self, pixels, None, eager), eager=eager).queries
        return F.normalize(self.vision_proj(queries), dim=-1)

    def text_embeds(self, ids: Tensor, attention_mask: Tensor | None = None, *, eager: bool = False) -> Tensor:
        """ids, attention_mask (M, T) -> (M, embed_dim): the normalised [CLS] output of the text alone."""
        text = self.qformer(None, ids, attention_mask, eager=eager).text  # (M, T, width)
        return F.normalize(self.text_proj(text[:, 0]), dim=-1)

    @staticmethod
    def itc_scores(image_embeds: Tensor, text_embeds: Tensor) -> Tensor:
        """(N, Q, E) and (M, E) -> (N, M): the highest query-text cosine of each pair."""
        return torch.einsum("nqe,me->nqm", image_embeds, text_embeds).amax(dim=1)

    def itm_logits(self, pixels: Tensor, ids: Tensor, attention_mask: Tensor | None = None, *,
                   eager: bool = False) -> Tensor:
        """(B, 2) (no match, match) logits of the pairs (image b, text b)."""
        return self._itm(read_image(self, pixels, None, eager), ids, attention_mask, eager)

    def _itm(self, image: Tensor, ids: Tensor, attention_mask: Tensor | None, eager: bool,
             shared: SharedImage | None = None) -> Tensor:
        queries = self.qformer(image, ids, attention_mask, mask="itm", shared=shared, eager=eager).queries
        return self.itm_head(queries).mean(dim=1)  # (B, 2)

    def _itg(self, image: Tensor, ids: Tensor, attention_mask: Tensor | None, eager: bool,
             shared: SharedImage | None = None) -> Tensor:
        dec = self.cfg.qformer.dec_token_id
        if dec is not None:
            ids = torch.cat([torch.full_like(ids[:, :1], dec), ids[:, 1:]], dim=1)  # [DEC] replaces [CLS]
        text = self.qformer(image, ids, attention_mask, mask="itg", shared=shared, eager=eager).text
        return self.qformer.text_logits(text)

    def forward(self, pixels: Tensor | None, ids: Tensor, attention_mask: Tensor | None = None, *,
                targets: Tensor | None = None, generator: torch.Generator | None = None,
                features: Tensor | None = None, negatives: tuple[Tensor, Tensor, Tensor] | None = None,
                eager: bool = False) -> Stage1Output:
        """pixels (N, C, H, W) and ids, attention_mask (N, T): N matching pairs (image i, text i).
        features (N, tokens, vision_width) instead of pixels: `image_features`, computed once.

        targets (N, T): the ITG targets (the ids, -100 on padding), predicted from the position
        before. Given targets, the losses are set: ITC over the N x N scores, ITM on the pairs and on
        one hard negative text per image and one hard negative image per text, each drawn in
        proportion to its ITC similarity (BLIP-2 3.2), and ITG.
        negatives (ids (M, T'), attention_mask (M, T'), rows (M,)): more texts for ITM that do not
        match images `rows`, e.g. a caption of that very image made false (its left and right swapped)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(ids)
        image = read_image(self, pixels, features, eager)
        shared = SharedImage()  # every pass below reads these N images: their keys and values once
        img = F.normalize(self.vision_proj(self.qformer(image, shared=shared, eager=eager).queries), dim=-1)
        itc = self.itc_scores(img, self.text_embeds(ids, attention_mask, eager=eager))  # (N, N)
        itm = self._itm(image, ids, attention_mask, eager, shared)
        itg = self._itg(image, ids, attention_mask, eager, shared) if self.qformer.lm_head is not None else None
        if targets is None:
            return Stage1Output(itc=itc, itm=itm, itg=itg)

        N = ids.shape[0]
        if N < 2:
            raise ValueError("the stage-1 losses need at least 2 pairs (ITM draws its negatives from the batch)")
        logits = self.logit_scale.exp() * itc  # (N, N)
        pairs = torch.arange(N, device=ids.device)
        itc_loss = (F.cross_entropy(logits, pairs, label_smoothing=LABEL_SMOOTHING)
                    + F.cross_entropy(logits.t(), pairs, label_smoothing=LABEL_SMOOTHING)) / 2
        with torch.no_grad():
            others = ~torch.eye(N, dtype=torch.bool, device=ids.device)
            neg_text = torch.multinomial(logits.softmax(1) * others, 1, generator=generator).squeeze(1)  # (N,)
            neg_image = torch.multinomial(logits.t().softmax(1) * others, 1, generator=generator).squeeze(1)
        itm_neg = self._itm(image, torch.cat([ids[neg_text], ids]), torch.cat([attention_mask[neg_text], attention_mask]),
                            eager, shared.select(torch.cat([pairs, neg_image])))  # (2N, 2)
        if negatives is not None:
            neg_ids, neg_mask, rows = negatives
            itm_neg = torch.cat([itm_neg, self._itm(image, neg_ids, neg_mask, eager, shared.select(rows))])
        match = torch.cat([torch.ones(N), torch.zeros(len(itm_neg))]).long().to(ids.device)
        itm_loss = F.cross_entropy(torch.cat([itm, itm_neg]), match)
        loss, itg_loss = itc_loss + itm_loss, None
        if itg is not None:
            itg_loss = F.cross_entropy(itg[:, :-1].flatten(0, 1).float(), targets[:, 1:].flatten(),
                                       ignore_index=IGNORE_INDEX, label_smoothing=LABEL_SMOOTHING)
            loss = loss + itg_loss
        return Stage1Output(itc=itc, itm=itm, itg=itg, loss=loss, itc_loss=itc_loss, itm_loss=itm_loss,
                            itg_loss=itg_loss)

    @property
    def temperature(self) -> float:
        return math.exp(-self.logit_scale.item())


@dataclass
class Blip2Output:
    logits: Tensor  # (B, Q + T, vocab): the LLM's next-token logits over [visual prompt; text]
    loss: Tensor | None = None  # next-token cross-entropy on the text targets (queries never scored)


class Blip2(nn.Module):
    """Frozen ViT -> Q-Former queries -> language_projection -> soft prompt before the text -> frozen LLM."""

    def __init__(self, cfg: Blip2Config):
        super().__init__()
        if cfg.lm is None:
            raise ConfigError("BLIP-2 stage 2 needs a language model (Blip2Config.lm); lm=None is Blip2Stage1")
        if cfg.instruction and not (cfg.qformer.text_input and cfg.qformer.vocab_size == 0):
            raise ConfigError("an instruction-aware BLIP-2 needs a Q-Former text side without word embeddings "
                              "(QFormerConfig text_input=True, vocab_size=0)")
        if cfg.instruction_in_queries and not cfg.instruction:
            raise ConfigError("instruction_in_queries needs an instruction-aware BLIP-2 (instruction=True)")
        self.cfg = cfg
        self.visual = VisionTransformer(cfg.vision)
        self.slots = ObjectSlots(cfg.vision.width, cfg.object_slots) if cfg.object_slots else None
        self.views = ViewEmbedding(cfg) if cfg.tiles else None
        self.qformer = QFormer(cfg.qformer, cfg.vision.width)
        self.language_projection = nn.Linear(cfg.qformer.width, cfg.lm.embed_dim)
        self.instruction_proj = nn.Linear(cfg.lm.embed_dim, cfg.qformer.width) if cfg.instruction else None
        self.lm = DecoderLM(cfg.lm)

    def visual_prompt(self, pixels: Tensor | None, *, features: Tensor | None = None,
                      instruction: Tensor | None = None, instruction_mask: Tensor | None = None,
                      eager: bool = False) -> Tensor:
        """pixels (B, C, H, W) -> (B, Q, embed_dim): the queries in the LLM's input embedding space.
        features (B, tokens, vision_width) instead of pixels: `image_features`, computed once.
        instruction, instruction_mask (B, T): the question in the LLM's token ids (right-padded), which
        an instruction-aware model's queries read (InstructBLIP); ignored by a plain one."""
        features = read_image(self, pixels, features, eager)
        if self.instruction_proj is None or instruction is None:
            return self.language_projection(self.qformer(features, eager=eager).queries)
        instruction = instruction[:, :self.cfg.qformer.context_length]
        if instruction_mask is not None:
            instruction_mask = instruction_mask[:, :instruction.shape[1]]
        words = self.instruction_proj(self.lm.embed(instruction).to(features.dtype))  # (B, T, width)
        offset = None
        if self.cfg.instruction_in_queries:  # the question's mean word, added to every query
            real = (torch.ones_like(instruction) if instruction_mask is None else instruction_mask)
            real = real.to(words.device, words.dtype)[..., None]  # (B, T, 1)
            offset = (words * real).sum(1) / real.sum(1).clamp(min=1)  # (B, width)
        queries = self.qformer(features, attention_mask=instruction_mask, text_embeds=words, query_offset=offset,
                               eager=eager).queries
        return self.language_projection(queries)

    def prompt(self, pixels: Tensor, ids: Tensor, attention_mask: Tensor | None = None, *,
               eager: bool = False) -> tuple[Tensor, Tensor]:
        """[visual prompt; embedded text] (B, Q + T, embed_dim) and its attention mask (B, Q + T).
        Left padding of the text lands between the queries and the text; positions count real
        tokens only, so the text follows the queries either way."""
        visual = self.visual_prompt(pixels, eager=eager)  # (B, Q, E)
        text = self.lm.embed(ids).to(visual.dtype)  # (B, T, E)
        if attention_mask is None:
            attention_mask = torch.ones_like(ids)
        ones = torch.ones(visual.shape[:2], dtype=attention_mask.dtype, device=ids.device)
        return torch.cat([visual, text], dim=1), torch.cat([ones, attention_mask], dim=1)

    def forward(self, pixels: Tensor, ids: Tensor, attention_mask: Tensor | None = None, *,
                targets: Tensor | None = None, eager: bool = False) -> Blip2Output:
        """pixels (B, C, H, W); ids, attention_mask (B, T): the text after the visual prompt.

        targets (B, T): the ids, -100 where no loss is wanted (padding, a question's tokens); the
        loss predicts each target from the position before, the last query predicting the first."""
        embeds, mask = self.prompt(pixels, ids, attention_mask, eager=eager)
        full = None
        if targets is not None:
            ignore = torch.full(embeds.shape[:1] + (self.cfg.qformer.num_query_tokens,), IGNORE_INDEX,
                                dtype=targets.dtype, device=targets.device)
            full = torch.cat([ignore, targets], dim=1)  # (B, Q + T): the queries are never targets
        out = self.lm(inputs_embeds=embeds, attention_mask=mask, targets=full, eager=eager)
        return Blip2Output(logits=out.logits, loss=out.loss)

    @torch.no_grad()
    def generate(self, pixels: Tensor, prompt_ids: Tensor | None = None, attention_mask: Tensor | None = None, *,
                 config: GenerationConfig | None = None, **options) -> GenerateOutput:
        """Continue [visual prompt; prompt_ids] (left-padded (B, P)); without a prompt, from the BOS
        token alone (a caption). Returns the new tokens only. The end-of-sequence and pad ids
        default to the LLM's; options override fields of `config` (max_new_tokens=..., num_beams=...)."""
        lm = self.cfg.lm
        if prompt_ids is None:
            if attention_mask is not None:
                raise ValueError("an attention_mask without prompt_ids")
            if lm.bos_token_id is None:
                raise ValueError("no prompt and no BOS token (LMConfig.bos_token_id) to start from")
            prompt_ids = torch.full((pixels.shape[0], 1), lm.bos_token_id, dtype=torch.long, device=pixels.device)
        if config is None:
            config = GenerationConfig(eos_token_id=lm.eos_token_id, pad_token_id=lm.pad_token_id)
        embeds, mask = self.prompt(pixels, prompt_ids, attention_mask)
        return generate(self.lm, inputs_embeds=embeds, attention_mask=mask, config=config, **options)
