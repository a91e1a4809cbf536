"""The `transformers` decoder-LM layouts: OPTForCausalLM, LlamaForCausalLM and Qwen2ForCausalLM.

config.json -> LMConfig, and an explicit key map from each state dict to `DecoderLM`'s.
q, k and v are fused into one `qkv`; Llama's gate and up into one SwiGLU `up` ([gate; up]).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import Tensor

from polymodal.checkpoints.state import (
    CheckpointError,
    StateReader,
    find_weights,
    load_exact,
    read_state_dict,
)
from polymodal.config import LMConfig
from polymodal.models.lm import DecoderLM

FAMILIES = {"opt": "opt", "llama": "llama", "qwen2": "llama"}  # HF model_type -> our family
_OPT_ACT = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
_LLAMA_ACT = {"silu": "swiglu", "swish": "swiglu"}


def is_hf_lm(directory: Path) -> bool:
    cfg = directory / "config.json"
    return cfg.is_file() and json.loads(cfg.read_text()).get("model_type") in FAMILIES


def _act(table: dict[str, str], name: str, model_type: str) -> str:
    if name not in table:
        raise CheckpointError(f"{model_type}: activation {name!r} not supported; known: {sorted(table)}")
    return table[name]


def _rope_theta(data: dict[str, Any]) -> float:
    """rope_parameters (transformers >= 5) or rope_theta / rope_scaling (older config.json)."""
    params = data.get("rope_parameters") or data.get("rope_scaling") or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
        raise CheckpointError(f"rope scaling {kind!r} is not supported (only the default RoPE)")
    return float(params.get("rope_theta", data.get("rope_theta", 10000.0)))


def config_from_hf(data: dict[str, Any]) -> LMConfig:
    model_type = data.get("model_type")
    if model_type not in FAMILIES:
        raise CheckpointError(f"model_type {model_type!r} is not a decoder LM we convert; known: {sorted(FAMILIES)}")
    ids = dict(bos_token_id=data.get("bos_token_id"), eos_token_id=data.get("eos_token_id"),
               pad_token_id=data.get("pad_token_id"))
    if isinstance(ids["eos_token_id"], list):
        ids["eos_token_id"] = tuple(ids["eos_token_id"])
    if model_type == "opt":
        if not data.get("layer_norm_elementwise_affine", True) or data.get("_remove_final_layer_norm", False):
            raise CheckpointError("OPT without LayerNorm weights or without its final LayerNorm is not supported")
        width, proj = data["hidden_size"], data.get("word_embed_proj_dim", data["hidden_size"])
        bias = data.get("enable_bias", True)
        return LMConfig(
            family="opt", vocab_size=data["vocab_size"], width=width, layers=data["num_hidden_layers"],
            heads=data["num_attention_heads"], mlp_dim=data["ffn_dim"],
            act=_act(_OPT_ACT, data.get("activation_function", "relu"), model_type),
            norm_eps=1e-5, pre_norm=data.get("do_layer_norm_before", True),
            max_positions=data["max_position_embeddings"], tie_embeddings=data.get("tie_word_embeddings", True),
            qkv_bias=bias, out_bias=bias, mlp_bias=bias, embed_proj_dim=proj if proj != width else None, **ids)
    if data.get("use_sliding_window", False):
        raise CheckpointError("Qwen2 sliding-window attention is not supported")
    attention_bias = model_type == "qwen2" or data.get("attention_bias", False)
    heads = data["num_attention_heads"]
    head_dim = data.get("head_dim") or data["hidden_size"] // heads
    return LMConfig(
        family="llama", vocab_size=data["vocab_size"], width=data["hidden_size"],
        layers=data["num_hidden_layers"], heads=heads, kv_heads=data.get("num_key_value_heads") or heads,
        head_dim=head_dim if head_dim * heads != data["hidden_size"] else None,
        mlp_dim=data["intermediate_size"], act=_act(_LLAMA_ACT, data.get("hidden_act", "silu"), model_type),
        norm_eps=data.get("rms_norm_eps", 1e-6), max_positions=data.get("max_position_embeddings", 2048),
        rope_theta=_rope_theta(data), tie_embeddings=data.get("tie_word_embeddings", False),
        qkv_bias=attention_bias, out_bias=attention_bias and model_type != "qwen2",
        mlp_bias=data.get("mlp_bias", False), **ids)


def _linear(r: StateReader, src: str, dst: str, bias: bool, out: dict[str, Tensor]) -> None:
    out[f"{dst}.weight"] = r.take(f"{src}.weight")
    if bias:
        out[f"{dst}.bias"] = r.take(f"{src}.bias")


def _qkv(r: StateReader, src: str, dst: str, bias: bool, out: dict[str, Tensor]) -> None:
    names = [f"{src}.{n}_proj" for n in "qkv"]
    out[f"{dst}.weight"] = r.cat(f"{k}.weight" for k in names)
    if bias:
        out[f"{dst}.bias"] = r.cat(f"{k}.bias" for k in names)


def _head(r: StateReader, cfg: LMConfig, out: dict[str, Tensor]) -> None:
    if cfg.tie_embeddings:
        r.ignore("lm_head.weight")  # a tied head is the embedding table; some files store a copy
    else:
        out["lm_head.weight"] = r.take("lm_head.weight")


def _opt_state(r: StateReader, cfg: LMConfig) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    d = "model.decoder"
    out["token_embed.weight"] = r.take(f"{d}.embed_tokens.weight")
    out["pos_embed.weight"] = r.take(f"{d}.embed_positions.weight")
    if cfg.embed_proj_dim is not None:
        out["project_in.weight"] = r.take(f"{d}.project_in.weight")
        out["project_out.weight"] = r.take(f"{d}.project_out.weight")
    for i in range(cfg.layers):
        s, b = f"{d}.layers.{i}", f"blocks.{i}"
        _qkv(r, f"{s}.self_attn", f"{b}.attn.qkv", cfg.qkv_bias, out)
        _linear(r, f"{s}.self_attn.out_proj", f"{b}.attn.out", cfg.out_bias, out)
        _linear(r, f"{s}.self_attn_layer_norm", f"{b}.norm1", True, out)
        _linear(r, f"{s}.final_layer_norm", f"{b}.norm2", True, out)
        _linear(r, f"{s}.fc1", f"{b}.mlp.up", cfg.mlp_bias, out)
        _linear(r, f"{s}.fc2", f"{b}.mlp.down", cfg.mlp_bias, out)
    if cfg.pre_norm:
        _linear(r, f"{d}.final_layer_norm", "norm_final", True, out)
    _head(r, cfg, out)
    return out


def _llama_state(r: StateReader, cfg: LMConfig) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    out["token_embed.weight"] = r.take("model.embed_tokens.weight")
    for i in range(cfg.layers):
        s, b = f"model.layers.{i}", f"blocks.{i}"
        r.ignore(f"{s}.self_attn.rotary_emb.inv_freq")  # a buffer in pre-2024 files; we recompute it
        _qkv(r, f"{s}.self_attn", f"{b}.attn.qkv", cfg.qkv_bias, out)
        _linear(r, f"{s}.self_attn.o_proj", f"{b}.attn.out", cfg.out_bias, out)
        out[f"{b}.norm1.weight"] = r.take(f"{s}.input_layernorm.weight")
        out[f"{b}.norm2.weight"] = r.take(f"{s}.post_attention_layernorm.weight")
        out[f"{b}.mlp.up.weight"] = r.cat([f"{s}.mlp.gate_proj.weight", f"{s}.mlp.up_proj.weight"])
        if cfg.mlp_bias:
            out[f"{b}.mlp.up.bias"] = r.cat([f"{s}.mlp.gate_proj.bias", f"{s}.mlp.up_proj.bias"])
        _linear(r, f"{s}.mlp.down_proj", f"{b}.mlp.down", cfg.mlp_bias, out)
    out["norm_final.weight"] = r.take("model.norm.weight")
    _head(r, cfg, out)
    return out


def state_from_hf(state: dict[str, Tensor], cfg: LMConfig, source: str = "transformers LM") -> dict[str, Tensor]:
    """Every source key is used (or named as ignorable) and every model key is produced."""
    r = StateReader(state, source)
    out = _opt_state(r, cfg) if cfg.family == "opt" else _llama_state(r, cfg)
    r.finish()
    return out


def load_hf_lm(directory: str | Path) -> DecoderLM:
    """A `transformers` OPT / Llama / Qwen2 causal-LM directory -> DecoderLM in eval mode."""
    p = Path(directory)
    if not is_hf_lm(p):
        raise CheckpointError(f"{p}: not a transformers OPT, Llama or Qwen2 directory (config.json model_type)")
    cfg = config_from_hf(json.loads((p / "config.json").read_text()))
    source = f"{p} (transformers {cfg.family})"
    state = state_from_hf(read_state_dict(find_weights(p)), cfg, source)
    return load_exact(DecoderLM(cfg), state, source).eval()
