"""Text->video objects: the world's captions name the balls asked for; the clip the caption was made
from shows them (the oracle), a recoloured or duplicated ball does not, noise shows nothing."""

from __future__ import annotations

import numpy as np
import pytest

from megatron_cosmos3.evaluation.text_to_video import balls_in_caption, objects_shown, share_right
from megatron_cosmos3.world import captions
from megatron_cosmos3.world.render import BALL_COLOURS, Canvas, Disc


def test_captions_name_the_balls_asked_for():
    for colours in (["red"], ["blue", "yellow"], ["green", "red", "blue"]):
        caption = captions.clip_caption(colours, [], None, 16.0, 1.0)
        assert balls_in_caption(caption, BALL_COLOURS) == {c: 1 for c in colours}
    still = captions.still_caption(["yellow"], np.array([[0.2, 0.2]]))
    assert balls_in_caption(still, BALL_COLOURS) == {"yellow": 1}


def test_oracle_recoloured_duplicated_and_noise(world_detector, world_clips):
    results = []
    for clip in world_clips:
        asked = balls_in_caption(captions.clip_caption(clip.colours, [], None, clip.fps, 1.0), BALL_COLOURS)
        result = objects_shown(clip.frames, asked, world_detector)
        assert result.colours_right and result.counts_right, clip.colours
        results.append(result)
    assert share_right(results) == (1.0, 1.0)

    canvas = Canvas(64)
    asked = {"red": 1, "blue": 1}
    recoloured = canvas.draw([Disc(0.3, 0.5, 0.07, BALL_COLOURS["red"]), Disc(0.7, 0.5, 0.07, BALL_COLOURS["green"])])
    duplicated = canvas.draw(
        [Disc(x, 0.5, 0.07, BALL_COLOURS[c]) for x, c in ((0.15, "red"), (0.5, "blue"), (0.85, "red"))]
    )
    wrong_colour = objects_shown(recoloured[None], asked, world_detector)
    assert not wrong_colour.colours_right and wrong_colour.shown == {"red": 1, "green": 1}
    too_many = objects_shown(duplicated[None], asked, world_detector)
    assert too_many.colours_right and not too_many.counts_right and too_many.shown == {"red": 2, "blue": 1}
    noise = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    assert objects_shown(noise, asked, world_detector).shown == {}
    assert share_right(results + [wrong_colour, too_many]) == (4 / 5, 3 / 5)


def test_bad_input_is_refused_by_name(world_detector):
    with pytest.raises(ValueError, match=r"asked colours \['purple'\] are not in the detector's palette"):
        objects_shown(np.zeros((1, 32, 32, 3), np.uint8), {"purple": 1}, world_detector)
    with pytest.raises(ValueError, match="results is empty"):
        share_right([])
