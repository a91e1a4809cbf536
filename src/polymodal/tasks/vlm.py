"""Captioning, visual question answering and chat over a BLIP-2 model (`polymodal.load_vlm`).

    vlm = polymodal.load_vlm("path/to/blip2")
    vlm.caption("cat.png")                       # as transformers' generate + decode
    vlm.ask("cat.png", "What is the cat on?")
    chat = vlm.chat("cat.png"); chat.send("What is this?"); chat.send("And its colour?")

Prompts (Li et al. 2023, 4.2): the soft visual prompt (the Q-Former's queries through
`language_projection`) comes before the text. An LLM with a chat template is prompted through
it, the visual prompt placed at the start of the FIRST user turn: the rendered conversation is
split at a placeholder and the embeddings go in between. An LLM without one (OPT) gets the
original BLIP-2 format, "Question: {q} Answer:", turns joined by spaces. Without an image the
prompt is the text alone, so the answer is the bare LLM's.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor

from polymodal.generation import GenerationConfig, generate
from polymodal.processing.chat import apply_chat_template, template_tokens
from polymodal.processing.image import ImageError, load_image, preprocess
from polymodal.tasks.folder import pending_files, progress_bar

IMAGE_PLACEHOLDER = "<|polymodal:image|>"  # where the visual prompt goes in a rendered template
# What `caption` asks a model whose LLM has a chat template (the default VLM is trained on it);
# an LLM without one (OPT BLIP-2) captions from its BOS token alone, as the original.
CAPTION_PROMPT = "Describe this image in a few words."
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def _check_text(text, what: str) -> str:
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"the {what} is empty: give some text")
    return text.strip()


class VLM:
    """A BLIP-2 model with its tokenizer, chat template (or None) and image transform."""

    def __init__(self, model, tokenizer, chat_template: str | None = None, image_transform=None):
        self.model, self.tokenizer, self.chat_template = model, tokenizer, chat_template
        self.image_transform = image_transform or model.cfg.image_transform
        model.lm.for_decoding()

    @classmethod
    def from_pretrained(cls, path) -> VLM:
        from polymodal.checkpoints.vlm_io import load_vlm_checkpoint

        return cls(*load_vlm_checkpoint(path))

    @property
    def context_length(self) -> int:
        return self.model.cfg.lm.max_positions

    @property
    def num_queries(self) -> int:
        return self.model.cfg.qformer.num_query_tokens

    def generation_config(self, **options) -> GenerationConfig:
        lm = self.model.cfg.lm
        return replace(GenerationConfig(eos_token_id=lm.eos_token_id, pad_token_id=lm.pad_token_id), **options)

    def pixels(self, image) -> Tensor:
        """An image (path, bytes, PIL image) -> (1, 3, size, size) for the vision tower."""
        param = next(self.model.parameters())
        return preprocess(load_image(image), self.image_transform).to(param.device, param.dtype)

    def encode(self, text: str, *, specials: bool) -> list[int]:
        """Token ids, untruncated; `specials`: add the tokenizer's start / end tokens (BLIP-2's
        plain prompts) or not (a rendered chat template, which spells them itself)."""
        return self.tokenizer.backend.encode(text, add_special_tokens=specials).ids

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def caption(self, image, *, max_new_tokens: int = 30, min_new_tokens: int = 0, num_beams: int = 1,
                prompt: str | None = None) -> str:
        """A caption of `image`, from the BOS token alone (or after `prompt`, "a photo of", say). A model
        whose LLM has a chat template is asked CAPTION_PROMPT instead (or `prompt`, as a question)."""
        if self.chat_template is not None:
            return self.ask(image, CAPTION_PROMPT if prompt is None else prompt, max_new_tokens=max_new_tokens,
                            min_new_tokens=min_new_tokens, num_beams=num_beams)
        px = self.pixels(image)
        cfg = self.generation_config(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                                     num_beams=num_beams)
        ids = None
        if prompt is not None:
            ids = torch.tensor([self.encode(_check_text(prompt, "prompt"), specials=True)], device=px.device)
        self._check_length((ids.shape[1] if ids is not None else 1) + self.num_queries, max_new_tokens)
        out = self.model.generate(px, ids, config=cfg)
        return self.decode(out.tokens[0, : int(out.lengths[0])])

    def ask(self, image, question: str, **gen) -> str:
        """One question about `image` (a fresh conversation); gen: max_new_tokens, num_beams, ..."""
        return self.chat(image).send(question, **gen)

    @torch.no_grad()
    def ask_many(self, images: list, questions: list[str], *, batch_size: int = 8, **gen) -> list[str]:
        """One question about each image (None: no picture), each a fresh conversation, `batch_size`
        at a time through the LLM: the prompts are left-padded into one batch. The answers are
        `ask`'s, but for the rounding of a wider matrix product (an exact tie may break otherwise)."""
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images but {len(questions)} questions")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        cfg = self.generation_config(**{"max_new_tokens": 30, **gen})
        answers: list[str] = []
        for start in range(0, len(questions), batch_size):
            rows = [ChatSession(self, image).prompt_embeds(_check_text(question, "question"), cfg.max_new_tokens)
                    for image, question in zip(images[start:start + batch_size], questions[start:start + batch_size], strict=True)]
            width = max(r.shape[1] for r in rows)
            embeds = rows[0].new_zeros(len(rows), width, rows[0].shape[2])  # (B, P, E), left-padded
            mask = torch.zeros(len(rows), width, dtype=torch.long, device=embeds.device)
            for i, r in enumerate(rows):
                embeds[i, width - r.shape[1]:] = r[0]
                mask[i, width - r.shape[1]:] = 1
            out = generate(self.model.lm, inputs_embeds=embeds, attention_mask=mask, config=cfg)
            answers += [self.decode(out.tokens[i, : int(out.lengths[i])]) for i in range(len(rows))]
        return answers

    def caption_many(self, images: list, *, batch_size: int = 8, max_new_tokens: int = 30,
                     min_new_tokens: int = 0, num_beams: int = 1) -> list[str]:
        """`caption` of each image, `batch_size` at a time (see `ask_many`)."""
        gen = {"max_new_tokens": max_new_tokens, "min_new_tokens": min_new_tokens, "num_beams": num_beams}
        if self.chat_template is not None:
            return self.ask_many(images, [CAPTION_PROMPT] * len(images), batch_size=batch_size, **gen)
        captions = []
        cfg = self.generation_config(**gen)
        self._check_length(1 + self.num_queries, max_new_tokens)
        for start in range(0, len(images), batch_size):
            px = torch.cat([self.pixels(image) for image in images[start:start + batch_size]])
            out = self.model.generate(px, config=cfg)
            captions += [self.decode(out.tokens[i, : int(out.lengths[i])]) for i in range(px.shape[0])]
        return captions

    def chat(self, image=None, *, on_note: Callable[[str], None] | None = None, **gen) -> ChatSession:
        return ChatSession(self, image, on_note=on_note, **gen)

    def caption_folder(self, folder, out_jsonl, *, batch_size: int = 8, progress: bool = False,
                       on_error: Callable[[str, str], None] | None = None, **gen) -> dict:
        """`caption_folder` (below) with this model's batched `caption_many`."""
        return caption_folder(self.caption_many, folder, out_jsonl, batch_size=batch_size, progress=progress,
                              on_error=on_error, **gen)

    def _check_length(self, prompt_len: int, max_new_tokens: int) -> None:
        if prompt_len + max_new_tokens > self.context_length:
            raise ValueError(f"the prompt is too long: {prompt_len} tokens (visual prompt included) + "
                             f"{max_new_tokens} new ones > the LLM's context of {self.context_length}")


