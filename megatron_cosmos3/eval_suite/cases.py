"""Held-out cases from the generated world, each with its truth (docs/DESIGN.md, "Evaluation").

The world is a pure function of (seed, index, config) (``world.world.generate_sample``), so the
suite draws its cases from a held-out world seed directly, with no shards: the clip's frames, 48 kHz
sound, the embodiment's pseudo-actions, caption, instruction and question are what the model gets
or what it is measured against, and the simulator's collision times are the sound's truth. A
sample serves every task whose inputs and truth it has; each task takes the first
``cases_per_task`` that fit, in index order.

What each task's case asks for and what its truth is:

=================  =================================================  ===================================
task               request                                            truth (scored part)
=================  =================================================  ===================================
forward_dynamics   instruction, the past frames, all the actions      the future frames
image_to_video     caption, the first frame                           the frames after the first latent
video_to_audio     caption, the clip                                  the sound and its collision times
inverse_dynamics   instruction, the clip                              the actions
policy             instruction, the first frame (observation)         the actions (open loop)
text_to_video      caption                                            the clip; the caption's balls
understanding      the question, the first frame                      the answer
=================  =================================================  ===================================
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

import numpy as np

from megatron_cosmos3.data.schema import Sample
from megatron_cosmos3.encoders.video_vae import encoded_frame_count, num_latent_frames
from megatron_cosmos3.eval_suite.config import MAX_SAMPLES_SEARCHED, SuiteConfig
from megatron_cosmos3.evaluation.audio import resolvable_onsets
from megatron_cosmos3.evaluation.detection import BallDetector
from megatron_cosmos3.evaluation.text_to_video import balls_in_caption
from megatron_cosmos3.inference.requests import GenerationRequest
from megatron_cosmos3.tasks.layout import past_frames
from megatron_cosmos3.world.render import BALL_COLOURS, EMBODIMENT_COLOURS
from megatron_cosmos3.world.sound import SAMPLE_RATE
from megatron_cosmos3.world.world import generate_sample

ACTION_TASKS = ("forward_dynamics", "inverse_dynamics", "policy")


def world_detector() -> BallDetector:
    """The ball detector for the generated world: its palette, 1 m box, smallest ball (0.05 m) and
    its effectors' colours as distractors."""
    return BallDetector(BALL_COLOURS, box_m=1.0, min_radius_m=0.05, distractors=list(EMBODIMENT_COLOURS.values()))


@dataclass(frozen=True)
class Case:
    """One held-out case of ``task``: ``sample`` is the world's (its truth); ``index`` its place in
    the world; ``seed`` the sampler seed of its generation."""

    task: str
    index: int
    sample: Sample
    seed: int

    @property
    def name(self) -> str:
        return f"{self.task}_{self.index:05d}"

    @property
    def frames(self) -> np.ndarray:
        return self.sample.video

    @property
    def first_scored_frame(self) -> int:
        """The first pixel frame the model generated rather than was given: after the past latent
        frames (forward dynamics) or the first one (image->video); 0 where nothing is given."""
        if self.task == "forward_dynamics":
            return encoded_frame_count(past_frames(num_latent_frames(len(self.frames))))
        return 1 if self.task == "image_to_video" else 0

    @property
    def collision_times_s(self) -> np.ndarray:
        """The collisions one can hear apart (``resolvable_onsets``) within the clip."""
        events = (self.sample.timing or {}).get("events", [])
        times = [e["time_s"] for e in events if e["time_s"] < self.sample.audio.shape[1] / SAMPLE_RATE]
        return resolvable_onsets(times) if times else np.zeros(0)

    @property
    def asked(self) -> dict[str, int]:
        """text->video: the balls the caption asks for."""
        return balls_in_caption(self.sample.caption, BALL_COLOURS)

    def request(self, config: SuiteConfig) -> GenerationRequest:
        """The generation request of a task with DM targets (module doc)."""
        s, task = self.sample, self.task
        sampler = dict(seed=self.seed, steps=config.steps, solver=config.solver, guidance=config.guidance)
        clip = dict(fps=float(s.fps), num_frames=len(s.video), **sampler, shift=config.shift)
        if task == "forward_dynamics":
            past = self.first_scored_frame
            return GenerationRequest(
                task, s.instruction, video=s.video[:past], actions=s.actions, embodiment=s.embodiment, **clip
            )
        if task == "image_to_video":
            return GenerationRequest(task, s.caption, image=s.video[0], **clip)
        if task == "video_to_audio":
            return GenerationRequest(task, s.caption, video=s.video, **clip)
        if task == "inverse_dynamics":
            return GenerationRequest(task, s.instruction, video=s.video, embodiment=s.embodiment, **clip)
        if task == "policy":
            return GenerationRequest(task, s.instruction, image=s.video[0], embodiment=s.embodiment, **clip)
        if task == "text_to_video":
            size = tuple(s.video.shape[1:3])
            return GenerationRequest(task, s.caption, resolution=size, **clip)
        raise ValueError(f"task {task!r} has no generation request (understanding generates text)")


def _fits(task: str, sample: Sample, embodiments: Collection[str]) -> bool:
    if sample.video is None:
        return False
    if task in ACTION_TASKS:
        return sample.actions is not None and sample.embodiment in embodiments and bool(sample.instruction)
    if task == "video_to_audio":
        events = (sample.timing or {}).get("events", [])
        return sample.audio is not None and any(e["time_s"] < sample.audio.shape[1] / SAMPLE_RATE for e in events)
    if task == "understanding":
        return sample.question is not None and sample.answer is not None
    if task == "text_to_video":
        return bool(balls_in_caption(sample.caption or "", BALL_COLOURS))
    return bool(sample.caption)


def held_out_cases(
    config: SuiteConfig,
    tasks: Collection[str],
    embodiments: Collection[str],
    search: int = MAX_SAMPLES_SEARCHED,
    action_rates: Mapping[str, float] | None = None,
) -> dict[str, list[Case]]:
    """``config.cases_per_task`` cases of each of ``tasks`` (in ``config.tasks`` order) from the
    held-out world ``config.world_seed``; action tasks only for ``embodiments`` (those the model has
    heads for), their actions at ``action_rates`` (the model's, ``SuiteConfig.world``). ValueError
    naming the task when the first ``search`` samples (at most ``MAX_SAMPLES_SEARCHED``) hold too
    few cases."""
    if isinstance(search, bool) or not isinstance(search, int) or not 1 <= search <= MAX_SAMPLES_SEARCHED:
        raise ValueError(f"eval suite: search={search!r} must be an integer in [1, {MAX_SAMPLES_SEARCHED}]")
    world = config.world(action_rates)
    wanted = [task for task in config.tasks if task in tasks]
    cases: dict[str, list[Case]] = {task: [] for task in wanted}
    for index in range(search):
        if all(len(found) == config.cases_per_task for found in cases.values()):
            break
        sample = generate_sample(world, config.world_seed, index)
        for task in wanted:
            if len(cases[task]) < config.cases_per_task and _fits(task, sample, embodiments):
                cases[task].append(Case(task, index, sample, config.seed + len(cases[task])))
    short = {task: len(found) for task, found in cases.items() if len(found) < config.cases_per_task}
    if short:
        raise ValueError(
            f"eval suite: world_seed={config.world_seed}: the first {search} samples hold too few cases "
            f"(found {short}, cases_per_task={config.cases_per_task}; action tasks need an embodiment among "
            f"{sorted(embodiments)})"
        )
    return cases
