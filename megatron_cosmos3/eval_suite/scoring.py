"""The suite's report rows: each task's cases scored by ``evaluation.rows`` for the model, the oracle
(the world's truth through the same metric) and chance (the untrained model's predictions)
(docs/DESIGN.md, "Evaluation").

A task's cases are scored as one clip: the scored frames of every case end to end (PSNR, SSIM and
positions are per frame), the sounds end to end with each case's collision times shifted by the
time before it, the actions stacked per embodiment (rows ``<task>/<embodiment>/...``: dimensions
differ between embodiments). A prediction and its truth are cut to the shorter of the two where a
generated length rounds differently from the world's (a 1 + 4k-frame clip lasts one frame longer
than the world's ``duration_s``, so generated sound and actions run one frame past the truth).
A prediction whose frames, sound or actions run at another rate than the truth's is refused
(``check_rates``), never compared index by index.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from megatron_cosmos3.encoders.action_normalization import STD_FLOOR, ActionStats
from megatron_cosmos3.eval_suite.cases import ACTION_TASKS, Case, world_detector
from megatron_cosmos3.eval_suite.config import SuiteConfig
from megatron_cosmos3.eval_suite.predictions import Prediction
from megatron_cosmos3.evaluation.actions import spread_of
from megatron_cosmos3.evaluation.report import MetricRow
from megatron_cosmos3.evaluation.rows import action_rows, audio_rows, text_to_video_rows, understanding_rows, video_rows
from megatron_cosmos3.world.sound import SAMPLE_RATE


def check_rates(case: Case, prediction: Prediction, who: str) -> None:
    """ValueError naming the case, ``who`` made the prediction, the rate and both values where a
    piece of ``prediction`` runs at another rate than the truth's (frames, sound samples or action
    steps would be compared out of step, silently: frame i of a 30 fps clip is not frame i of a
    24 fps one). A rate the prediction leaves None is the truth's."""
    s = case.sample
    for piece, name, given, true in (
        (prediction.frames, "fps", prediction.fps, s.fps),
        (prediction.audio, "sample_rate", prediction.sample_rate, s.audio_sample_rate or SAMPLE_RATE),
        (prediction.actions, "action_rate_hz", prediction.action_rate_hz, s.action_rate_hz),
    ):
        if piece is None or given is None or true is None or math.isclose(float(given), float(true), rel_tol=1e-9):
            continue
        raise ValueError(
            f"{case.name}: {who}'s prediction has {name}={float(given):g} but the truth's is {float(true):g}; "
            "resample it to the truth's rate (pieces at two rates are never compared index by index)"
        )


def _scored_frames(case: Case, *predictions: Prediction) -> list[np.ndarray]:
    """The frames the model generated — each prediction's, then the truth's — cut to one length."""
    start = case.first_scored_frame
    clips = [p.frames[start:] for p in predictions] + [case.frames[start:]]
    for clip in clips[:-1]:
        if clip.shape[1:] != clips[-1].shape[1:]:
            raise ValueError(f"{case.name}: predicted frames of {clip.shape[1:]} for a truth of {clips[-1].shape[1:]}")
    n = min(len(clip) for clip in clips)
    return [clip[:n] for clip in clips]


def _video(task: str, cases: Sequence[Case], model: Sequence[Prediction], chance: Sequence[Prediction], detector):
    cut = [_scored_frames(case, m, c) for case, m, c in zip(cases, model, chance)]
    model_frames, chance_frames, true = (np.concatenate(part) for part in zip(*cut))
    return video_rows(task, model_frames, chance_frames, true, detector)


