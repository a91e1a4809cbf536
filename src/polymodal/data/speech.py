"""Spoken sentences for the speech bridge: questions, instructions and captions, spoken by espeak-ng.

`sentences(n, seed)` builds `n` distinct English sentences, deterministically: questions and
instructions from templates over everyday words (assets/keywords/words.txt) and numbers, and the
captions and questions of our generated scenes (data/scenes.py). `split_of(sentence)` holds a
sentence out by a hash of its text, so a held-out sentence is never heard in training, in any voice.
`voice_for(rng)` draws an espeak-ng voice (accent and variant), a speed and a pitch; `synthesize`
speaks each (sentence, voice) once into a WAV file named by both, so a rerun finds it there.
"""

from __future__ import annotations

import hashlib
import random
import shutil
import subprocess
from collections.abc import Callable
from importlib import resources
from pathlib import Path

SPLIT_SALT = "speech-v1"

ACCENTS = ("en-us", "en-gb", "en-gb-x-rp", "en-gb-scotland", "en-029", "en-gb-x-gbclan", "en-us-nyc")
VARIANTS = ("", "+m1", "+m2", "+m3", "+m4", "+m5", "+f1", "+f2", "+f3", "+f4", "+klatt", "+klatt2")

QUESTIONS = (
    "What is a {a}?", "Tell me something about a {a}.", "Describe a {a} in one sentence.",
    "What colour is a {a} usually?", "Where would I usually find a {a}?", "What is a {a} used for?",
    "Is a {a} bigger than a {b}?", "Which is heavier, a {a} or a {b}?", "What is the plural of {a}?",
    "How do you spell {a}?", "What rhymes with {a}?", "What does the word {a} mean?",
    "Can a {a} fit inside a {b}?", "What do a {a} and a {b} have in common?", "Why do people like a {a}?",
)
INSTRUCTIONS = (
    "Write a short poem about a {a}.", "Tell me a joke about a {a}.", "List three things you can do with a {a}.",
    "Give me a fun fact about a {a}.", "Write one sentence about a {a} and a {b}.",
    "Name something that goes well with a {a}.", "Say hello to the {a}.", "Write a title for a story about a {a}.",
    "Describe a {a} to a child.", "Give me three words that describe a {a}.",
)
ARITHMETIC = ("What is {x} plus {y}?", "What is {x} times {y}?", "What is {y} minus {x}?", "Count from {x} to {y}.")
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve")


def keywords() -> list[str]:
    """Everyday words and short phrases (the default clustering vocabulary)."""
    text = (resources.files("polymodal") / "assets" / "keywords" / "words.txt").read_text(encoding="utf-8")
    return [w.strip() for w in text.splitlines() if w.strip() and not w.startswith("#")]


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]


def scene_sentences(count: int, seed: int) -> list[str]:
    """Captions and questions of generated scenes (shapes, colours, counts, positions)."""
    from polymodal.data.scenes import draw_scene

    out: list[str] = []
    i = 0
    while len(out) < count:
        _, scene = draw_scene(seed, i, size=8)
        out += [_capital(c) + "." for c in scene["captions"][:2]] + [_capital(qa["q"]) for qa in scene["qa"][:2]]
        i += 1
    return out[:count]


def sentences(n: int, seed: int = 0, *, scene_share: float = 0.2) -> list[str]:
    """`n` distinct sentences: about 45% questions, 25% instructions, 10% arithmetic, `scene_share`
    scene captions and questions, in a seeded order."""
    rng = random.Random(seed)
    words = keywords()
    found: dict[str, None] = {}
    for s in scene_sentences(int(n * scene_share), seed):
        found.setdefault(s)
    tries = 0
    while len(found) < n:
        tries += 1
        if tries > 50 * n:
            raise ValueError(f"cannot build {n} distinct sentences from the templates")
        a, b = rng.sample(words, 2)
        kind = rng.random()
        if kind < 0.56:
            s = rng.choice(QUESTIONS).format(a=a, b=b)
        elif kind < 0.87:
            s = rng.choice(INSTRUCTIONS).format(a=a, b=b)
        else:
            x, y = sorted(rng.sample(range(len(NUMBERS)), 2))
            s = rng.choice(ARITHMETIC).format(x=NUMBERS[x], y=NUMBERS[y])
        found.setdefault(s.replace(" a a", " an a").replace(" a e", " an e").replace(" a i", " an i")
                         .replace(" a o", " an o").replace(" a u", " an u"))
    out = list(found)
    rng.shuffle(out)
    return out


def split_of(sentence: str, held_out: float = 0.1) -> str:
    """'eval' for a fixed `held_out` share of sentences (by a hash of the text), else 'train'."""
    h = int.from_bytes(hashlib.sha256(f"{SPLIT_SALT}:{sentence}".encode()).digest()[:8], "big")
    return "eval" if h / 2**64 < held_out else "train"


def voice_for(rng: random.Random) -> dict:
    """An espeak-ng voice: accent + variant, words per minute, pitch (0-99)."""
    return {"voice": rng.choice(ACCENTS) + rng.choice(VARIANTS), "speed": rng.randint(120, 220),
            "pitch": rng.randint(25, 75)}


def espeak() -> str:
    path = shutil.which("espeak-ng") or shutil.which("espeak")
    if path is None:
        raise ValueError("espeak-ng is not installed: `apt-get install espeak-ng` (Debian) to synthesise speech")
    return path


def clip_name(sentence: str, voice: dict) -> str:
    key = f"{sentence}|{voice['voice']}|{voice['speed']}|{voice['pitch']}"
    return hashlib.sha256(key.encode()).hexdigest()[:20] + ".wav"


def speak(sentence: str, voice: dict, out: Path) -> Path:
    """One sentence into a WAV file (22,050 Hz mono), written whole or not at all."""
    tmp = out.with_suffix(".tmp.wav")
    run = subprocess.run([espeak(), "-v", voice["voice"], "-s", str(voice["speed"]), "-p", str(voice["pitch"]),
                          "-w", str(tmp), sentence], capture_output=True, text=True)
    if run.returncode != 0 or not tmp.is_file():
        raise ValueError(f"espeak-ng failed on voice {voice['voice']!r}: {run.stderr.strip() or run.returncode}")
    tmp.replace(out)
    return out


def synthesize(items: list[tuple[str, dict]], folder: Path,
               on_progress: Callable[[int, int], None] | None = None) -> list[Path]:
    """Speak every (sentence, voice) into `folder`, skipping the clips already there."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (sentence, voice) in enumerate(items):
        path = folder / clip_name(sentence, voice)
        if not path.is_file():
            speak(sentence, voice, path)
        paths.append(path)
        if on_progress is not None and ((i + 1) % 50 == 0 or i + 1 == len(items)):
            on_progress(i + 1, len(items))
    return paths


__all__ = ["ACCENTS", "VARIANTS", "clip_name", "keywords", "sentences", "speak", "split_of", "synthesize",
           "voice_for"]
