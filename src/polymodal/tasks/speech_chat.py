"""Talking to the frozen LLM through the speech bridge (`polymodal.load_speech_chat`).

    chat = polymodal.load_speech_chat("runs/speech")
    chat.ask("question.wav")                          # answers what was said (a spoken question)
    chat.ask("clip.wav", "What did they ask for?")    # a question about the clip
    chat.transcribe("clip.wav")                       # "What did they say?"
    session = chat.chat("first.wav"); session.send(); session.send("And why?"); session.send(audio="next.wav")

The prompt is the LLM's chat template with the speech's soft prompt at the start of its user turn,
exactly where the recipe (train/speech_bridge.py) puts it: the rendered conversation is split at
AUDIO_PLACEHOLDER and the soft prompt goes in between. A spoken turn without text is the question
itself. A clip is encoded on a trimmed Whisper context (the clip + `context_pad` seconds, whole
seconds), the same rule in training and here (`speech_mel`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from polymodal.config import SpeechBridgeConfig
from polymodal.generation import GenerationConfig, generate
from polymodal.models.speech_bridge import SpeechBridge, SpeechFeatures
from polymodal.processing.audio import N_SAMPLES, SAMPLE_RATE, AudioError, audio_input, log_mel
from polymodal.processing.chat import apply_chat_template, template_tokens

AUDIO_PLACEHOLDER = "<|polymodal:audio|>"  # where a spoken turn's soft prompt goes in a rendered template
TRANSCRIBE_PROMPT = "What did they say?"
SILENCE_DBFS = -60.0


def context_seconds(samples: int, cfg: SpeechBridgeConfig) -> int:
    """Whole seconds of encoder context for a clip of `samples` (16 kHz): the clip and its padding."""
    return min(N_SAMPLES // SAMPLE_RATE, math.ceil(samples / SAMPLE_RATE + cfg.context_pad))


def speech_mel(audio: np.ndarray, cfg: SpeechBridgeConfig) -> Tensor:
    """(N,) 16 kHz -> (n_mels, 100 * context_seconds) log-mel: the clip, silence after it (cut at 30 s)."""
    return log_mel(audio, n_samples=context_seconds(audio.shape[0], cfg) * SAMPLE_RATE, n_mels=cfg.whisper.n_mels)


def load_speech(src) -> tuple[str, np.ndarray]:
    """A path or a (N,) 16 kHz array -> (name, waveform); AudioError (one line naming it) for unreadable
    or silent audio."""
    name, audio = audio_input(src)
    rms = float(np.sqrt(np.mean(np.square(audio, dtype=np.float64))))
    if 20.0 * math.log10(max(rms, 1e-12)) <= SILENCE_DBFS:
        raise AudioError(f"{name}: silent (below {SILENCE_DBFS:.0f} dBFS): nothing was said")
    if audio.shape[0] > N_SAMPLES:
        raise AudioError(f"{name}: {audio.shape[0] / SAMPLE_RATE:.1f} s is longer than the 30 s the speech "
                         "bridge reads at once; cut it, or transcribe it (`polymodal transcribe`)")
    return name, audio


@torch.no_grad()
def encode_clips(model: SpeechBridge, audios: list[np.ndarray], *, batch_size: int = 16,
                 on_progress: Callable[[int, int], None] | None = None) -> list[Tensor]:
    """The pooled encoder states (S_i, width) of every clip, float32 on the CPU. Clips of the same
    context length are encoded together, so batching changes no clip's states."""
    model.encoder.eval()
    p = model.encoder.conv1.weight
    out: list[Tensor | None] = [None] * len(audios)
    by_length: dict[int, list[int]] = {}
    for i, a in enumerate(audios):
        by_length.setdefault(context_seconds(a.shape[0], model.cfg), []).append(i)
    done = 0
    for _, rows in sorted(by_length.items()):
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            mel = torch.stack([speech_mel(audios[i], model.cfg) for i in chunk]).to(p.device, p.dtype)
            states = model.speech_states(mel).float().cpu()  # (b, S, width)
            for r, i in enumerate(chunk):
                out[i] = states[r]
            done += len(chunk)
            if on_progress is not None:
                on_progress(done, len(audios))
    return out