def _audio(task: str, cases: Sequence[Case], model, chance, tolerance_s: float) -> list[MetricRow]:
    parts: dict[str, list[np.ndarray]] = {"model": [], "chance": [], "true": []}
    times, offset = [], 0
    for case, m, c in zip(cases, model, chance):
        true = case.sample.audio.astype(np.float32)
        n = min(true.shape[1], m.audio.shape[1], c.audio.shape[1])
        for name, waveform in (("model", m.audio), ("chance", c.audio), ("true", true)):
            parts[name].append(waveform[:, :n])
        times += [offset / SAMPLE_RATE + t for t in case.collision_times_s if t < n / SAMPLE_RATE]
        offset += n
    joined = {name: np.concatenate(waves, axis=1) for name, waves in parts.items()}
    return audio_rows(task, joined["model"], joined["chance"], joined["true"], SAMPLE_RATE, times, tolerance_s)


def action_scale(
    action_stats: ActionStats | None, embodiment: str, true: np.ndarray
) -> tuple[np.ndarray, np.ndarray, str]:
    """The unit of the action error per dimension: the run's action std of ``embodiment`` (what
    normalised training), else the true actions' own spread (``evaluation.actions.spread_of``);
    which dimensions are measured: those that move in that data (a dimension constant there, e.g.
    the y of a world seen from the side or an arm that never tilts, has no unit); a note saying
    both. The same rule as the closed-loop runner's action error."""
    if action_stats is not None and embodiment in action_stats.embodiments:
        scale, scale_is = np.asarray(action_stats[embodiment].std, dtype=np.float64), "dataset std"
    else:
        scale, scale_is = spread_of(true), "true spread"
    moving = scale > STD_FLOOR
    if not moving.any():
        raise ValueError(f"no action dimension of {embodiment!r} moves in the data ({scale_is}): nothing to measure")
    return scale[moving], moving, f"{scale_is}; {int(moving.sum())} of {len(scale)} dims (those that move)"


def _actions(task: str, cases: Sequence[Case], model, chance, action_stats: ActionStats | None) -> list[MetricRow]:
    rows = []
    for embodiment in sorted({case.sample.embodiment for case in cases}):
        parts: dict[str, list[np.ndarray]] = {"model": [], "chance": [], "true": []}
        for case, m, c in zip(cases, model, chance):
            if case.sample.embodiment != embodiment:
                continue
            true = case.sample.actions.astype(np.float32)
            n = min(len(true), len(m.actions), len(c.actions))
            for name, actions in (("model", m.actions), ("chance", c.actions), ("true", true)):
                parts[name].append(actions[:n])
        joined = {name: np.concatenate(a) for name, a in parts.items()}
        scale, moving, scale_is = action_scale(action_stats, embodiment, joined["true"])
        model_, chance_, true_ = (joined[name][:, moving] for name in ("model", "chance", "true"))
        rows += action_rows(f"{task}/{embodiment}", model_, chance_, true_, scale, scale_is)
    return rows


def task_rows(
    task: str,
    cases: Sequence[Case],
    model: Sequence[Prediction],
    chance: Sequence[Prediction],
    config: SuiteConfig,
    action_stats: ActionStats | None = None,
) -> list[MetricRow]:
    """The rows of one task (module doc); ``model`` and ``chance`` hold one prediction per case."""
    if not (len(cases) == len(model) == len(chance)):
        raise ValueError(f"{task}: {len(cases)} cases, {len(model)} model and {len(chance)} chance predictions")
    for case, m, c in zip(cases, model, chance):
        check_rates(case, m, "the model")
        check_rates(case, c, "the chance model")
    if task in ("forward_dynamics", "image_to_video"):
        return _video(task, cases, model, chance, world_detector())
    if task == "video_to_audio":
        return _audio(task, cases, model, chance, config.onset_tolerance_s)
    if task in ACTION_TASKS:
        return _actions(task, cases, model, chance, action_stats)
    if task == "text_to_video":
        true = [case.frames for case in cases]
        clips = [[p.frames for p in predictions] for predictions in (model, chance)]
        return text_to_video_rows(task, *clips, true, [case.asked for case in cases], world_detector())
    if task == "understanding":
        answers = [case.sample.answer for case in cases]
        return understanding_rows(task, [p.text for p in model], [p.text for p in chance], answers)
    raise ValueError(f"task {task!r} has no rows in the suite")