class ChatSession:
    """A conversation with a VLM about one image (or none). `send` keeps every exchange as memory;
    when the prompt outgrows the LLM's context, the oldest exchanges are dropped (`dropped_turns`
    counts them, on_note(message) is told)."""

    def __init__(self, vlm: VLM, image=None, *, on_note: Callable[[str], None] | None = None, **gen):
        self.vlm, self.on_note, self.gen = vlm, on_note, {"max_new_tokens": 30, **gen}
        self.messages: list[dict[str, str]] = []
        self.dropped_turns = 0
        self.last_tokens: list[int] = []
        self.image_source: str | None = None
        self._pixels: Tensor | None = None
        if image is not None:
            self.set_image(image)

    def set_image(self, image) -> None:
        """Talk about `image` from now on; the conversation starts over (BLIP-2 sees one image,
        at the start of the first turn)."""
        self._pixels = self.vlm.pixels(image)
        self.image_source = str(image) if isinstance(image, (str, Path)) else "<image>"
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the image stays)."""
        self.messages, self.dropped_turns, self.last_tokens = [], 0, []

    def _note(self, message: str) -> None:
        if self.on_note is not None:
            self.on_note(message)

    def prompt_text(self, text: str, messages: list[dict] | None = None) -> str:
        """The prompt for the next turn `text`, IMAGE_PLACEHOLDER where the visual prompt goes."""
        messages = (self.messages if messages is None else messages) + [{"role": "user", "content": text}]
        image = IMAGE_PLACEHOLDER if self._pixels is not None else ""
        if self.vlm.chat_template is not None:
            first = next(i for i, m in enumerate(messages) if m["role"] == "user")
            messages = [dict(m, content=image + m["content"]) if i == first else m for i, m in enumerate(messages)]
            return apply_chat_template(self.vlm.chat_template, messages, add_generation_prompt=True,
                                       **template_tokens(self.vlm.tokenizer))
        turns = [f"Question: {m['content']} Answer:" if m["role"] == "user" else m["content"] for m in messages]
        return image + " ".join(turns)

    def _prompt_ids(self, text: str, messages: list[dict]) -> tuple[list[int], list[int]]:
        """Token ids before and after the visual prompt (before is empty for a plain prompt)."""
        rendered = self.prompt_text(text, messages)
        templated = self.vlm.chat_template is not None
        if IMAGE_PLACEHOLDER not in rendered:
            return [], self.vlm.encode(rendered, specials=not templated)
        before, after = rendered.split(IMAGE_PLACEHOLDER, 1)
        if not templated:  # BLIP-2: [visual prompt; BOS text], as the transformers processor tokenizes it
            return [], self.vlm.encode(after, specials=True)
        return self.vlm.encode(before, specials=False), self.vlm.encode(after, specials=False)

    def _fit(self, text: str, max_new: int) -> tuple[list[int], list[int]]:
        """The prompt ids, dropping the oldest exchanges while it does not fit the context."""
        extra = self.vlm.num_queries if self._pixels is not None else 0
        while True:
            before, after = self._prompt_ids(text, self.messages)
            length = len(before) + extra + len(after)
            if length + max_new <= self.vlm.context_length:
                return before, after
            if not self.messages:
                self.vlm._check_length(length, max_new)
            drop = 2 if len(self.messages) >= 2 else 1
            self.messages = self.messages[drop:]
            self.dropped_turns += 1
            self._note(f"the conversation outgrew the LLM's context ({self.vlm.context_length} tokens): "
                       f"dropped its oldest exchange ({self.dropped_turns} dropped so far)")

    @torch.no_grad()
    def send(self, text: str, stream: Callable[[str], None] | None = None, **gen) -> str:
        """The model's answer to `text`; stream(piece) is given the answer's text as it grows
        (with beam search, all at once at the end)."""
        text = _check_text(text, "question")
        vlm, options = self.vlm, {**self.gen, **gen}
        cfg = vlm.generation_config(**options)
        if self._pixels is None:
            _, after = self._fit(text, cfg.max_new_tokens)
            inputs = {"ids": torch.tensor([after], device=next(vlm.model.lm.parameters()).device)}
        else:
            inputs = {"inputs_embeds": self.prompt_embeds(text, cfg.max_new_tokens)}
        on_token = None
        shown, pieces = "", []
        if stream is not None and cfg.num_beams == 1:
            def on_token(token: Tensor) -> None:
                nonlocal shown
                pieces.append(int(token[0]))
                now = vlm.tokenizer.decode(pieces, skip_special_tokens=True).lstrip()
                if now.endswith("\ufffd"):  # an unfinished UTF-8 character: wait for its next byte
                    return
                if now.startswith(shown) and len(now) > len(shown):
                    stream(now[len(shown):])
                    shown = now
        out = generate(vlm.model.lm, config=cfg, on_token=on_token, **inputs)
        self.last_tokens = out.tokens[0, : int(out.lengths[0])].tolist()
        answer = vlm.decode(self.last_tokens)
        if stream is not None and answer.startswith(shown) and len(answer) > len(shown):
            stream(answer[len(shown):])
        self.messages += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
        return answer

    def prompt_embeds(self, text: str, max_new_tokens: int) -> Tensor:
        """(1, P, E): the next turn's prompt in the LLM's input embeddings, the visual prompt (if
        any) in place; the oldest exchanges dropped while it does not fit (`_fit`)."""
        before, after = self._fit(text, max_new_tokens)
        lm = self.vlm.model.lm
        device = next(lm.parameters()).device
        if self._pixels is None:
            return lm.embed(torch.tensor([after], device=device))
        visual = self.vlm.model.visual_prompt(self._pixels, **self._instruction(text))  # (1, Q, E)
        parts = [lm.embed(torch.tensor([ids], device=device)).to(visual.dtype) for ids in (before, after) if ids]
        parts.insert(1 if before else 0, visual)
        return torch.cat(parts, dim=1)

    def _instruction(self, text: str) -> dict[str, Tensor]:
        """What an instruction-aware model's queries read (InstructBLIP): the question the image came
        with, i.e. the first user turn kept (`text` itself in a new conversation). Nothing for others."""
        model = self.vlm.model
        if getattr(model, "instruction_proj", None) is None:
            return {}
        first = next((m["content"] for m in self.messages if m["role"] == "user"), text)
        # Blip2.visual_prompt keeps the Q-Former's context_length of it
        return {"instruction": torch.tensor([self.vlm.encode(first, specials=False)], device=self._pixels.device)}

    def save(self, path) -> Path:
        """The transcript as JSON: image, messages, dropped_turns."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        doc = {"image": self.image_source, "messages": self.messages, "dropped_turns": self.dropped_turns}
        path.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return path


