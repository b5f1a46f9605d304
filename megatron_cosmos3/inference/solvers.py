"""Flow ODE solvers for the DM tokens (docs/DESIGN.md, "Generation").

The model is trained on x_t = (1 - t) x0 + t eps with velocity v = eps - x0, so data comes from
integrating dx/dt = v(x, t) from t = 1 (noise) to t = 0 (data). A solver only sees a velocity
function of a state (a dict of tensors) and a time, and which rows move: clean conditioning rows
stay exactly as given. It knows nothing of the model, which is what lets it be tested on an
analytic flow whose exact solution is known (``tests/inference/test_solvers.py``).

* ``euler``: x <- x + (t' - t) v(x, t); one velocity per step, first order.
* ``heun``: the trapezoid of v at both ends of the step, the end point predicted by Euler; second
  order, two velocities per step except the last, which is Euler (v at t = 0, pure data, is the
  one the model never trained on at its noise level; Karras et al. and most samplers do the same).

Steps follow the schedule ``t_i = shift(1 - i / n)``: the SD3 / Wan timestep shift
``t' = s·t / (1 + (s - 1)·t)`` (the one training draws its timesteps with,
``objectives/flow_matching.py``); s > 1 spends more of the steps at high noise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from megatron_cosmos3.objectives.flow_matching import first_standing, shift_timesteps

SOLVERS = ("euler", "heun")
# The most denoising steps a sampler takes: far past where more steps change a sample (tens do),
# short of a typo or a crafted request (10**9) that would run for days holding the machine.
MAX_STEPS = 1000
State = dict[str, torch.Tensor]
FlowVelocity = Callable[[State, float], State]


@dataclass(frozen=True)
class SamplerConfig:
    """How to integrate: ``solver`` ("euler" or "heun"), ``num_steps`` (1 .. ``MAX_STEPS``) and
    timestep ``shift`` (finite, > 0; 1 = uniform steps). ValueError naming the field for a bad value."""

    solver: str = "euler"
    num_steps: int = 8
    shift: float = 1.0

    def __post_init__(self) -> None:
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {list(SOLVERS)}, got {self.solver!r}")
        steps = self.num_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
            raise ValueError(f"num_steps must be an int in [1, {MAX_STEPS}] (solvers.MAX_STEPS), got {steps!r}")
        if isinstance(self.shift, bool) or not isinstance(self.shift, (int, float)) or not 0 < self.shift < math.inf:
            raise ValueError(f"shift must be a finite number > 0, got {self.shift!r}")
        still = standing_step(steps, self.shift)
        if still is not None:
            raise ValueError(
                f"shift={self.shift!r}: steps {still} and {still + 1} of num_steps={steps} are at the same time "
                "in float32, the model's time (a shift this far from 1 makes every time 1.0 or 0.0)"
            )

    @property
    def num_evaluations(self) -> int:
        """Velocity evaluations per sample: n (Euler) or 2n - 1 (Heun)."""
        return self.num_steps if self.solver == "euler" else 2 * self.num_steps - 1


def timestep_schedule(num_steps: int, shift: float = 1.0) -> torch.Tensor:
    """(num_steps + 1,) float64 times from 1 down to 0, shifted (module doc)."""
    # On the CPU whatever the default device: a SamplerConfig made inside a meta context is checked too.
    return shift_timesteps(torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64, device="cpu"), shift)


def standing_step(num_steps: int, shift: float) -> int | None:
    """The first step i whose times t_i and t_i+1 (``timestep_schedule``) are equal in float32, or
    None where every step moves: a step of no time that the model is still run for, the whole
    schedule but one step where the shift is far from 1 (1e300: every time but the last is 1.0)."""
    return first_standing(timestep_schedule(num_steps, shift))


def integrate(
    state: Mapping[str, torch.Tensor],
    velocity: FlowVelocity,
    config: SamplerConfig,
    moving: Mapping[str, torch.Tensor] | None = None,
) -> State:
    """Integrates dx/dt = velocity(x, t) from t = 1 to t = 0 with ``config``'s solver and schedule.

    state: the tensors at t = 1 (noise on the rows that move). moving: per key, a bool tensor
    broadcastable to the state (e.g. (n, 1)) marking the rows that are integrated; the others keep
    their values bit for bit. None = everything moves. Returns the state at t = 0.
    """
    x = dict(state)

    def step(x: State, v: State, dt: float) -> State:
        out = {}
        for key, value in x.items():
            moved = value + dt * v[key]
            out[key] = moved if moving is None else torch.where(moving[key], moved, value)
        return out

    times = timestep_schedule(config.num_steps, config.shift).tolist()
    for t, t_next in zip(times[:-1], times[1:]):
        v = velocity(x, t)
        predicted = step(x, v, t_next - t)
        if config.solver == "euler" or t_next == 0.0:
            x = predicted
            continue
        v_next = velocity(predicted, t_next)
        x = step(x, {key: 0.5 * (v[key] + v_next[key]) for key in v}, t_next - t)
    return x
