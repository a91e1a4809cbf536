"""The `transformers` IDEFICS (v1) layout: IdeficsForVisionText2Text -> our Flamingo.

IDEFICS is the open reproduction of Flamingo: a CLIP-like ViT (`model.vision_model`, read as our
VisionTransformer through hf_clip's block map), a perceiver resampler
(`model.perceiver_resampler`), a Llama decoder (`model.layers`, read through hf_lm's map) and gated
cross-attention layers (`model.gated_cross_attn_layers`). Its "decoupled" embeddings and head keep
the extra tokens (`<image>`, `<fake_token_around_image>`) in separate tables that are always
trained; concatenated, they are one table of vocab_size + additional_vocab_size rows, which is what
the decoupled modules compute. config.json -> FlamingoConfig; an explicit key map that asserts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import Tensor

from polymodal.checkpoints import hf_lm
from polymodal.checkpoints.hf_clip import _blocks as _vision_blocks
from polymodal.checkpoints.state import (
    CheckpointError,
    StateReader,
    find_weights,
    load_exact,
    read_state_dict,
)
from polymodal.config import FlamingoConfig, ImageTransformConfig, LMConfig, PerceiverConfig, VisionConfig

IMAGE_TOKEN = "<image>"


def is_hf_idefics(directory: Path) -> bool:
    cfg = directory / "config.json"
    return cfg.is_file() and json.loads(cfg.read_text()).get("model_type") == "idefics"


def _image_token_id(directory: Path | None, data: dict[str, Any]) -> int:
    """The id of `<image>` in the directory's tokenizer.json, else the first extra token's."""
    path = directory / "tokenizer.json" if directory is not None else None
    if path is not None and path.is_file():
        for tok in json.loads(path.read_text()).get("added_tokens", []):
            if tok.get("content") == IMAGE_TOKEN:
                return int(tok["id"])
    return int(data.get("vocab_size", 32000)) + int(data.get("additional_vocab_size", 0)) - 1


def config_from_hf(data: dict[str, Any], *, image_token_id: int | None = None) -> FlamingoConfig:
    if data.get("model_type") != "idefics":
        raise CheckpointError(f"model_type {data.get('model_type')!r} is not IDEFICS")
    v, p = data.get("vision_config") or {}, data.get("perceiver_config") or {}
    if not data.get("use_resampler", False):
        raise CheckpointError("IDEFICS without a perceiver resampler (use_resampler false) is not supported")
    if data.get("hidden_act", "silu") not in ("silu", "swish"):
        raise CheckpointError(f"IDEFICS activation {data.get('hidden_act')!r} not supported (silu only)")
    size = v.get("image_size", 224)
    vision = VisionConfig(image_size=size, patch_size=v.get("patch_size", 14), channels=v.get("num_channels", 3),
                          width=v.get("embed_dim", 768), layers=v.get("num_hidden_layers", 32),
                          heads=v.get("num_attention_heads", 16), mlp_dim=v.get("intermediate_size", 5120),
                          act=v.get("hidden_act", "gelu"), norm_eps=v.get("layer_norm_eps", 1e-5))
    perceiver = PerceiverConfig(latents=p.get("resampler_n_latents", 64), depth=p.get("resampler_depth", 6),
                                heads=p.get("resampler_n_heads", 16), head_dim=p.get("resampler_head_dim", 96),
                                qk_norm=p.get("qk_layer_norms_perceiver", False), max_frames=0)
    eos = data.get("eos_token_id", 2)
    lm = LMConfig(family="llama", vocab_size=data.get("vocab_size", 32000) + data.get("additional_vocab_size", 0),
                  width=data.get("hidden_size", 4096), layers=data.get("num_hidden_layers", 32),
                  heads=data.get("num_attention_heads", 32), mlp_dim=data.get("intermediate_size", 11008),
                  act="swiglu", norm_eps=data.get("rms_norm_eps", 1e-6),
                  max_positions=data.get("max_position_embeddings", 2048), rope_theta=hf_lm._rope_theta(data),
                  tie_embeddings=data.get("tie_word_embeddings", False), bos_token_id=data.get("bos_token_id", 1),
                  eos_token_id=tuple(eos) if isinstance(eos, list) else eos, pad_token_id=data.get("pad_token_id", 0))
    first_eos = eos[0] if isinstance(eos, list) else eos
    return FlamingoConfig(
        vision=vision, perceiver=perceiver, lm=lm, cross_every=data.get("cross_layer_interval", 1),
        xattn_qk_norm=data.get("qk_layer_norms", False), gate=data.get("alpha_type", "float"),
        image_token_id=image_token_id if image_token_id is not None else _image_token_id(None, data),
        end_of_chunk_token_id=first_eos,  # IDEFICS's processor: tokens after the eos see no image
        image_transform=ImageTransformConfig(size=size, resize=size, mode="squash"))


def _take(r: StateReader, src: str, dst: str, out: dict[str, Tensor], *params: str) -> None:
    for p in params or ("weight",):
        out[f"{dst}.{p}"] = r.take(f"{src}.{p}")


def _decoupled(r: StateReader, main: str, extra: str) -> Tensor:
    """The frozen table and the extra (always trained) rows, as one table."""
    return r.cat([main, extra]) if extra in r else r.take(main)


def _vision(r: StateReader, cfg: VisionConfig, out: dict[str, Tensor]) -> None:
    v = "model.vision_model"
    r.ignore(f"{v}.embeddings.position_ids")
    out["vision.patch_embed.proj.weight"] = r.take(f"{v}.embeddings.patch_embedding.weight")
    out["vision.class_token"] = r.take(f"{v}.embeddings.class_embedding")
    out["vision.pos_embed"] = r.take(f"{v}.embeddings.position_embedding.weight")
    _take(r, f"{v}.pre_layrnorm", "vision.norm_pre", out, "weight", "bias")
    _vision_blocks(r, f"{v}.encoder.layers", "vision.blocks", cfg.layers, out)
    _take(r, f"{v}.post_layernorm", "vision.norm_post", out, "weight", "bias")


def _perceiver(r: StateReader, cfg: PerceiverConfig, out: dict[str, Tensor]) -> None:
    s = "model.perceiver_resampler"
    out["resampler.latents"] = r.take(f"{s}.latents")
    for i in range(cfg.depth):
        a, f, d = f"{s}.blocks.{i}.0", f"{s}.blocks.{i}.1", f"resampler.layers.{i}"
        _take(r, f"{a}.context_layer_norm", f"{d}.norm_media", out, "weight", "bias")
        _take(r, f"{a}.latents_layer_norm", f"{d}.norm_latents", out, "weight", "bias")
        if cfg.qk_norm:
            _take(r, f"{a}.q_layer_norm", f"{d}.attn.q_norm", out, "weight", "bias")
            _take(r, f"{a}.k_layer_norm", f"{d}.attn.k_norm", out, "weight", "bias")
        _take(r, f"{a}.q_proj", f"{d}.attn.q", out)
        out[f"{d}.attn.kv.weight"] = r.cat([f"{a}.k_proj.weight", f"{a}.v_proj.weight"])
        _take(r, f"{a}.output_proj", f"{d}.attn.out", out)
        _take(r, f"{f}.ln", f"{d}.norm_mlp", out, "weight", "bias")
        _take(r, f"{f}.fc", f"{d}.mlp.up", out)
        _take(r, f"{f}.c_proj", f"{d}.mlp.down", out)
    _take(r, f"{s}.layer_norm", "resampler.norm", out, "weight", "bias")


def _xattn(r: StateReader, cfg: FlamingoConfig, out: dict[str, Tensor]) -> None:
    for i in range(cfg.cross_layers):
        s, d = f"model.gated_cross_attn_layers.{i}", f"xattn.{i}"
        r.ignore(f"{s}.cross_attn.rotary_emb.inv_freq")
        _take(r, f"{s}.cross_attn.q_proj", f"{d}.xattn.q", out)
        out[f"{d}.xattn.kv.weight"] = r.cat([f"{s}.cross_attn.k_proj.weight", f"{s}.cross_attn.v_proj.weight"])
        _take(r, f"{s}.cross_attn.o_proj", f"{d}.xattn.out", out)
        if cfg.xattn_qk_norm:
            _take(r, f"{s}.cross_attn.q_layer_norm", f"{d}.xattn.q_norm", out)
            _take(r, f"{s}.cross_attn.k_layer_norm", f"{d}.xattn.k_norm", out)
        out[f"{d}.mlp.up.weight"] = r.cat([f"{s}.mlp.gate_proj.weight", f"{s}.mlp.up_proj.weight"])
        _take(r, f"{s}.mlp.down_proj", f"{d}.mlp.down", out)
        _take(r, f"{s}.input_layernorm", f"{d}.norm1", out)
        _take(r, f"{s}.post_attention_layernorm", f"{d}.norm2", out)
        out[f"{d}.attn_gate"] = r.take(f"{s}.alpha_cross_attn")
        out[f"{d}.ff_gate"] = r.take(f"{s}.alpha_dense")


def state_from_hf(state: dict[str, Tensor], cfg: FlamingoConfig,
                  source: str = "transformers IDEFICS") -> dict[str, Tensor]:
    """Every source key is used (or named as ignorable) and every model key is produced."""
    r = StateReader(state, source)
    out: dict[str, Tensor] = {}
    _vision(r, cfg.vision, out)
    _perceiver(r, cfg.perceiver, out)
    _xattn(r, cfg, out)
    # the decoder: hf_lm's Llama map over the "model.layers" keys, the decoupled tables made whole
    lm_state = {k: r.take(k) for k in list(state) if k.startswith("model.layers.") or k == "model.norm.weight"}
    lm_state["model.embed_tokens.weight"] = _decoupled(r, "model.embed_tokens.weight",
                                                       "model.embed_tokens.additional_embedding.weight")
    if cfg.lm.tie_embeddings:
        r.ignore("lm_head.weight", "lm_head.additional_fc.weight")
    else:
        lm_state["lm_head.weight"] = _decoupled(r, "lm_head.weight", "lm_head.additional_fc.weight")
    lm = hf_lm.state_from_hf(lm_state, cfg.lm, f"{source}, its decoder")
    out.update({f"lm.{k}": v for k, v in lm.items()})
    r.finish()
    return out


def load_hf_idefics(directory: str | Path):
    """A transformers IdeficsForVisionText2Text directory -> `Flamingo` in eval mode."""
    from polymodal.models.flamingo import Flamingo

    p = Path(directory)
    if not is_hf_idefics(p):
        raise CheckpointError(f"{p}: not a transformers IDEFICS directory (config.json model_type 'idefics')")
    data = json.loads((p / "config.json").read_text())
    cfg = config_from_hf(data, image_token_id=_image_token_id(p, data))
    source = f"{p} (transformers IDEFICS)"
    state = state_from_hf(read_state_dict(find_weights(p)), cfg, source)
    return load_exact(Flamingo(cfg), state, source).eval()


__all__ = ["config_from_hf", "is_hf_idefics", "load_hf_idefics", "state_from_hf"]
