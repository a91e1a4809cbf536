"""Transcription speed with the real Whisper tiny.en: polymodal against transformers (same weights,
this process) and faster-whisper (CTranslate2, the very same model.bin) in float32 and int8.

    nice .venv/bin/python bench/transcribe.py [--long-sentences 24] [--gap 6] [--clips 16] [--repeats 2]

The speech is spoken by espeak-ng: one long recording (a sentence every --gap seconds: 6 s leaves
about 3.5 s of silence after each sentence, 3 s is talk with short pauses) and a folder of short
clips (2-3 s each). Every contender starts from the files, greedy, no
temperature fallback, no conditioning on the previous window, no voice-activity filter:
  - polymodal: `ASR.transcribe(long)` (the default long form: cut at quiet points, 8 chunks decoded
    at once), and with `long_form="sequential"` (OpenAI's long form); `transcribe_folder` (clips
    batched 8 at a time), with the full 30 s encoder window and with the trimmed context
    (`audio_ctx=10`, opt-in);
  - transformers: WhisperForConditionalGeneration on our weights (`to_transformers`), long-form
    `generate(return_timestamps=True)` over the whole recording (its sequential long form); and the
    very chunks of our default form, batched 8 at a time (the same work); short clips batched 8 at a
    time;
  - faster-whisper: `WhisperModel(model.bin's directory, compute_type=float32 | int8)`, one clip
    at a time (its WhisperModel has no batching without VAD), in a child process (`FasterWhisper`
    says why), on the same number of threads.
Speed is seconds of audio per second of wall time (median of --repeats, contenders alternated);
ratios are polymodal / contender. Word error rate is against the sentences spoken.
faster-whisper is a bench-only extra: `pip install faster-whisper` (skipped when missing).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

SENTENCES = [
    "Hello, how are you today?", "The weather is nice and sunny this morning.",
    "Please open the window and let the fresh air in.", "I would like a cup of coffee with milk.",
    "The train to London leaves at seven o'clock.", "My brother plays the guitar every evening.",
    "We need to buy bread, eggs and butter.", "The children are playing in the garden.",
    "Thank you very much for your help.", "The meeting will start in ten minutes.",
    "She reads a book before going to sleep.", "Our team won the football match on Sunday.",
    "Turn left at the next traffic light.", "The museum is closed on Mondays.",
    "Could you send me the report by Friday?", "The cat is sleeping on the sofa.",
]


def speak(text: str, path: Path) -> Path:
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(path), text], check=True)
    return path


def make_data(root: Path, long_sentences: int, clips: int, gap: float = 6.0):
    from polymodal.processing.audio import load_audio

    (root / "clips").mkdir(parents=True)
    clip_paths, clip_refs = [], []
    for i in range(clips):
        text = SENTENCES[i % len(SENTENCES)]
        clip_paths.append(speak(text, root / "clips" / f"clip{i:03d}.wav"))
        clip_refs.append(text)
    parts, refs = [], []
    for i in range(long_sentences):
        text = SENTENCES[i % len(SENTENCES)]
        a = load_audio(speak(text, root / "tmp.wav"))
        parts += [a, np.zeros(max(0, int(gap * 16000) - a.shape[0]), np.float32)]
        refs.append(text)
    long = root / "long.wav"
    sf.write(long, np.concatenate(parts), 16000)
    return long, " ".join(refs), clip_paths, clip_refs


def _faster_whisper_worker(conn, model_dir: str, kind: str, threads: int, long: str, clips: list[str]) -> None:
    from faster_whisper import WhisperModel

    fw = WhisperModel(model_dir, device="cpu", compute_type=kind, cpu_threads=threads)
    opts = dict(beam_size=1, temperature=0.0, condition_on_previous_text=False, vad_filter=False, language="en")
    while (task := conn.recv()) is not None:  # None: the parent is done
        if task == "long":
            conn.send(" ".join(s.text.strip() for s in fw.transcribe(long, **opts)[0]).strip())
        else:
            conn.send([" ".join(s.text.strip() for s in fw.transcribe(p, without_timestamps=True, **opts)[0])
                       for p in clips])


class FasterWhisper:
    """faster-whisper in a child process. In this one, once CTranslate2's own OpenMP threads had run,
    torch's ran slower for the rest of the process (the same polymodal transcription: 4.6 s before a
    faster-whisper run, 5.5-6.4 s after, with ten times the system time), so every contender after
    it paid for it. The pipe costs a few milliseconds a call."""

    def __init__(self, model_dir, kind: str, threads: int, long: Path, clips: list[Path]):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_faster_whisper_worker, daemon=True,
                                args=(child, str(model_dir), kind, threads, str(long), [str(p) for p in clips]))
        self.proc.start()

    def long(self) -> str:
        self.conn.send("long")
        return self.conn.recv()

    def clips(self) -> list[str]:
        self.conn.send("clips")
        return self.conn.recv()

    def close(self) -> None:
        self.conn.send(None)
        self.proc.join(timeout=10)


def seconds_of(paths) -> float:
    return sum(sf.info(p).duration for p in paths)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--long-sentences", type=int, default=24)
    ap.add_argument("--gap", type=float, default=6.0, help="Seconds from one sentence's start to the next's.")
    ap.add_argument("--clips", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None, help="Also write the figures here.")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if shutil.which("espeak-ng") is None:
        sys.exit("espeak-ng is needed to speak the test audio (apt-get install espeak-ng)")

    from polymodal.checkpoints.hf_whisper import to_transformers
    from polymodal.processing.audio import load_audio, log_mel, quiet_spans
    from polymodal.tasks.asr import ASR, SILENCE_DBFS, dbfs, default_asr_dir, word_error_rate

    model_dir = default_asr_dir()
    asr = ASR.from_pretrained(model_dir)
    hf = to_transformers(asr.model)
    import transformers

    fe = transformers.WhisperFeatureExtractor()
    root = Path(tempfile.mkdtemp(prefix="bench-asr-"))
    long, long_ref, clips, clip_refs = make_data(root, args.long_sentences, args.clips, args.gap)
    long_s, clips_s = seconds_of([long]), seconds_of(clips)
    out_jsonl = root / "t.jsonl"

    # --- the contenders: each returns (long text) or (list of clip texts) ---------------------
    def ours_long():
        return asr.transcribe(long, batch_size=8)["text"]

    def ours_sequential():
        return asr.transcribe(long, long_form="sequential")["text"]

    def ours_clips(ctx=None):
        out_jsonl.unlink(missing_ok=True)
        asr.transcribe_folder(root / "clips", out_jsonl, audio_ctx=ctx, batch_size=8)
        rows = {json.loads(x)["path"]: json.loads(x)["text"] for x in out_jsonl.read_text().splitlines()}
        return [rows[str(p)] for p in clips]

    def hf_decode(ids):
        return [asr.decode(r) for r in ids.tolist()]

    def hf_long():
        a = load_audio(long)
        feats = fe(a, sampling_rate=16000, return_tensors="pt", truncation=False, padding="longest",
                   return_attention_mask=True)
        with torch.no_grad():
            ids = hf.generate(feats.input_features, attention_mask=feats.attention_mask, return_timestamps=True,
                              condition_on_prev_tokens=False)
        return " ".join(hf_decode(ids)).strip()

    def hf_chunked():  # the very chunks of our default form, batched 8 at a time: the same work
        a = load_audio(long)
        chunks = [a[x:y] for x, y in quiet_spans(a) if dbfs(a[x:y]) > SILENCE_DBFS]
        texts = []
        for i in range(0, len(chunks), 8):
            feats = log_mel(torch.nn.utils.rnn.pad_sequence([torch.from_numpy(c) for c in chunks[i:i + 8]],
                                                            batch_first=True))
            with torch.no_grad():
                texts += hf_decode(hf.generate(feats, return_timestamps=True))
        return " ".join(texts).strip()

    def hf_clips():
        texts = []
        for i in range(0, len(clips), 8):
            feats = log_mel(torch.nn.utils.rnn.pad_sequence(
                [torch.from_numpy(load_audio(p)) for p in clips[i:i + 8]], batch_first=True))
            with torch.no_grad():
                texts += hf_decode(hf.generate(feats))
        return texts

    contenders = {"polymodal": (ours_long, ours_clips), "polymodal sequential": (ours_sequential, None),
                  "polymodal audio_ctx=10": (None, lambda: ours_clips(10.0)),
                  "transformers": (hf_long, hf_clips), "transformers on our chunks": (hf_chunked, None)}
    workers: list[FasterWhisper] = []
    try:
        import faster_whisper  # noqa: F401  (only to know it is there; it runs in a child process)

        for kind in ("float32", "int8"):
            worker = FasterWhisper(model_dir, kind, args.threads, long, clips)
            contenders[f"faster-whisper {kind}"] = (worker.long, worker.clips)
            workers.append(worker)
    except ImportError:
        print("faster-whisper is not installed: `pip install faster-whisper` to compare (skipped)")

    print(f"Whisper tiny.en ({model_dir}), {args.threads} threads, torch {torch.__version__}; "
          f"long recording {long_s:.0f} s ({args.long_sentences} sentences), {len(clips)} clips ({clips_s:.0f} s)")
    times: dict[tuple[str, str], list[float]] = {}
    texts: dict[tuple[str, str], object] = {}
    for rep in range(args.repeats + 1):  # the first round warms up (and gives the texts)
        for name, (fl, fc) in contenders.items():
            for kind, fn in (("long", fl), ("clips", fc)):
                if fn is None:
                    continue
                time.sleep(0.5)  # let the last contender's threads (another process's too) go idle
                t0 = time.perf_counter()
                result = fn()
                dt = time.perf_counter() - t0
                if rep == 0:
                    texts[name, kind] = result
                else:
                    times.setdefault((name, kind), []).append(dt)

    figures = {}
    print(f"\n{'contender':28s} {'task':6s} {'audio s/s':>10s} {'polymodal x':>12s} {'sequential x':>13s} "
          f"{'WER':>6s}")
    sequential = "polymodal sequential"
    for kind, audio_s in (("long", long_s), ("clips", clips_s)):
        base = statistics.median(times["polymodal", kind])
        base_seq = statistics.median(times[sequential, kind]) if (sequential, kind) in times else None
        for name in contenders:
            if (name, kind) not in times:
                continue
            t = statistics.median(times[name, kind])
            text = texts[name, kind]
            if kind == "long":
                wer = word_error_rate(long_ref, text)
            else:
                wer = float(np.mean([word_error_rate(r, h) for r, h in zip(clip_refs, text, strict=True)]))
            figures[f"{name} / {kind}"] = {"audio_per_s": audio_s / t, "polymodal_ratio": t / base, "wer": wer}
            vs_seq = f"{t / base_seq:13.2f}" if base_seq else " " * 13
            if base_seq:
                figures[f"{name} / {kind}"]["sequential_ratio"] = t / base_seq
            print(f"{name:28s} {kind:6s} {audio_s / t:10.2f} {t / base:12.2f} {vs_seq} {wer:6.3f}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    for worker in workers:
        worker.close()
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
