"""The generated world is deterministic and physically consistent: impact sounds start at the
collision times, the video shows the bounces when they happen, the pseudo-actions integrated from
the recorded start state put the effector where the video shows it, and the mix covers several
frame rates and two embodiments."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from world_helpers import tiny_world  # noqa: F401 - a fixture

from megatron_cosmos3.data.schema import decode_sample, encode_sample
from megatron_cosmos3.data.shards import ShardIndex, read_shard
from megatron_cosmos3.encoders.pseudo_actions import decode_pseudo_actions
from megatron_cosmos3.world.render import BALL_COLOURS, EFFECTOR_COLOUR
from megatron_cosmos3.world.sound import SAMPLE_RATE
from megatron_cosmos3.world.world import WorldConfig, agent_start_trajectory, generate_sample

CONFIG = WorldConfig()  # the demo's world: 64x64, 2 s


@pytest.fixture(scope="module")
def clips():
    return [s for s in (generate_sample(CONFIG, 3, i) for i in range(24)) if s.video is not None]


def test_same_seed_same_bytes_other_seed_other_world():
    a, b, c = generate_sample(CONFIG, 1, 5), generate_sample(CONFIG, 1, 5), generate_sample(CONFIG, 2, 5)
    assert encode_sample(a) == encode_sample(b)
    assert encode_sample(a) != encode_sample(c)


def test_every_impact_sound_starts_at_its_collision(clips):
    checked = 0
    for clip in clips:
        times = [e["time_s"] for e in clip.timing["events"]]
        assert clip.audio.shape == (2, int(CONFIG.duration_s * SAMPLE_RATE))
        for i, time in enumerate(times):
            if i and time - times[i - 1] < 0.25:
                continue  # still ringing from the previous impact: no clean onset to see
            onset = int(round(time * SAMPLE_RATE))
            before = np.abs(clip.audio[:, max(0, onset - 240) : onset]).max()
            after = np.abs(clip.audio[:, onset : onset + 96]).max()  # the 2 ms click
            assert before < 0.006 < after, (clip.key, time)
            checked += 1
    assert checked >= 10


def _height(frames: np.ndarray, colour) -> np.ndarray:
    """Per frame, the height (m, z up) of the centroid of the pixels of ``colour``."""
    mask = np.abs(frames.astype(int) - np.array(colour)).sum(-1) < 30
    rows = np.arange(frames.shape[1])[None, :, None]
    centroid_row = (mask * rows).sum((1, 2)) / np.maximum(mask.sum((1, 2)), 1)
    return 1 - (centroid_row + 0.5) / frames.shape[1]


def test_the_video_shows_each_floor_bounce_when_the_sound_says(clips):
    checked = 0
    for clip in clips:
        colours = {e["ball"] for e in clip.timing["events"]}
        if clip.actions is not None or len(colours) != 1 or "balls" in clip.caption.split(".")[0]:
            continue  # one ball, no agent: nothing hides it
        height = _height(clip.video, BALL_COLOURS[colours.pop()])
        lowest = [k for k in range(1, len(height) - 1) if height[k] <= height[k - 1] and height[k] <= height[k + 1]]
        for event in clip.timing["events"]:
            if event["kind"] == "floor" and event["speed"] > 1.0:
                assert min(abs(k / clip.fps - event["time_s"]) for k in lowest) <= 1 / clip.fps, (clip.key, event)
                checked += 1
    assert checked >= 3


def test_single_arm_actions_integrate_to_the_effector_the_video_shows(clips):
    checked = 0
    for clip in (c for c in clips if c.embodiment == "single_arm"):
        size = clip.video.shape[1]

        def seen(frame: int, clip=clip) -> np.ndarray:
            """(x, z) in metres of the effector's pixels in ``frame``."""
            rows, cols = np.nonzero(np.abs(clip.video[frame].astype(int) - np.array(EFFECTOR_COLOUR)).sum(-1) < 12)
            return np.array([(cols.mean() + 0.5) / clip.video.shape[2], 1 - (rows.mean() + 0.5) / clip.video.shape[1]])

        initial = agent_start_trajectory("single_arm", clip.timing["agent_start"])
        assert np.abs(initial.poses["end_effector"].positions[0, [0, 2]].numpy() - seen(0)).max() < 1.5 / size
        path = decode_pseudo_actions(torch.from_numpy(clip.actions).double(), initial, strict=False)
        for seconds in (0.5, 1.0, 1.5, 2.0):
            predicted = path.poses["end_effector"].positions[int(seconds * clip.action_rate_hz), [0, 2]].numpy()
            assert np.abs(predicted - seen(int(round(seconds * clip.fps)))).max() < 2.5 / size, (clip.key, seconds)
        checked += 1
    assert checked >= 2


def test_the_mix_covers_frame_rates_embodiments_stills_and_questions():
    shards = ShardIndex.load(tiny_world()["raw"]).shards
    samples = [decode_sample(raw) for shard in shards for raw in read_shard(shard.url)]
    assert {s.fps for s in samples if s.fps} == {16.0, 24.0, 30.0}
    assert {s.embodiment for s in samples if s.embodiment} == {"single_arm", "humanoid"}
    assert any(s.image is not None for s in samples) and any(s.question for s in samples)
    for s in samples:
        if s.video is not None:  # frames, audio and poses span the same seconds
            assert len(s.video) == s.fps * 1.0 + 1 and s.audio.shape[1] == SAMPLE_RATE
        if s.actions is not None:
            assert len(s.actions) == s.action_rate_hz * 1.0


def test_a_clip_length_that_holds_whole_frames_and_poses_is_accepted_exactly():
    """4.1 s x 30 Hz is 123 poses and 0.56 s x 12.5 fps 7 frames, though their floats' products
    are not whole (123.00000000000001): they were refused. 0.35 s at 10 Hz is not, and stays so."""
    rates = {"single_arm": 10.0, "humanoid": 30.0, "planar_pusher": 20.0}
    WorldConfig(duration_s=4.1, fps_choices=(30.0,), action_rates=rates)
    at_25 = dict.fromkeys(rates, 25.0)
    world = WorldConfig(32, 0.56, (12.5,), at_25, embodiments=("single_arm",), still_fraction=0.0, agent_fraction=1.0)
    sample = generate_sample(world, 3, 0)
    assert len(sample.video) == 8 and len(sample.actions) == 14  # frames 0..7 span 0.56 s; 25 Hz steps
    with pytest.raises(ValueError, match=r"duration_s=0.35 must hold a whole number of frames/poses at 10.0/s"):
        WorldConfig(duration_s=0.35, fps_choices=(20.0,), action_rates=rates)


@pytest.mark.parametrize(
    "resolution, duration_s, message",
    [
        (100_000, 2.0, r"61 frames of 100000x100000 decodes to 1704.3 GiB"),
        (64, 1e9, r"30000000001 frames of 64x64 decodes to"),
        # frames of a day fit at 32x32 (7.4 GiB); its 48 kHz stereo float sound does not (30.9 GiB)
        (32, 86_400.0, r"86400 s of 48 kHz stereo sound decodes to 30.9 GiB"),
    ],
)
def test_a_world_of_clips_the_loader_skips_as_too_large_is_refused(resolution, duration_s, message):
    """A crafted size was a MemoryError in the first sample's frames or poses, after the output
    folders were made; the loader would have skipped such a clip as out_of_range anyway."""
    with pytest.raises(ValueError, match=message + r".*above clips.MAX_CLIP_BYTES"):
        WorldConfig(resolution=resolution, duration_s=duration_s)
    WorldConfig(resolution=32, duration_s=60.0)  # a long clip of a size the loader reads
