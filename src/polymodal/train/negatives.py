"""Hard negative captions: the caption with one word changed so that it no longer fits the picture.

Yuksekgonul et al. 2023, "When and why vision-language models behave like bags-of-words" (NegCLIP):
contrastive training only needs what tells the batch's pictures apart, and in a random batch
colours alone usually do, so the image tower never learns shapes, counts or left from right. Each
image is also scored against a copy of its own caption with one shape, colour, count or relation
changed ("two red circles left of a blue square" -> "two red circles right of a blue square"), and
must prefer the true one. The loss side is `ClipLoss(negatives=...)`.

Only the words of the contrast sets below are changed, so captions without any (most emoji names)
get no negative and train as before.
"""

from __future__ import annotations

import random
import re
from collections.abc import Collection

SHAPES = ("circle", "square", "triangle", "star")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
COUNTS = ("one", "two", "three", "four")
FLIPS = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}

_WORD = re.compile(r"\b(left of|right of|above|below|[a-z]+)\b")
_NOUNS = {*SHAPES, "shape"}


def _noun(word: str) -> tuple[str, bool] | None:
    """'circles' -> ('circle', True); 'shape' -> ('shape', False); other words -> None."""
    if word in _NOUNS:
        return word, False
    if word.endswith("s") and word[:-1] in _NOUNS:
        return word[:-1], True
    return None


def _edits(words: list[str]) -> list[tuple[str, int]]:
    """Every change this caption allows: (kind, index of the word)."""
    edits = []
    for i, w in enumerate(words):
        noun = _noun(w)
        if noun and noun[0] != "shape":
            edits.append(("shape", i))
        elif w in COLOURS:
            edits.append(("colour", i))
        elif w in FLIPS:
            edits.append(("relation", i))
        elif w in COUNTS and any(_noun(x) for x in words[i + 1:i + 3]):
            edits.append(("count", i))  # it counts a noun ('two red circles', 'one shape')
    return edits


def hard_negative(text: str, rng: random.Random, kinds: Collection[str] | None = None) -> str | None:
    """`text` with one shape, colour, count or relation changed, or None when it has none of them.

    The kind of change is drawn first, uniformly among those the caption allows, then the word.
    Counts keep the grammar: 'one shape' -> 'three shapes', 'two red circles' -> 'one red circle'.
    kinds: only these kinds of change ("shape", "colour", "count", "relation"), e.g. to measure each.
    """
    parts = _WORD.split(text)  # odd indices are the matched words
    words = parts[1::2]
    edits = [(k, i) for k, i in _edits(words) if kinds is None or k in kinds]
    if not edits:
        return None
    kinds = sorted({k for k, _ in edits})  # a kind first, so four colour words do not crowd out one count
    kind = kinds[rng.randrange(len(kinds))]
    i = rng.choice([j for k, j in edits if k == kind])
    w = words[i]
    if kind == "shape":
        shape, plural = _noun(w)
        new = rng.choice([s for s in SHAPES if s != shape])
        words[i] = new + "s" if plural else new
    elif kind == "colour":
        words[i] = rng.choice([c for c in COLOURS if c != w])
    elif kind == "relation":
        words[i] = FLIPS[w]
    else:
        words[i] = new = rng.choice([c for c in COUNTS if c != w])
        for j in range(i + 1, min(i + 3, len(words))):  # the counted noun agrees with its new number
            noun = _noun(words[j])
            if noun:
                words[j] = noun[0] if new == "one" else noun[0] + "s"
                break
    parts[1::2] = words
    return "".join(parts)


KINDS = ("shape", "colour", "count", "relation")

__all__ = ["hard_negative", "KINDS", "SHAPES", "COLOURS", "COUNTS", "FLIPS"]
