"""Chat-formatted training rows for a bridge into a frozen chat LLM, shared by the default-VLM recipe
(train/vlm.py) and the speech recipe (train/speech_bridge.py).

- `ChatFormat` renders a conversation about a soft prompt exactly as the chat sessions do, and says
  where every answer lies (what the loss reads).
- `followup_chats` self-distils two-turn chats from the frozen LLM itself, cached as JSON lines.
- `chat_loss`: cross-entropy of the answers, the template before the soft prompt run once without
  gradients into the KV cache, only answer positions through the LLM's head.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from polymodal.models.lm import IGNORE_INDEX
from polymodal.processing.chat import apply_chat_template, template_tokens
from polymodal.tasks.vlm import IMAGE_PLACEHOLDER


class ChatFormat:
    """Token ids of a one-turn chat about an image, as `ChatSession` renders it: the template is split
    at IMAGE_PLACEHOLDER into `before` (the same for every question) and the question's part after."""

    def __init__(self, tokenizer, chat_template: str, eos_id: int):
        self.tokenizer, self.template, self.eos_id = tokenizer, chat_template, eos_id
        self.before = self._split("?")[0]

    def _split(self, question: str) -> tuple[list[int], list[int]]:
        text = apply_chat_template(self.template, [{"role": "user", "content": IMAGE_PLACEHOLDER + question}],
                                   add_generation_prompt=True, **template_tokens(self.tokenizer))
        before, after = text.split(IMAGE_PLACEHOLDER, 1)
        encode = self.tokenizer.backend.encode
        return encode(before, add_special_tokens=False).ids, encode(after, add_special_tokens=False).ids

    def row(self, question: str, answer: str) -> tuple[list[int], int]:
        """The ids after the visual prompt (question turn, answer, end of turn) and where the answer starts."""
        ids, spans = self.turns([(question, answer)])
        return ids, spans[0][0]

    def turns(self, pairs: list[tuple[str, str]]) -> tuple[list[int], list[tuple[int, int]]]:
        """A conversation of (question, answer) turns about the image, as `ChatSession` renders its
        history: the ids after the visual prompt, and the (start, end) span of every answer with its
        end-of-turn token (what the loss reads)."""
        ids: list[int] = []
        spans: list[tuple[int, int]] = []
        messages: list[dict[str, str]] = []
        encode = self.tokenizer.backend.encode
        for question, answer in pairs:
            content = (IMAGE_PLACEHOLDER if not messages else "") + question
            messages.append({"role": "user", "content": content})
            text = apply_chat_template(self.template, messages, add_generation_prompt=True,
                                       **template_tokens(self.tokenizer))
            before, after = text.split(IMAGE_PLACEHOLDER, 1)
            prompt = encode(after, add_special_tokens=False).ids
            if encode(before, add_special_tokens=False).ids != self.before or prompt[:len(ids)] != ids:
                raise ValueError("the chat template renders an earlier turn differently in a later one")
            answer_ids = encode(answer, add_special_tokens=False).ids + [self.eos_id]
            spans.append((len(prompt), len(prompt) + len(answer_ids)))
            ids = prompt + answer_ids
            messages.append({"role": "assistant", "content": answer})
        return ids, spans


# Follow-up questions whose answers need the LLM's own knowledge of the thing in the image.
FOLLOWUPS = ("What is it usually used for?", "Tell me one interesting fact about it.",
             "Where would you usually see one?", "What colour is it usually?", "Describe it in one sentence.")


def _whole_sentences(text: str, *, truncated: bool | None = None) -> str:
    """`text` cut after its last full sentence: an answer stopped by max_new_tokens. truncated=True
    (known cut): "" when no full sentence is left; False (known whole): `text` as it is; None
    (unknown): cut when there is a full sentence to cut after, else `text` as it is."""
    text = text.strip()
    if text.endswith((".", "!", "?")) or truncated is False:
        return text
    end = max(text.rfind(". "), text.rfind("! "), text.rfind("? "))
    if end >= 0:
        return text[:end + 1]
    return "" if truncated else text


