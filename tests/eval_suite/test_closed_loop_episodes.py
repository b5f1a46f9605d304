"""Closed-loop episodes (docs/DESIGN.md, "Evaluation"): the runner is a pure function of the seeds,
the expert's episodes succeed and the random policy's fail when run through it, a model's episode is
exactly its chunks stepped by hand, and the report rows put the model between its references."""

from __future__ import annotations

import copy

import av
import numpy as np
import pytest
import torch

from megatron_cosmos3.encoders.action_normalization import ActionStats, EmbodimentActionStats
from megatron_cosmos3.eval_suite.closed_loop import (
    ExpertPolicy,
    ModelPolicy,
    RandomPolicy,
    ReferenceCache,
    chunks_at_decisions,
    closed_loop_rows_for,
    run_episodes,
    write_episode_mp4,
)
from megatron_cosmos3.model.config import EmbodimentConfig
from megatron_cosmos3.model.mot import MoTModel
from megatron_cosmos3.testing.generation import generation_config, generation_setup
from megatron_cosmos3.world.config import WorldConfig
from megatron_cosmos3.world.environment import TASKS, WorldEnvironment
from megatron_cosmos3.world.experts import Expert
from megatron_cosmos3.world.world import chunk_steps

WORLD = WorldConfig(resolution=32, duration_s=1.0)
PUSHER = "planar_pusher"
EXECUTE = 10  # 0.5 s of the pusher's 20 Hz actions
CONFIG = generation_config(embodiments={PUSHER: EmbodimentConfig(10, 20.0)})


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MoTModel(copy.deepcopy(CONFIG)).eval()


@pytest.fixture(scope="module")
def builder():
    """The pusher's statistics from expert chunks, so generated actions are un-normalised with them."""
    env = WorldEnvironment("push_to_region", PUSHER, WORLD)
    env.reset(0)
    actions = Expert(env).act(env.state, 40)
    return generation_setup(CONFIG, ActionStats({PUSHER: EmbodimentActionStats.from_actions(PUSHER, actions)}))


def _stop_ball_runs(policy, references, seeds, record_media=False):
    return run_episodes(
        policy,
        "stop_ball",
        PUSHER,
        seeds,
        WORLD,
        execute=EXECUTE,
        horizon_s=1.0,
        references=references,
        record_media=record_media,
    )


def _model_runs(model, builder, seeds, record_media=False):
    policy = ModelPolicy(model, builder, chunk_s=WORLD.duration_s, steps=2)
    return _stop_ball_runs(policy, {"expert": ExpertPolicy(EXECUTE)}, seeds, record_media)


def test_the_runner_is_deterministic_given_the_seeds(model, builder):
    first, again, other = (_model_runs(model, builder, seeds) for seeds in ([3, 4], [3, 4], [5, 4]))
    for a, b in zip(first, again):
        assert a.episode == b.episode and len(a.chunks) == len(b.chunks) == 2
        assert all(np.array_equal(x, y) for x, y in zip(a.chunks, b.chunks))
        assert all(np.array_equal(x, y) for x, y in zip(a.references["expert"], b.references["expert"]))
    # Control: another seed is another episode; an episode does not depend on the others beside it.
    assert not np.array_equal(first[0].chunks[0], other[0].chunks[0])
    assert all(np.array_equal(x, y) for x, y in zip(first[1].chunks, other[1].chunks))


def test_a_models_episode_is_its_chunks_stepped_by_hand(model, builder):
    (run,) = _model_runs(model, builder, [7], record_media=True)
    assert run.chunks[0].shape == (22, 10)  # steps starting in the clip: 17 / 16 s x 20 Hz = 21.25
    env = WorldEnvironment("stop_ball", PUSHER, WORLD, horizon_s=1.0)
    frames, audio = [env.reset(7).frames], []
    for chunk, state in zip(run.chunks, run.states):
        assert np.array_equal(env.state.positions, state.positions)
        result = env.step(chunk[:EXECUTE])
        frames.append(result.frames)
        audio.append(result.audio)
    assert result.done and result.success == run.episode.success and run.episode.steps == 2 * EXECUTE
    assert np.array_equal(np.concatenate(frames), run.frames) and np.array_equal(np.concatenate(audio, 1), run.audio)
    # Control: one action changed is another episode.
    env.reset(7)
    changed = run.chunks[0][:EXECUTE].copy()
    changed[0, 0] += 0.05
    assert not np.array_equal(env.step(changed).frames, run.frames[1 : 1 + 8])


def test_the_expert_succeeds_and_the_random_policy_fails_through_the_runner():
    seeds = [100, 101, 102, 103]
    for task in TASKS:
        expert = run_episodes(ExpertPolicy(EXECUTE), task, PUSHER, seeds, WORLD, execute=EXECUTE)
        random = run_episodes(RandomPolicy(EXECUTE), task, PUSHER, seeds, WORLD, execute=EXECUTE)
        assert all(run.episode.success for run in expert), (task, [run.episode for run in expert])
        assert sum(run.episode.success for run in random) <= 1, (task, [run.episode for run in random])
        assert [run.episode.seed for run in expert] == seeds


