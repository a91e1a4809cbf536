"""GGUF, llama.cpp's one-file format: a Llama or Qwen2 decoder LM, its tokenizer and its chat template.

A GGUF file holds metadata (`llama.block_count`, `tokenizer.ggml.tokens`, `tokenizer.chat_template`,
...) and tensors, each F32, F16, BF16 or quantized in blocks (Q8_0, Q4_0, Q4_1, Q5_x, K-quants). We
read it with the `gguf` library's `GGUFReader`, dequantize every tensor to fp32 with
`gguf.quants.dequantize`, and map llama.cpp's names onto `DecoderLM`'s with an exhaustive
`StateReader`: every tensor is used, the model loads strictly.

llama.cpp's converter (`convert_hf_to_gguf.py`, `LlamaModel.permute`) reorders the rows of each head
of a Llama q and k projection from the rotate-half layout to the interleaved pairs its RoPE kernel
reads; `unpermute` puts them back (transformers' `LlamaTensorProcessor` does the same). Qwen2 files
are written unpermuted.

The tokenizer is byte-level BPE (`tokenizer.ggml.model == "gpt2"`); `tokenizer.ggml.pre` names the
split llama.cpp applies before BPE (`llama-vocab.cpp`), reproduced in `PRE_TOKENIZERS`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from polymodal.checkpoints import hf_lm
from polymodal.checkpoints.state import (
    CheckpointError,
    StateReader,
    load_exact,
    read_state_dict,
    write_checkpoint,
)
from polymodal.config import LMConfig, load_config
from polymodal.models.lm import DecoderLM
from polymodal.processing.chat import read_chat_template, write_chat_template
from polymodal.processing.tokenizer import Tokenizer, bpe_tokenizer, load_tokenizer

ARCHITECTURES = ("llama", "qwen2")  # general.architecture values we read
# Tensor types we dequantize (gguf.GGMLQuantizationType names): plain floats, the legacy block
# formats, and the K-quants most published files use.
TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
CONTROL, USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values (llama.cpp's llama_token_type)

# llama.cpp's pre-tokenizer splits (llama-vocab.cpp), by tokenizer.ggml.pre: (regex, digits first).
# A None regex is GPT-2's, which `tokenizers`' ByteLevel applies itself. The StarCoder family
# (SmolLM among it) cuts every digit out before GPT-2's split, as its own tokenizer.json does.
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS: dict[str, tuple[str | None, bool]] = {
    **dict.fromkeys(("gpt2", "gpt-2", "mpt", "olmo", "jais"), (None, False)),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone"), (None, True)),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "falcon3", "dbrx"), (_LLAMA3, False)),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), (_QWEN2, False)),
}


# --- reading ----------------------------------------------------------------------------------------


def read_gguf(path: str | Path):
    """A `gguf.GGUFReader` over the file; a short, corrupt or foreign file is one CheckpointError."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader indexes past the end of a truncated file, or meets garbage
        reason = " ".join(f"{type(e).__name__}: {e}".split())
        raise CheckpointError(f"{path}: not a complete GGUF file, truncated or corrupt "
                              f"({path.stat().st_size:,} bytes; {reason})") from None


def _source(reader) -> str:
    return str(getattr(reader.data, "filename", None) or "GGUF file")


def gguf_metadata(reader) -> dict[str, Any]:
    """Every metadata key -> its value (str, int, float, bool, or a list of them)."""
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def _architecture(reader, meta: dict[str, Any]) -> str:
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"{_source(reader)}: architecture {arch!r} is not supported "
                              f"(polymodal reads {', '.join(ARCHITECTURES)})")
    return arch


