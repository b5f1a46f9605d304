"""What the evaluation suite runs (docs/DESIGN.md, "Evaluation"): which tasks, how many held-out
cases of which held-out world, the sampler, and whether media are written. A typed dataclass like
the training configs, loadable from YAML with dotlist overrides and validated once; the trainer
holds one as ``eval.suite``."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from megatron_cosmos3.config_files import refuse_irregular_file
from megatron_cosmos3.data.clips import check_clip_bytes
from megatron_cosmos3.data.determinism import seed_problem
from megatron_cosmos3.data.errors import SampleError
from megatron_cosmos3.data.schema import DURATION_RANGE_S, FPS_RANGE
from megatron_cosmos3.encoders.pseudo_actions import get_layout
from megatron_cosmos3.inference.requests import sampler_settings
from megatron_cosmos3.inference.text_generation import MAX_NEW_TOKENS
from megatron_cosmos3.model.config import merge_config_layer
from megatron_cosmos3.world.agents import EMBODIMENT_RATES
from megatron_cosmos3.world.config import WorldConfig
from megatron_cosmos3.world.environment import TASKS as ENVIRONMENT_TASKS
from megatron_cosmos3.yaml_integers import refuse_long_integers

# What the suite's refusals start with; inside a training config they name eval.suite.<field> instead.
SUITE_PREFIX = "eval suite: "
# World samples looked at for a task's cases before it is declared unfillable: no task can have more
# cases than this (``cases_per_task``), and a crafted count cannot search the world without end.
MAX_SAMPLES_SEARCHED = 400
# Closed-loop episodes per (task, embodiment) at most: each is a model-driven rollout of
# ``closed_loop_horizon_s``, so a crafted count (10**9) would run for years before the report.
MAX_CLOSED_LOOP_EPISODES = 1000

# The tasks the suite measures, in report order; each needs the world's truth of its kind.
SUITE_TASKS = (
    "forward_dynamics",
    "image_to_video",
    "video_to_audio",
    "inverse_dynamics",
    "policy",
    "text_to_video",
    "understanding",
)


@dataclass
class SuiteConfig:
    """tasks: which of ``SUITE_TASKS`` to measure (a task the checkpoint did not train is skipped
    and named in the report's meta). world_seed: the held-out world the cases come from (not a
    training world's seed). cases_per_task: held-out cases per task (at most
    ``MAX_SAMPLES_SEARCHED``, the world samples searched for them). resolution (pixels, a multiple
    of 32 and of the model's video token, ``16 * model.video_patch_size``), duration_s and fps:
    the held-out clips (duration_s x fps a multiple of 4: 1 + 4k frames, whole latent frames).
    steps, solver, guidance, shift: the sampler; seed: the first case's sampler seed (case i uses
    seed + i); each checked as a generation request's (``requests.sampler_settings``: steps at most
    ``solvers.MAX_STEPS``, guidance at most ``requests.MAX_GUIDANCE``). max_new_tokens: the
    understanding answers' length (at most ``text_generation.MAX_NEW_TOKENS``).
    chance_seed: the initialisation seed of the untrained model whose predictions are the chance
    row. onset_tolerance_s: how far a sound onset may be from its collision to count.
    demonstration_fraction: the share of held-out samples that are expert demonstrations of the
    environment's tasks (``world.world.demonstration_sample``: the policy's instructions and actions
    are then an expert's) instead of random-motion clips. media: write side-by-side predicted | true
    clips (the command; the trainer never does). closed_loop_episodes: seeded episodes (seeds
    ``world_seed + i``; at most ``MAX_CLOSED_LOOP_EPISODES``) of each of ``closed_loop_tasks`` (the
    environment's ``TASKS``) per embodiment the model acts for, driven by the model's ``policy`` generations
    (``eval_suite/closed_loop.py``); 0: no closed loop. closed_loop_horizon_s: an episode's length
    at most."""

    tasks: list[str] = field(default_factory=lambda: list(SUITE_TASKS))
    world_seed: int = 9001
    cases_per_task: int = 2
    resolution: int = 64
    duration_s: float = 0.5
    fps: float = 16.0
    steps: int = 8
    solver: str = "euler"
    guidance: float = 1.0
    shift: float = 1.0
    seed: int = 0
    max_new_tokens: int = 8
    chance_seed: int = 7
    onset_tolerance_s: float = 0.05
    demonstration_fraction: float = 0.0
    media: bool = True
    closed_loop_episodes: int = 0
    closed_loop_tasks: list[str] = field(default_factory=lambda: list(ENVIRONMENT_TASKS))
    closed_loop_horizon_s: float = 4.0

    def __post_init__(self) -> None:
        unknown = [task for task in self.tasks if task not in SUITE_TASKS]
        if unknown or not self.tasks:
            raise ValueError(
                f"{SUITE_PREFIX}tasks={list(self.tasks)}: must be a non-empty subset of {list(SUITE_TASKS)}"
            )
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"{SUITE_PREFIX}tasks={list(self.tasks)} names a task twice")
        bad = [task for task in self.closed_loop_tasks if task not in ENVIRONMENT_TASKS]
        if bad or len(set(self.closed_loop_tasks)) != len(self.closed_loop_tasks):
            raise ValueError(
                f"{SUITE_PREFIX}closed_loop_tasks={list(self.closed_loop_tasks)}: must name each of "
                f"{list(ENVIRONMENT_TASKS)} at most once"
            )
        for name in ("world_seed", "seed", "chance_seed"):
            problem = seed_problem(name, getattr(self, name))
            if problem:
                raise ValueError(f"{SUITE_PREFIX}{problem}")
        for name, low, high, constant in (
            ("closed_loop_episodes", 0, MAX_CLOSED_LOOP_EPISODES, "MAX_CLOSED_LOOP_EPISODES"),
            ("cases_per_task", 1, MAX_SAMPLES_SEARCHED, "MAX_SAMPLES_SEARCHED"),
            ("max_new_tokens", 1, MAX_NEW_TOKENS, "text_generation.MAX_NEW_TOKENS"),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ValueError(f"{SUITE_PREFIX}{name}={value!r} must be an integer in [{low}, {high}] ({constant})")
        try:
            sampler_settings(self.solver, self.steps, self.shift, self.guidance)
        except ValueError as error:
            raise ValueError(f"{SUITE_PREFIX}{error}") from None
        for name in ("onset_tolerance_s", "fps", "duration_s", "closed_loop_horizon_s"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not (math.isfinite(value) and value > 0)
            ):
                raise ValueError(f"{SUITE_PREFIX}{name}={value!r} must be a finite number > 0")
        frames = self.duration_s * self.fps
        if abs(frames - round(frames)) > 1e-9 or round(frames) % 4:
            raise ValueError(
                f"{SUITE_PREFIX}duration_s={self.duration_s} x fps={self.fps} = {frames:g} frame steps must be a "
                "multiple of 4 (clips of 1 + 4k frames: whole latent frames)"
            )
        if self.onset_tolerance_s >= self.duration_s:  # every onset of the clip would count as on time
            raise ValueError(
                f"{SUITE_PREFIX}onset_tolerance_s={self.onset_tolerance_s} must be below duration_s={self.duration_s} "
                "(a window as long as the clip finds every onset on time)"
            )
        if not (FPS_RANGE[0] <= self.fps <= FPS_RANGE[1] and self.duration_s <= DURATION_RANGE_S[1]):
            raise ValueError(
                f"{SUITE_PREFIX}fps={self.fps} must be in {list(FPS_RANGE)} and duration_s={self.duration_s} at most "
                f"{DURATION_RANGE_S[1]:g} (the shards' ranges)"
            )
        if self.closed_loop_horizon_s > DURATION_RANGE_S[1]:
            raise ValueError(
                f"{SUITE_PREFIX}closed_loop_horizon_s={self.closed_loop_horizon_s} is at most {DURATION_RANGE_S[1]:g} "
                "(the shards' longest clip)"
            )
        # The world validates resolution, the action rates' whole steps and its clips' decoded size.
        self.world()
        side = self.resolution
        episode = math.ceil(self.closed_loop_horizon_s * self.fps) + 1  # an episode's recorded frames
        try:  # what the shards could hold: a crafted length cannot allocate without bound
            check_clip_bytes(
                episode * side * side * 3, f"{episode} frames of {side}x{side}", "resolution x closed_loop_horizon_s"
            )
        except SampleError as error:
            raise ValueError(f"{SUITE_PREFIX}{error}") from None

    def world(self, action_rates: Mapping[str, float] | None = None) -> WorldConfig:
        """The held-out world's settings: the suite's clip size, length and frame rate, every
        embodiment acting (a model is measured on those it has heads for). ``action_rates``: the
        model's rates where they differ from the world's own (``model_action_rates``), so its
        actions and the truth's are sampled alike."""
        try:
            return WorldConfig(
                resolution=self.resolution,
                duration_s=self.duration_s,
                fps_choices=(self.fps,),
                action_rates={**EMBODIMENT_RATES, **(action_rates or {})},
                embodiments=("single_arm", "humanoid", "planar_pusher"),
                still_fraction=0.0,
                agent_fraction=0.8,
                question_fraction=0.5,
                demonstration_fraction=self.demonstration_fraction,
            )
        except ValueError as error:
            raise ValueError(f"{SUITE_PREFIX}{error}") from None


def model_action_rates(model_config) -> dict[str, float]:
    """The action rate of each embodiment of ``model_config`` (a ``MoTConfig``) that the world
    knows: a model generates actions at its configured rate, so the held-out world is sampled there."""
    return {name: float(e.rate_hz) for name, e in model_config.embodiments.items() if name in EMBODIMENT_RATES}


def check_model_embodiments(model_config) -> None:
    """ValueError naming the embodiment and both widths where ``model_config`` (a ``MoTConfig``)
    gives an embodiment of the world another action width than the world's pseudo-actions: its
    cases would feed the world's actions to heads of another width (found only in the first
    evaluation, after training)."""
    for name, embodiment in model_config.embodiments.items():
        if name in EMBODIMENT_RATES and embodiment.action_dim != get_layout(name).dim:
            raise ValueError(
                f"{SUITE_PREFIX}model.embodiments.{name}.action_dim={embodiment.action_dim}, but the held-out "
                f"world's {name!r} acts with {get_layout(name).dim}-D pseudo-actions; name the model's "
                f"embodiment otherwise or give it {get_layout(name).dim} dims"
            )


def load_suite_config(yaml_path: str | None = None, overrides: list[str] | None = None) -> SuiteConfig:
    """Defaults <- the YAML file <- ``key=value`` overrides, validated (ValueError naming the field)."""
    merged = OmegaConf.structured(SuiteConfig)
    if yaml_path:  # a FIFO or device would be read without end
        refuse_irregular_file("eval suite --config", yaml_path)
    try:
        if yaml_path:
            refuse_long_integers(Path(yaml_path).read_bytes().decode("utf-8"), "", SUITE_PREFIX)
            merged = merge_config_layer(merged, OmegaConf.load(yaml_path))
        for override in overrides or []:
            key, _, value = override.partition("=")
            refuse_long_integers(value, key.strip(), SUITE_PREFIX)  # the value alone: its key names it
        if overrides:
            merged = merge_config_layer(merged, OmegaConf.from_dotlist(list(overrides)))
        return OmegaConf.to_object(merged)
    except (OmegaConfBaseException, UnicodeDecodeError) as error:  # names the key (or the byte), on one line
        message = " ".join(str(error).split())
        raise ValueError(f"eval suite config{f' {yaml_path}' if yaml_path else ''}: {message}") from None
    except ValueError as error:  # the config's own checks name the field; add the file
        raise ValueError(f"eval suite config {yaml_path}: {error}" if yaml_path else str(error)) from None
    except Exception as error:  # YAML syntax and the like
        raise ValueError(f"eval suite config{f' {yaml_path}' if yaml_path else ''}: {error}") from None
