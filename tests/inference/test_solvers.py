"""The flow ODE solvers on an analytic flow whose exact solution is known: Gaussian noise to
Gaussian data. Euler's final error falls about linearly with the step count, Heun's about
quadratically (the fitted log-log slopes), with and without the timestep shift."""

import numpy as np
import pytest
import torch

from megatron_cosmos3.inference.solvers import SamplerConfig, integrate, timestep_schedule

MEAN, STD = 2.0, 0.5  # the data distribution N(MEAN, STD^2); noise is N(0, 1)


def gaussian_velocity(state, t):
    """The exact marginal velocity of x_t = (1 - t) x0 + t eps: x_t = m_t + s_t z moves with
    dm/dt + (ds/dt / s_t)(x - m_t), m_t = (1 - t) MEAN, s_t^2 = (1 - t)^2 STD^2 + t^2."""
    mean = (1 - t) * MEAN
    variance = (1 - t) ** 2 * STD**2 + t**2
    return {"x": -MEAN + (t - (1 - t) * STD**2) / variance * (state["x"] - mean)}


def final_error(solver: str, steps: int, shift: float) -> float:
    noise = torch.linspace(-2.5, 2.5, 11, dtype=torch.float64)
    exact = MEAN + STD * noise  # the flow carries quantile z of the noise to quantile z of the data
    out = integrate({"x": noise}, gaussian_velocity, SamplerConfig(solver, steps, shift))
    return float((out["x"] - exact).abs().max())


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize(("solver", "order"), [("euler", 1), ("heun", 2)])
def test_final_error_falls_with_the_solvers_order(solver, order, shift):
    steps = np.array([8, 16, 32, 64])
    errors = np.array([final_error(solver, int(n), shift) for n in steps])
    slope = np.polyfit(np.log(steps), np.log(errors), 1)[0]
    assert -order - 0.3 < slope < -order + 0.3, (slope, errors)
    assert errors[-1] < (0.1 if order == 1 else 1e-2)


def test_heun_beats_euler_at_equal_model_evaluations():
    # 15 Heun evaluations (8 steps) against 16 Euler steps: the second order wins, by more with more steps.
    assert final_error("heun", 8, 1.0) < 0.5 * final_error("euler", 16, 1.0)
    assert final_error("heun", 32, 1.0) < 0.1 * final_error("euler", 64, 1.0)


def test_schedule_is_shifted_and_runs_from_noise_to_data():
    plain = timestep_schedule(4)
    assert plain.tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    shifted = timestep_schedule(4, shift=3.0)
    assert shifted[0] == 1.0 and shifted[-1] == 0.0
    assert torch.allclose(shifted[1:-1], 3 * plain[1:-1] / (1 + 2 * plain[1:-1]), rtol=0, atol=1e-15)
    assert bool((shifted[1:-1] > plain[1:-1]).all())  # more of the steps at high noise


@pytest.mark.parametrize(("solver", "evaluations"), [("euler", 5), ("heun", 9)])
def test_frozen_rows_stay_bit_for_bit_and_each_step_evaluates_as_the_solver_says(solver, evaluations):
    times = []

    def velocity(state, t):
        times.append(t)
        return {"x": torch.ones_like(state["x"]) * (1 + t)}

    start = torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
    moving = torch.tensor([True, False, True, False, False, True])[:, None]
    config = SamplerConfig(solver, 5)
    out = integrate({"x": start}, velocity, config, {"x": moving})["x"]
    assert torch.equal(out[~moving.squeeze(1)], start[~moving.squeeze(1)])
    assert not torch.equal(out[moving.squeeze(1)], start[moving.squeeze(1)])
    assert len(times) == evaluations == config.num_evaluations
    assert 0.0 not in times  # Heun's last step is Euler: the velocity is never asked at t = 0


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"solver": "rk4"}, "solver must be one of \\['euler', 'heun'\\], got 'rk4'"),
        ({"num_steps": 0}, "num_steps must be an int in \\[1, 1000\\] \\(solvers.MAX_STEPS\\), got 0"),
        ({"num_steps": 2.5}, "num_steps must be an int in \\[1, 1000\\].*, got 2.5"),
        ({"num_steps": 1001}, "num_steps must be an int in \\[1, 1000\\].*, got 1001"),
        ({"shift": 0.0}, "shift must be a finite number > 0, got 0.0"),
        ({"shift": float("inf")}, "shift must be a finite number > 0, got inf"),
    ],
)
def test_bad_sampler_settings_are_named(changes, message):
    with pytest.raises(ValueError, match=message):
        SamplerConfig(**changes)


def test_a_sampler_config_made_inside_a_meta_device_context_is_checked_on_the_cpu():
    """Models are built under ``with torch.device("meta")``; a request or suite config made there
    is still checked (its schedule's times are CPU tensors, not meta ones without values)."""
    with torch.device("meta"):
        assert SamplerConfig("euler", 8, 3.0).shift == 3.0
        with pytest.raises(ValueError, match=r"shift=1e\+300: steps"):
            SamplerConfig("euler", 8, 1e300)