class SpeechChat:
    """A speech bridge with its LLM's tokenizer and chat template: `ask`, `transcribe`, `chat`."""

    def __init__(self, model: SpeechBridge, tokenizer, chat_template: str):
        self.model, self.tokenizer, self.chat_template = model, tokenizer, chat_template
        model.lm.for_decoding()

    @classmethod
    def from_pretrained(cls, path) -> SpeechChat:
        from polymodal.checkpoints.speech_io import load_speech_bridge

        return cls(*load_speech_bridge(path))

    @property
    def context_length(self) -> int:
        return self.model.cfg.lm.max_positions

    @property
    def num_queries(self) -> int:
        return self.model.cfg.qformer.num_query_tokens

    def generation_config(self, **options) -> GenerationConfig:
        lm = self.model.cfg.lm
        return GenerationConfig(eos_token_id=lm.eos_token_id, pad_token_id=lm.pad_token_id, **options)

    def soft_prompt(self, audio) -> Tensor:
        """A clip (path or (N,) 16 kHz array) -> its soft prompt (1, Q, embed_dim)."""
        _, wave = load_speech(audio)
        return self.model.prompt(SpeechFeatures(encode_clips(self.model, [wave])[0][None]))

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def ask(self, audio, question: str | None = None, **gen) -> str:
        """The answer to a spoken question (no `question`), or to `question` about the clip."""
        return self.chat().send(question, audio=audio, **gen)

    def transcribe(self, audio, **gen) -> str:
        """What was said, in the bridge's words (the recipe trains TRANSCRIBE_PROMPT on transcripts)."""
        return self.ask(audio, TRANSCRIBE_PROMPT, **{"max_new_tokens": 48, **gen})

    def chat(self, audio=None, *, on_note: Callable[[str], None] | None = None, **gen) -> SpeechChatSession:
        return SpeechChatSession(self, audio, on_note=on_note, **gen)


