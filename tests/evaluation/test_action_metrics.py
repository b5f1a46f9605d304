"""Action error per dimension in units of each dimension's spread: the truth scores 0, the mean
scores 1, an independent draw from the action distribution sqrt(2), negated actions worse; a
dimension's scale is its own; bad input is refused by name."""

from __future__ import annotations

import numpy as np
import pytest

from megatron_cosmos3.evaluation.actions import action_error, spread_of


@pytest.fixture(scope="module")
def true_actions():
    """(episodes, steps, 19) single-arm-sized actions with dims on very different scales."""
    rng = np.random.default_rng(0)
    scale = np.geomspace(1e-3, 1.0, 19)
    return rng.normal(0.1 * scale, scale, (64, 10, 19)), scale


def test_truth_mean_and_chance_reference_points(true_actions):
    true, _ = true_actions
    scale = spread_of(true)  # the true actions' own spread: the mean then scores exactly 1
    assert action_error(true, true, scale).mean_rmse == 0.0
    mean = np.broadcast_to(true.reshape(-1, 19).mean(0), true.shape).copy()
    np.testing.assert_allclose(action_error(mean, true, scale).per_dim_rmse, 1.0, rtol=1e-9)
    # An untrained guess drawn from the data's distribution: E[(x - y)^2] = 2 var for independent x, y.
    draw = np.random.default_rng(1).normal(mean, scale, true.shape)
    np.testing.assert_allclose(action_error(draw, true, scale).per_dim_rmse, np.sqrt(2), rtol=0.1)
    negated = action_error(-true, true, scale)
    # -t against t: error 2|t|, so the RMSE is 2 * sqrt(mean(t^2)) / std, above the mean's 1.
    expected = 2 * np.sqrt((true.reshape(-1, 19) ** 2).mean(0)) / scale
    np.testing.assert_allclose(negated.per_dim_rmse, expected)
    assert (negated.per_dim_rmse > 1.0).all()


def test_each_dimension_is_in_its_own_units(true_actions):
    true, scale = true_actions
    wrong = true.copy()
    wrong[..., 0] += scale[0]  # one std off in the smallest dim only
    error = action_error(wrong, true, scale)
    assert error.per_dim_rmse[0] == pytest.approx(1.0) and error.per_dim_mae[0] == pytest.approx(1.0)
    assert (error.per_dim_rmse[1:] == 0).all()
    np.testing.assert_allclose(spread_of(true), scale, rtol=0.12)  # 640 draws per dim: about 3% sampling error
    assert spread_of(np.zeros((4, 2))).min() > 0  # a dim that never moves: floored, not 0


def test_bad_input_is_refused_by_name(true_actions):
    true, scale = true_actions
    with pytest.raises(ValueError, match=r"predicted has shape \(64, 10, 18\) but true has shape \(64, 10, 19\)"):
        action_error(true[..., :18], true, scale)
    with pytest.raises(ValueError, match="predicted must hold floats, got dtype int64"):
        action_error(true.astype(np.int64), true, scale)
    with pytest.raises(ValueError, match="true is empty"):
        action_error(true[:0], true[:0], scale)
    with pytest.raises(ValueError, match="scale must be 19 positive finite values"):
        action_error(true, true, np.zeros(19))
    with pytest.raises(ValueError, match=f"predicted actions must be finite; {true.size} of {true.size} values"):
        action_error(np.full_like(true, np.nan), true, scale)
    one_inf = true.copy()
    one_inf[3, 2, 1] = np.inf
    with pytest.raises(ValueError, match=f"predicted actions must be finite; 1 of {true.size} values are NaN or Inf"):
        action_error(one_inf, true, scale)


def test_the_error_of_a_30_hz_robot_equals_a_loop_reference():
    """A 7-D robot at 30 Hz (not the single arm's 10 Hz) predicted one step late: per-dim RMSE and
    MAE / scale equal sums written out dimension by dimension, step by step."""
    t = np.arange(45) / 30.0
    true = np.stack([np.sin(2 * np.pi * (0.5 + d) * t) * 4.0**-d for d in range(7)], axis=-1)
    late = np.concatenate([true[:1], true[:-1]])
    scale = spread_of(true)
    error = action_error(late, true, scale)
    for d in range(7):
        squares = [(late[s, d] - true[s, d]) ** 2 for s in range(len(t))]
        absolute = [abs(late[s, d] - true[s, d]) for s in range(len(t))]
        mean = sum(true[s, d] for s in range(len(t))) / len(t)
        std = (sum((true[s, d] - mean) ** 2 for s in range(len(t))) / len(t)) ** 0.5
        assert scale[d] == pytest.approx(std, rel=1e-12)
        assert error.per_dim_rmse[d] == pytest.approx((sum(squares) / len(t)) ** 0.5 / std, rel=1e-12)
        assert error.per_dim_mae[d] == pytest.approx(sum(absolute) / len(t) / std, rel=1e-12)
