"""The generated world as an environment: goal-conditioned tasks with an instruction, actions in
receding-horizon chunks, a success predicate on the state (docs/DESIGN.md, "The world as an
environment").

Tasks (``TASKS``) start with the balls resting on the floor of the box (the distractor of
``push_to_region`` rests in the other third). The box has no friction, so a ball slides until a
wall stops it — which a wall does when the ball arrives slower than ``physics.SOUND_SPEED``:

* ``push_to_region``: "Push the red ball into the left third of the box." Success: that ball's
  centre lies in the third and it is at rest (speed below ``REST_SPEED``).
* ``stop_ball``: one ball slides along the floor at 0.4-0.7 m/s. "Stop the blue ball." Success: it
  is at rest, anywhere.
* ``separate_balls``: two balls rest 0.2-0.24 m apart (surface to surface) in the middle. "Separate
  the red and green balls." Success: their centres at least ``SEPARATION`` apart, both at rest.

Actions are the embodiment's pseudo-actions (``encoders/pseudo_actions.py``) at its rate
(``agents.EMBODIMENT_RATES``), the units and rate of the training data. ``step`` integrates a chunk
of K of them from the current pose into K poses (``decode_pseudo_actions``, non-strict: a model's
6D may be degenerate), moves each effector linearly between them (centres clipped to the box), runs
the physics for K / rate seconds and returns the frames (at ``fps``, the world's resolution) whose
times fall in the chunk, the stereo audio of the chunk, the new state and whether the episode is
done (success, or ``horizon_s`` reached). Stepping on after a success is allowed (a demonstration
fills its clip so), past the horizon it is an error. Everything is a pure function of the seed and
the actions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from megatron_cosmos3.encoders.pseudo_actions import EmbodimentTrajectory, decode_pseudo_actions, get_layout
from megatron_cosmos3.world.agents import effector_discs, planned_trajectory
from megatron_cosmos3.world.config import WorldConfig
from megatron_cosmos3.world.physics import PHYSICS_RATE, Event, simulate
from megatron_cosmos3.world.render import BALL_COLOURS, EMBODIMENT_COLOURS, Canvas, Disc
from megatron_cosmos3.world.sound import RING_S, SAMPLE_RATE, synthesize

TASKS = ("push_to_region", "stop_ball", "separate_balls")
REGIONS = {"left": (0.0, 1.0 / 3.0), "right": (2.0 / 3.0, 1.0)}  # thirds of the box, x in metres
REST_SPEED = 0.05  # m/s: a ball slower than this is at rest
SEPARATION = 0.5  # m between the centres of separated balls


@dataclass(frozen=True)
class Task:
    """One episode's goal: ``kind`` (one of ``TASKS``), the ball it names (index into ``colours``) and,
    for ``push_to_region``, the region (a key of ``REGIONS``)."""

    kind: str
    ball: int
    colours: tuple[str, ...]
    region: str | None = None

    @property
    def instruction(self) -> str:
        colour = self.colours[self.ball]
        if self.kind == "push_to_region":
            return f"Push the {colour} ball into the {self.region} third of the box."
        if self.kind == "separate_balls":
            return f"Separate the {self.colours[0]} and {self.colours[1]} balls."
        return f"Stop the {colour} ball."

    def success(self, state: WorldState) -> bool:
        """The goal holds in ``state`` (module doc)."""
        if self.kind == "separate_balls":
            resting = bool((np.hypot(*state.velocities.T) < REST_SPEED).all())
            return resting and bool(abs(state.positions[0, 0] - state.positions[1, 0]) >= SEPARATION)
        if float(np.hypot(*state.velocities[self.ball])) >= REST_SPEED:
            return False
        if self.kind == "stop_ball":
            return True
        low, high = REGIONS[self.region]
        return bool(low <= state.positions[self.ball, 0] <= high)


@dataclass
class WorldState:
    """The truth at ``step / PHYSICS_RATE`` seconds: ball centres and velocities (B, 2) (x, z; m, m/s),
    radii (B,) m, and the embodiment's absolute pose (one frame, rotation matrices)."""

    step: int
    positions: np.ndarray
    velocities: np.ndarray
    radii: np.ndarray
    pose: EmbodimentTrajectory

    @property
    def time_s(self) -> float:
        return self.step / PHYSICS_RATE

    def effectors(self) -> tuple[np.ndarray, np.ndarray]:
        """Effector centres (H, 2) and radii (H,), the acting effector first (``agents.effector_discs``)."""
        centres, radii = effector_discs(self.pose)
        return np.clip(centres[0], 0.0, 1.0), radii[0]


