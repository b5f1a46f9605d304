"""The ball detector finds the world's rendered balls where the simulator put them (also after a
pooled-latent round trip and beside an effector), and the position error scores the truth 0, a
late, moved or recoloured clip worse, and noise as chance."""

from __future__ import annotations

import numpy as np
import pytest

from megatron_cosmos3.data.latent_encoders import PooledLatentEncoder
from megatron_cosmos3.evaluation.detection import BallDetector, position_error
from megatron_cosmos3.world.render import BALL_COLOURS, EFFECTOR_COLOUR, Canvas, Disc

SIZE = 64
PIXEL_M = 1.0 / SIZE


def test_rendered_balls_are_found_where_they_were_drawn(world_detector):
    rng = np.random.default_rng(0)
    canvas = Canvas(SIZE)
    for _ in range(6):
        # Three balls spread along x, and the arm's effector (a distractor) beside them.
        centres = np.stack([np.array([0.15, 0.5, 0.85]) + rng.uniform(-0.05, 0.05, 3), rng.uniform(0.1, 0.6, 3)], -1)
        radii = rng.uniform(0.05, 0.09, 3)
        names = list(rng.choice(list(BALL_COLOURS), 3, replace=False))
        discs = [Disc(*c, r, BALL_COLOURS[n]) for c, r, n in zip(centres, radii, names)]
        frame = canvas.draw(discs + [Disc(0.5, 0.85, 0.06, EFFECTOR_COLOUR)])
        found = world_detector.detect(frame[None])
        for name, centre in zip(names, centres):
            k = found.colours.index(name)
            assert np.linalg.norm(found.positions[0, k] - centre) < 0.1 * PIXEL_M, name
        assert found.present[0].sum() == 3 and found.counts[0].max() == 1  # the fourth colour is absent


def test_balls_are_found_after_a_pooled_latent_round_trip(world_detector, world_clips):
    encoder = PooledLatentEncoder(video_latent_channels=24, audio_latent_dim=16)
    sub_block_m = 8 * PIXEL_M  # the decoder's blocks: one colour per 8x8 pixels
    for clip in world_clips:
        still = np.repeat(clip.frames[:1], 5, axis=0)  # a still scene: the blocks' only loss is space
        decoded = encoder.decode_video(encoder.encode_video(still, clip.fps))
        truth = world_detector.detect(still)
        error = position_error(world_detector.detect(decoded), truth)
        assert error.missed == error.extra == 0
        assert np.nanmax(error.errors_m) < 0.5 * sub_block_m, clip.colours

        moving = clip.frames[:13]
        decoded = encoder.decode_video(encoder.encode_video(moving, clip.fps))
        error = position_error(world_detector.detect(decoded), world_detector.detect(moving))
        # Motion within a 4-frame group is smeared into fading blocks: a looser bound, few misses.
        assert error.mean_m < 0.5 * sub_block_m and error.missed_rate < 0.2, clip.colours


def test_truth_scores_zero_late_moved_and_recoloured_clips_worse(world_detector, world_clips):
    clip = world_clips[2]
    truth = world_detector.detect(clip.frames)
    oracle = position_error(truth, truth)
    assert oracle.mean_m == 0.0 and oracle.missed == oracle.extra == 0
    np.testing.assert_allclose(
        truth.positions[:, [truth.colours.index(c) for c in clip.colours]], clip.centres, atol=0.5 * PIXEL_M
    )

    late = position_error(world_detector.detect(np.concatenate([clip.frames[:1], clip.frames[:-1]])), truth)
    assert late.mean_m > 0.01 and late.missed == late.extra == 0

    canvas, radius = Canvas(SIZE), 0.07
    drawn = lambda colour, x: canvas.draw([Disc(x, 0.4, radius, BALL_COLOURS[colour])])[None]  # noqa: E731
    reference = world_detector.detect(drawn("red", 0.3))
    moved = position_error(world_detector.detect(drawn("red", 0.5)), reference)
    assert moved.mean_m == pytest.approx(0.2, abs=0.1 * PIXEL_M) and moved.missed == moved.extra == 0
    recoloured = position_error(world_detector.detect(drawn("blue", 0.3)), reference)
    assert recoloured.matched == 0 and recoloured.missed == 1 and recoloured.extra == 1
    assert recoloured.penalised_mean_m(np.sqrt(2)) == pytest.approx(np.sqrt(2))


def test_noise_frames_score_as_chance(world_detector, world_clips):
    clip = world_clips[2]
    noise = np.random.default_rng(0).integers(0, 256, clip.frames.shape, dtype=np.uint8)
    error = position_error(world_detector.detect(noise), world_detector.detect(clip.frames))
    # Noise has no ball-sized blob of one colour: every true ball is missed.
    assert error.matched == 0 and error.missed_rate == 1.0
    assert error.penalised_mean_m(np.sqrt(2)) == pytest.approx(np.sqrt(2))


def test_bad_input_is_refused_by_name(world_detector):
    with pytest.raises(ValueError, match="frames must have dtype uint8"):
        world_detector.detect(np.zeros((1, 32, 32, 3), np.float32))
    with pytest.raises(ValueError, match=r"frames must have shape \(T, H, W, 3\)"):
        world_detector.detect(np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="frames is empty"):
        world_detector.detect(np.zeros((0, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="palette is empty"):
        BallDetector({}, box_m=1.0, min_radius_m=0.05)
    with pytest.raises(ValueError, match="box_m must be a positive number of metres, got -1"):
        BallDetector(BALL_COLOURS, box_m=-1, min_radius_m=0.05)
    with pytest.raises(ValueError, match="RGB triples"):
        BallDetector({"red": (300, 0, 0)}, box_m=1.0, min_radius_m=0.05)
    one, two = (
        world_detector.detect(np.zeros((1, 32, 32, 3), np.uint8)),
        world_detector.detect(np.zeros((2, 32, 32, 3), np.uint8)),
    )
    with pytest.raises(ValueError, match=r"predicted detections of shape \(2, 4, 2\) differ from true \(1, 4, 2\)"):
        position_error(two, one)
