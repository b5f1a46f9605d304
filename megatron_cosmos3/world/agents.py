"""The embodiments that act in the box: smooth seeded motions, their effectors for the physics, and
their poses as ``EmbodimentTrajectory`` for pseudo-actions (``encoders/pseudo_actions.py``).

World frame: x right, y into the picture (always 0), z up; rotations are about the y axis (the
only ones a side view shows). Every coordinate is a sum of sines with amplitudes that keep it in
its range, so position and velocity are exact at any time and stay inside the box.

* ``single_arm``: a fixed base on the floor at x = 0.5 (ego = identity at the base); the end
  effector is a disc whose radius follows the gripper opening (0.04 m closed, 0.07 m open) and
  whose tilt is the end-effector rotation.
* ``humanoid``: the ego walks along the floor (x between 0.3 and 0.7); the two wrists are discs
  left and right of it; each hand's closure sets its 15 finger joints and its radius.
* ``planar_pusher`` (held out of pre- and mid-training, for the transfer experiment): a disc on a
  gantry, free in x and z; its ego pose is the pusher itself and its ``extension`` joint (1 = out)
  sets its radius. 10-D pseudo-actions at 20 Hz.

``EMBODIMENT_RATES`` is every embodiment's action rate; ``effector_discs`` reads the effectors back
from any trajectory (recorded or integrated from actions), ``planned_trajectory`` makes the poses
that put an embodiment's acting effector on a planned path (the environment's experts).

Only the effectors are bodies in the scene — drawn, colliding, pushing balls; the arm's links and
the humanoid's torso are not modelled (nothing in the picture can pass through them).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from megatron_cosmos3.encoders.pseudo_actions import BodyPoses, EmbodimentTrajectory

FINGER_WEIGHTS = np.linspace(0.6, 1.2, 15)  # radians per unit of hand closure, base to tip
EMBODIMENT_RATES = {"single_arm": 10.0, "humanoid": 30.0, "planar_pusher": 20.0}  # poses per second
# Effector radius (m) closed / open: gripper opening, hand opening (1 - closure), pusher extension.
EFFECTOR_RADII = {"single_arm": (0.04, 0.07), "humanoid": (0.035, 0.055), "planar_pusher": (0.045, 0.07)}
WRIST_OFFSET = 0.15  # m: where a planned humanoid's wrists sit either side of its ego


@dataclass(frozen=True)
class Wave:
    """``centre + sum_k amplitude_k * sin(2 pi frequency_k t + phase_k)``, within centre ± sum(amplitudes)."""

    centre: float
    amplitudes: tuple[float, ...]
    frequencies: tuple[float, ...]
    phases: tuple[float, ...]

    @classmethod
    def random(
        cls,
        rng: np.random.Generator,
        low: float,
        high: float,
        components: int = 2,
        frequency: tuple[float, float] = (0.2, 0.9),
    ) -> Wave:
        centre, half = (low + high) / 2, (high - low) / 2
        weights = rng.dirichlet(np.ones(components)) * half * rng.uniform(0.6, 1.0)
        return cls(
            centre,
            tuple(weights),
            tuple(rng.uniform(*frequency, components)),
            tuple(rng.uniform(0, 2 * np.pi, components)),
        )

    def __call__(self, t: float | np.ndarray) -> np.ndarray:
        t = np.asarray(t, dtype=np.float64)[..., None]
        return self.centre + (
            np.array(self.amplitudes) * np.sin(2 * np.pi * np.array(self.frequencies) * t + np.array(self.phases))
        ).sum(-1)

    def rate(self, t: float | np.ndarray) -> np.ndarray:
        t = np.asarray(t, dtype=np.float64)[..., None]
        angular = 2 * np.pi * np.array(self.frequencies)
        return (np.array(self.amplitudes) * angular * np.cos(angular * t + np.array(self.phases))).sum(-1)


def _y_rotation_quaternions(angle: np.ndarray) -> np.ndarray:
    """(T,) angles about +y -> (T, 4) xyzw quaternions."""
    half = angle / 2
    return np.stack([np.zeros_like(half), np.sin(half), np.zeros_like(half), np.cos(half)], axis=-1)


def _y_rotation_matrices(angle: np.ndarray) -> np.ndarray:
    """(T,) angles about +y -> (T, 3, 3) rotation matrices."""
    c, s, zero, one = np.cos(angle), np.sin(angle), np.zeros_like(angle), np.ones_like(angle)
    return np.stack([np.stack([c, zero, s], -1), np.stack([zero, one, zero], -1), np.stack([-s, zero, c], -1)], -2)


def _poses(x: np.ndarray, z: np.ndarray, angle: np.ndarray, matrices: bool = False) -> BodyPoses:
    positions = np.stack([x, np.zeros_like(x), z], axis=-1)
    rotations = _y_rotation_matrices(angle) if matrices else _y_rotation_quaternions(angle)
    return BodyPoses(torch.from_numpy(positions), torch.from_numpy(rotations))


@dataclass(frozen=True)
class Hand:
    """One effector disc: x relative to ``anchor_x`` (the ego), height, tilt and closure in [0, 1]."""

    x: Wave
    z: Wave
    tilt: Wave
    closure: Wave
    radius_closed: float
    radius_open: float

    def radius(self, t) -> np.ndarray:
        # An open gripper / hand reaches wider than a closed one.
        return self.radius_closed + (self.radius_open - self.radius_closed) * (1.0 - self.closure(t))


class Agent:
    """An embodiment: ego motion plus hands (module doc)."""

    def __init__(self, kind: str, ego_x: Wave | None, hands: list[Hand]) -> None:
        self.kind, self.ego_x, self.hands = kind, ego_x, hands

    def ego(self, t) -> np.ndarray:
        return self.ego_x(t) if self.ego_x is not None else np.full_like(np.asarray(t, dtype=np.float64), 0.5)

    def ego_rate(self, t) -> np.ndarray:
        return self.ego_x.rate(t) if self.ego_x is not None else np.zeros_like(np.asarray(t, dtype=np.float64))

    def hand_centre(self, hand: Hand, t) -> np.ndarray:
        return np.stack([self.ego(t) + hand.x(t), hand.z(t)], axis=-1)

    def effectors(self):
        """Physics effectors: t -> (centre (2,), velocity (2,), radius)."""

        def make(hand: Hand):
            def effector(t: float):
                centre = self.hand_centre(hand, t)
                velocity = np.array([float(self.ego_rate(t) + hand.x.rate(t)), float(hand.z.rate(t))])
                return centre, velocity, float(hand.radius(t))

            return effector

        return [make(hand) for hand in self.hands]

    def trajectory(self, times: np.ndarray) -> EmbodimentTrajectory:
        """Absolute poses at ``times`` (s) in the layout of ``kind``."""
        zero = np.zeros_like(times)
        ego = _poses(self.ego(times), zero, zero)
        hands = [_poses(self.ego(times) + h.x(times), h.z(times), h.tilt(times)) for h in self.hands]
        if self.kind == "single_arm":
            gripper = 1.0 - self.hands[0].closure(times)  # opening: 1 = open
            return EmbodimentTrajectory(
                "single_arm", {"ego": ego, "end_effector": hands[0]}, {"gripper": torch.from_numpy(gripper[:, None])}
            )
        if self.kind == "planar_pusher":
            extension = 1.0 - self.hands[0].closure(times)
            return EmbodimentTrajectory(
                "planar_pusher", {"ego": hands[0]}, {"extension": torch.from_numpy(extension[:, None])}
            )
        fingers = [torch.from_numpy(h.closure(times)[:, None] * FINGER_WEIGHTS) for h in self.hands]
        return EmbodimentTrajectory(
            "humanoid",
            {"ego": ego, "left_wrist": hands[0], "right_wrist": hands[1]},
            {"left_fingers": fingers[0], "right_fingers": fingers[1]},
        )


def random_agent(kind: str, rng: np.random.Generator) -> Agent:
    """A seeded ``single_arm``, ``humanoid`` or ``planar_pusher`` (module doc for their ranges)."""
    closure = lambda: Wave.random(rng, 0.0, 1.0, 1, (0.3, 1.0))  # noqa: E731
    tilt = lambda: Wave.random(rng, -0.6, 0.6, 1)  # noqa: E731
    _check_kind(kind)
    radii = EFFECTOR_RADII[kind]
    if kind == "single_arm":
        hand = Hand(Wave.random(rng, -0.33, 0.33), Wave.random(rng, 0.1, 0.6), tilt(), closure(), *radii)
        return Agent(kind, None, [hand])
    if kind == "humanoid":
        left = Hand(Wave.random(rng, -0.25, -0.08), Wave.random(rng, 0.1, 0.7), tilt(), closure(), *radii)
        right = Hand(Wave.random(rng, 0.08, 0.25), Wave.random(rng, 0.1, 0.7), tilt(), closure(), *radii)
        return Agent(kind, Wave.random(rng, 0.3, 0.7, 1, (0.1, 0.4)), [left, right])
    hand = Hand(Wave.random(rng, -0.38, 0.38), Wave.random(rng, 0.1, 0.75), tilt(), closure(), *radii)
    return Agent(kind, None, [hand])


def _check_kind(kind: str) -> None:
    if kind not in EMBODIMENT_RATES:
        raise ValueError(f"the generated world has no embodiment {kind!r}; it has {sorted(EMBODIMENT_RATES)}")


def _radius(kind: str, opening: np.ndarray) -> np.ndarray:
    closed, open_ = EFFECTOR_RADII[kind]
    return closed + (open_ - closed) * np.clip(opening, 0.0, 1.0)


def effector_discs(trajectory: EmbodimentTrajectory) -> tuple[np.ndarray, np.ndarray]:
    """The effectors of any trajectory of a world embodiment: centres (T, H, 2) as (x, z) m and radii
    (T, H) m, the acting effector first (the end effector, the right wrist, the pusher)."""
    kind = trajectory.kind
    _check_kind(kind)
    xz = lambda part: trajectory.poses[part].positions[..., [0, 2]].double().numpy()  # noqa: E731
    if kind == "single_arm":
        parts, openings = ["end_effector"], [trajectory.joints["gripper"][..., 0]]
    elif kind == "humanoid":
        parts = ["right_wrist", "left_wrist"]
        weights = torch.from_numpy(FINGER_WEIGHTS)
        openings = [1.0 - (trajectory.joints[f"{side}_fingers"] / weights).mean(-1) for side in ("right", "left")]
    else:
        parts, openings = ["ego"], [trajectory.joints["extension"][..., 0]]
    centres = np.stack([xz(part) for part in parts], axis=-2)
    radii = np.stack([_radius(kind, opening.double().numpy()) for opening in openings], axis=-1)
    return centres, radii


def planned_trajectory(kind: str, centres: np.ndarray, opening: float = 1.0) -> EmbodimentTrajectory:
    """Poses (rotation matrices, no tilt) that put ``kind``'s acting effector at ``centres`` (T, 2)
    with the given opening; a humanoid's ego walks to stay beside its right wrist and its left wrist
    waits near the ceiling, out of the balls' way."""
    _check_kind(kind)
    x, z = centres[:, 0], centres[:, 1]
    zero, ones = np.zeros_like(x), np.ones_like(x)
    if kind == "single_arm":
        return EmbodimentTrajectory(
            kind,
            {"ego": _poses(np.full_like(x, 0.5), zero, zero, True), "end_effector": _poses(x, z, zero, True)},
            {"gripper": torch.from_numpy(opening * ones[:, None])},
        )
    if kind == "humanoid":
        ego = np.clip(x - WRIST_OFFSET, 0.25, 0.75)
        fingers = torch.from_numpy((1.0 - opening) * ones[:, None] * FINGER_WEIGHTS)
        return EmbodimentTrajectory(
            kind,
            {
                "ego": _poses(ego, zero, zero, True),
                "left_wrist": _poses(ego - WRIST_OFFSET, np.full_like(x, 0.85), zero, True),
                "right_wrist": _poses(x, z, zero, True),
            },
            {"left_fingers": fingers, "right_fingers": fingers.clone()},
        )
    return EmbodimentTrajectory(
        kind, {"ego": _poses(x, z, zero, True)}, {"extension": torch.from_numpy(opening * ones[:, None])}
    )


def joined(first: EmbodimentTrajectory, then: EmbodimentTrajectory) -> EmbodimentTrajectory:
    """``first``'s frames followed by ``then``'s (same kind and rotation format): a pose and a plan
    from it, ready for ``encode_pseudo_actions``."""
    return EmbodimentTrajectory(
        first.kind,
        {
            part: BodyPoses(
                torch.cat([poses.positions, then.poses[part].positions], -2),
                torch.cat([poses.rotations, then.poses[part].rotations], -3 if poses.rotations.shape[-1] == 3 else -2),
            )
            for part, poses in first.poses.items()
        },
        {name: torch.cat([values, then.joints[name]], -2) for name, values in first.joints.items()},
    )
