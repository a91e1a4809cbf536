"""Asking, captioning and chatting with a Flamingo: several images, interleaved prompts, video, few-shot.

    vlm = polymodal.load_vlm("runs/flamingo")          # a Flamingo directory (or transformers IDEFICS)
    vlm.ask(["a.png", "b.png"], "<image>A cat.<image>And this?")   # an interleaved prompt
    vlm.ask("scene.png", "what colour is the star?", shots="shots.jsonl")
    vlm.ask(None, "what moves?", video="clip.gif")    # a GIF or a folder of frames
    chat = vlm.chat("a.png"); chat.send("What is this?"); chat.add_image("b.png"); chat.send("And now?")

Prompts use the format the recipe trains on (train/flamingo_recipe.py, data/interleaved.py):
"<image>Question: {q} Answer: {a}\\n" per example, the query last; "<image>Caption:" and
"<image>Video:" to caption. Each text token sees the latest image before it. A question that already
holds `<image>` markers is used as it is (one marker per image, in order); otherwise the images come
first, then the question. Answers stop at the end of their line.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image, ImageSequence

from polymodal.data.interleaved import IMAGE, encode_interleaved
from polymodal.generation import GenerationConfig
from polymodal.processing.image import ImageError, load_image, preprocess

FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _text(text, what: str) -> str:
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"the {what} is empty: give some text")
    return text.strip()


def read_shots(src) -> list[dict]:
    """Few-shot examples: a JSON-lines file (or a list) of {"image" | "video", "question", "answer"}."""
    if isinstance(src, (str, Path)):
        path = Path(src)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such shots file")
        rows = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except ValueError:
                raise ValueError(f"{path}: line {n} is not JSON") from None
        base = path.parent
    else:
        rows, base = list(src), Path(".")
    for n, r in enumerate(rows, 1):
        if not isinstance(r, dict) or not ({"image", "video"} & set(r)) or "question" not in r or "answer" not in r:
            raise ValueError(f"shot {n}: needs an image (or video), a question and an answer")
        for key in ("image", "video"):
            if key in r and not Path(r[key]).is_absolute() and isinstance(src, (str, Path)):
                r[key] = str(base / r[key])
    return rows


class FlamingoVLM:
    """A Flamingo with its tokenizer and image transform."""

    def __init__(self, model, tokenizer, chat_template: str | None = None, image_transform=None):
        self.model, self.tokenizer, self.chat_template = model, tokenizer, chat_template
        self.image_transform = image_transform or model.cfg.image_transform
        model.lm.for_decoding()

    @classmethod
    def from_pretrained(cls, path) -> FlamingoVLM:
        from polymodal.checkpoints.flamingo_io import load_flamingo_checkpoint

        return cls(*load_flamingo_checkpoint(path))

    @property
    def context_length(self) -> int:
        return self.model.cfg.lm.max_positions

    @property
    def max_frames(self) -> int:
        return self.model.cfg.perceiver.max_frames

    def generation_config(self, **options) -> GenerationConfig:
        lm = self.model.cfg.lm
        base = GenerationConfig(eos_token_id=lm.eos_token_id, pad_token_id=lm.pad_token_id, stop_strings=("\n",))
        return replace(base, **options)

    # --- media ---------------------------------------------------------------------------------

    def frames(self, image) -> torch.Tensor:
        """An image -> (1, C, H, W) frames."""
        return preprocess(load_image(image), self.image_transform)

    def video_frames(self, video) -> torch.Tensor:
        """A GIF (or other animated image) or a folder of frame images -> (F, C, H, W), at most
        max_frames of them, evenly spaced."""
        path = Path(video)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
            if not files:
                raise ImageError(f"{path}: no frame images (png, jpg, webp, bmp) in the folder")
            pictures = [load_image(p) for p in files]
        elif path.is_file():
            try:
                with Image.open(path) as im:
                    pictures = [f.convert("RGB") for f in ImageSequence.Iterator(im)]
            except OSError as e:
                raise ImageError(f"{path}: not a readable animation ({e})") from None
        else:
            raise FileNotFoundError(f"{path}: no such file or directory")
        limit = max(self.max_frames, 1)
        if len(pictures) > limit:
            pictures = [pictures[round(i * (len(pictures) - 1) / (limit - 1))] if limit > 1 else pictures[0]
                        for i in range(limit)]
        return preprocess(pictures, self.image_transform)

    def media(self, items: list[torch.Tensor]) -> torch.Tensor:
        """Frames of each media item -> (1, M, latents, width) resampled visual tokens."""
        p = next(self.model.parameters())
        out = [self.model.encode_media(f.to(p.device, p.dtype)[None, None]) for f in items]  # (1, 1, L, D) each
        return torch.cat(out, dim=1)

    # --- prompts -------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        ids = encode_interleaved(text, lambda s: self.tokenizer.backend.encode(s, add_special_tokens=False).ids,
                                 self.model.cfg.image_token_id)
        bos = self.model.cfg.lm.bos_token_id
        return ([bos] if bos is not None and self.chat_template is None else []) + ids

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def _shots(self, shots) -> tuple[str, list[torch.Tensor]]:
        text, items = "", []
        for s in read_shots(shots) if shots is not None else []:
            items.append(self.video_frames(s["video"]) if "video" in s else self.frames(s["image"]))
            text += f"{IMAGE}Question: {_text(s['question'], 'question')} Answer: {s['answer']}\n"
        return text, items

    def _generate(self, text: str, items: list[torch.Tensor], **gen) -> str:
        cfg = self.generation_config(**{"max_new_tokens": 30, **gen})
        ids = self.encode(text)
        if ids.count(self.model.cfg.image_token_id) != len(items):
            raise ValueError(f"the prompt has {ids.count(self.model.cfg.image_token_id)} {IMAGE} markers "
                             f"for {len(items)} images")
        if len(ids) + cfg.max_new_tokens > self.context_length:
            raise ValueError(f"the prompt is too long: {len(ids)} tokens + {cfg.max_new_tokens} new ones > "
                             f"the LM's context of {self.context_length}")
        device = next(self.model.parameters()).device
        ids_t = torch.tensor([ids], device=device)
        media = self.media(items) if items else None
        out = self.model.generate(ids_t, media=media, config=cfg, decode=self.tokenizer.decode)
        return self.decode(out.tokens[0, : int(out.lengths[0])].tolist())

    @torch.no_grad()
    def ask(self, images, question: str, *, video=None, shots=None, **gen) -> str:
        """Answer `question` about `images` (one, a list, or None) and/or a `video`, after the few-shot
        examples in `shots` (a JSON-lines file or a list of dicts). gen: max_new_tokens, num_beams, ..."""
        question = _text(question, "question")
        if images is None:
            images = []
        elif isinstance(images, (str, Path, Image.Image, bytes)):
            images = [images]
        items = [self.frames(i) for i in list(images)]
        if video is not None:
            items.append(self.video_frames(video))
        prefix, shot_items = self._shots(shots)
        # an interleaved prompt is used as it is; otherwise the images come first
        query = question if IMAGE in question else IMAGE * len(items) + f"Question: {question} Answer:"
        return self._generate(prefix + query, shot_items + items, **gen)

    @torch.no_grad()
    def caption(self, image=None, *, video=None, **gen) -> str:
        """A caption of an image ("<image>Caption:") or a video ("<image>Video:")."""
        if (image is None) == (video is None):
            raise ValueError("caption one image or one video")
        if video is not None:
            return self._generate(f"{IMAGE}Video:", [self.video_frames(video)], **gen)
        return self._generate(f"{IMAGE}Caption:", [self.frames(image)], **gen)

    def caption_many(self, images: list, *, batch_size: int = 1, **gen) -> list[str]:
        """`caption` of each image, one at a time (batch_size is accepted and unused)."""
        return [self.caption(image, **gen) for image in images]

    def caption_folder(self, folder, out_jsonl, **options) -> dict:
        """Caption every image in a folder, resumably (tasks/vlm.py `caption_folder`)."""
        from polymodal.tasks.vlm import caption_folder

        return caption_folder(self.caption_many, folder, out_jsonl, **options)

    def chat(self, images=None, *, video=None, on_note: Callable[[str], None] | None = None,
             **gen) -> FlamingoChat:
        chat = FlamingoChat(self, on_note=on_note, **gen)
        for image in [] if images is None else [images] if isinstance(images, (str, Path)) else images:
            chat.add_image(image)
        if video is not None:
            chat.add_video(video)
        return chat


class FlamingoChat:
    """A conversation in which images (and videos) can come at any point: each joins the transcript
    where it is added, and the questions after it are about it. The oldest exchanges are dropped when
    the transcript outgrows the LM's context."""

    def __init__(self, vlm: FlamingoVLM, *, on_note: Callable[[str], None] | None = None, **gen):
        self.vlm, self.on_note, self.gen = vlm, on_note, {"max_new_tokens": 30, **gen}
        self.turns: list[tuple[str, list[torch.Tensor]]] = []  # (text, frames of the media it brought)
        self.messages: list[dict] = []
        self.pending: list[torch.Tensor] = []
        self.sources: list[str] = []

    def add_image(self, image) -> None:
        self.pending.append(self.vlm.frames(image))
        self.sources.append(str(image))

    def add_video(self, video) -> None:
        self.pending.append(self.vlm.video_frames(video))
        self.sources.append(str(video))

    def reset(self) -> None:
        """Forget everything: the exchanges and the images."""
        self.turns, self.messages, self.pending, self.sources = [], [], [], []

    @torch.no_grad()
    def send(self, text: str, stream: Callable[[str], None] | None = None, **gen) -> str:
        text = _text(text, "question")
        turn = IMAGE * len(self.pending) + f"Question: {text} Answer:"
        new_items = list(self.pending)
        while True:
            prompt = "".join(t for t, _ in self.turns) + turn
            items = [f for _, fs in self.turns for f in fs] + new_items
            try:
                answer = self.vlm._generate(prompt, items, **{**self.gen, **gen})
                break
            except ValueError as e:
                if "too long" not in str(e) or not self.turns:
                    raise
                self.turns.pop(0)
                if self.on_note is not None:
                    self.on_note("the conversation outgrew the LM's context: dropped its oldest exchange")
        if stream is not None:
            stream(answer)
        self.turns.append((f"{turn} {answer}\n", new_items))
        self.pending = []
        self.messages += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
        return answer

    def save(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        doc = {"media": self.sources, "messages": self.messages}
        path.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return path


__all__ = ["FlamingoChat", "FlamingoVLM", "read_shots"]
