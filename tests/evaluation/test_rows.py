"""Each task's report rows: the oracle row is the best possible, the chance row the worst, and a
degraded model (late frames, late sound, negated actions) falls between them."""

from __future__ import annotations

import numpy as np
import pytest

from megatron_cosmos3.evaluation.audio import resolvable_onsets
from megatron_cosmos3.evaluation.closed_loop import Episode
from megatron_cosmos3.evaluation.report import EvalReport
from megatron_cosmos3.evaluation.rows import (
    action_rows,
    audio_rows,
    closed_loop_rows,
    text_to_video_rows,
    understanding_rows,
    video_rows,
)
from megatron_cosmos3.evaluation.video import PSNR_MAX_DB
from megatron_cosmos3.world.sound import SAMPLE_RATE


def _ordered(row) -> bool:
    """The model between chance and the oracle, in the row's good direction (a chance that matched
    nothing, NaN, is below every model)."""
    sign = 1 if row.higher_is_better else -1
    return (np.isnan(row.chance) or sign * row.chance <= sign * row.model) and sign * row.model <= sign * row.oracle


def test_every_task_has_oracle_best_chance_worst(world_detector, world_clips):
    clip = world_clips[2]
    rng = np.random.default_rng(0)
    report = EvalReport()
    late = np.concatenate([clip.frames[:1], clip.frames[:-1]])
    noise = rng.integers(0, 256, clip.frames.shape, dtype=np.uint8)
    for row in video_rows("forward_dynamics", late, noise, clip.frames, world_detector):
        report.add(row)
    fd = {row.name.split("/")[1]: row for row in report.rows}
    assert (fd["psnr_db"].oracle, fd["ssim"].oracle, fd["position_error_m"].oracle) == (PSNR_MAX_DB, 1.0, 0.0)
    assert fd["balls_missed"].chance == 1.0 and fd["position_error_m"].chance == pytest.approx(np.sqrt(2))

    late_audio = np.concatenate([np.zeros((2, 1440), np.float32), clip.audio[:, :-1440]], axis=1)
    hiss = rng.uniform(-0.5, 0.5, clip.audio.shape).astype(np.float32)
    true_times = resolvable_onsets(clip.event_times)
    for row in audio_rows("video_to_audio", late_audio, hiss, clip.audio, SAMPLE_RATE, true_times):
        report.add(row)
    assert report["video_to_audio/onset_error_ms"].oracle < 3.0 < report["video_to_audio/onset_error_ms"].model
    assert report["video_to_audio/onset_f1"].chance == 0.0

    actions = rng.normal(0.0, 1.0, (8, 10, 19))
    guess = rng.normal(0.0, 1.0, actions.shape)
    for row in action_rows("inverse_dynamics", 0.5 * actions, guess, actions, np.ones(19), "dataset std"):
        report.add(row)
    assert report["inverse_dynamics/action_rmse"].oracle == 0.0

    expert = [Episode(s, True) for s in range(10)]
    policy = [Episode(s, s % 2 == 0) for s in range(10)]
    flailing = [Episode(s, s == 3) for s in range(10)]
    for row in closed_loop_rows("policy", policy, flailing, expert):
        report.add(row)
    answers = ["One.", "Two.", "No."]
    for row in understanding_rows("understanding", ["1", "2", "3"], ["4", "4", "4"], answers):
        report.add(row)
    asked = [{c: 1 for c in clip.colours}]
    for row in text_to_video_rows("text_to_video", [late], [noise], [clip.frames], asked, world_detector):
        report.add(row)

    assert all(_ordered(row) for row in report.rows), [r for r in report.rows if not _ordered(r)]
    assert len(report.mlflow_metrics()) == 3 * len(report.rows) - 1  # the chance onset error: nothing matched


def test_closed_loop_rows_count_failed_episodes_and_name_each():
    """The failed episodes are a row of their own (a count, lower is better) whose note names who,
    the seed, the step and the reason, the first five one by one; success counts them as failures."""
    expert = [Episode(s, True, 40) for s in range(8)]
    model = [Episode(s, False, 4 * s, f"round {s}: the policy's chunk holds NaN") for s in range(7)] + [
        Episode(7, True)
    ]
    rows = {row.name: row for row in closed_loop_rows("closed_loop/arm/stop_ball", model, expert, expert)}
    failed = rows["closed_loop/arm/stop_ball/failed_episodes"]
    assert (failed.model, failed.oracle, failed.chance, failed.unit, failed.higher_is_better) == (
        7,
        0,
        0,
        "episodes",
        False,
    )
    assert failed.note.startswith(
        "model seed 0 at step 0: round 0: the policy's chunk holds NaN; model seed 1 at step 4"
    )
    assert failed.note.endswith("model seed 4 at step 16: round 4: the policy's chunk holds NaN; 2 more")
    success = rows["closed_loop/arm/stop_ball/success_rate"]
    assert success.model == 1 / 8 and "a failed episode is no success" in success.note
