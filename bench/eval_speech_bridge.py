"""The speech bridge against the pipeline (transcribe, then type the transcript to the LLM), on held-out
spoken sentences (issue 12 part 5's figures).

    python bench/eval_speech_bridge.py --model runs/speech [--n 100] [--out speech_eval.json]

The sentences are the recipe's held-out ones (data/speech.split_of: never heard in training, in any
voice), each spoken once by espeak-ng in a voice drawn with another seed. The reference answer is the
frozen LLM's own greedy answer to the sentence typed (what the bridge was trained to reproduce);
both systems are scored against it:

- bridge:   [speech] -> the LLM (one pass, no text in between);
- pipeline: the same Whisper (tiny.en by default) transcribes the clip, the transcript is typed to
            the same LLM in the same chat template.

Reported: token-F1 and exact match with the reference, seconds per clip; and for "What did they
say?" the bridge's word error rate against Whisper's (against the true sentence). Every answer is cut
after its last full sentence, as the references are. Clips and references are kept in --work
(default MODEL/eval); the timed parts run every time.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path

import polymodal
from polymodal.checkpoints.speech_io import whisper_dir
from polymodal.data.speech import synthesize, voice_for
from polymodal.tasks.asr import normalise_words, word_error_rate
from polymodal.train.chat_rows import _whole_sentences
from polymodal.train.speech_bridge import SpeechRecipe, recipe_sentences, teacher_answers


def token_f1(prediction: str, reference: str) -> float:
    p, r = Counter(normalise_words(prediction)), Counter(normalise_words(reference))
    common = sum((p & r).values())
    if common == 0:
        return 0.0
    precision, recall = common / sum(p.values()), common / sum(r.values())
    return 2 * precision * recall / (precision + recall)


def exact(prediction: str, reference: str) -> float:
    return float(normalise_words(prediction) == normalise_words(reference))


def mean(xs: list[float]) -> float:
    return round(sum(xs) / max(1, len(xs)), 4)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="a speech bridge (polymodal train speech --out)")
    ap.add_argument("--n", type=int, default=100, help="held-out sentences to score")
    ap.add_argument("--work", type=Path, default=None, help="where clips, references and transcripts are kept")
    ap.add_argument("--out", type=Path, default=None, help="write the figures and every example as JSON")
    ap.add_argument("--seed", type=int, default=1, help="draws the held-out voices")
    args = ap.parse_args()

    recipe = SpeechRecipe.from_dict(json.loads((args.model / "recipe.json").read_text()))
    sentences = recipe_sentences(recipe, "eval")[: args.n]
    if not sentences:
        print(f"{args.model}: the recipe holds no sentence out (explicit texts, or held_out 0)", file=sys.stderr)
        return 2
    work = args.work or args.model / "eval"
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    clips = synthesize([(s, voice_for(rng)) for s in sentences], work / "clips")

    chat = polymodal.load_speech_chat(args.model)
    lm, tok, template = chat.model.lm, chat.tokenizer, chat.chat_template
    max_new = recipe.max_answer_tokens
    # one at a time, as the pipeline's answers are made (a padded batch can flip a greedy token)
    references = teacher_answers(sentences, lm, tok, template, max_new_tokens=max_new, batch_size=1,
                                 cache=work / "references.jsonl")
    asr = polymodal.load_asr(whisper_dir(recipe.whisper))

    rows = []
    bridge_s = pipeline_s = 0.0
    for i, (sentence, clip) in enumerate(zip(sentences, clips, strict=True)):
        t0 = time.perf_counter()
        bridge = _whole_sentences(chat.ask(clip, max_new_tokens=max_new))
        t1 = time.perf_counter()
        transcript = asr.transcribe(clip)["text"]
        piped = teacher_answers([transcript], lm, tok, template, max_new_tokens=max_new)[transcript]
        t2 = time.perf_counter()
        bridge_s, pipeline_s = bridge_s + t1 - t0, pipeline_s + t2 - t1
        heard = chat.transcribe(clip)
        ref = references[sentence]
        rows.append({"sentence": sentence, "reference": ref, "bridge": bridge, "pipeline": piped,
                     "whisper_transcript": transcript, "bridge_transcript": heard,
                     "bridge_f1": token_f1(bridge, ref), "pipeline_f1": token_f1(piped, ref),
                     "bridge_exact": exact(bridge, ref), "pipeline_exact": exact(piped, ref),
                     "bridge_wer": word_error_rate(sentence, heard), "whisper_wer": word_error_rate(sentence, transcript)})
        print(f"{i + 1}/{len(sentences)} {sentence!r}: bridge F1 {rows[-1]['bridge_f1']:.2f}, pipeline F1 "
              f"{rows[-1]['pipeline_f1']:.2f}", file=sys.stderr)

    figures = {"sentences": len(rows), "max_new_tokens": max_new,
               "bridge": {"token_f1": mean([r["bridge_f1"] for r in rows]),
                          "exact": mean([r["bridge_exact"] for r in rows]),
                          "wer_what_did_they_say": mean([r["bridge_wer"] for r in rows]),
                          "seconds_per_clip": round(bridge_s / len(rows), 3)},
               "pipeline": {"token_f1": mean([r["pipeline_f1"] for r in rows]),
                            "exact": mean([r["pipeline_exact"] for r in rows]),
                            "whisper_wer": mean([r["whisper_wer"] for r in rows]),
                            "seconds_per_clip": round(pipeline_s / len(rows), 3)}}
    print(f"held-out spoken sentences: {len(rows)} (reference: the LLM's answer to the typed sentence)")
    print(f"{'':10} {'token-F1':>9} {'exact':>7} {'WER':>7} {'s/clip':>7}")
    for name, wer in (("bridge", "wer_what_did_they_say"), ("pipeline", "whisper_wer")):
        f = figures[name]
        print(f"{name:10} {f['token_f1']:9.3f} {f['exact']:7.3f} {f[wer]:7.3f} {f['seconds_per_clip']:7.2f}")
    questions = [r for r in rows if r["sentence"].endswith("?")]
    others = [r for r in rows if not r["sentence"].endswith("?")]
    for label, part in (("questions", questions), ("instructions and captions", others)):
        if part:
            figures[label] = {"sentences": len(part), "bridge_f1": mean([r["bridge_f1"] for r in part]),
                              "pipeline_f1": mean([r["pipeline_f1"] for r in part])}
            print(f"{label}: {len(part)}, token-F1 bridge {figures[label]['bridge_f1']:.3f}, "
                  f"pipeline {figures[label]['pipeline_f1']:.3f}")
    if args.out:
        args.out.write_text(json.dumps({"figures": figures, "rows": rows}, indent=2, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
