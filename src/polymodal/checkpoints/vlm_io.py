"""BLIP-2 as a chat / caption model: our own directory format, and reading transformers' one.

Own format: `config.json` (Blip2Config, model_type "blip2"), `model.safetensors`, the tokenizer
files (`Tokenizer.save`) and `chat_template.jinja` when the LLM has one. `load_vlm_checkpoint`
also reads a transformers Blip2ForConditionalGeneration directory (see hf_blip2.py) with its
tokenizer. `processing/tokenizer.load_tokenizer` reads CLIP BPE and WordPiece only, so a
GPT-2-style byte-level BPE `tokenizer.json` (OPT, Llama 3, Qwen2) is wrapped here as it is,
`tokenizers.Tokenizer.from_file`, its pre-tokenizer, post-processor and decoder untouched.
"""

from __future__ import annotations

import json
from pathlib import Path

from polymodal.checkpoints.state import CheckpointError, load_exact, read_state_dict, write_checkpoint
from polymodal.config import Blip2Config, ImageTransformConfig, config_from_dict
from polymodal.processing.chat import read_chat_template, write_chat_template
from polymodal.processing.tokenizer import Tokenizer, load_tokenizer


def save_vlm(model, directory: str | Path, tokenizer: Tokenizer, chat_template: str | None = None) -> Path:
    """Write config.json, model.safetensors, the tokenizer files and chat_template.jinja (if any)."""
    directory = write_checkpoint(directory, model.cfg, model.state_dict(), tokenizer)
    write_chat_template(directory, chat_template)
    return directory


def is_own_vlm(directory: Path) -> bool:
    cfg = directory / "config.json"
    return cfg.is_file() and json.loads(cfg.read_text()).get("model_type") == "blip2"




def hf_bpe_tokenizer(directory: Path, cfg: Blip2Config) -> Tokenizer:
    """A transformers byte-level BPE `tokenizer.json` as it is, the special ids from the LLM's config."""
    from tokenizers import Tokenizer as Backend

    path = directory / "tokenizer.json"
    if not path.is_file():
        raise CheckpointError(f"{directory}: no tokenizer.json (the VLM needs its LLM's tokenizer)")
    lm = cfg.lm
    eos = lm.eos_token_id if isinstance(lm.eos_token_id, int) or lm.eos_token_id is None else lm.eos_token_id[0]
    pad = lm.pad_token_id if lm.pad_token_id is not None else eos if eos is not None else 0
    return Tokenizer(Backend.from_file(str(path)), "bpe", max(lm.max_positions, 2), pad_id=pad,
                     bos_id=lm.bos_token_id, eos_id=eos)


def load_vlm_checkpoint(path: str | Path):
    """(Blip2 in eval mode, tokenizer, chat template or None, image transform) from our own
    format or a transformers BLIP-2 generation directory."""
    from polymodal.checkpoints.hf_blip2 import is_hf_blip2, load_hf_blip2
    from polymodal.models.blip2 import Blip2

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or directory")
    if not p.is_dir():
        raise CheckpointError(f"{p}: a VLM is a directory (polymodal or transformers BLIP-2), not a file")
    if is_own_vlm(p):
        cfg = config_from_dict(json.loads((p / "config.json").read_text()))
        if cfg.lm is None:
            raise CheckpointError(f"{p}: a stage-1 BLIP-2 (no language model) cannot caption or chat")
        model = load_exact(Blip2(cfg), read_state_dict(p / "model.safetensors"), str(p)).eval()
        tokenizer = load_tokenizer(p)
    elif is_hf_blip2(p):
        model = load_hf_blip2(p)
        if not isinstance(model, Blip2):
            raise CheckpointError(f"{p}: a BLIP-2 retrieval model (no language model) cannot caption or chat")
        try:
            tokenizer = load_tokenizer(p)
        except (FileNotFoundError, ValueError):  # GPT-2-style byte-level BPE: not a kind load_tokenizer reads
            tokenizer = hf_bpe_tokenizer(p, model.cfg)
    else:
        raise CheckpointError(f"{p}: not a VLM polymodal knows (own format with model_type 'blip2', "
                              "or a transformers BLIP-2 directory)")
    transform: ImageTransformConfig = model.cfg.image_transform
    return model, tokenizer, read_chat_template(p), transform


__all__ = ["load_vlm_checkpoint", "save_vlm"]
