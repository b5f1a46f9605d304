"""The task registry: every task of docs/DESIGN.md is a layout with clean conditioning before noisy
targets; the mixture assigns only tasks a sample's modalities allow, in proportion to the weights."""

from __future__ import annotations

import pytest
import torch

from megatron_cosmos3.data import synthetic_packs
from megatron_cosmos3.tasks import TASK_REGISTRY, DMRole, Modality, Stream, TaskMixture, TaskSpec, dm_layout, noise_mask

T, V, A, ACT = Modality.TEXT, Modality.VIDEO, Modality.AUDIO, Modality.ACTIONS


def _streams(frames: int = 4) -> dict[str, Stream]:
    """A clip at 24 fps (6 latent frames/s) on a 2x2 grid, 1 s of audio, 10 actions at 10 Hz, an image."""
    return {
        "video": Stream("video", torch.arange(frames * 4.0)[:, None].expand(-1, 3), (frames, 2, 2), 6.0),
        "image": Stream("video", torch.zeros(4, 3), (1, 2, 2), 6.0),
        "audio": Stream("audio", torch.zeros(25, 2), (25, 1, 1), 25.0),
        "actions": Stream("action/single_arm", torch.zeros(10, 19), (10, 1, 1), 10.0),
    }


def test_registry_covers_the_design_table_and_the_synthetic_tasks():
    design = {
        "understanding",
        "text_to_image",
        "text_to_video",
        "image_to_video",
        "video_to_audio",
        "text_to_audio_video",
        "forward_dynamics",
        "inverse_dynamics",
        "policy",
    }
    assert design <= set(TASK_REGISTRY)
    assert set(synthetic_packs.TASKS) <= set(TASK_REGISTRY)


@pytest.mark.parametrize("name", sorted(TASK_REGISTRY))
def test_every_layout_puts_clean_conditioning_before_noisy_targets(name):
    task = TASK_REGISTRY[name]
    if not task.dm:
        assert task.answer
        return
    spans = dm_layout(task, _streams())
    mask = noise_mask(spans)
    assert mask.any(), "a generation task has a noisy target"
    first_noisy = int(mask.int().argmax())
    assert not mask[:first_noisy].any() and mask[first_noisy:].all()


@pytest.mark.parametrize(
    "name, clean, noisy",
    [
        ("text_to_video", [], [("video", 0, 4)]),
        ("image_to_video", [("video", 0, 1)], [("video", 1, 3)]),
        ("video_to_audio", [("video", 0, 4)], [("audio", 0, 25)]),
        ("text_to_audio_video", [], [("video", 0, 4), ("audio", 0, 25)]),
        ("forward_dynamics", [("video", 0, 2), ("action/single_arm", 0, 10)], [("video", 2, 2)]),
        ("inverse_dynamics", [("video", 0, 4)], [("action/single_arm", 0, 10)]),
        ("policy", [("video", 0, 1)], [("action/single_arm", 0, 10)]),
        ("policy_with_future", [("video", 0, 1)], [("action/single_arm", 0, 10), ("video", 1, 3)]),
    ],
)
def test_noise_masks_select_the_task(name, clean, noisy):
    """(stream key, first temporal index, temporal steps) of every span, clean ones then noisy ones."""
    spans = dm_layout(TASK_REGISTRY[name], _streams())
    got = [(piece.key, piece.first_temporal_index, piece.num_steps, is_noisy) for piece, is_noisy in spans]
    assert got == [(*c, False) for c in clean] + [(*n, True) for n in noisy]


def test_split_spans_keep_their_place_in_the_clip():
    (past, _), _, (future, _) = dm_layout(TASK_REGISTRY["forward_dynamics"], _streams(frames=5))
    assert past.num_steps + future.num_steps == 5 and future.first_temporal_index == past.num_steps
    # Row values are the row numbers of the whole clip: the future continues where the past ends.
    assert future.values[0, 0] == past.values.shape[0]


def test_a_layout_refuses_a_clip_too_short_for_it():
    with pytest.raises(ValueError, match="empty"):
        dm_layout(TASK_REGISTRY["image_to_video"], _streams(frames=1))
    assert not TASK_REGISTRY["image_to_video"].allows(frozenset({T, V}), latent_frames=1)


def test_task_specs_refuse_noisy_before_clean():
    with pytest.raises(ValueError, match="clean DM spans must precede"):
        TaskSpec(
            "bad", frozenset({T, V}), "caption", dm=(DMRole("video", "future", True), DMRole("video", "past", False))
        )


def test_first_seconds_cuts_every_stream_at_the_same_instant():
    streams = _streams(frames=6)  # 1 s of video
    cut = {name: s.first_seconds(0.5) for name, s in streams.items() if name != "image"}
    assert cut["video"].num_steps == 3 and cut["audio"].num_steps == 13 and cut["actions"].num_steps == 5
    for stream in cut.values():
        assert (stream.num_steps - 1) / stream.tokens_per_second < 0.5 <= stream.num_steps / stream.tokens_per_second


def test_mixture_draws_only_allowed_tasks_in_proportion_to_weights():
    mixture = TaskMixture({"understanding": 1.0, "text_to_video": 2.0, "video_to_audio": 1.0, "policy": 5.0})
    clip = frozenset({T, V})  # no audio, no actions: only understanding and text_to_video fit
    draws = [mixture.choose(clip, 3, (i + 0.5) / 3000).name for i in range(3000)]
    assert set(draws) == {"understanding", "text_to_video"}
    assert draws.count("text_to_video") == 2000  # the inverse CDF over an even grid of u is exact
    assert mixture.choose(frozenset({A}), 0, 0.3) is None


def test_policy_needs_a_picture_for_the_vit():
    sample = frozenset({T, V, ACT})
    assert TASK_REGISTRY["policy"].allows(sample, 2, has_picture=True)
    assert not TASK_REGISTRY["policy"].allows(sample, 2, has_picture=False)
    assert TASK_REGISTRY["inverse_dynamics"].allows(sample, 2, has_picture=False)


def test_mixture_rejects_unknown_tasks_and_empty_weights():
    with pytest.raises(ValueError, match="unknown task"):
        TaskMixture({"dancing": 1.0})
    with pytest.raises(ValueError, match="positive weight"):
        TaskMixture({"understanding": 0.0})