def gguf_config(reader) -> LMConfig:
    """The LMConfig a GGUF file's `{arch}.*` metadata describes; embeddings are tied when the file
    has no `output.weight`."""
    meta, source = gguf_metadata(reader), _source(reader)
    arch = _architecture(reader, meta)

    def key(name: str, default: Any = KeyError) -> Any:
        full = f"{arch}.{name}"
        if full not in meta and default is KeyError:
            raise CheckpointError(f"{source}: metadata key {full!r} is missing")
        value = meta.get(full, default)
        if isinstance(value, list):
            raise CheckpointError(f"{source}: {full} varies per layer ({value[:4]}...), which is not supported")
        return value

    width, heads = key("embedding_length"), key("attention.head_count")
    head_dim = key("attention.key_length", width // heads)
    if key("attention.value_length", head_dim) != head_dim or key("rope.dimension_count", head_dim) != head_dim:
        raise CheckpointError(f"{source}: value width or rotary width other than the head width "
                              f"({head_dim}) is not supported")
    scaling = key("rope.scaling.type", "none")
    names = {t.name for t in reader.tensors}
    if scaling not in ("none", "") or "rope_freqs.weight" in names:
        raise CheckpointError(f"{source}: RoPE scaling ({scaling}, rope_freqs) is not supported")
    tokens = meta.get("tokenizer.ggml.tokens")
    # generation ends at any end-of-generation token, as in llama.cpp: end of text, of turn, of message
    ends = tuple(dict.fromkeys(i for name in ("eos", "eot", "eom")
                               if (i := meta.get(f"tokenizer.ggml.{name}_token_id")) is not None))
    return LMConfig(
        family="llama", vocab_size=len(tokens) if tokens else key("vocab_size"), width=width,
        layers=key("block_count"), heads=heads, kv_heads=key("attention.head_count_kv", heads),
        head_dim=head_dim if head_dim * heads != width else None, mlp_dim=key("feed_forward_length"),
        act="swiglu", norm_eps=float(key("attention.layer_norm_rms_epsilon")),
        max_positions=key("context_length", 2048), rope_theta=float(key("rope.freq_base", 10000.0)),
        tie_embeddings="output.weight" not in names, qkv_bias=arch == "qwen2" or "blk.0.attn_q.bias" in names,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"), eos_token_id=ends[0] if len(ends) == 1 else ends or None,
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"))


def gguf_tensors(reader) -> dict[str, Tensor]:
    """Every tensor of the file by its GGUF name, dequantized to fp32 in PyTorch's (out, in) order."""
    import gguf

    out = {}
    for t in reader.tensors:
        kind = t.tensor_type.name
        if kind not in TENSOR_TYPES:
            raise CheckpointError(f"{_source(reader)}: tensor {t.name!r} has type {kind}, which polymodal "
                                  f"does not dequantize (supported: {', '.join(TENSOR_TYPES)})")
        values = gguf.quants.dequantize(t.data, t.tensor_type)  # reversed GGUF shape: (out, in)
        out[t.name] = torch.from_numpy(np.require(values, np.float32, ["C", "W"]))
    return out


# --- the key map ------------------------------------------------------------------------------------


def unpermute(w: Tensor, heads: int) -> Tensor:
    """Undo llama.cpp's `permute` of a q or k projection (rows) or bias: within each head, rows
    (0, 2, 4, ..., 1, 3, 5, ...) of its interleaved layout go back to the rotate-half halves."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)  # (rows, ...)


def state_from_gguf(state: dict[str, Tensor], cfg: LMConfig, arch: str, source: str = "GGUF") -> dict[str, Tensor]:
    """GGUF tensor names -> DecoderLM's; every source tensor is used and every model key produced."""
    r = StateReader(state, source)
    permute = arch == "llama"  # llama.cpp permutes Llama's q and k, not Qwen2's
    kv_heads = cfg.kv_heads or cfg.heads

    def qkv(s: str, part: str) -> Tensor:
        q, k, v = (r.take(f"{s}.attn_{n}.{part}") for n in "qkv")
        if permute:
            q, k = unpermute(q, cfg.heads), unpermute(k, kv_heads)
        return torch.cat([q, k, v])  # (q_dim + 2 * kv_dim, ...)

    out = {"token_embed.weight": r.take("token_embd.weight")}
    for i in range(cfg.layers):
        s, b = f"blk.{i}", f"blocks.{i}"
        out[f"{b}.norm1.weight"] = r.take(f"{s}.attn_norm.weight")
        out[f"{b}.attn.qkv.weight"] = qkv(s, "weight")
        if cfg.qkv_bias:
            out[f"{b}.attn.qkv.bias"] = qkv(s, "bias")
        out[f"{b}.attn.out.weight"] = r.take(f"{s}.attn_output.weight")
        out[f"{b}.norm2.weight"] = r.take(f"{s}.ffn_norm.weight")
        out[f"{b}.mlp.up.weight"] = r.cat([f"{s}.ffn_gate.weight", f"{s}.ffn_up.weight"])  # SwiGLU [gate; up]
        out[f"{b}.mlp.down.weight"] = r.take(f"{s}.ffn_down.weight")
    out["norm_final.weight"] = r.take("output_norm.weight")
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = r.take("output.weight")
    r.finish()
    return out


# --- tokenizer --------------------------------------------------------------------------------------


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table (`bytes_to_unicode`)."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in kept]
    return {**{b: chr(b) for b in kept}, **{b: chr(256 + i) for i, b in enumerate(moved)}}


def gguf_tokenizer(reader) -> Tokenizer:
    """The byte-level BPE tokenizer of `tokenizer.ggml.*`: control tokens (`<|im_start|>`) and the
    start / end / padding / unknown tokens match whole, user-defined ones too, as in transformers."""
    meta, source = gguf_metadata(reader), _source(reader)
    model, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "gpt2")
    if model != "gpt2":
        raise CheckpointError(f"{source}: tokenizer {model!r} is not supported (polymodal reads byte-level "
                              "BPE, tokenizer.ggml.model 'gpt2')")
    if pre not in PRE_TOKENIZERS:
        raise CheckpointError(f"{source}: pre-tokenizer {pre!r} is not supported; known: {', '.join(PRE_TOKENIZERS)}")
    tokens, merges = meta["tokenizer.ggml.tokens"], meta.get("tokenizer.ggml.merges", [])
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if len(types) != len(tokens):
        raise CheckpointError(f"{source}: {len(tokens)} tokens but {len(types)} token types")
    spelling = _byte_alphabet()
    alphabet = set(spelling.values())
    spelled = [t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")) for t in tokens]
    ids = {name: meta.get(f"tokenizer.ggml.{name}_token_id") for name in ("bos", "eos", "padding", "unknown")}
    # a control token outside the byte alphabet is a llama.cpp mislabel; transformers skips it too
    specials = [t for t, kind in zip(tokens, types, strict=True) if kind == CONTROL and set(t) <= alphabet]
    specials += [tokens[i] for i in ids.values() if i is not None and tokens[i] not in specials]
    added = [t for t, kind in zip(tokens, types, strict=True) if kind == USER_DEFINED and set(t) <= alphabet]
    split, digits = PRE_TOKENIZERS[pre]
    arch = meta.get("general.architecture")
    return bpe_tokenizer(
        {t: i for i, t in enumerate(spelled)}, [tuple(m.split(" ", 1)) for m in merges], split=split,
        individual_digits=digits, specials=tuple(specials), added=tuple(added), bos_id=ids["bos"],
        eos_id=ids["eos"], pad_id=ids["padding"], add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        add_eos=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        context_length=meta.get(f"{arch}.context_length", 2048))


# --- loading and converting -------------------------------------------------------------------------


def load_gguf(path: str | Path) -> tuple[DecoderLM, Tokenizer, str | None]:
    """(model in eval mode, tokenizer, chat template or None) from a Llama / Qwen2 GGUF file."""
    reader = read_gguf(path)
    meta = gguf_metadata(reader)
    arch = _architecture(reader, meta)
    cfg = gguf_config(reader)
    tokenizer = gguf_tokenizer(reader)
    source = f"{path} (GGUF {arch})"
    model = load_exact(DecoderLM(cfg), state_from_gguf(gguf_tensors(reader), cfg, arch, source), source)
    return model.eval(), tokenizer, meta.get("tokenizer.chat_template")


def save_lm(model: DecoderLM, directory: str | Path, tokenizer: Tokenizer | None = None,
            chat_template: str | None = None) -> Path:
    """Our own LM format: config.json (model_type "lm"), model.safetensors, the tokenizer files and
    chat_template.jinja."""
    directory = write_checkpoint(directory, model.cfg, model.state_dict(), tokenizer)
    write_chat_template(directory, chat_template)
    return directory


def convert_gguf(src: str | Path, dst: str | Path) -> Path:
    """`polymodal convert model.gguf out/`: a GGUF file -> our own LM directory (fp32 weights)."""
    model, tokenizer, chat_template = load_gguf(src)
    return save_lm(model, dst, tokenizer, chat_template)


def is_gguf(path: Path) -> bool:
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def load_lm(path: str | Path) -> tuple[DecoderLM, Tokenizer | None, str | None]:
    """(model in eval mode, tokenizer or None, chat template or None) from our own LM directory, a
    GGUF file, or a transformers OPT / Llama / Qwen2 directory."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or directory")
    if p.is_file():
        if not is_gguf(p):
            raise CheckpointError(f"{p}: not a GGUF file (no 'GGUF' magic); an LM loads from a GGUF file or a directory")
        return load_gguf(p)
    cfg_file = p / "config.json"
    if cfg_file.is_file() and json.loads(cfg_file.read_text()).get("model_type") == "lm":
        cfg = load_config(cfg_file)
        model = load_exact(DecoderLM(cfg), read_state_dict(p / "model.safetensors"), str(p))
        tokenizer = load_tokenizer(p) if (p / "tokenizer.json").is_file() else None
        return model.eval(), tokenizer, read_chat_template(p)
    if hf_lm.is_hf_lm(p):
        try:
            tokenizer = load_tokenizer(p)
        except (FileNotFoundError, ValueError):  # a tokenizer kind we do not read (sentencepiece, say)
            tokenizer = None
        return hf_lm.load_hf_lm(p), tokenizer, read_chat_template(p)
    raise CheckpointError(f"{p}: not an LM polymodal knows (own format with model_type 'lm', a GGUF file, "
                          "or a transformers OPT / Llama / Qwen2 directory)")
