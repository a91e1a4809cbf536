"""The `transformers` CLIP layout: config.json (+ preprocessor_config.json) -> CLIPConfig, and
an explicit key map from `CLIPModel`'s state dict to ours."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import Tensor

from polymodal.checkpoints.state import CheckpointError, StateReader
from polymodal.config import CLIPConfig, ImageTransformConfig, TextConfig, VisionConfig

_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL's numbering, as HF stores it


def is_hf_clip(directory: Path) -> bool:
    cfg = directory / "config.json"
    if not cfg.is_file():
        return False
    data = json.loads(cfg.read_text())
    return "vision_config" in data and data.get("model_type", "clip") == "clip"


def config_from_hf(data: dict[str, Any], preprocessor: dict[str, Any] | None = None) -> CLIPConfig:
    v, t = data.get("vision_config", {}), data.get("text_config", {})
    vision = VisionConfig(
        image_size=v.get("image_size", 224), patch_size=v.get("patch_size", 32),
        channels=v.get("num_channels", 3), width=v.get("hidden_size", 768),
        layers=v.get("num_hidden_layers", 12), heads=v.get("num_attention_heads", 12),
        mlp_dim=v.get("intermediate_size", 3072), act=v.get("hidden_act", "quick_gelu"),
        norm_eps=v.get("layer_norm_eps", 1e-5),
    )
    eos = t.get("eos_token_id", 49407)
    text = TextConfig(
        vocab_size=t.get("vocab_size", 49408), context_length=t.get("max_position_embeddings", 77),
        width=t.get("hidden_size", 512), layers=t.get("num_hidden_layers", 12),
        heads=t.get("num_attention_heads", 8), mlp_dim=t.get("intermediate_size", 2048),
        act=t.get("hidden_act", "quick_gelu"), norm_eps=t.get("layer_norm_eps", 1e-5),
        bos_token_id=t.get("bos_token_id", 49406),
        eot_token_id=None if eos == 2 else eos,  # eos 2: the pre-2023 configs, pooled at argmax
        pad_token_id=t.get("pad_token_id", 1),
    )
    return CLIPConfig(vision=vision, text=text, embed_dim=data.get("projection_dim", 512),
                      logit_scale_init=data.get("logit_scale_init_value", 2.6592),
                      image_transform=transform_from_hf(preprocessor or {}, vision.image_size))


def transform_from_hf(p: dict[str, Any], image_size: int) -> ImageTransformConfig:
    """preprocessor_config.json of a CLIPImageProcessor -> ImageTransformConfig."""
    size, crop = p.get("size", {"shortest_edge": image_size}), p.get("crop_size", image_size)
    resize = size.get("shortest_edge", size.get("height", image_size)) if isinstance(size, dict) else size
    crop = crop.get("height", image_size) if isinstance(crop, dict) else crop
    if p and not p.get("do_center_crop", True):
        mode = "squash"
        crop = resize
    else:
        mode = "crop"
    defaults = ImageTransformConfig()
    return ImageTransformConfig(size=crop, resize=resize, mode=mode,
                                resample=_RESAMPLE.get(p.get("resample", 3), "bicubic"),
                                mean=tuple(p.get("image_mean", defaults.mean)),
                                std=tuple(p.get("image_std", defaults.std)))


def _blocks(r: StateReader, src: str, dst: str, layers: int, out: dict[str, Tensor]) -> None:
    for i in range(layers):
        s, d = f"{src}.{i}", f"{dst}.{i}"
        qkv = [f"{s}.self_attn.{n}_proj" for n in "qkv"]
        out[f"{d}.attn.qkv.weight"] = r.cat(f"{k}.weight" for k in qkv)
        out[f"{d}.attn.qkv.bias"] = r.cat(f"{k}.bias" for k in qkv)
        for ours, theirs in [("attn.out", "self_attn.out_proj"), ("norm1", "layer_norm1"),
                             ("norm2", "layer_norm2"), ("mlp.up", "mlp.fc1"), ("mlp.down", "mlp.fc2")]:
            for p in ("weight", "bias"):
                out[f"{d}.{ours}.{p}"] = r.take(f"{s}.{theirs}.{p}")


def _norm(r: StateReader, src: str, dst: str, out: dict[str, Tensor]) -> None:
    out[f"{dst}.weight"], out[f"{dst}.bias"] = r.take(f"{src}.weight"), r.take(f"{src}.bias")


def state_from_hf(state: dict[str, Tensor], cfg: CLIPConfig, source: str = "transformers CLIP") -> dict[str, Tensor]:
    if not isinstance(cfg.text, TextConfig):
        raise CheckpointError(f"{source}: a transformers CLIP has a CLIP text tower")
    r = StateReader(state, source)
    r.ignore("vision_model.embeddings.position_ids", "text_model.embeddings.position_ids")
    out: dict[str, Tensor] = {}
    v, t = "vision_model", "text_model"
    out["visual.patch_embed.proj.weight"] = r.take(f"{v}.embeddings.patch_embedding.weight")
    out["visual.class_token"] = r.take(f"{v}.embeddings.class_embedding")
    out["visual.pos_embed"] = r.take(f"{v}.embeddings.position_embedding.weight")
    _norm(r, f"{v}.pre_layrnorm", "visual.norm_pre", out)
    _blocks(r, f"{v}.encoder.layers", "visual.blocks", cfg.vision.layers, out)
    _norm(r, f"{v}.post_layernorm", "visual.norm_post", out)
    out["text.token_embed.weight"] = r.take(f"{t}.embeddings.token_embedding.weight")
    out["text.pos_embed"] = r.take(f"{t}.embeddings.position_embedding.weight")
    _blocks(r, f"{t}.encoder.layers", "text.blocks", cfg.text.layers, out)
    _norm(r, f"{t}.final_layer_norm", "text.norm_final", out)
    out["visual_proj.weight"] = r.take("visual_projection.weight")
    out["text_proj.weight"] = r.take("text_projection.weight")
    out["logit_scale"] = r.take("logit_scale")
    r.finish()
    return out