def caption_folder(caption_many: Callable[..., list[str]], folder, out_jsonl, *, batch_size: int = 8,
                   progress: bool = False, on_error: Callable[[str, str], None] | None = None, **gen) -> dict:
    """Caption every image under `folder` (sorted) through caption_many(images, batch_size=..., **gen),
    `batch_size` at a time, appending {"path", "caption"} per line to `out_jsonl`, flushed after each
    batch. A rerun skips the paths already there (resumable); an image that cannot be read is
    skipped, reported to on_error(path, message) and counted."""
    out = Path(out_jsonl)
    paths, todo = pending_files(folder, out, IMAGE_SUFFIXES)
    skipped: list[dict] = []
    captioned = 0
    out.parent.mkdir(parents=True, exist_ok=True)
    with progress_bar(progress, len(todo), "captioning") as advance, open(out, "a", encoding="utf-8") as f:
        for start in range(0, len(todo), batch_size):
            batch, images = [], []
            for p in todo[start:start + batch_size]:
                try:
                    images.append(load_image(p))
                    batch.append(p)
                except ImageError as e:
                    skipped.append({"path": str(p), "error": str(e)})
                    if on_error is not None:
                        on_error(str(p), str(e))
            for p, text in zip(batch, caption_many(images, batch_size=batch_size, **gen), strict=True):
                f.write(json.dumps({"path": str(p), "caption": text}) + "\n")
            f.flush()
            captioned += len(batch)
            advance(len(todo[start:start + batch_size]))
    return {"out": str(out), "images": len(paths), "captioned": captioned,
            "already_done": len(paths) - len(todo), "skipped": skipped}


__all__ = ["VLM", "ChatSession", "caption_folder"]
