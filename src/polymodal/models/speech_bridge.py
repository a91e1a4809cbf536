"""Speech into a frozen LLM: a frozen Whisper encoder -> a Q-Former -> a projection -> the frozen LLM.

The bridge of BLIP-2 (Li et al. 2023, "BLIP-2: Bootstrapping Language-Image Pre-training with
Frozen Image Encoders and Large Language Models", Figure 3) with the Whisper encoder (Radford et al.
2022) as the frozen tower, as SALMONN (Tang et al. 2023) and Speech-LLaMA read speech into an LLM:

    log-mel (B, 80, frames) -> Whisper encoder (B, frames / 2, width), 20 ms a position
      -> average of every `pool` positions (B, S, width)
      -> Q-Former: learned queries cross-attend to the speech (padding masked) (B, Q, qformer width)
      -> language_projection (B, Q, embed_dim): a soft prompt in the LLM's input embedding space.

Only the Q-Former and the projection train; the encoder and the LLM stay frozen and are read from
where they ship (`SpeechBridgeConfig.whisper_weights` / `lm_weights`). `prompt` (also under BLIP-2's
name `visual_prompt`, so train/vlm.py's `chat_loss` trains it unchanged) takes the encoder's
output, computed once per clip and cached by the recipe.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polymodal.config import SpeechBridgeConfig
from polymodal.models.lm import DecoderLM
from polymodal.models.qformer import QFormer
from polymodal.models.whisper import WhisperEncoder


@dataclass
class SpeechFeatures:
    """A batch of pooled encoder outputs of clips of different lengths, padded on the right."""

    states: Tensor  # (B, S, width)
    mask: Tensor | None = None  # (B, S) bool, True = a real position; None: all real

    @classmethod
    def pad(cls, clips: list[Tensor]) -> SpeechFeatures:
        """[(S_i, width)] -> padded states and their mask."""
        states = torch.nn.utils.rnn.pad_sequence(clips, batch_first=True)  # (B, S, width)
        lengths = torch.tensor([c.shape[0] for c in clips])
        mask = torch.arange(states.shape[1])[None, :] < lengths[:, None]  # (B, S)
        return cls(states, None if bool(mask.all()) else mask)

    def to(self, device) -> SpeechFeatures:
        return SpeechFeatures(self.states.to(device), None if self.mask is None else self.mask.to(device))

    def __len__(self) -> int:
        return self.states.shape[0]


class SpanProjector(nn.Module):
    """The Q-Former's plainer rival (`SpeechBridgeConfig.bridge = "projector"`): each clip's real
    positions cut into `tokens` equal spans and averaged (B, tokens, width), then LLaVA-1.5's two-layer
    MLP projector (Liu et al. 2023, "Improved Baselines with Visual Instruction Tuning") into the LLM's
    embedding space."""

    def __init__(self, width: int, embed_dim: int, tokens: int):
        super().__init__()
        self.tokens = tokens
        self.mlp = nn.Sequential(nn.Linear(width, embed_dim), nn.GELU(), nn.Linear(embed_dim, embed_dim))

    def forward(self, states: Tensor, mask: Tensor | None = None) -> Tensor:
        B, S, _ = states.shape
        lengths = mask.sum(1) if mask is not None else torch.full((B,), S, device=states.device)  # (B,)
        span = torch.arange(S, device=states.device)[None, :] * self.tokens // lengths[:, None]  # (B, S)
        member = span[:, None, :] == torch.arange(self.tokens, device=states.device)[None, :, None]  # (B, T, S)
        weights = member.to(states.dtype) / member.sum(-1, keepdim=True).clamp(min=1)  # padding: span >= T
        return self.mlp(weights @ states)  # (B, tokens, embed_dim)


class SpeechBridge(nn.Module):
    """Frozen Whisper encoder -> Q-Former queries -> language_projection -> soft prompt -> frozen LLM
    (or, with bridge "projector", span averages -> an MLP)."""

    def __init__(self, cfg: SpeechBridgeConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = WhisperEncoder(cfg.whisper)
        if cfg.bridge == "qformer":
            self.qformer = QFormer(cfg.qformer, cfg.whisper.width)
            self.language_projection = nn.Linear(cfg.qformer.width, cfg.lm.embed_dim)
        else:
            self.projector = SpanProjector(cfg.whisper.width, cfg.lm.embed_dim, cfg.qformer.num_query_tokens)
        self.lm = DecoderLM(cfg.lm)

    @property
    def frozen(self) -> tuple[nn.Module, nn.Module]:
        return self.encoder, self.lm

    @property
    def trained(self) -> tuple[nn.Module, ...]:
        return (self.qformer, self.language_projection) if self.cfg.bridge == "qformer" else (self.projector,)

    def speech_states(self, mel: Tensor) -> Tensor:
        """mel (B, n_mels, frames) -> (B, frames / (2 * pool), width): the encoder's output, every
        `pool` positions averaged (a last incomplete group is averaged over what it has)."""
        states = self.encoder(mel)  # (B, frames / 2, width)
        if self.cfg.pool == 1:
            return states
        pooled = F.avg_pool1d(states.transpose(1, 2), self.cfg.pool, ceil_mode=True)  # (B, width, S)
        return pooled.transpose(1, 2)  # (B, S, width)

    def prompt(self, features: SpeechFeatures | Tensor) -> Tensor:
        """Pooled encoder states (SpeechFeatures, or a (B, S, width) tensor with no padding) ->
        (B, Q, embed_dim): the queries in the LLM's input embedding space."""
        if isinstance(features, Tensor):
            features = SpeechFeatures(features)
        p = next(self.trained[0].parameters())
        states = features.states.to(p.device, p.dtype)
        mask = None if features.mask is None else features.mask.to(p.device)
        if self.cfg.bridge == "projector":
            return self.projector(states, mask)
        queries = self.qformer(states, image_mask=mask).queries  # (B, Q, qformer width)
        return self.language_projection(queries)

    def visual_prompt(self, pixels: None = None, *, features: SpeechFeatures | Tensor) -> Tensor:
        """BLIP-2's name for `prompt` (train/vlm.py's `chat_loss` calls it); there are no pixels."""
        if pixels is not None:
            raise ValueError("a speech bridge reads encoder features, not pixels")
        return self.prompt(features)


__all__ = ["SpanProjector", "SpeechBridge", "SpeechBridgeConfig", "SpeechFeatures"]
