"""Answers to the world's questions: the world's own answers match themselves and what a model may
say instead; random answers score near one in the number of choices, off-by-one counts score 0."""

from __future__ import annotations

import numpy as np
import pytest

from megatron_cosmos3.evaluation.understanding import accuracy, answers_match, normalise_answer
from megatron_cosmos3.world import captions
from megatron_cosmos3.world.physics import Event


def _floor_events(hits: int) -> list[Event]:
    return [Event(0.1 * (i + 1), 0.5, 0.0, 1.0, "floor", 0) for i in range(hits)]


def test_the_worlds_answers_and_their_paraphrases_match():
    rng = np.random.default_rng(0)
    for hits in range(5):
        _, answer = captions.floor_question(["red"], _floor_events(hits), rng)
        assert answers_match(answer, answer)
        for said in (str(hits), f"{captions.number(hits)} times", f"It hits the floor {hits} times."):
            assert answers_match(said, answer), (said, answer)
        assert not answers_match(str(hits + 1), answer)
    assert answers_match("once", "One.") and answers_match("twice", "2") and answers_match("none", "No.")
    assert answers_match("The blue and red balls.", "red and blue")
    assert answers_match("on the left, near the floor", "Near the floor on the left.")
    assert not answers_match("near the top on the left", "Near the floor on the left.")
    assert normalise_answer("The RED ball!") == ("red",)


def test_oracle_chance_and_corrupted_accuracy():
    rng = np.random.default_rng(1)
    counts = rng.integers(0, 4, 400)
    true = [captions.floor_question(["red"], _floor_events(int(n)), rng)[1] for n in counts]
    assert accuracy(true, true) == 1.0
    guesses = [captions.number(int(n)) for n in rng.integers(0, 4, len(true))]  # uniform over the 4 answers
    assert accuracy(guesses, true) == pytest.approx(0.25, abs=0.06)
    assert accuracy([str(int(n) + 1) for n in counts], true) == 0.0


def test_bad_input_is_refused_by_name():
    with pytest.raises(ValueError, match="predicted has 1 answers but true has 2"):
        accuracy(["One."], ["One.", "Two."])
    with pytest.raises(ValueError, match="true is empty"):
        accuracy([], [])
    with pytest.raises(ValueError, match="an answer must be a string, got int: 3"):
        answers_match(3, "Three.")
