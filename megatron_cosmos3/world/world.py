"""One generated sample from (seed, index): physics, pictures, sound, actions and text that agree.

A *clip* simulates 1-3 balls (and, most of the time, a single-arm robot or a humanoid whose
effectors push them) for ``duration_s``; it renders the frames at a frame rate drawn from
``fps_choices`` (frame k at k / fps s), synthesises stereo 48 kHz audio whose impact sounds start
at the collision times, records the embodiment's poses at its action rate (pose k at k / rate s)
and turns them into pseudo-actions (``timing.agent_start`` keeps the absolute start state that
integrates them back into poses), and describes it all in a caption, an instruction and,
sometimes, a question. A *still* is one picture of the box with a caption saying where each ball
is. A *demonstration* (``config.demonstration_fraction`` of the samples) is an environment episode
(``world/environment.py``) of ``duration_s`` in which the scripted expert (``world/experts.py``)
solves a task: the same fields as a clip, the task's instruction, and ``timing.task``. Everything is
a pure function of (seed, index, config).
"""

from __future__ import annotations

import numpy as np
import torch

from megatron_cosmos3.data.schema import Sample
from megatron_cosmos3.encoders.pseudo_actions import BodyPoses, EmbodimentTrajectory, encode_pseudo_actions
from megatron_cosmos3.encoders.rotations import matrix_to_quaternion
from megatron_cosmos3.tasks.layout import steps_before
from megatron_cosmos3.world import captions
from megatron_cosmos3.world.agents import Agent, random_agent
from megatron_cosmos3.world.config import WorldConfig
from megatron_cosmos3.world.environment import TASKS, WorldEnvironment
from megatron_cosmos3.world.experts import Expert
from megatron_cosmos3.world.physics import Event, Simulation, simulate
from megatron_cosmos3.world.render import BALL_COLOURS, EMBODIMENT_COLOURS, Canvas, Disc
from megatron_cosmos3.world.sound import SAMPLE_RATE, synthesize

_DEMONSTRATION_STREAM = 1
CHUNK_S = 0.5  # seconds of actions per expert chunk in a demonstration (receding horizon)


def _event_records(events: list[Event], colours: list[str]) -> list[dict]:
    return [
        {
            "time_s": round(e.time, 6),
            "kind": e.kind,
            "ball": colours[e.ball],
            "x": round(e.x, 4),
            "z": round(e.z, 4),
            "speed": round(e.speed, 4),
        }
        for e in events
    ]


def agent_start_record(trajectory: EmbodimentTrajectory) -> dict:
    """``timing.agent_start``: the absolute first pose of every part (position, xyzw quaternion) and
    the first joint values — pseudo-actions are relative, this is what integrates them into poses."""
    poses = {}
    for part, p in trajectory.poses.items():
        rotation = p.rotations[0]
        quaternion = matrix_to_quaternion(rotation) if rotation.shape == (3, 3) else rotation
        poses[part] = {"position": p.positions[0].tolist(), "quaternion_xyzw": quaternion.tolist()}
    return {"poses": poses, "joints": {name: values[0].tolist() for name, values in trajectory.joints.items()}}


def agent_start_trajectory(kind: str, record: dict) -> EmbodimentTrajectory:
    """The one-frame float64 start state an ``agent_start_record`` describes: what a sample's
    pseudo-actions integrate from (``decode_pseudo_actions``)."""
    return EmbodimentTrajectory(
        kind,
        {
            part: BodyPoses(
                torch.tensor([pose["position"]], dtype=torch.float64),
                torch.tensor([pose["quaternion_xyzw"]], dtype=torch.float64),
            )
            for part, pose in record["poses"].items()
        },
        {name: torch.tensor([values], dtype=torch.float64) for name, values in record["joints"].items()},
    )


def chunk_steps(rate: float, seconds: float = CHUNK_S) -> int:
    """Actions in a chunk of ``seconds`` at ``rate`` Hz: the steps that start in it
    (``tasks.layout.steps_before``, at least one). The expert's chunk in a demonstration and the
    chunk the closed loop executes before deciding again are both this (docs/DESIGN.md, "Evaluation")."""
    return max(1, steps_before(seconds, rate))


