"""The OpenCLIP (and OpenAI `clip`) state-dict layout.

Keys as in open_clip's `VisionTransformer` / `TextTransformer` with `nn.MultiheadAttention`
(`in_proj_weight` holds q, k, v stacked), projections stored as (width, embed_dim)
matrices applied as `x @ proj`. The architecture comes from `open_clip_config.json` when it
sits beside the weights (the hub layout), otherwise from the tensor shapes; the activation
cannot be read off shapes, so OpenAI's own files (which carry `input_resolution`) mean
quick_gelu and anything else means gelu unless `act=` says otherwise.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from torch import Tensor

from polymodal.checkpoints.state import CheckpointError, StateReader
from polymodal.config import CLIPConfig, ImageTransformConfig, TextConfig, VisionConfig

OPENAI_META = ("input_resolution", "context_length", "vocab_size")
WEIGHT_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "open_clip_model.bin")


def is_openclip_state(state: dict[str, Tensor]) -> bool:
    return "visual.conv1.weight" in state and "token_embedding.weight" in state


def _count_layers(state: dict[str, Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    return len({m.group(1) for k in state if (m := pattern.match(k))})


def config_from_openclip(state: dict[str, Tensor], model_cfg: dict[str, Any] | None = None,
                         preprocess: dict[str, Any] | None = None, act: str | None = None) -> CLIPConfig:
    """Read the architecture off the tensor shapes, checked against `model_cfg` when given."""
    model_cfg = model_cfg or {}
    openai = all(k in state for k in OPENAI_META)
    act = act or ("quick_gelu" if openai or model_cfg.get("quick_gelu") else "gelu")
    vc, tc = model_cfg.get("vision_cfg", {}), model_cfg.get("text_cfg", {})

    width, _, patch, _ = state["visual.conv1.weight"].shape
    grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    v_mlp = state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    vision = VisionConfig(image_size=grid * patch, patch_size=patch, width=width,
                          layers=_count_layers(state, "visual.transformer.resblocks"),
                          heads=max(1, width // vc.get("head_width", 64)), mlp_dim=v_mlp, act=act)

    t_width = state["token_embedding.weight"].shape[1]
    text = TextConfig(vocab_size=state["token_embedding.weight"].shape[0],
                      context_length=state["positional_embedding"].shape[0], width=t_width,
                      layers=_count_layers(state, "transformer.resblocks"),
                      heads=tc.get("heads", max(1, t_width // 64)),
                      mlp_dim=state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0], act=act,
                      eot_token_id=None, pad_token_id=0)  # OpenCLIP pools at argmax, pads with 0
    embed_dim = state["text_projection"].shape[1]
    for name, ours, theirs in [("embed_dim", embed_dim, model_cfg.get("embed_dim")),
                               ("vision width", width, vc.get("width")),
                               ("vision layers", vision.layers, vc.get("layers")),
                               ("text layers", text.layers, tc.get("layers"))]:
        if theirs is not None and theirs != ours:
            raise CheckpointError(f"open_clip config says {name} {theirs}, the weights say {ours}")
    p = preprocess or {}
    defaults = ImageTransformConfig()
    transform = ImageTransformConfig(
        size=vision.image_size, resize=vision.image_size,
        mode="squash" if p.get("resize_mode") == "squash" else "crop",
        resample=p.get("interpolation", "bicubic"),
        mean=tuple(p.get("mean", defaults.mean)), std=tuple(p.get("std", defaults.std)))
    return CLIPConfig(vision=vision, text=text, embed_dim=embed_dim, image_transform=transform)


def _blocks(r: StateReader, src: str, dst: str, layers: int, out: dict[str, Tensor]) -> None:
    for i in range(layers):
        s, d = f"{src}.{i}", f"{dst}.{i}"
        for ours, theirs in [("attn.qkv.weight", "attn.in_proj_weight"), ("attn.qkv.bias", "attn.in_proj_bias")]:
            out[f"{d}.{ours}"] = r.take(f"{s}.{theirs}")
        for ours, theirs in [("attn.out", "attn.out_proj"), ("norm1", "ln_1"), ("norm2", "ln_2"),
                             ("mlp.up", "mlp.c_fc"), ("mlp.down", "mlp.c_proj")]:
            for p in ("weight", "bias"):
                out[f"{d}.{ours}.{p}"] = r.take(f"{s}.{theirs}.{p}")


def state_from_openclip(state: dict[str, Tensor], cfg: CLIPConfig, source: str = "OpenCLIP") -> dict[str, Tensor]:
    r = StateReader(state, source)
    r.ignore(*OPENAI_META, "attn_mask")
    out: dict[str, Tensor] = {}
    out["visual.patch_embed.proj.weight"] = r.take("visual.conv1.weight")
    out["visual.class_token"] = r.take("visual.class_embedding")
    out["visual.pos_embed"] = r.take("visual.positional_embedding")
    _blocks(r, "visual.transformer.resblocks", "visual.blocks", cfg.vision.layers, out)
    for ours, theirs in [("visual.norm_pre", "visual.ln_pre"), ("visual.norm_post", "visual.ln_post"),
                         ("text.norm_final", "ln_final")]:
        out[f"{ours}.weight"], out[f"{ours}.bias"] = r.take(f"{theirs}.weight"), r.take(f"{theirs}.bias")
    out["visual_proj.weight"] = r.take("visual.proj").t().contiguous()  # (width, embed) -> (embed, width)
    out["text.token_embed.weight"] = r.take("token_embedding.weight")
    out["text.pos_embed"] = r.take("positional_embedding")
    _blocks(r, "transformer.resblocks", "text.blocks", cfg.text.layers, out)
    out["text_proj.weight"] = r.take("text_projection").t().contiguous()
    out["logit_scale"] = r.take("logit_scale")
    r.finish()
    return out


def read_openclip_dir(directory: Path) -> tuple[Path, dict[str, Any]]:
    """(weights file, open_clip_config.json contents) of a hub-style OpenCLIP directory."""
    cfg_path = directory / "open_clip_config.json"
    meta = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    for name in WEIGHT_NAMES:
        if (directory / name).is_file():
            return directory / name, meta
    raise FileNotFoundError(f"{directory}: no OpenCLIP weights ({', '.join(WEIGHT_NAMES)})")
