"""Word error rate: how far a transcript is from what was said, on normalised words."""

from __future__ import annotations


def normalise_words(text: str) -> list[str]:
    """Lower case, punctuation dropped (apostrophes kept inside words), split on spaces and hyphens."""
    import re

    text = re.sub(r"[^a-z0-9' ]+", " ", text.lower().replace("-", " "))
    return [w.strip("'") for w in text.split() if w.strip("'")]


def word_error_rate(reference: str, hypothesis: str) -> float:
    """(substitutions + deletions + insertions) / reference words, on normalised words."""
    ref, hyp = normalise_words(reference), normalise_words(hypothesis)
    if not ref:
        return float(bool(hyp))
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1] / len(ref)


__all__ = ["normalise_words", "word_error_rate"]
