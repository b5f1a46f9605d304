"""Accuracy on the world's questions (how many, which, where) with answer normalisation
(docs/DESIGN.md, "Evaluation").

The world answers in short sentences ("Two.", "No.", "The red ball.", "Near the floor on the
left."); a model may say "2", "two times" or "on the left, near the floor". Normalising: lower
case, punctuation and filler words dropped (articles, "ball(s)", "and", "times"), number words and
"once"/"twice"/"none"/"no" as digits; two answers match when their remaining words are the same
multiset (order-free, so "red and blue" = "blue and red"). A counting answer also matches a
longer prediction whose first number is the same ("It hits the floor 2 times.").
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

_NUMBER_WORDS = {
    "no": 0, "none": 0, "zero": 0, "once": 1, "one": 1, "twice": 2, "two": 2, "three": 3, "four": 4,
    "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10,
}  # fmt: skip
_FILLER = {"a", "an", "the", "ball", "balls", "and", "times", "time", "it", "is", "are", "they"}


def normalise_answer(text: str) -> tuple[str, ...]:
    """The words of an answer that carry its meaning, numbers as digits, sorted (module doc)."""
    if not isinstance(text, str):
        raise ValueError(f"an answer must be a string, got {type(text).__name__}: {text!r}")
    words = re.findall(r"[a-z0-9]+", text.lower())
    words = [str(_NUMBER_WORDS.get(w, w)) for w in words if w not in _FILLER]
    return tuple(sorted(words))


def _first_number(words: Sequence[str]) -> str | None:
    return next((w for w in words if w.isdigit()), None)


def answers_match(predicted: str, true: str) -> bool:
    """Whether ``predicted`` says what ``true`` says (module doc)."""
    p, t = normalise_answer(predicted), normalise_answer(true)
    if Counter(p) == Counter(t):
        return True
    # A counting answer: the prediction's first number decides (words unsorted, as said).
    if len(t) == 1 and t[0].isdigit():
        said = [str(_NUMBER_WORDS.get(w, w)) for w in re.findall(r"[a-z0-9]+", predicted.lower())]
        return _first_number(said) == t[0]
    return False


def accuracy(predicted: Sequence[str], true: Sequence[str]) -> float:
    """The share of questions whose predicted answer matches the true one."""
    if len(predicted) != len(true):
        raise ValueError(f"predicted has {len(predicted)} answers but true has {len(true)}; they must pair up")
    if not true:
        raise ValueError("true is empty: accuracy needs at least one question")
    return sum(answers_match(p, t) for p, t in zip(predicted, true)) / len(true)