def test_closed_loop_rows_and_media(model, builder, tmp_path):
    rows = {
        row.name.removeprefix(f"closed_loop/{PUSHER}/push_to_region/"): row
        for row in closed_loop_rows_for(
            model, builder, WORLD, "push_to_region", PUSHER, [11, 12], horizon_s=3.0, steps=2, media_dir=tmp_path
        )
    }
    assert set(rows) == {
        "success_rate",
        "success_low",
        "success_high",
        "failed_episodes",
        "action_rmse",
        "action_rmse_worst_dim",
    }
    assert (rows["failed_episodes"].model, rows["failed_episodes"].oracle, rows["failed_episodes"].note) == (0, 0, "")
    success = rows["success_rate"]
    assert success.oracle == 1.0 and success.model == 0.0 and success.chance == 0.0
    assert rows["success_low"].oracle > 0.3 and rows["success_high"].model < 0.9  # Wilson, 2 episodes
    error = rows["action_rmse"]
    assert error.oracle == 0.0 and error.model > 0.5 and error.chance > 0.5  # an untrained model is far off
    assert "dataset std" in error.note
    for who in ("model", "expert", "random"):
        with av.open(str(tmp_path / f"{PUSHER}_push_to_region_seed11_{who}.mp4")) as container:
            assert sum(1 for _ in container.decode(video=0)) > 16 and container.streams.audio


class _Asked(Exception):
    pass


class _ExecuteSpy(ReferenceCache):
    """A cache that records the chunk the closed loop would execute and stops it there."""

    def get(self, world, task, embodiment, seeds, *, execute, **_):
        raise _Asked(execute)


@pytest.mark.parametrize(("rate", "chunk"), [(7.5, 4), (15.0, 8), (5.0, 3)])
def test_the_executed_chunk_is_the_demonstrations_chunk(model, builder, rate, chunk):
    """At rates where 0.5 s is not a whole number of steps the closed loop executes the chunk the
    demonstrations were cut in (``world.world.chunk_steps``, tests/world/test_environment.py)."""
    world = WorldConfig(resolution=32, duration_s=2.0, action_rates={PUSHER: rate}, embodiments=(PUSHER,))
    with pytest.raises(_Asked) as asked:
        closed_loop_rows_for(model, builder, world, "stop_ball", PUSHER, [0], steps=1, cache=_ExecuteSpy())
    assert asked.value.args == (chunk,) == (chunk_steps(rate),)


def test_cached_reference_episodes_give_the_rows_of_a_fresh_run(model, builder):
    """The expert's and the random episodes run once per cache; the model asked at the cached
    decisions answers exactly what it answers as a reference inside the expert's episodes."""
    cache, seeds = ReferenceCache(), [21, 22]
    call = dict(horizon_s=1.0, steps=2)
    fresh = closed_loop_rows_for(model, builder, WORLD, "stop_ball", PUSHER, seeds, **call)
    first = closed_loop_rows_for(model, builder, WORLD, "stop_ball", PUSHER, seeds, **call, cache=cache)
    assert len(cache) == 1  # an empty cache passed in is the one filled
    cached = cache.get(WORLD, "stop_ball", PUSHER, seeds, execute=EXECUTE, horizon_s=1.0, fps=16.0, record_media=False)
    again = closed_loop_rows_for(model, builder, WORLD, "stop_ball", PUSHER, seeds, **call, cache=cache)
    assert fresh == first == again and len(cache) == 1
    assert (
        cache.get(WORLD, "stop_ball", PUSHER, seeds, execute=EXECUTE, horizon_s=1.0, fps=16.0, record_media=False)
        is cached
    )
    policy = ModelPolicy(model, builder, chunk_s=WORLD.duration_s, steps=2)
    inside = _stop_ball_runs(ExpertPolicy(EXECUTE), {"model": policy}, seeds)
    asked = chunks_at_decisions(policy, cached.expert, EXECUTE)
    assert [len(chunks) for chunks in asked] == [len(run.references["model"]) for run in inside] == [2, 2]
    for run, chunks in zip(inside, asked):
        assert all(np.array_equal(a, b) for a, b in zip(run.references["model"], chunks))