@torch.no_grad()
def followup_chats(examples: list[dict], lm, tokenizer, template: str, *, count: int, seed: int,
                   max_new_tokens: int = 32, batch_size: int = 8, cache: Path | None = None,
                   on_progress: Callable[[int, int], None] | None = None) -> list[dict]:
    """Two-turn chats about named examples, self-distilled from the frozen LLM: "What is this?" ->
    the name, then a follow-up from FOLLOWUPS -> the LLM's own answer when the picture is given to it
    in words. Training on them keeps the visual prompt from drowning out the LLM's knowledge in later
    turns. Returns [{"example": index, "turns": [[q, a], [q, a]]}], kept in `cache` (JSON lines) so a
    rerun does not generate them again."""
    from polymodal.generation import generate

    rng = random.Random(seed)
    named = [i for i, ex in enumerate(examples) if ex.get("name")]
    picked = rng.sample(named, min(count, len(named)))
    asks = [(i, rng.choice(FOLLOWUPS)) for i in picked]
    done: dict[tuple[str, str], dict] = {}
    if cache is not None and cache.is_file():
        for line in cache.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            done[(row["image"], row["turns"][1][0])] = row
    todo = [(i, q) for i, q in asks if (examples[i]["image"], q) not in done]
    encode = tokenizer.backend.encode
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        prompts = []
        for i, q in chunk:
            name = examples[i]["name"]
            messages = [{"role": "user", "content": f"I am showing you a picture of {name}. What is this?"},
                        {"role": "assistant", "content": name}, {"role": "user", "content": q}]
            text = apply_chat_template(template, messages, add_generation_prompt=True, **template_tokens(tokenizer))
            prompts.append(encode(text, add_special_tokens=False).ids)
        width = max(len(p) for p in prompts)  # left padding
        ids = torch.full((len(prompts), width), tokenizer.pad_id or 0, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, p in enumerate(prompts):
            ids[r, width - len(p):] = torch.tensor(p)
            mask[r, width - len(p):] = 1
        out = generate(lm, ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                       eos_token_id=tuple(lm.cfg.eos_ids))
        rows = []
        for r, (i, q) in enumerate(chunk):
            length = int(out.lengths[r])
            answer = _whole_sentences(tokenizer.decode(out.tokens[r, :length].tolist(), skip_special_tokens=True),
                                      truncated=length >= max_new_tokens)
            row = {"image": examples[i]["image"], "turns": [["What is this?", examples[i]["name"]], [q, answer]]}
            done[(row["image"], q)] = row
            rows.append(row)
        if cache is not None:
            with open(cache, "a", encoding="utf-8") as f:
                f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        if on_progress is not None:
            on_progress(min(start + batch_size, len(todo)), len(todo))
    return [{"example": i, "turns": done[(examples[i]["image"], q)]["turns"]} for i, q in asks
            if done[(examples[i]["image"], q)]["turns"][1][1]]



def chat_loss(model, prefix: list[int], features: Tensor, input_ids: Tensor, targets: Tensor,
              instruction: Tensor | None = None, instruction_mask: Tensor | None = None) -> Tensor:
    """Cross-entropy of the answers in [prefix; visual prompt; input_ids]. The prefix is the same for
    every row and frozen, so its keys and values are computed without gradients into the KV cache;
    only the positions that predict an answer token go through the LLM's head. instruction,
    instruction_mask (B, T'): the question an instruction-aware model's queries read."""
    lm = model.lm
    extra = {} if instruction is None else {"instruction": instruction, "instruction_mask": instruction_mask}
    visual = model.visual_prompt(None, features=features, **extra)  # (B, Q, E)
    B, Q, T, P = visual.shape[0], visual.shape[1], input_ids.shape[1], len(prefix)
    cache = lm.new_cache(B, P + Q + T, dtype=visual.dtype, device=visual.device)
    with torch.no_grad():
        lm(torch.tensor([prefix], device=visual.device).expand(B, P), cache=cache, logits=False)
    x = torch.cat([visual, lm.embed(input_ids).to(visual.dtype)], dim=1)  # (B, Q + T, E)
    hidden = lm(inputs_embeds=x, cache=cache, logits=False).hidden  # (B, Q + T, E)
    keep = targets != IGNORE_INDEX  # (B, T): position Q - 1 + t predicts input_ids[:, t]
    return F.cross_entropy(lm.head(hidden[:, Q - 1:-1][keep]).float(), targets[keep])




__all__ = ["ChatFormat", "FOLLOWUPS", "followup_chats", "chat_loss"]
