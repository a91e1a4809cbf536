"""The `transformers` BLIP-2 layouts -> ours, through explicit key maps.

  - Blip2ForConditionalGeneration (and Blip2Model, the same keys) with a decoder-only LLM: OPT,
    Llama or Qwen2 (hf_lm's families; encoder-decoder LLMs such as Flan-T5 are not supported)
    -> `Blip2`;
  - Blip2ForImageTextRetrieval (the Q-Former's text embeddings, `vision_projection`,
    `text_projection`, `itm_head`) -> `Blip2Stage1` without an ITG head (transformers has none).

The vision tower's fused `qkv` carries a bias of [q_bias; 0; v_bias] (no k bias); without
`qkv_bias` the bias is all zeros. The Q-Former's separate query, key and value become fused
`qkv` (self-attention) and `q` + `kv` (cross-attention).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from polymodal.checkpoints import hf_lm
from polymodal.checkpoints.state import (
    CheckpointError,
    StateReader,
    find_weights,
    load_exact,
    read_state_dict,
)
from polymodal.config import Blip2Config, ImageTransformConfig, QFormerConfig, VisionConfig

_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL's numbering, as transformers stores it
LM_PREFIX = "language_model."


def is_hf_blip2(directory: Path) -> bool:
    cfg = directory / "config.json"
    return cfg.is_file() and json.loads(cfg.read_text()).get("model_type") == "blip-2"


def _square(size: int | list[int], name: str) -> int:
    if isinstance(size, int):
        return size
    if len(set(size)) != 1:
        raise CheckpointError(f"non-square {name} {size} is not supported")
    return size[0]


def config_from_hf(data: dict[str, Any], preprocessor: dict[str, Any] | None = None, *,
                   retrieval: bool = False) -> Blip2Config:
    """config.json of a transformers BLIP-2 -> Blip2Config; `retrieval`: the stage-1 model (lm=None)."""
    v, q = data.get("vision_config") or {}, data.get("qformer_config") or {}
    vision = VisionConfig(
        image_size=_square(v.get("image_size", 224), "image_size"), patch_size=_square(v.get("patch_size", 14), "patch"),
        channels=3, width=v.get("hidden_size", 1408), layers=v.get("num_hidden_layers", 39),
        heads=v.get("num_attention_heads", 16), mlp_dim=v.get("intermediate_size", 6144),
        act=v.get("hidden_act", "gelu"), norm_eps=v.get("layer_norm_eps", 1e-6), pre_norm=False, patch_bias=True)
    text_input = q.get("use_qformer_text_input", False)
    if retrieval and not text_input:
        raise CheckpointError("a BLIP-2 retrieval model needs qformer_config.use_qformer_text_input=true")
    qformer = QFormerConfig(
        vocab_size=q.get("vocab_size", 30522), context_length=q.get("max_position_embeddings", 512),
        width=q.get("hidden_size", 768), layers=q.get("num_hidden_layers", 12), heads=q.get("num_attention_heads", 12),
        mlp_dim=q.get("intermediate_size", 3072), act=q.get("hidden_act", "gelu"),
        norm_eps=q.get("layer_norm_eps", 1e-12), num_query_tokens=data.get("num_query_tokens", 32),
        cross_attention_frequency=q.get("cross_attention_frequency", 2), text_input=retrieval, lm_head=False,
        pad_token_id=q.get("pad_token_id") or 0, dec_token_id=None)
    if retrieval:
        lm = None
    else:
        text = data.get("text_config") or {"model_type": "opt"}
        if text.get("is_encoder_decoder") or text.get("model_type") not in hf_lm.FAMILIES:
            raise CheckpointError(f"BLIP-2 with a {text.get('model_type')!r} language model is not supported; "
                                  f"known: {sorted(hf_lm.FAMILIES)}")
        lm = hf_lm.config_from_hf(text)
    return Blip2Config(vision=vision, qformer=qformer, lm=lm, embed_dim=data.get("image_text_hidden_size", 256),
                       image_transform=transform_from_hf(preprocessor or {}, vision.image_size))


def transform_from_hf(p: dict[str, Any], image_size: int) -> ImageTransformConfig:
    """preprocessor_config.json of a BlipImageProcessor (resize to size x size, no crop)."""
    size = p.get("size", {"height": image_size})
    size = size.get("height", size.get("shortest_edge", image_size)) if isinstance(size, dict) else size
    defaults = ImageTransformConfig()
    return ImageTransformConfig(size=size, resize=size, mode="squash",
                                resample=_RESAMPLE.get(p.get("resample", 3), "bicubic"),
                                mean=tuple(p.get("image_mean", defaults.mean)), std=tuple(p.get("image_std", defaults.std)))


def _pair(r: StateReader, src: str, dst: str, out: dict[str, Tensor]) -> None:
    for p in ("weight", "bias"):
        out[f"{dst}.{p}"] = r.take(f"{src}.{p}")


def _vision(r: StateReader, cfg: VisionConfig, out: dict[str, Tensor]) -> None:
    s, w = "vision_model", cfg.width
    _pair(r, f"{s}.embeddings.patch_embedding", "visual.patch_embed.proj", out)
    out["visual.class_token"] = r.take(f"{s}.embeddings.class_embedding").reshape(w)
    out["visual.pos_embed"] = r.take(f"{s}.embeddings.position_embedding").reshape(1 + cfg.num_patches, w)
    for i in range(cfg.layers):
        src, dst = f"{s}.encoder.layers.{i}", f"visual.blocks.{i}"
        out[f"{dst}.attn.qkv.weight"] = r.take(f"{src}.self_attn.qkv.weight")
        bias = f"{src}.self_attn.qkv.bias"
        out[f"{dst}.attn.qkv.bias"] = r.take(bias) if bias in r else torch.zeros(3 * w)  # qkv_bias=False
        for ours, theirs in [("attn.out", "self_attn.projection"), ("norm1", "layer_norm1"),
                             ("norm2", "layer_norm2"), ("mlp.up", "mlp.fc1"), ("mlp.down", "mlp.fc2")]:
            _pair(r, f"{src}.{theirs}", f"{dst}.{ours}", out)
    _pair(r, f"{s}.post_layernorm", "visual.norm_post", out)


def _qformer(r: StateReader, cfg: QFormerConfig, out: dict[str, Tensor]) -> None:
    out["qformer.query_tokens"] = r.take("query_tokens").reshape(cfg.num_query_tokens, cfg.width)
    if cfg.text_input:
        r.ignore("embeddings.position_ids")
        out["qformer.token_embed.weight"] = r.take("embeddings.word_embeddings.weight")
        out["qformer.pos_embed.weight"] = r.take("embeddings.position_embeddings.weight")
    _pair(r, "qformer.layernorm", "qformer.norm_embed", out)
    for i in range(cfg.layers):
        src, dst = f"qformer.encoder.layer.{i}", f"qformer.layers.{i}"
        for p in ("weight", "bias"):
            out[f"{dst}.attn.qkv.{p}"] = r.cat(f"{src}.attention.attention.{n}.{p}" for n in ("query", "key", "value"))
        _pair(r, f"{src}.attention.output.dense", f"{dst}.attn.out", out)
        _pair(r, f"{src}.attention.output.LayerNorm", f"{dst}.norm1", out)
        if i % cfg.cross_attention_frequency == 0:
            x = f"{src}.crossattention"
            _pair(r, f"{x}.attention.query", f"{dst}.xattn.q", out)
            for p in ("weight", "bias"):
                out[f"{dst}.xattn.kv.{p}"] = r.cat(f"{x}.attention.{n}.{p}" for n in ("key", "value"))
            _pair(r, f"{x}.output.dense", f"{dst}.xattn.out", out)
            _pair(r, f"{x}.output.LayerNorm", f"{dst}.norm_x", out)
        _pair(r, f"{src}.intermediate_query.dense", f"{dst}.query_mlp.up", out)
        _pair(r, f"{src}.output_query.dense", f"{dst}.query_mlp.down", out)
        _pair(r, f"{src}.output_query.LayerNorm", f"{dst}.query_norm", out)
        text_ffn = [(f"{src}.intermediate.dense", f"{dst}.text_mlp.up"), (f"{src}.output.dense", f"{dst}.text_mlp.down"),
                    (f"{src}.output.LayerNorm", f"{dst}.text_norm")]
        for theirs, ours in text_ffn:
            if cfg.text_input:
                _pair(r, theirs, ours, out)
            else:  # a generation model with use_qformer_text_input: no text embeddings ever reach it
                r.ignore(f"{theirs}.weight", f"{theirs}.bias")


def state_from_hf(state: dict[str, Tensor], cfg: Blip2Config, source: str = "transformers BLIP-2") -> dict[str, Tensor]:
    """Blip2ForConditionalGeneration keys (cfg.lm set) or Blip2ForImageTextRetrieval keys (cfg.lm None)
    -> Blip2 / Blip2Stage1 keys. Every source key is used or named as ignorable."""
    own = {k: v for k, v in state.items() if not k.startswith(LM_PREFIX)}
    lm_state = {k[len(LM_PREFIX):]: v for k, v in state.items() if k.startswith(LM_PREFIX)}
    r = StateReader(own, source)
    out: dict[str, Tensor] = {}
    _vision(r, cfg.vision, out)
    _qformer(r, cfg.qformer, out)
    if cfg.lm is None:
        if lm_state:
            raise CheckpointError(f"{source}: a retrieval model has no language model, found {sorted(lm_state)[:4]}")
        _pair(r, "vision_projection", "vision_proj", out)
        _pair(r, "text_projection", "text_proj", out)
        _pair(r, "itm_head", "itm_head", out)
        out["logit_scale"] = torch.tensor(cfg.logit_scale_init)  # transformers keeps no ITC temperature
    else:
        _pair(r, "language_projection", "language_projection", out)
        lm = hf_lm.state_from_hf(lm_state, cfg.lm, f"{source}, keys under {LM_PREFIX!r}")
        out.update({f"lm.{k}": v for k, v in lm.items()})
    r.finish()
    return out


def load_hf_blip2(directory: str | Path):
    """A transformers BLIP-2 directory -> `Blip2` (Blip2ForConditionalGeneration / Blip2Model) or
    `Blip2Stage1` (Blip2ForImageTextRetrieval), in eval mode."""
    from polymodal.models.blip2 import Blip2, Blip2Stage1

    p = Path(directory)
    if not is_hf_blip2(p):
        raise CheckpointError(f"{p}: not a transformers BLIP-2 directory (config.json model_type 'blip-2')")
    state = read_state_dict(find_weights(p))
    retrieval = "itm_head.weight" in state
    pre = p / "preprocessor_config.json"
    cfg = config_from_hf(json.loads((p / "config.json").read_text()),
                         json.loads(pre.read_text()) if pre.is_file() else None, retrieval=retrieval)
    source = f"{p} (transformers BLIP-2)"
    model = (Blip2Stage1 if retrieval else Blip2)(cfg)
    return load_exact(model, state_from_hf(state, cfg, source), source).eval()