def demonstration_sample(config: WorldConfig, seed: int, index: int) -> Sample:
    """The expert solving a drawn task with a drawn embodiment of ``config.embodiments`` (module doc)."""
    rng = np.random.default_rng([seed, index, _DEMONSTRATION_STREAM])
    rng.random()  # the draw that chose a demonstration
    kind = sorted(config.embodiments)[int(rng.integers(len(config.embodiments)))]
    task = TASKS[int(rng.integers(len(TASKS)))]
    fps = float(config.fps_choices[int(rng.integers(len(config.fps_choices)))])
    env = WorldEnvironment(task, kind, config, fps=fps, horizon_s=config.duration_s)
    episode = int(rng.integers(2**31))
    observation = env.reset(episode)
    expert, start = Expert(env), env.state.pose
    frames, audio, actions, events = [observation.frames], [], [], []
    total = int(round(config.duration_s * env.rate))
    while len(actions) < total:
        chunk = expert.act(env.state, min(chunk_steps(env.rate), total - len(actions)))
        result = env.step(chunk)
        frames.append(result.frames)
        audio.append(result.audio)
        actions.extend(chunk)
        events.extend(result.events)
    colours = list(env.task.colours)
    return Sample(
        key=f"world-{seed:04d}-{index:07d}",
        video=np.concatenate(frames),
        fps=fps,
        audio=np.concatenate(audio, axis=1),
        audio_sample_rate=SAMPLE_RATE,
        caption=captions.clip_caption(colours, events, None, fps, config.duration_s)
        + " "
        + captions.task_caption(kind, observation.instruction, env.task.success(env.state)),
        instruction=observation.instruction,
        actions=np.stack(actions).astype(np.float32),
        embodiment=kind,
        action_rate_hz=env.rate,
        duration_s=config.duration_s,
        source={"world_seed": seed, "index": index, "episode_seed": episode},
        timing={
            "events": _event_records(events, colours),
            "agent_start": agent_start_record(start),
            "task": {
                "kind": task,
                "ball": colours[env.task.ball],
                "region": env.task.region,
                "success": env.task.success(env.state),
            },
        },
    )


def _start_state(rng: np.random.Generator, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    radii = rng.uniform(0.05, 0.09, count)
    positions = np.zeros((count, 2))
    for i in range(count):
        while True:  # rejection-sample a free spot in the upper half
            candidate = np.array([rng.uniform(radii[i], 1 - radii[i]), rng.uniform(0.45, 1 - radii[i])])
            if all(np.hypot(*(candidate - positions[j])) > radii[i] + radii[j] for j in range(i)):
                positions[i] = candidate
                break
    return positions, rng.uniform(-1.5, 1.5, (count, 2)), radii


def _discs(sim: Simulation, colours: list[str], agent: Agent | None, time: float) -> list[Disc]:
    discs = [Disc(x, z, r, BALL_COLOURS[c]) for (x, z), r, c in zip(sim.at(time), sim.radii, colours)]
    if agent is not None:
        colour = EMBODIMENT_COLOURS[agent.kind]
        for hand in agent.hands:
            x, z = agent.hand_centre(hand, time)
            discs.append(Disc(float(x), float(z), float(hand.radius(time)), colour))
    return discs


def generate_sample(config: WorldConfig, seed: int, index: int) -> Sample:
    """Sample ``index`` of world ``seed`` (module doc)."""
    draw = np.random.default_rng([seed, index, _DEMONSTRATION_STREAM]).random()  # leaves the other draws as they were
    if draw < config.demonstration_fraction:
        return demonstration_sample(config, seed, index)
    rng = np.random.default_rng([seed, index])
    key = f"world-{seed:04d}-{index:07d}"
    count = int(rng.integers(1, config.max_balls + 1))
    colours = [str(c) for c in rng.choice(list(BALL_COLOURS), count, replace=False)]
    positions, velocities, radii = _start_state(rng, len(colours))
    canvas = Canvas(config.resolution)
    if rng.random() < config.still_fraction:
        moment = float(rng.integers(0, int(config.duration_s * 24))) / 24  # a step time
        sim = simulate(positions, velocities, radii, moment)
        return Sample(
            key=key,
            caption=captions.still_caption(colours, sim.at(moment)),
            image=canvas.draw(_discs(sim, colours, None, moment)),
            source={"world_seed": seed, "index": index},
        )

    agent = None
    if rng.random() < config.agent_fraction:
        agent = random_agent(sorted(config.embodiments)[int(rng.integers(len(config.embodiments)))], rng)
    fps = float(config.fps_choices[int(rng.integers(len(config.fps_choices)))])
    sim = simulate(positions, velocities, radii, config.duration_s, agent.effectors() if agent else [])
    frames = np.stack(
        [canvas.draw(_discs(sim, colours, agent, k / fps)) for k in range(int(round(config.duration_s * fps)) + 1)]
    )
    sample = Sample(
        key=key,
        video=frames,
        fps=fps,
        audio=synthesize(sim.events, radii, config.duration_s, rng),
        audio_sample_rate=SAMPLE_RATE,
        caption=captions.clip_caption(colours, sim.events, agent.kind if agent else None, fps, config.duration_s),
        duration_s=config.duration_s,
        source={"world_seed": seed, "index": index},
        timing={"events": _event_records(sim.events, colours)},
    )
    if agent is not None:
        rate = config.action_rates[agent.kind]
        times = np.arange(int(round(config.duration_s * rate)) + 1) / rate
        trajectory = agent.trajectory(times)
        sample.actions = encode_pseudo_actions(trajectory).numpy().astype(np.float32)
        sample.embodiment, sample.action_rate_hz = agent.kind, rate
        sample.timing["agent_start"] = agent_start_record(trajectory)
        hand = agent.hands[0]
        opening = (1 - float(hand.closure(0.0)), 1 - float(hand.closure(config.duration_s)))
        sample.instruction = captions.instruction(
            agent.kind, agent.hand_centre(hand, 0.0), agent.hand_centre(hand, config.duration_s), opening
        )
    if rng.random() < config.question_fraction:
        sample.question, sample.answer = captions.floor_question(colours, sim.events, rng)
    return sample
