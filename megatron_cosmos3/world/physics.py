"""Rigid discs in a 1 m x 1 m box under gravity, seen from the side (x right, z up), metres and
seconds throughout.

Balls bounce off the walls, floor, ceiling, each other and the agents' effectors (kinematic discs
that push but are never pushed). Every bounce faster than ``SOUND_SPEED`` is an *event* — the time,
place and impact speed the sound synthesis and the captions use. Integration is semi-implicit
Euler at ``PHYSICS_RATE`` steps per second, a common multiple of every frame rate (16, 24, 30 fps),
action rate (10, 30 Hz) and of 48 kHz / 50, so frames, actions and audio samples fall on steps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

PHYSICS_RATE = 960  # steps per second
GRAVITY = 9.81  # m/s^2
WALL_RESTITUTION = 0.85
BALL_RESTITUTION = 0.9
EFFECTOR_RESTITUTION = 0.8
SOUND_SPEED = 0.3  # m/s: slower impacts are resting contact, silent and not events
CONTACT_S = 0.05  # a repeat impact of the same pair within this time is the same contact, one event
BOX = 1.0
_AXES = np.eye(2)


@dataclass
class Event:
    """A collision: ``time`` s, contact point ``x``/``z`` m, normal impact speed m/s, what hit what."""

    time: float
    x: float
    z: float
    speed: float
    kind: str  # "floor", "wall", "ceiling", "ball", "effector"
    ball: int
    other: int = -1  # the other ball (kind "ball") or the effector index (kind "effector")


# An effector at time t: (position (2,), velocity (2,), radius).
Effector = Callable[[float], tuple[np.ndarray, np.ndarray, float]]


@dataclass
class Simulation:
    """States at every physics step: positions (steps + 1, B, 2), the events in time order, and the
    velocities (B, 2) after the last step (where a continued run starts)."""

    positions: np.ndarray
    radii: np.ndarray
    events: list[Event]
    final_velocities: np.ndarray

    def at(self, time: float) -> np.ndarray:
        """(B, 2) ball centres at ``time`` seconds (a step time)."""
        return self.positions[int(round(time * PHYSICS_RATE))]


def simulate(
    positions: np.ndarray, velocities: np.ndarray, radii: np.ndarray, duration_s: float, effectors: list[Effector] = ()
) -> Simulation:
    """Runs the box for ``duration_s`` from initial (B, 2) positions and velocities."""
    p, v, r = positions.astype(np.float64).copy(), velocities.astype(np.float64).copy(), radii.astype(np.float64)
    mass, ball_radius = r**2, r.tolist()
    dt = 1.0 / PHYSICS_RATE
    steps = int(round(duration_s * PHYSICS_RATE))
    history = np.empty((steps + 1, len(r), 2))
    history[0] = p
    events: list[Event] = []
    for step in range(1, steps + 1):
        time = step * dt
        v[:, 1] -= GRAVITY * dt
        p += v * dt
        for i in range(len(r)):
            x, z = p[i].tolist()
            if not (ball_radius[i] <= x <= BOX - ball_radius[i] and ball_radius[i] <= z <= BOX - ball_radius[i]):
                _walls(i, p, v, r, time, events)  # only near a wall: the loop is the generator's hot spot
        for i in range(len(r)):
            for j in range(i + 1, len(r)):
                _ball_pair(i, j, p, v, r, mass, time, events)
        for e, effector in enumerate(effectors):
            centre, velocity, radius = effector(time)
            for i in range(len(r)):
                _push(i, e, centre, velocity, radius, p, v, r, time, events)
        history[step] = p
    return Simulation(history, r, events, v)


def _bounce(speed: float, restitution: float) -> float:
    """Rebound speed; slow impacts come to rest instead of jittering forever."""
    return restitution * speed if speed > SOUND_SPEED else 0.0


def _walls(i, p, v, r, time, events) -> None:
    for axis, low_kind, high_kind in ((0, "wall", "wall"), (1, "floor", "ceiling")):
        if p[i, axis] < r[i] and v[i, axis] < 0:
            speed = -v[i, axis]
            p[i, axis], v[i, axis] = r[i], _bounce(speed, WALL_RESTITUTION)
            _record(events, time, p[i] - _AXES[axis] * r[i], speed, low_kind, i)
        elif p[i, axis] > BOX - r[i] and v[i, axis] > 0:
            speed = v[i, axis]
            p[i, axis], v[i, axis] = BOX - r[i], -_bounce(speed, WALL_RESTITUTION)
            _record(events, time, p[i] + _AXES[axis] * r[i], speed, high_kind, i)


def _apart(a: np.ndarray, b: np.ndarray, reach: float) -> bool:
    """Surely farther apart than ``reach`` (a cheap float test before the exact one)."""
    (ax, az), (bx, bz) = a.tolist(), b.tolist()
    return (ax - bx) ** 2 + (az - bz) ** 2 > reach * reach * (1.0 + 1e-9)


def _ball_pair(i, j, p, v, r, mass, time, events) -> None:
    if _apart(p[i], p[j], float(r[i] + r[j])):
        return
    offset = p[j] - p[i]
    distance = float(np.hypot(*offset))
    if distance >= r[i] + r[j] or distance == 0.0:
        return
    normal = offset / distance
    approach = float((v[i] - v[j]) @ normal)
    overlap = r[i] + r[j] - distance
    share = mass[j] / (mass[i] + mass[j])
    p[i] -= normal * overlap * share  # separate in proportion to the other's mass
    p[j] += normal * overlap * (1 - share)
    if approach <= 0:
        return
    impulse = (1 + BALL_RESTITUTION) * approach / (1 / mass[i] + 1 / mass[j])
    v[i] -= impulse / mass[i] * normal
    v[j] += impulse / mass[j] * normal
    _record(events, time, p[i] + normal * r[i], approach, "ball", i, j)


def _push(i, e, centre, velocity, radius, p, v, r, time, events) -> None:
    if _apart(p[i], np.asarray(centre), float(r[i] + radius)):
        return
    offset = p[i] - centre
    distance = float(np.hypot(*offset))
    if distance >= r[i] + radius or distance == 0.0:
        return
    normal = offset / distance
    p[i] = centre + normal * (r[i] + radius)  # the effector is kinematic: only the ball moves
    approach = -float((v[i] - velocity) @ normal)
    if approach <= 0:
        return
    v[i] += (1 + EFFECTOR_RESTITUTION) * approach * normal
    _record(events, time, centre + normal * radius, approach, "effector", i, e)


def _record(events, time, point, speed, kind, ball, other=-1) -> None:
    if speed <= SOUND_SPEED:
        return
    for earlier in reversed(events):
        if time - earlier.time > CONTACT_S:
            break
        if (earlier.kind, earlier.ball, earlier.other) == (kind, ball, other):
            return  # an effector pushing a ball along re-contacts it every step: one sound, one event
    events.append(Event(float(time), float(point[0]), float(point[1]), float(speed), kind, ball, other))