class SpeechChatSession:
    """A conversation whose user turns may be spoken (`send(audio=...)`), typed, or both. Every spoken
    turn keeps its soft prompt, at the start of its own user turn; when the prompt outgrows the LLM's
    context the oldest exchanges are dropped (on_note is told)."""

    def __init__(self, chat: SpeechChat, audio=None, *, on_note: Callable[[str], None] | None = None, **gen):
        self.speech, self.on_note, self.gen = chat, on_note, {"max_new_tokens": 64, **gen}
        self.messages: list[dict[str, str]] = []
        self.prompts: list[Tensor | None] = []  # per message: its soft prompt (1, Q, E), or None
        self.sources: list[str | None] = []
        self.dropped_turns = 0
        self.pending = None if audio is None else (self._source(audio), chat.soft_prompt(audio))

    @staticmethod
    def _source(audio) -> str:
        return str(audio) if isinstance(audio, (str, Path)) else "<audio>"

    def reset(self) -> None:
        self.messages, self.prompts, self.sources, self.dropped_turns = [], [], [], 0

    def segments(self, messages: list[dict[str, str]], spoken: list[bool]) -> list[list[int]]:
        """The token ids between the soft prompts of the conversation (one more than the spoken turns),
        with the assistant's header at the end."""
        rendered = [dict(m, content=(AUDIO_PLACEHOLDER if s else "") + m["content"])
                    for m, s in zip(messages, spoken, strict=True)]
        text = apply_chat_template(self.speech.chat_template, rendered, add_generation_prompt=True,
                                   **template_tokens(self.speech.tokenizer))
        return [self.speech.encode(part) for part in text.split(AUDIO_PLACEHOLDER)]

    @torch.no_grad()
    def send(self, text: str | None = None, *, audio=None, stream: Callable[[str], None] | None = None,
             **gen) -> str:
        """The answer to the next user turn: `text`, the spoken `audio` (or the clip the session was
        opened with), or both (the speech first). stream(piece) gets the answer as it grows."""
        text = (text or "").strip()
        source, prompt = (self._source(audio), self.speech.soft_prompt(audio)) if audio is not None else (None, None)
        if prompt is None and self.pending is not None:
            source, prompt = self.pending
        if prompt is None and not text:
            raise ValueError("nothing to answer: give a question, a clip, or both")
        if AUDIO_PLACEHOLDER in text:
            raise ValueError(f"the question holds {AUDIO_PLACEHOLDER!r}, which marks where speech goes")
        self.pending = None
        cfg = self.speech.generation_config(**{**self.gen, **gen})
        messages = self.messages + [{"role": "user", "content": text}]
        prompts = self.prompts + [prompt]
        while True:  # drop the oldest exchanges until the prompt fits
            segments = self.segments(messages, [p is not None for p in prompts])
            length = sum(map(len, segments)) + self.speech.num_queries * sum(p is not None for p in prompts)
            if length + cfg.max_new_tokens <= self.speech.context_length:
                break
            if len(messages) <= 1:
                raise ValueError(f"the prompt is too long: {length} tokens (soft prompts included) + "
                                 f"{cfg.max_new_tokens} new ones > the LLM's context of {self.speech.context_length}")
            messages, prompts = messages[2:], prompts[2:]
            self.messages, self.prompts, self.sources = self.messages[2:], self.prompts[2:], self.sources[2:]
            self.dropped_turns += 1
            if self.on_note is not None:
                self.on_note(f"the conversation outgrew the LLM's context ({self.speech.context_length} tokens): "
                             f"dropped its oldest exchange ({self.dropped_turns} dropped so far)")
        lm = self.speech.model.lm
        device = lm.token_embed.weight.device
        spoken = iter(p for p in prompts if p is not None)
        parts = []
        for k, ids in enumerate(segments):
            if k:
                parts.append(next(spoken).to(device))
            if ids:
                parts.append(lm.embed(torch.tensor([ids], device=device)))
        embeds = torch.cat([p.to(parts[0].dtype) for p in parts], dim=1)  # (1, P, E)
        shown, pieces = "", []

        def on_token(token: Tensor) -> None:
            nonlocal shown
            pieces.append(int(token[0]))
            now = self.speech.decode(pieces)
            if stream is not None and not now.endswith("\ufffd") and now.startswith(shown) and len(now) > len(shown):
                stream(now[len(shown):])
                shown = now

        out = generate(lm, inputs_embeds=embeds, config=cfg, on_token=on_token if cfg.num_beams == 1 else None)
        answer = self.speech.decode(out.tokens[0, : int(out.lengths[0])].tolist())
        if stream is not None and answer.startswith(shown) and len(answer) > len(shown):
            stream(answer[len(shown):])
        self.messages = messages + [{"role": "assistant", "content": answer}]
        self.prompts = prompts + [None]
        self.sources = self.sources + [source, None]
        return answer

    def save(self, path) -> Path:
        """The transcript as JSON: messages (a spoken turn names its clip), dropped_turns."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        messages = [dict(m, audio=s) if s else m for m, s in zip(self.messages, self.sources, strict=True)]
        path.write_text(json.dumps({"messages": messages, "dropped_turns": self.dropped_turns}, indent=2,
                                   ensure_ascii=False) + "\n", encoding="utf-8")
        return path


class TranscriptChat:
    """The pipeline, no bridge: Whisper transcribes each spoken turn and the LLM reads the words, in
    its chat template (a clip with a question is put to it as the speech recipe's teacher is asked:
    ABOUT_TEACHER). The same `ask` / `chat` as SpeechChat; `polymodal ask --audio` and `chat --audio`
    use it when no --speech-model is given. Against the small bridge trained here it is slower and
    the only one to give exact answers; the bridge does better on spoken questions (MODEL_CARD.md)."""

    def __init__(self, asr, vlm):
        self.asr, self.vlm = asr, vlm

    @classmethod
    def default(cls) -> TranscriptChat:
        """The shipped Whisper tiny.en and the default VLM's SmolLM2 (it answers as the bare LLM when
        no image is given)."""
        import polymodal

        return cls(polymodal.load_asr(), polymodal.load_vlm())

    def transcribe(self, audio) -> str:
        _, wave = load_speech(audio)
        return self.asr.transcribe(wave)["text"]

    def ask(self, audio, question: str | None = None, **gen) -> str:
        """The answer to a spoken question (no `question`), or to `question` about the clip."""
        return self.chat().send(question, audio=audio, **gen)

    def chat(self, audio=None, *, on_note: Callable[[str], None] | None = None, **gen) -> TranscriptChatSession:
        return TranscriptChatSession(self, audio, on_note=on_note, **gen)


class TranscriptChatSession:
    """A conversation of typed and spoken turns; a spoken turn reaches the LLM as its transcript
    (kept in the saved conversation, with the clip it came from)."""

    def __init__(self, chat: TranscriptChat, audio=None, *, on_note: Callable[[str], None] | None = None, **gen):
        self.pipeline = chat
        self.session = chat.vlm.chat(None, on_note=on_note, **{"max_new_tokens": 64, **gen})
        self.pending = audio
        self.sources: list[str] = []

    def reset(self) -> None:
        self.session.reset()
        self.sources = []

    def send(self, text: str | None = None, *, audio=None, stream: Callable[[str], None] | None = None,
             **gen) -> str:
        """The answer to `text`, the spoken `audio` (or the clip the session was opened with), or both."""
        from polymodal.train.speech_bridge import ABOUT_TEACHER

        audio = audio if audio is not None else self.pending
        self.pending = None
        if audio is None:
            return self.session.send(text, stream=stream, **gen)
        heard = self.pipeline.transcribe(audio)
        if not heard:
            raise AudioError(f"{SpeechChatSession._source(audio)}: no words heard")
        message = heard if not (text and text.strip()) else ABOUT_TEACHER.format(sentence=heard, question=text.strip())
        self.sources.append(SpeechChatSession._source(audio))
        return self.session.send(message, stream=stream, **gen)

    def save(self, path) -> Path:
        """The conversation as JSON (the VLM chat's transcript), with the clips the spoken turns came from."""
        path = self.session.save(path)
        doc = json.loads(path.read_text())
        doc["audio"] = self.sources
        path.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
        return path


__all__ = ["AUDIO_PLACEHOLDER", "TRANSCRIBE_PROMPT", "SpeechChat", "SpeechChatSession", "TranscriptChat",
           "TranscriptChatSession", "context_seconds", "encode_clips", "load_speech", "speech_mel"]
