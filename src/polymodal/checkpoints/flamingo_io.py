"""Flamingo checkpoints: our own directory format, and reading transformers' IDEFICS one.

Own format: `config.json` (FlamingoConfig, model_type "flamingo"), `model.safetensors` (the whole
model, frozen parts included), the tokenizer files and `chat_template.jinja` when the LM has one.
"""

from __future__ import annotations

import json
from pathlib import Path

from polymodal.checkpoints.state import CheckpointError, load_exact, read_state_dict, write_checkpoint
from polymodal.config import config_from_dict
from polymodal.processing.chat import read_chat_template, write_chat_template
from polymodal.processing.tokenizer import load_tokenizer


def save_flamingo(model, directory: str | Path, tokenizer=None, chat_template: str | None = None) -> Path:
    directory = write_checkpoint(directory, model.cfg, model.state_dict(), tokenizer)
    write_chat_template(directory, chat_template)
    return directory


def is_own_flamingo(directory: Path) -> bool:
    cfg = directory / "config.json"
    return cfg.is_file() and json.loads(cfg.read_text()).get("model_type") == "flamingo"


def is_flamingo_dir(directory: Path) -> bool:
    from polymodal.checkpoints.hf_idefics import is_hf_idefics

    return directory.is_dir() and (is_own_flamingo(directory) or is_hf_idefics(directory))


def load_flamingo_checkpoint(path: str | Path):
    """(Flamingo in eval mode, tokenizer, chat template or None, image transform) from our own format
    or a transformers IDEFICS directory."""
    from polymodal.checkpoints.hf_idefics import is_hf_idefics, load_hf_idefics
    from polymodal.models.flamingo import Flamingo

    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{p}: no such directory")
    if is_own_flamingo(p):
        cfg = config_from_dict(json.loads((p / "config.json").read_text()))
        model = load_exact(Flamingo(cfg), read_state_dict(p / "model.safetensors"), str(p)).eval()
    elif is_hf_idefics(p):
        model = load_hf_idefics(p)
    else:
        raise CheckpointError(f"{p}: not a Flamingo polymodal knows (own format with model_type 'flamingo', "
                              "or a transformers IDEFICS directory)")
    try:
        tokenizer = load_tokenizer(p)
    except (FileNotFoundError, ValueError):
        from polymodal.checkpoints.vlm_io import hf_bpe_tokenizer

        tokenizer = hf_bpe_tokenizer(p, model.cfg)
    return model, tokenizer, read_chat_template(p), model.cfg.image_transform


__all__ = ["is_flamingo_dir", "load_flamingo_checkpoint", "save_flamingo"]
