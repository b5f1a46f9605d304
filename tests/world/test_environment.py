"""The generated world as an environment (docs/DESIGN.md, "The world as an environment"): episodes
are a pure function of the seed and the actions, the success predicate means what the instruction
says, the scripted expert of every embodiment solves every task, a random-motion policy does not,
and expert demonstrations are shard samples whose actions integrate to the expert's poses."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_cosmos3.data.schema import decode_sample, encode_sample
from megatron_cosmos3.data.shards import ShardIndex, read_shard
from megatron_cosmos3.encoders.pseudo_actions import (
    decode_pseudo_actions,
    encode_pseudo_actions,
    get_layout,
)
from megatron_cosmos3.world.agents import EMBODIMENT_RATES, effector_discs, joined, planned_trajectory, random_agent
from megatron_cosmos3.world.config import WorldConfig
from megatron_cosmos3.world.environment import TASKS, Task, WorldEnvironment, WorldState
from megatron_cosmos3.world.experts import Expert
from megatron_cosmos3.world.render import EMBODIMENT_COLOURS
from megatron_cosmos3.world.sound import SAMPLE_RATE
from megatron_cosmos3.world.world import agent_start_trajectory, chunk_steps, demonstration_sample, generate_sample

WORLD = WorldConfig(resolution=32)
EMBODIMENTS = sorted(EMBODIMENT_RATES)
EPISODES = 8  # per embodiment and task: >= 95% means all of them
CHUNK_S = 0.5


def _run(env: WorldEnvironment, seed: int, policy) -> bool:
    """One episode of ``policy(state, steps) -> actions`` in chunks of CHUNK_S; whether it succeeded."""
    env.reset(seed)
    while True:
        result = env.step(policy(env.state, int(CHUNK_S * env.rate)))
        if result.done:
            return result.success


def test_reset_and_step_are_deterministic_given_the_seed():
    for task in TASKS:
        runs = []
        for seed in (3, 3, 4):
            env = WorldEnvironment(task, "single_arm", WORLD)
            observation = env.reset(seed)
            steps = [env.step(Expert(env).act(env.state, 5)) for _ in range(2)]
            runs.append((observation, steps))
        (first, a), (again, b), (other, c) = runs
        assert np.array_equal(first.frames, again.frames) and first.instruction == again.instruction
        for x, y in zip(a, b):
            assert np.array_equal(x.frames, y.frames) and np.array_equal(x.audio, y.audio)
            assert np.array_equal(x.state.positions, y.state.positions)
            assert np.array_equal(x.state.velocities, y.state.velocities)
            assert torch.equal(
                x.state.pose.poses["end_effector"].positions, y.state.pose.poses["end_effector"].positions
            )
        assert not np.array_equal(first.state.positions, other.state.positions)
        assert not np.array_equal(first.frames, other.frames)


def test_the_actions_move_the_effector_where_the_frames_show_it():
    """Control for determinism: other actions, another path and other frames; the pusher's pixels sit
    where its integrated pose says."""
    env = WorldEnvironment("push_to_region", "planar_pusher", WORLD, fps=16.0)
    env.reset(0)
    start = env.state.pose
    centre = effector_discs(start)[0][0, 0]
    goal = centre + np.array([0.2, -0.1])
    path = planned_trajectory("planar_pusher", centre + np.linspace(0, 1, 6)[1:, None] * (goal - centre))
    moved = env.step(encode_pseudo_actions(joined(start, path)).numpy())  # 5 actions: 0.25 s, 4 frames
    assert moved.frames.shape == (4, 32, 32, 3) and moved.audio.shape == (2, SAMPLE_RATE // 4)
    assert np.allclose(env.state.effectors()[0][0], goal, atol=1e-9)
    rows, cols = np.nonzero(np.abs(moved.frames[-1].astype(int) - EMBODIMENT_COLOURS["planar_pusher"]).sum(-1) < 12)
    seen = np.array([(cols.mean() + 0.5) / 32, 1 - (rows.mean() + 0.5) / 32])
    assert np.abs(seen - goal).max() < 1.5 / 32
    env.reset(0)
    still = env.step(np.tile(encode_pseudo_actions(joined(start, start)).numpy(), (5, 1)))
    assert np.allclose(env.state.effectors()[0][0], centre, atol=1e-9)
    assert not np.array_equal(moved.frames, still.frames)


@pytest.mark.parametrize("embodiment", EMBODIMENTS)
@pytest.mark.parametrize("task", TASKS)
def test_the_expert_solves_at_least_95_percent_of_seeded_episodes(task, embodiment):
    env = WorldEnvironment(task, embodiment, WORLD)
    expert = Expert(env)
    solved = sum(_run(env, 1000 + seed, expert.act) for seed in range(EPISODES))
    assert solved >= 0.95 * EPISODES, f"{embodiment} solved {solved}/{EPISODES} {task} episodes"


def _state(positions, velocities, radii=(0.06, 0.06)) -> WorldState:
    pose = planned_trajectory("single_arm", np.array([[0.5, 0.7]]))
    return WorldState(0, np.array(positions, float), np.array(velocities, float), np.array(radii), pose)


def test_the_success_predicate_on_hand_made_states():
    left = Task("push_to_region", 0, ("red", "blue"), "left")
    right = Task("push_to_region", 1, ("red", "blue"), "right")
    third = 1.0 / 3.0
    assert left.success(_state([[third - 1e-3, 0.06], [0.9, 0.06]], [[0, 0], [0, 0]]))
    assert not left.success(_state([[third + 1e-3, 0.06], [0.1, 0.06]], [[0, 0], [0, 0]]))  # the other ball is in
    assert not left.success(_state([[0.1, 0.06], [0.9, 0.06]], [[0.06, 0], [0, 0]]))  # in, but still sliding
    assert left.success(_state([[0.1, 0.06], [0.9, 0.06]], [[0.03, 0.03], [2.0, 0]]))  # at rest; the other moves
    assert right.success(_state([[0.1, 0.06], [2 * third + 1e-3, 0.06]], [[0, 0], [0, 0]]))
    assert not right.success(_state([[0.9, 0.06], [2 * third - 1e-3, 0.06]], [[0, 0], [0, 0]]))
    stop = Task("stop_ball", 0, ("green",))
    assert stop.success(_state([[0.5, 0.06]], [[0.049, 0.0]], (0.06,)))
    assert not stop.success(_state([[0.5, 0.06]], [[0.051, 0.0]], (0.06,)))
    assert not stop.success(_state([[0.5, 0.3]], [[0.0, -0.06]], (0.06,)))  # falling counts as moving
    apart = Task("separate_balls", 0, ("red", "blue"))
    assert type(apart.success(_state([[0.2, 0.06], [0.8, 0.06]], [[0, 0], [0, 0]]))) is bool  # JSON-able
    assert apart.success(_state([[0.2, 0.06], [0.7 + 1e-3, 0.06]], [[0, 0], [0.04, 0]]))
    assert apart.success(_state([[0.9, 0.06], [0.4 - 1e-3, 0.06]], [[0, 0], [0, 0]]))
    assert not apart.success(_state([[0.2, 0.06], [0.7 - 1e-3, 0.06]], [[0, 0], [0, 0]]))  # too close
    assert not apart.success(_state([[0.1, 0.06], [0.9, 0.06]], [[0, 0], [0.06, 0]]))  # one still slides
    assert apart.instruction == "Separate the red and blue balls."
    assert left.instruction == "Push the red ball into the left third of the box."
    assert stop.instruction == "Stop the green ball."


def test_a_random_motion_policy_succeeds_far_less_often_than_the_expert():
    """The random policy moves like the training clips' embodiments (``agents.random_agent``)."""
    rates = {}
    for task in TASKS:
        env = WorldEnvironment(task, "single_arm", WORLD, horizon_s=3.0)
        successes = []
        for seed in range(6):
            agent = random_agent("single_arm", np.random.default_rng(seed))
            times = np.arange(int(3.0 * env.rate) + 1) / env.rate
            actions = encode_pseudo_actions(agent.trajectory(times)).numpy()
            played = iter(np.split(actions, len(actions) // 5))
            successes.append(_run(env, 2000 + seed, lambda state, steps, played=played: next(played)))
        rates[task] = np.mean(successes)
    assert all(rate <= 0.25 for rate in rates.values()), rates


def test_demonstrations_are_samples_whose_actions_integrate_to_the_expert_poses():
    config = WorldConfig(resolution=32, embodiments=tuple(EMBODIMENTS), duration_s=2.0)
    seen = set()
    for index in range(12):
        if seen == set(EMBODIMENTS):
            break
        sample = demonstration_sample(config, 5, index)
        if sample.embodiment in seen:
            continue
        seen.add(sample.embodiment)
        decoded = decode_sample(encode_sample(sample))  # the shard schema accepts it
        assert np.array_equal(decoded.actions, sample.actions) and decoded.instruction == sample.instruction
        rate, fps = sample.action_rate_hz, sample.fps
        assert sample.actions.shape == (rate * 2.0, get_layout(sample.embodiment).dim)
        assert len(sample.video) == fps * 2.0 + 1 and sample.audio.shape == (2, 2 * SAMPLE_RATE)
        # Replay: the same episode, the expert's own poses at every chunk's end.
        task = sample.timing["task"]["kind"]
        env = WorldEnvironment(task, sample.embodiment, config, fps=fps, horizon_s=2.0)
        assert env.reset(sample.source["episode_seed"]).instruction == sample.instruction
        expert, poses, taken = Expert(env), [], 0
        while taken < len(sample.actions):
            steps = min(chunk_steps(rate), len(sample.actions) - taken)
            env.step(expert.act(env.state, steps))
            taken += steps
            poses.append((taken, env.state.pose))
        integrated = decode_pseudo_actions(
            torch.from_numpy(sample.actions).double(),
            agent_start_trajectory(sample.embodiment, sample.timing["agent_start"]),
        )
        for step, pose in poses:
            for part, truth in pose.poses.items():
                got = integrated.poses[part].positions[step]
                assert torch.allclose(got, truth.positions[0], atol=1e-4), (sample.embodiment, part, step)
        assert sample.timing["task"]["success"] == env.task.success(env.state)
    assert seen == set(EMBODIMENTS)


@pytest.mark.parametrize(("rate", "chunk"), [(7.5, 4), (15.0, 8), (5.0, 3), (20.0, 10)])
def test_demonstration_chunks_are_the_steps_that_start_in_half_a_second(monkeypatch, rate, chunk):
    """The expert is asked for ceil(0.5 s x rate) actions at a time (3.75 -> 4), the chunk the
    closed loop executes (tests/eval_suite/test_closed_loop_episodes.py); the last one is cut to the clip."""
    asked = []
    act = Expert.act
    monkeypatch.setattr(Expert, "act", lambda self, state, steps: asked.append(steps) or act(self, state, steps))
    config = WorldConfig(resolution=32, embodiments=("single_arm",), action_rates={"single_arm": rate}, duration_s=2.0)
    sample = demonstration_sample(config, 5, 0)
    total = int(rate * 2.0)
    assert chunk_steps(rate) == chunk and asked == [chunk] * (total // chunk) + [total % chunk] * (total % chunk > 0)
    assert len(sample.actions) == total


def test_the_held_out_embodiment_stays_out_of_the_default_world():
    default = WorldConfig(resolution=32, duration_s=0.5, demonstration_fraction=0.5)
    kinds = {generate_sample(default, 9, i).embodiment for i in range(16)}
    assert kinds == {"single_arm", "humanoid", None}
    held_out = WorldConfig(resolution=32, duration_s=0.5, embodiments=("planar_pusher",), demonstration_fraction=0.5)
    samples = [generate_sample(held_out, 9, i) for i in range(10)]
    assert {s.embodiment for s in samples} == {"planar_pusher", None}
    assert any("task" in (s.timing or {}) for s in samples) and any(
        s.actions is not None and "task" not in s.timing for s in samples
    )


def test_bad_settings_and_chunks_are_named():
    with pytest.raises(ValueError, match="embodiments=.*'gantry'"):
        WorldConfig(embodiments=("gantry",))
    with pytest.raises(ValueError, match="demonstration_fraction=1.5"):
        WorldConfig(demonstration_fraction=1.5)
    with pytest.raises(ValueError, match="task='juggle'"):
        WorldEnvironment("juggle", "single_arm")
    with pytest.raises(ValueError, match="embodiment='gantry'"):
        WorldEnvironment("stop_ball", "gantry")
    with pytest.raises(ValueError, match="fps=25"):
        WorldEnvironment("stop_ball", "single_arm", fps=25.0)
    env = WorldEnvironment("stop_ball", "humanoid", WORLD)
    with pytest.raises(ValueError, match="step before reset"):
        env.step(np.zeros((2, 57)))
    env.reset(0)
    with pytest.raises(ValueError, match=r"\(steps, 57\) chunk of humanoid pseudo-actions, got shape \(2, 19\)"):
        env.step(np.zeros((2, 19)))
    with pytest.raises(ValueError, match="finite, got nan"):
        env.step(np.full((2, 57), np.nan))


@pytest.mark.parametrize("embodiment", EMBODIMENTS)
def test_a_huge_finite_chunk_is_stepped_with_the_effector_held_in_the_box(embodiment):
    """A diverging model's chunk of 1e30 (finite: the closed loop steps it) moves the effector to the
    box's edge; the balls' state and the frames stay finite and the episode goes on."""
    env = WorldEnvironment("push_to_region", embodiment, WORLD)
    env.reset(0)
    for value in (1e30, 0.0, -1e300):
        result = env.step(np.full((4, env.action_dim), value))
        centres, _ = result.state.effectors()
        assert np.isfinite(result.state.positions).all() and np.isfinite(result.state.velocities).all()
        assert ((0.0 <= centres) & (centres <= 1.0)).all() and np.isfinite(result.audio).all()
    assert centres[0, 0] == 0.0  # pushed to the left wall by the last chunk


def test_generate_world_writes_demonstrations_of_the_embodiments_asked_for(tmp_path):
    """The command: ``--demonstrations`` and ``--embodiments`` reach the shards (the held-out pusher's own data)."""
    path = Path(__file__).resolve().parents[2] / "data_pipelines" / "generate_world.py"
    spec = importlib.util.spec_from_file_location("generate_world", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)  # data_pipelines/ holds scripts, not a package
    argv = [str(tmp_path), "--samples", "6", "--resolution", "32", "--duration", "0.5", "--shard-size", "6"]
    assert script.main([*argv, "--demonstrations", "0.5", "--embodiments", "planar_pusher"]) == 0
    shard = ShardIndex.load(tmp_path / "raw").shards[0]
    samples = [decode_sample(raw) for raw in read_shard(shard.url)]
    demonstrations = [s for s in samples if "task" in (s.timing or {})]
    assert 0 < len(demonstrations) < len(samples)
    assert {s.embodiment for s in samples} <= {"planar_pusher", None}
    for sample in demonstrations:
        env = WorldEnvironment(sample.timing["task"]["kind"], "planar_pusher", WORLD)
        assert sample.instruction == env.reset(sample.source["episode_seed"]).instruction