@dataclass
class Observation:
    """What ``reset`` gives: the first frame (1, H, W, 3) uint8, the instruction and the state."""

    frames: np.ndarray
    instruction: str
    state: WorldState


@dataclass
class StepResult:
    """What ``step`` gives: the chunk's frames (F, H, W, 3) uint8 (possibly none), its audio
    (2, K / rate * 48000) float32, its collision events (times from the episode start), the new state,
    whether the task is solved and whether the episode is over."""

    frames: np.ndarray
    audio: np.ndarray
    events: list[Event]
    state: WorldState
    success: bool
    done: bool


class _EffectorPath:
    """A physics effector moving linearly between poses ``1 / rate`` s apart: t -> (centre, velocity,
    radius), tabulated at every physics step of the chunk."""

    def __init__(self, centres: np.ndarray, radii: np.ndarray, rate: float) -> None:
        steps = int(round((len(centres) - 1) * PHYSICS_RATE / rate))
        scaled = np.arange(steps + 1) * (rate / PHYSICS_RATE)
        index = np.minimum(scaled.astype(int), len(centres) - 2)
        fraction = (scaled - index)[:, None]
        moves = centres[index + 1] - centres[index]
        self.centres = centres[index] + moves * fraction
        self.velocities = moves * rate
        self.radii = (radii[index] + (radii[index + 1] - radii[index]) * fraction[:, 0]).tolist()

    def __call__(self, time: float):
        step = int(round(time * PHYSICS_RATE))
        return self.centres[step], self.velocities[step], self.radii[step]


def _whole_steps(rate: float, what: str) -> int:
    steps = PHYSICS_RATE / rate
    if steps != int(steps):
        raise ValueError(f"{what}={rate:g} must divide the physics rate {PHYSICS_RATE} steps per second")
    return int(steps)


