"""Scripted experts for the environment's tasks, one controller for every embodiment
(docs/DESIGN.md, "The world as an environment").

The expert reads the true state (privileged), plans where the acting effector goes at each action
time of the chunk, lets ``agents.planned_trajectory`` pose the embodiment for that path and returns
the pseudo-actions from the current pose to those poses — the same units and rate a policy emits.
It replans every chunk (receding horizon). The plan, for a ball resting or sliding on the floor:

* ``push_to_region``: rise above the ball, come down behind it (on the side away from the region)
  at its height, then push at ``PUSH_SPEED``; the ball leaves at (1 + 0.8) x that, below
  ``SOUND_SPEED``, slides to the region's wall and stops there.
* ``separate_balls``: the same push, of the left ball towards the left wall.
* ``stop_ball``: get ahead of the sliding ball, come down in its path at its height moving with it,
  then move at ``e / (1 + e)`` of its speed (e = ``EFFECTOR_RESTITUTION``): the ball catching up
  leaves the contact at rest.
"""

from __future__ import annotations

import functools

import numpy as np

from megatron_cosmos3.encoders.pseudo_actions import encode_pseudo_actions
from megatron_cosmos3.world.agents import effector_discs, joined, planned_trajectory
from megatron_cosmos3.world.environment import REGIONS, REST_SPEED, SEPARATION, WorldEnvironment, WorldState
from megatron_cosmos3.world.physics import BOX, EFFECTOR_RESTITUTION, SOUND_SPEED, WALL_RESTITUTION

MAX_SPEED = 1.2  # m/s: effector travel
PUSH_SPEED = 0.15  # m/s
GAP = 0.02  # m between effector and ball where a push or a catch starts
CLEARANCE = 0.04  # m above the ball when passing over it
LOW = 1e-4  # m: at the ball's height


def _toward(position: np.ndarray, target: np.ndarray, reach: float) -> np.ndarray:
    offset = target - position
    distance = float(np.hypot(*offset))
    return target.copy() if distance <= reach else position + offset * (reach / distance)


def _slide(x: float, vx: float, radius: float, dt: float) -> tuple[float, float]:
    """A ball sliding on the floor after ``dt`` s: walls reflect it (and stop a slow one)."""
    x += vx * dt
    for wall, inside in ((radius, 1.0), (BOX - radius, -1.0)):
        if (x - wall) * inside < 0:
            vx = -vx * WALL_RESTITUTION if abs(vx) > SOUND_SPEED else 0.0
            x = 2 * wall - x if vx else wall
    return x, vx


class Expert:
    """The scripted expert of ``env``'s task and embodiment: ``act(state, steps)`` -> (steps, dim)
    float64 pseudo-actions (module doc)."""

    def __init__(self, env: WorldEnvironment) -> None:
        self.env = env

    def act(self, state: WorldState, steps: int) -> np.ndarray:
        task, rate = self.env.task, self.env.rate
        centres, radii = effector_discs(state.pose)
        effector, reach = np.clip(centres[0, 0], 0.0, 1.0), float(radii[0, 0])
        ball, control = task.ball, self._catch
        if task.kind == "separate_balls":  # push the left ball to the left wall
            ball = int(np.argmin(state.positions[:, 0]))
            other = float(state.positions[1 - ball, 0])
            control = functools.partial(self._push, -1.0, lambda x: abs(x - other) >= SEPARATION)
        elif task.kind == "push_to_region":
            low, high = REGIONS[task.region]
            side = -1.0 if task.region == "left" else 1.0
            control = functools.partial(self._push, side, lambda x: low <= x <= high)
        x, vx = float(state.positions[ball, 0]), float(state.velocities[ball, 0])
        radius = float(state.radii[ball])
        latched = None  # once a push or a catch starts it runs to the end of the chunk
        path = []
        for _ in range(steps):
            after = _slide(x, vx, radius, 1.0 / rate)
            effector, latched = control(effector, latched, x, vx, after[0], radius, radius + reach, rate)
            path.append(effector)
            x, vx = after
        planned = planned_trajectory(self.env.embodiment, np.stack(path))
        return encode_pseudo_actions(joined(state.pose, planned)).numpy()

    def _push(self, side, finished, effector, latched, x, vx, x_next, radius, contact, rate):
        """Push towards ``side`` (-1 left, +1 right) until ``finished(ball x)``."""
        if latched is not None:
            return effector + np.array([side * PUSH_SPEED / rate, 0.0]), latched
        if abs(vx) >= REST_SPEED or finished(x):
            return effector, None  # sliding after the push, or done: wait
        behind_x = x - side * (contact + GAP)
        behind = (effector[0] - x) * side  # < -contact: on the far side from the region, clear of the ball
        if behind <= -(contact + 0.005) and abs(effector[1] - radius) < LOW:
            start = np.array([effector[0], radius])
            return start + np.array([side * PUSH_SPEED / rate, 0.0]), "push"
        return _toward(
            effector, self._route(effector, behind < -(contact + 0.005), behind_x, radius, contact), MAX_SPEED / rate
        ), None

    def _catch(self, effector, latched, x, vx, x_next, radius, contact, rate):
        if latched is not None:
            return effector + np.array([latched / rate, 0.0]), latched
        if abs(vx) < REST_SPEED:
            return effector, None
        side = float(np.sign(vx))
        ahead_x = x_next + side * (contact + GAP)
        ahead = (effector[0] - x) * side
        if not contact <= ahead_x <= BOX - contact:  # no room before the wall: wait above for the rebound
            return _toward(effector, np.array([effector[0], radius + contact + CLEARANCE]), MAX_SPEED / rate), None
        if ahead >= contact + 0.002 and abs(effector[1] - radius) < LOW:
            speed = side * EFFECTOR_RESTITUTION / (1 + EFFECTOR_RESTITUTION) * abs(vx)
            return np.array([effector[0] + speed / rate, radius]), speed
        if ahead >= contact + 0.005:  # in the ball's path: keep ahead of it first, come down with what is left
            reach = MAX_SPEED / rate
            dx = float(np.clip(ahead_x - effector[0], -reach, reach))
            down = min(np.sqrt(max(reach**2 - dx**2, 0.0)), effector[1] - radius)
            return np.array([effector[0] + dx, effector[1] - down]), None
        return _toward(effector, self._route(effector, False, ahead_x, radius, contact), MAX_SPEED / rate), None

    @staticmethod
    def _route(effector, clear_side: bool, goal_x: float, radius: float, contact: float) -> np.ndarray:
        """Next waypoint to (goal_x, ball height): straight there from the right side, else over the ball."""
        if clear_side:
            return np.array([goal_x, radius])
        over = radius + contact + CLEARANCE
        if effector[1] < over - LOW:
            return np.array([effector[0], over])
        return np.array([goal_x, over])
