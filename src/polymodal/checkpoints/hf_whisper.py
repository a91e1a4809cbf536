"""The `transformers` Whisper layout (WhisperForConditionalGeneration), both ways.

config.json (+ generation_config.json) -> WhisperConfig, and an explicit key map from the state
dict to `Whisper`'s: q, k and v fused into self-attention's `qkv` (Whisper's k projection has no
bias: its slice of the fused bias is zero), cross-attention's k and v into `kv`, fc1 / fc2 into
the MLP. `to_hf` goes the other way, so that `transformers` can run the very weights we loaded
from elsewhere (CTranslate2's model.bin) for parity tests and the benchmark.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from polymodal.checkpoints.state import (
    CheckpointError,
    StateReader,
    find_weights,
    load_exact,
    read_state_dict,
)
from polymodal.models.whisper import Whisper, WhisperConfig


def is_hf_whisper(directory: Path) -> bool:
    cfg = Path(directory) / "config.json"
    return cfg.is_file() and json.loads(cfg.read_text()).get("model_type") == "whisper" and not any(
        (Path(directory) / n).is_file() for n in ("model.bin",))


def config_from_hf(data: dict[str, Any], gen: dict[str, Any] | None = None) -> WhisperConfig:
    gen = gen or {}
    if data.get("activation_function", "gelu") != "gelu":
        raise CheckpointError(f"whisper: activation {data.get('activation_function')!r} not supported (only gelu)")
    if data.get("scale_embedding", False):
        raise CheckpointError("whisper: scale_embedding=True is not supported")
    vocab = data["vocab_size"]
    no_ts = gen.get("no_timestamps_token_id", 50362 if vocab == 51864 else 50363)
    start = data.get("decoder_start_token_id", 50257)
    prefix = (start,)
    if gen.get("is_multilingual"):  # transcribe in English by default: <|sot|> <|en|> <|transcribe|>
        prefix = (start, gen["lang_to_id"]["<|en|>"], gen["task_to_id"]["transcribe"])
    eos = data.get("eos_token_id", 50256)
    return WhisperConfig(
        n_mels=data.get("num_mel_bins", 80), vocab_size=vocab, width=data["d_model"],
        encoder_layers=data["encoder_layers"], decoder_layers=data["decoder_layers"],
        encoder_heads=data["encoder_attention_heads"], decoder_heads=data["decoder_attention_heads"],
        encoder_mlp_dim=data["encoder_ffn_dim"], decoder_mlp_dim=data["decoder_ffn_dim"],
        max_source_positions=data["max_source_positions"], max_target_positions=data["max_target_positions"],
        eos_token_id=eos if isinstance(eos, int) else eos[0], no_timestamps_token_id=no_ts, prefix_ids=prefix,
        suppress_tokens=tuple(gen.get("suppress_tokens") or data.get("suppress_tokens") or ()),
        begin_suppress_tokens=tuple(gen.get("begin_suppress_tokens") or data.get("begin_suppress_tokens") or ()),
        max_initial_timestamp_index=gen.get("max_initial_timestamp_index", 50))


def _attention(src: StateReader, prefix: str, out: str, state: dict[str, Tensor], cross: bool) -> None:
    q, k, v = (f"{prefix}.{n}_proj" for n in "qkv")
    zero = torch.zeros_like(src.take(f"{q}.bias"))
    if cross:
        state[f"{out}.q.weight"] = src.take(f"{q}.weight")
        state[f"{out}.q.bias"] = src.take(f"{q}.bias")
        state[f"{out}.kv.weight"] = src.cat([f"{k}.weight", f"{v}.weight"])
        state[f"{out}.kv.bias"] = torch.cat([zero, src.take(f"{v}.bias")])
    else:
        state[f"{out}.qkv.weight"] = src.cat([f"{q}.weight", f"{k}.weight", f"{v}.weight"])
        state[f"{out}.qkv.bias"] = torch.cat([src.take(f"{q}.bias"), zero, src.take(f"{v}.bias")])
    state[f"{out}.out.weight"] = src.take(f"{prefix}.out_proj.weight")
    state[f"{out}.out.bias"] = src.take(f"{prefix}.out_proj.bias")


def _norm(src: StateReader, prefix: str, out: str, state: dict[str, Tensor]) -> None:
    state[f"{out}.weight"] = src.take(f"{prefix}.weight")
    state[f"{out}.bias"] = src.take(f"{prefix}.bias")


def state_from_hf(hf: dict[str, Tensor], cfg: WhisperConfig, source: str = "whisper") -> dict[str, Tensor]:
    src = StateReader({k.removeprefix("model."): v for k, v in hf.items()}, source)
    state: dict[str, Tensor] = {}
    for n in ("conv1", "conv2"):
        for p in ("weight", "bias"):
            state[f"encoder.{n}.{p}"] = src.take(f"encoder.{n}.{p}")
    state["encoder.pos_embed"] = src.take("encoder.embed_positions.weight")
    state["decoder.pos_embed"] = src.take("decoder.embed_positions.weight")
    state["decoder.token_embed.weight"] = src.take("decoder.embed_tokens.weight")
    tied = "proj_out.weight" not in src or torch.equal(src.take("proj_out.weight"), state["decoder.token_embed.weight"])
    if not tied:
        raise CheckpointError(f"{source}: proj_out is not tied to the token embedding; not supported")
    for side, n in (("encoder", cfg.encoder_layers), ("decoder", cfg.decoder_layers)):
        _norm(src, f"{side}.layer_norm", f"{side}.norm", state)
        for i in range(n):
            s, o = f"{side}.layers.{i}", f"{side}.blocks.{i}"
            _attention(src, f"{s}.self_attn", f"{o}.attn", state, cross=False)
            _norm(src, f"{s}.self_attn_layer_norm", f"{o}.norm1", state)
            if side == "decoder":
                _attention(src, f"{s}.encoder_attn", f"{o}.xattn", state, cross=True)
                _norm(src, f"{s}.encoder_attn_layer_norm", f"{o}.norm_x", state)
            _norm(src, f"{s}.final_layer_norm", f"{o}.norm2", state)
            for a, b in (("fc1", "mlp.up"), ("fc2", "mlp.down")):
                state[f"{o}.{b}.weight"] = src.take(f"{s}.{a}.weight")
                state[f"{o}.{b}.bias"] = src.take(f"{s}.{a}.bias")
    src.finish()
    return state


def load_hf_whisper(directory: str | Path) -> Whisper:
    d = Path(directory)
    data = json.loads((d / "config.json").read_text())
    gen_path = d / "generation_config.json"
    gen = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
    cfg = config_from_hf(data, gen)
    state = state_from_hf(read_state_dict(find_weights(d)), cfg, str(d))
    return load_exact(Whisper(cfg), state, str(d)).eval()


# --- the other way: our model as a transformers one ------------------------------------------


def hf_config(cfg: WhisperConfig) -> dict[str, Any]:
    return dict(vocab_size=cfg.vocab_size, num_mel_bins=cfg.n_mels, d_model=cfg.width,
                encoder_layers=cfg.encoder_layers, decoder_layers=cfg.decoder_layers,
                encoder_attention_heads=cfg.encoder_heads, decoder_attention_heads=cfg.decoder_heads,
                encoder_ffn_dim=cfg.encoder_mlp_dim, decoder_ffn_dim=cfg.decoder_mlp_dim,
                max_source_positions=cfg.max_source_positions, max_target_positions=cfg.max_target_positions,
                decoder_start_token_id=cfg.prefix_ids[0], eos_token_id=cfg.eos_token_id,
                bos_token_id=cfg.eos_token_id, pad_token_id=cfg.eos_token_id,
                begin_suppress_tokens=list(cfg.begin_suppress_tokens), suppress_tokens=list(cfg.suppress_tokens),
                activation_function="gelu", scale_embedding=False, tie_word_embeddings=True)


def hf_generation_config(cfg: WhisperConfig) -> dict[str, Any]:
    return dict(decoder_start_token_id=cfg.prefix_ids[0], eos_token_id=cfg.eos_token_id,
                bos_token_id=cfg.eos_token_id, pad_token_id=cfg.eos_token_id,
                no_timestamps_token_id=cfg.no_timestamps_token_id, is_multilingual=len(cfg.prefix_ids) > 1,
                begin_suppress_tokens=list(cfg.begin_suppress_tokens), suppress_tokens=list(cfg.suppress_tokens),
                max_initial_timestamp_index=cfg.max_initial_timestamp_index, max_length=cfg.max_target_positions)


def to_hf(model: Whisper) -> dict[str, Tensor]:
    """Our state dict in transformers' layout (the inverse of `state_from_hf`)."""
    cfg, s = model.cfg, model.state_dict()
    w = cfg.width
    out: dict[str, Tensor] = {}
    for n in ("conv1", "conv2"):
        for p in ("weight", "bias"):
            out[f"model.encoder.{n}.{p}"] = s[f"encoder.{n}.{p}"]
    out["model.encoder.embed_positions.weight"] = s["encoder.pos_embed"]
    out["model.decoder.embed_positions.weight"] = s["decoder.pos_embed"]
    out["model.decoder.embed_tokens.weight"] = s["decoder.token_embed.weight"]
    out["proj_out.weight"] = s["decoder.token_embed.weight"]
    for side, n in (("encoder", cfg.encoder_layers), ("decoder", cfg.decoder_layers)):
        out[f"model.{side}.layer_norm.weight"] = s[f"{side}.norm.weight"]
        out[f"model.{side}.layer_norm.bias"] = s[f"{side}.norm.bias"]
        for i in range(n):
            h, o = f"model.{side}.layers.{i}", f"{side}.blocks.{i}"
            attns = [("self_attn", "attn", "qkv")] + ([("encoder_attn", "xattn", "kv")] if side == "decoder" else [])
            for hname, oname, fused in attns:
                wt, bs = s[f"{o}.{oname}.{fused}.weight"], s[f"{o}.{oname}.{fused}.bias"]
                if fused == "kv":
                    wt = torch.cat([s[f"{o}.{oname}.q.weight"], wt])
                    bs = torch.cat([s[f"{o}.{oname}.q.bias"], bs])
                for j, p in enumerate("qkv"):
                    out[f"{h}.{hname}.{p}_proj.weight"] = wt[j * w:(j + 1) * w]
                    if p != "k":
                        out[f"{h}.{hname}.{p}_proj.bias"] = bs[j * w:(j + 1) * w]
                out[f"{h}.{hname}.out_proj.weight"] = s[f"{o}.{oname}.out.weight"]
                out[f"{h}.{hname}.out_proj.bias"] = s[f"{o}.{oname}.out.bias"]
            norms = [("self_attn_layer_norm", "norm1"), ("final_layer_norm", "norm2")]
            if side == "decoder":
                norms.append(("encoder_attn_layer_norm", "norm_x"))
            for a, b in norms:
                out[f"{h}.{a}.weight"], out[f"{h}.{a}.bias"] = s[f"{o}.{b}.weight"], s[f"{o}.{b}.bias"]
            for a, b in (("fc1", "mlp.up"), ("fc2", "mlp.down")):
                out[f"{h}.{a}.weight"], out[f"{h}.{a}.bias"] = s[f"{o}.{b}.weight"], s[f"{o}.{b}.bias"]
    return out


def to_transformers(model: Whisper):
    """A transformers WhisperForConditionalGeneration holding our weights (fp32, eval mode)."""
    from transformers import GenerationConfig, WhisperForConditionalGeneration
    from transformers import WhisperConfig as HFConfig

    hf = WhisperForConditionalGeneration(HFConfig(**hf_config(model.cfg)))
    missing, unexpected = hf.load_state_dict(to_hf(model), strict=False)
    if [k for k in missing if k != "proj_out.weight"] or unexpected:
        raise CheckpointError(f"to_transformers: missing {missing[:8]}, unexpected {unexpected[:8]}")
    hf.generation_config = GenerationConfig(**hf_generation_config(model.cfg))
    return hf.float().eval()


__all__ = ["config_from_hf", "hf_config", "is_hf_whisper", "load_hf_whisper", "state_from_hf", "to_hf",
           "to_transformers"]
