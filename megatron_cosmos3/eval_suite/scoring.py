"""The suite's report rows: each task's cases scored by ``evaluation.rows`` for the model, the oracle
(the world's truth through the same metric) and chance (the untrained model's predictions)
(docs/DESIGN.md, "Evaluation").

A task's cases are scored as one clip: the scored frames of every case end to end (PSNR, SSIM and
positions are per frame), the sounds end to end with each case's collision times shifted by the
time before it, the actions stacked per embodiment (rows ``<task>/<embodiment>/...``: dimensions
differ between embodiments). A prediction and its truth are cut to the shorter of the two where a
generated length rounds differently from the world's (a 1 + 4k-frame clip lasts one frame longer
than the world's ``duration_s``, so generated sound and actions run one frame past the truth).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from megatron_cosmos3.encoders.action_normalization import STD_FLOOR, ActionStats
from megatron_cosmos3.encoders.pseudo_actions import get_layout
from megatron_cosmos3.eval_suite.cases import ACTION_TASKS, Case, world_detector
from megatron_cosmos3.eval_suite.config import SuiteConfig
from megatron_cosmos3.eval_suite.predictions import Prediction
from megatron_cosmos3.evaluation.report import MetricRow
from megatron_cosmos3.evaluation.rows import action_rows, audio_rows, text_to_video_rows, understanding_rows, video_rows
from megatron_cosmos3.world.sound import SAMPLE_RATE


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


def action_scale(embodiment: str, action_stats: ActionStats | None) -> tuple[np.ndarray, str, str]:
    """(per-dimension scale, what it is, the rows' unit) of the action error: the scale that normalised training
    — the dataset std (``action_stats``), the 6D rotation dimensions in their own unit, 1, as
    normalisation leaves them — or, where training had no statistics, the raw units the model learnt
    (a few cases' own spread is 0 on the dimensions the world never moves, which would blow any
    error up)."""
    dim = get_layout(embodiment).dim
    if action_stats is None or embodiment not in action_stats.embodiments:
        return np.ones(dim), "raw units (no action statistics)", "raw"
    scale = np.maximum(np.asarray(action_stats[embodiment].std, dtype=np.float64), STD_FLOOR)
    scale[list(get_layout(embodiment).rotation_6d_dims)] = 1.0
    return scale, "dataset std; 6D rotation dims: 1", "std"


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
        scale, scale_is, unit = action_scale(embodiment, action_stats)
        rows += action_rows(
            f"{task}/{embodiment}", joined["model"], joined["chance"], joined["true"], scale, scale_is, unit
        )
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