class WorldEnvironment:
    """One task for one embodiment in the generated world (module doc).

    ``reset(seed)`` -> ``Observation``; ``step(actions)`` with ``actions`` a (K, dim) chunk of the
    embodiment's pseudo-actions -> ``StepResult``. ``fps`` defaults to the world's first frame rate.
    """

    def __init__(
        self,
        task: str,
        embodiment: str,
        world: WorldConfig | None = None,
        fps: float | None = None,
        horizon_s: float = 4.0,
    ) -> None:
        world = world or WorldConfig()
        if task not in TASKS:
            raise ValueError(f"task={task!r} is not an environment task; expected one of {list(TASKS)}")
        if embodiment not in world.action_rates:
            raise ValueError(
                f"embodiment={embodiment!r} has no action rate; expected one of {sorted(world.action_rates)}"
            )
        self.task_kind, self.embodiment, self.world = task, embodiment, world
        self.rate = float(world.action_rates[embodiment])
        self.fps = float(fps if fps is not None else world.fps_choices[0])
        self.steps_per_action = _whole_steps(self.rate, "action rate")
        self.steps_per_frame = _whole_steps(self.fps, "fps")
        if horizon_s <= 0:
            raise ValueError(f"horizon_s={horizon_s} must be > 0")
        self.horizon_steps = int(round(horizon_s * PHYSICS_RATE))
        self.action_dim = get_layout(embodiment).dim
        self.canvas = Canvas(world.resolution)
        self.task: Task | None = None
        self.state: WorldState | None = None

    # -- episode ---------------------------------------------------------------------------------

    def reset(self, seed: int) -> Observation:
        """A new episode, a pure function of ``seed`` (and the task; the embodiment only adds its pose)."""
        rng = np.random.default_rng([seed, TASKS.index(self.task_kind)])
        self._seed, self._chunk, self._ringing = seed, 0, None
        colours = tuple(str(c) for c in rng.choice(list(BALL_COLOURS), 2, replace=False))
        radii = rng.uniform(0.05, 0.08, 2)
        if self.task_kind == "push_to_region":
            region = str(rng.choice(list(REGIONS)))
            away = 1.0 if region == "left" else -1.0  # from the region towards the box's other side
            target_x = 0.5 + away * rng.uniform(-0.15, -0.05)
            distractor_x = 0.5 + away * rng.uniform(0.32, 0.42)
            self.task = Task(self.task_kind, 0, colours, region)
            positions = np.array([[target_x, radii[0]], [distractor_x, radii[1]]])
            velocities = np.zeros((2, 2))
        elif self.task_kind == "separate_balls":
            self.task = Task(self.task_kind, 0, colours)
            left = rng.uniform(0.38, 0.46)
            right = left + radii.sum() + rng.uniform(0.2, 0.24)
            positions = np.array([[left, radii[0]], [right, radii[1]]])  # the colours are drawn: either on the left
            velocities = np.zeros((2, 2))
        else:
            self.task = Task(self.task_kind, 0, colours[:1])
            radii = radii[:1]
            speed = rng.uniform(0.4, 0.7) * rng.choice([-1.0, 1.0])
            positions = np.array([[rng.uniform(0.3, 0.7), radii[0]]])
            velocities = np.array([[speed, 0.0]])
        start = np.array([[rng.uniform(0.25, 0.75), rng.uniform(0.55, 0.75)]])
        self.state = WorldState(0, positions, velocities, radii, planned_trajectory(self.embodiment, start))
        frame = self._render(positions, radii, zip(*self.state.effectors()))
        return Observation(frame[None], self.task.instruction, self.state)

    def step(self, actions) -> StepResult:
        """Executes a (K, dim) chunk of pseudo-actions (module doc); ValueError on a wrong chunk."""
        if self.state is None:
            raise ValueError("step before reset: call reset(seed) first")
        actions = torch.as_tensor(np.asarray(actions, dtype=np.float64))
        if actions.dim() != 2 or actions.shape[1] != self.action_dim or actions.shape[0] == 0:
            raise ValueError(
                f"actions must be a (steps, {self.action_dim}) chunk of {self.embodiment} pseudo-actions, "
                f"got shape {tuple(actions.shape)}"
            )
        if not torch.isfinite(actions).all():
            raise ValueError(f"actions must be finite, got {actions[~torch.isfinite(actions)][0].item()}")
        state = self.state
        if state.step >= self.horizon_steps:
            raise ValueError(f"the episode ended at horizon_s={self.horizon_steps / PHYSICS_RATE:g}; call reset")
        poses = decode_pseudo_actions(actions, state.pose, strict=False)
        centres, radii = effector_discs(poses)
        paths = [_EffectorPath(np.clip(centres[:, h], 0.0, 1.0), radii[:, h], self.rate) for h in range(radii.shape[1])]
        steps = actions.shape[0] * self.steps_per_action
        sim = simulate(state.positions, state.velocities, state.radii, steps / PHYSICS_RATE, paths)
        first = state.step // self.steps_per_frame + 1
        last = (state.step + steps) // self.steps_per_frame
        frames = []
        for frame in range(first, last + 1):
            step = frame * self.steps_per_frame - state.step  # a frame time is a physics step time
            effectors = [path(step / PHYSICS_RATE)[::2] for path in paths]
            frames.append(self._render(sim.positions[step], state.radii, effectors))
        frames = (
            np.stack(frames) if frames else np.zeros((0, self.world.resolution, self.world.resolution, 3), np.uint8)
        )
        audio = self._audio(sim.events, steps)
        offset = state.time_s
        events = [Event(e.time + offset, e.x, e.z, e.speed, e.kind, e.ball, e.other) for e in sim.events]
        self.state = WorldState(
            state.step + steps, sim.positions[-1].copy(), sim.final_velocities.copy(), state.radii, poses.frames(-1)
        )
        self._chunk += 1
        success = self.task.success(self.state)
        return StepResult(frames, audio, events, self.state, success, success or self.state.step >= self.horizon_steps)

    # -- media -----------------------------------------------------------------------------------

    def _render(self, positions: np.ndarray, radii: np.ndarray, effectors) -> np.ndarray:
        """A frame of the balls at ``positions`` and the effectors, an iterable of (centre, radius)."""
        discs = [Disc(x, z, r, BALL_COLOURS[c]) for (x, z), r, c in zip(positions, radii, self.task.colours)]
        tint = EMBODIMENT_COLOURS[self.embodiment]
        discs += [Disc(float(centre[0]), float(centre[1]), float(radius), tint) for centre, radius in effectors]
        return self.canvas.draw(discs)

    def _audio(self, events: list[Event], steps: int) -> np.ndarray:
        """The chunk's sound; a sound still ringing at its end carries into the next chunk."""
        samples = steps * SAMPLE_RATE // PHYSICS_RATE
        rng = np.random.default_rng([self._seed, 1, self._chunk])
        audio = synthesize(events, self.state.radii, samples / SAMPLE_RATE + RING_S, rng)
        if self._ringing is not None:
            carried = min(len(self._ringing[0]), audio.shape[1])
            audio[:, :carried] = np.clip(audio[:, :carried] + self._ringing[:, :carried], -1.0, 1.0)
        self._ringing = audio[:, samples:]
        return audio[:, :samples]
