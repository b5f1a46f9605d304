"""The report rows of each task, every metric measured alike for the model, the oracle and chance
(docs/DESIGN.md, "Evaluation"). Each builder takes the model's and chance's predictions, then the
truth (which the oracle predicts) or, for closed loop, the expert's episodes; the eval command and
the trainer's periodic eval call these, so a task's rows are defined once."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from megatron_cosmos3.evaluation.actions import action_error
from megatron_cosmos3.evaluation.audio import detect_onsets, onset_error
from megatron_cosmos3.evaluation.closed_loop import Episode, SuccessRate
from megatron_cosmos3.evaluation.detection import BallDetector, position_error
from megatron_cosmos3.evaluation.report import MetricRow
from megatron_cosmos3.evaluation.text_to_video import objects_shown, share_right
from megatron_cosmos3.evaluation.understanding import accuracy
from megatron_cosmos3.evaluation.video import psnr, ssim

# Every row states its unit, so report.json reads without the code: a share of cases, balls or
# episodes in [0, 1] is a fraction, not a count; SSIM is an index without a physical unit.
FRACTION = "fraction (0-1)"
SSIM_UNIT = "index (1 = identical)"
_FAILURES_NAMED = 5  # failed episodes a row's note names one by one; a count says the rest


def video_rows(
    task: str,
    model: np.ndarray,
    chance: np.ndarray,
    true: np.ndarray,
    detector: BallDetector,
) -> list[MetricRow]:
    """PSNR, SSIM and ball-position rows of predicted ``(T, H, W, 3)`` frames (forward dynamics,
    image->video). The position error charges a missed or extra ball the box diagonal."""
    truth = detector.detect(true)
    diagonal = float(np.sqrt(2) * detector.box_m)
    found = [position_error(detector.detect(frames), truth) for frames in (model, true, chance)]
    note = "a missed or extra ball costs the box diagonal"
    return [
        MetricRow.measure(f"{task}/psnr_db", lambda p: psnr(p, true), model, true, chance, "dB"),
        MetricRow.measure(f"{task}/ssim", lambda p: ssim(p, true), model, true, chance, SSIM_UNIT),
        MetricRow(f"{task}/position_error_m", *(f.penalised_mean_m(diagonal) for f in found), "m", False, note),
        MetricRow(f"{task}/balls_missed", *(f.missed_rate for f in found), FRACTION, False),
    ]


def audio_rows(
    task: str,
    model: np.ndarray,
    chance: np.ndarray,
    true: np.ndarray,
    sample_rate: int,
    collision_times_s: Sequence[float],
    tolerance_s: float = 0.05,
) -> list[MetricRow]:
    """Onset rows of predicted ``(channels, samples)`` audio against the simulated collision times;
    the oracle is the true audio through the same detector (the detector's own floor)."""
    found = [
        onset_error(detect_onsets(waveform, sample_rate), collision_times_s, tolerance_s)
        for waveform in (model, true, chance)
    ]
    return [
        MetricRow(f"{task}/onset_error_ms", *(f.mean_abs_ms for f in found), "ms", False),
        MetricRow(f"{task}/onset_f1", *(f.f1 for f in found), FRACTION),
    ]


def action_rows(
    task: str, model: np.ndarray, chance: np.ndarray, true: np.ndarray, scale: np.ndarray, scale_is: str
) -> list[MetricRow]:
    """The mean over dimensions of the per-dimension RMSE in units of ``scale``, and the worst
    dimension's; ``scale_is`` says which scale (e.g. "dataset std", "true spread")."""
    note = f"per-dim RMSE / {scale_is}"
    errors = [action_error(actions, true, scale) for actions in (model, true, chance)]
    return [
        MetricRow(f"{task}/action_rmse", *(e.mean_rmse for e in errors), "std", False, note),
        MetricRow(f"{task}/action_rmse_worst_dim", *(float(e.per_dim_rmse.max()) for e in errors), "std", False, note),
    ]


def closed_loop_rows(
    task: str, model: Sequence[Episode], chance: Sequence[Episode], expert: Sequence[Episode]
) -> list[MetricRow]:
    """Success rate and its Wilson bounds, failed episodes counting as failures, and the number of
    failed episodes, its note naming each (who, seed, step, reason; the first ``_FAILURES_NAMED``);
    the oracle is the scripted expert, chance a random policy."""
    rates = [SuccessRate.of(episodes) for episodes in (model, expert, chance)]
    wilson = f"Wilson {rates[0].confidence:g}; a failed episode is no success"
    failures = [
        f"{who} seed {e.seed} at step {e.steps}: {e.failure}"
        for who, episodes in (("model", model), ("oracle", expert), ("chance", chance))
        for e in episodes
        if e.failure is not None
    ]
    more = len(failures) - _FAILURES_NAMED
    named = "; ".join(failures[:_FAILURES_NAMED] + ([f"{more} more"] if more > 0 else []))
    return [
        MetricRow(f"{task}/success_rate", *(r.rate for r in rates), FRACTION, note="a failed episode is no success"),
        MetricRow(f"{task}/success_low", *(r.low for r in rates), FRACTION, note=wilson),
        MetricRow(f"{task}/success_high", *(r.high for r in rates), FRACTION, note=wilson),
        MetricRow(f"{task}/failed_episodes", *(r.failed for r in rates), "episodes", False, named),
    ]


def understanding_rows(task: str, model: Sequence[str], chance: Sequence[str], true: Sequence[str]) -> list[MetricRow]:
    return [MetricRow.measure(f"{task}/accuracy", lambda p: accuracy(p, true), model, true, chance, FRACTION)]


def text_to_video_rows(
    task: str,
    model: Sequence[np.ndarray],
    chance: Sequence[np.ndarray],
    true: Sequence[np.ndarray],
    asked: Sequence[dict[str, int]],
    detector: BallDetector,
) -> list[MetricRow]:
    """Shares of clips showing the asked colours, and the asked colours and counts; the oracle is
    the clips the captions were made from."""

    def shares(clips: Sequence[np.ndarray]) -> tuple[float, float]:
        if len(clips) != len(asked):
            raise ValueError(f"{len(clips)} clips for {len(asked)} captions: one clip per caption")
        return share_right(objects_shown(frames, wanted, detector) for frames, wanted in zip(clips, asked))

    measured = [shares(clips) for clips in (model, true, chance)]
    return [
        MetricRow(f"{task}/right_colours", *(m[0] for m in measured), FRACTION),
        MetricRow(f"{task}/right_colours_and_counts", *(m[1] for m in measured), FRACTION),
    ]