class _DivergesFor:
    """A policy that answers ``policy``'s chunks, but NaN (or inf) for episode ``seed`` from ``round_`` on."""

    def __init__(self, policy, seed: int, round_: int, value: float = np.nan) -> None:
        self.policy, self.seed, self.round, self.value = policy, seed, round_, value

    def act(self, decisions):
        chunks = self.policy.act(decisions)
        return [
            np.full_like(chunk, self.value)
            if (d.seed, d.round) >= (self.seed, self.round) and d.seed == self.seed
            else chunk
            for d, chunk in zip(decisions, chunks)
        ]


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_a_non_finite_chunk_fails_its_episode_and_the_others_go_on(value):
    """A NaN chunk stopped the whole eval (the model's policy raised for the pack); the episode is
    now recorded as failed, with its seed, step and reason, and the other episodes run as before."""
    seeds = [100, 101, 102]
    plain = run_episodes(ExpertPolicy(EXECUTE), "push_to_region", PUSHER, seeds, WORLD, execute=EXECUTE)
    runs = run_episodes(
        _DivergesFor(ExpertPolicy(EXECUTE), 101, 1, value), "push_to_region", PUSHER, seeds, WORLD, execute=EXECUTE
    )
    failed = runs[1].episode
    assert (failed.seed, failed.success, failed.steps) == (101, False, EXECUTE)  # one chunk executed before
    assert (
        failed.failure
        == f"round 1: the policy's chunk holds {runs[1].chunks[1].size} of {runs[1].chunks[1].size} values NaN or Inf"
    )
    assert len(runs[1].chunks) == len(runs[1].states) == len(runs[1].decisions) == 2
    for run, alone in zip([runs[0], runs[2]], [plain[0], plain[2]]):  # control: the others as without it
        assert run.episode == alone.episode and run.episode.success and run.episode.failure is None
        assert all(np.array_equal(a, b) for a, b in zip(run.chunks, alone.chunks))


def test_a_diverged_model_fails_every_episode_and_the_rows_still_come(model, builder):
    """Every episode failed: the rows are reported (success 0, every episode counted and named as
    failed, the model's action error not measured) beside the expert's and the random policy's."""
    diverged = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in diverged.parameters():
            parameter.fill_(float("nan"))
    seeds = [11, 12]
    rows = {
        row.name.removeprefix(f"closed_loop/{PUSHER}/stop_ball/"): row
        for row in closed_loop_rows_for(diverged, builder, WORLD, "stop_ball", PUSHER, seeds, horizon_s=1.0, steps=2)
    }
    assert rows["success_rate"].model == 0.0 and rows["success_rate"].oracle > 0  # the expert still measured
    assert "a failed episode is no success" in rows["success_rate"].note
    failed = rows["failed_episodes"]
    assert (failed.model, failed.oracle, failed.chance, failed.unit, failed.higher_is_better) == (
        2,
        0,
        0,
        "episodes",
        False,
    )
    for seed in seeds:
        assert f"model seed {seed} at step 0: round 0: the policy's chunk holds" in failed.note
    error = rows["action_rmse"]
    assert np.isnan(error.model) and error.oracle == 0.0 and error.chance > 0.5
    assert "model not measured: " in error.note and "NaN or Inf" in error.note


def test_bad_runs_are_refused_naming_the_problem(model, builder):
    with pytest.raises(ValueError, match="seeds=.*distinct"):
        run_episodes(ExpertPolicy(EXECUTE), "stop_ball", PUSHER, [1, 1], WORLD, execute=EXECUTE)
    with pytest.raises(ValueError, match="execute=0"):
        run_episodes(ExpertPolicy(EXECUTE), "stop_ball", PUSHER, [1], WORLD, execute=0)
    with pytest.raises(ValueError, match=r"chunk of shape \(5, 10\); 10 actions are executed"):
        run_episodes(ExpertPolicy(5), "stop_ball", PUSHER, [1], WORLD, execute=EXECUTE)
    (run,) = run_episodes(ExpertPolicy(EXECUTE), "stop_ball", PUSHER, [1], WORLD, execute=EXECUTE)
    with pytest.raises(ValueError, match="no recorded media"):
        write_episode_mp4("unused.mp4", run, 16.0)


@pytest.mark.parametrize("world_rate", [10.0, 40.0])
def test_a_world_acting_at_another_rate_than_the_model_is_refused_naming_both(model, builder, world_rate):
    """The model's 20 Hz chunks were stepped at the world's rate without a word: at 10 Hz each action
    lasted twice as long as the model meant it to."""
    world = WorldConfig(resolution=32, duration_s=1.0, action_rates={PUSHER: world_rate}, embodiments=(PUSHER,))
    policy = ModelPolicy(model, builder, chunk_s=1.0, steps=1)
    want = rf"model.embodiments.{PUSHER}.rate_hz=20 Hz but the environment executes them at {world_rate:g} Hz"
    with pytest.raises(ValueError, match=want):
        run_episodes(policy, "stop_ball", PUSHER, [0], world, execute=chunk_steps(world_rate), horizon_s=1.0)
    (run,) = _stop_ball_runs(policy, {}, [0])  # control: the world at the model's 20 Hz
    assert run.chunks and run.chunks[0].shape[1] == 10
