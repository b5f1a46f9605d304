"""Pseudo-actions: embodiment trajectories as relative SE(3) steps, the Cosmos 3 action tokens.

A step ``i -> i+1`` of a rigid body part with absolute poses ``T_i = (R_i, p_i)`` becomes
``T_i^{-1} T_{i+1}`` = (translation ``R_i^T (p_{i+1} - p_i)`` in metres, expressed in frame ``i``;
rotation ``R_i^T R_{i+1}`` as 6D, see ``rotations.py``) = 9 numbers. Relative steps make one
action vocabulary for every robot, car and camera: the same motion gives the same numbers
wherever in the world it happens.

Frames. All input poses are absolute, in one world frame. The ego part is differenced in the
world; every other part (end effector, wrists) is first expressed in the ego frame
(``T_ego^{-1} T_part``) and then differenced. Ego-relative manipulation is what transfers across
robots — an arm's reach does not depend on where its base stands — and it keeps base motion out
of the end-effector action (a mobile base moving with a still arm gives a zero end-effector step).

Joint values (gripper opening, 15 finger joints per hand) are passed through ABSOLUTE: step ``i``
carries the values at frame ``i+1``, the target reached by the step. They are bounded by joint
limits, so absolute values normalise well and do not drift when a rollout integrates them, and a
grasp is naturally a target configuration; deltas would accumulate error over long rollouts.

Layouts (per step): ``[ego.translation, ego.rotation_6d, <parts in ego frame>..., <joints>...]``

=============  ========================================================================  ====
kind           fields                                                                    dim
=============  ========================================================================  ====
single_arm     ego 9, end_effector 9, gripper 1                                           19
humanoid       ego 9, left_wrist 9, right_wrist 9, left_fingers 15, right_fingers 15      57
vehicle        ego 9                                                                        9
camera         ego 9                                                                        9
planar_pusher  ego 9, extension 1                                                          10
=============  ========================================================================  ====

``planar_pusher`` is the generated world's held-out embodiment (``world/agents.py``): a disc on a
gantry whose ego pose is the pusher itself, and whose ``extension`` in [0, 1] sets its radius.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from megatron_cosmos3.encoders.rotations import (
    matrix_to_rotation_6d,
    quaternion_to_matrix,
    rotation_6d_to_matrix,
)

__all__ = [
    "ACTION_LAYOUTS",
    "EGO",
    "ActionField",
    "ActionLayout",
    "BodyPoses",
    "EmbodimentTrajectory",
    "decode_pseudo_actions",
    "encode_pseudo_actions",
    "get_layout",
]

EGO = "ego"
# Recorded matrices may be float32/float16 round-offs of rotations; reflections or scaled
# matrices are data bugs and must not be silently "fixed".
_ORTHONORMAL_TOLERANCE = 1e-3


@dataclass(frozen=True)
class ActionField:
    """One named, contiguous group of dims in a pseudo-action vector."""

    name: str  # "<part>.translation", "<part>.rotation_6d" or a joint group name
    start: int
    stop: int

    @property
    def slice(self) -> slice:
        return slice(self.start, self.stop)


@dataclass(frozen=True)
class ActionLayout:
    """Which parts an embodiment has and where each sits in its pseudo-action vector.

    ``pose_parts`` are rigid bodies (9 dims each), ``pose_parts[0]`` is always the ego;
    ``joint_parts`` are ``(name, width)`` groups of absolute joint values.
    """

    name: str
    pose_parts: tuple[str, ...]
    joint_parts: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        if not self.pose_parts or self.pose_parts[0] != EGO:
            raise ValueError(f"layout {self.name!r}: pose_parts must start with {EGO!r}, got {self.pose_parts}")

    @functools.cached_property
    def fields(self) -> tuple[ActionField, ...]:
        widths = [w for part in self.pose_parts for w in ((f"{part}.translation", 3), (f"{part}.rotation_6d", 6))]
        widths += list(self.joint_parts)
        fields, start = [], 0
        for name, width in widths:
            fields.append(ActionField(name, start, start + width))
            start += width
        return tuple(fields)

    @property
    def dim(self) -> int:
        return self.fields[-1].stop

    @property
    def slices(self) -> dict[str, slice]:
        """Field name -> slice of the last axis, e.g. ``{"ego.translation": slice(0, 3), ...}``."""
        return {f.name: f.slice for f in self.fields}

    @property
    def rotation_6d_dims(self) -> tuple[int, ...]:
        """Indices of every 6D rotation component."""
        return tuple(i for f in self.fields if f.name.endswith(".rotation_6d") for i in range(f.start, f.stop))


ACTION_LAYOUTS: dict[str, ActionLayout] = {
    layout.name: layout
    for layout in (
        ActionLayout("single_arm", (EGO, "end_effector"), (("gripper", 1),)),
        ActionLayout("humanoid", (EGO, "left_wrist", "right_wrist"), (("left_fingers", 15), ("right_fingers", 15))),
        ActionLayout("vehicle", (EGO,)),
        ActionLayout("camera", (EGO,)),
        ActionLayout("planar_pusher", (EGO,), (("extension", 1),)),
    )
}


def get_layout(kind: str) -> ActionLayout:
    """The layout of embodiment ``kind``; ValueError naming the kind if it is unknown."""
    if kind not in ACTION_LAYOUTS:
        raise ValueError(f"unknown embodiment kind {kind!r}; expected one of {sorted(ACTION_LAYOUTS)}")
    return ACTION_LAYOUTS[kind]


@dataclass
class BodyPoses:
    """Absolute poses of one rigid body part, world frame.

    positions: ``(..., T, 3)`` metres. rotations: ``(..., T, 4)`` xyzw quaternions or
    ``(..., T, 3, 3)`` matrices (body -> world). Decoded trajectories always hold matrices.
    """

    positions: torch.Tensor
    rotations: torch.Tensor

    def frames(self, start: int, stop: int | None = None) -> BodyPoses:
        """Frames ``start:stop`` (time axis -2 of positions, quaternions; -3 of matrices)."""
        time = slice(start, stop)
        rotation_index = (
            (..., time, slice(None)) if self.rotations.shape[-1] == 4 else (..., time, slice(None), slice(None))
        )
        return BodyPoses(self.positions[..., time, :], self.rotations[rotation_index])


@dataclass
class EmbodimentTrajectory:
    """Everything one embodiment recorded over ``T`` frames.

    poses: one ``BodyPoses`` per ``layout.pose_parts`` name. joints: one ``(..., T, width)``
    tensor per ``layout.joint_parts`` name (absolute values, their native units).
    """

    kind: str
    poses: Mapping[str, BodyPoses]
    joints: Mapping[str, torch.Tensor] = field(default_factory=dict)

    def frames(self, start: int, stop: int | None = None) -> EmbodimentTrajectory:
        """Frames ``start:stop`` of every part; ``frames(0, 1)`` is the start state for decoding."""
        return EmbodimentTrajectory(
            self.kind,
            {part: poses.frames(start, stop) for part, poses in self.poses.items()},
            {name: values[..., start:stop, :] for name, values in self.joints.items()},
        )


# ---------------------------------------------------------------------------------------------
# Validation: every message names the field and the offending shape or value.


def _require_keys(given: Mapping, expected: tuple[str, ...], what: str, kind: str) -> None:
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    if missing or unexpected:
        raise ValueError(
            f"{what} for kind {kind!r} must have keys {list(expected)}; missing {missing}, unexpected {unexpected}"
        )


def _require_tensor(x: object, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a floating-point torch.Tensor, got {got}")
    if not torch.isfinite(x).all():
        index = tuple(int(i) for i in torch.nonzero(~torch.isfinite(x))[0])
        raise ValueError(f"{name} must be finite; value {x[index].item()} at index {index}")
    return x


def _require_shape(x: torch.Tensor, name: str, frames_shape: tuple[int, ...], trailing: tuple[int, ...]) -> None:
    expected = frames_shape + trailing
    if tuple(x.shape) != expected:
        raise ValueError(f"{name} must have shape {expected} (batch..., T, ...), got {tuple(x.shape)}")


def _as_matrices(rotations: torch.Tensor, name: str, frames_shape: tuple[int, ...]) -> torch.Tensor:
    """Quaternions or matrices -> exact rotation matrices ``frames_shape + (3, 3)``."""
    if rotations.shape[-1:] == (4,):
        _require_shape(rotations, name, frames_shape, (4,))
        return quaternion_to_matrix(rotations, name=name)
    _require_shape(rotations, name, frames_shape, (3, 3))
    gram = rotations.transpose(-1, -2) @ rotations
    error = (gram - torch.eye(3, dtype=rotations.dtype, device=rotations.device)).abs().amax((-1, -2))
    bad = (error > _ORTHONORMAL_TOLERANCE) | (torch.linalg.det(rotations) <= 0)
    if bad.any():
        index = tuple(int(i) for i in torch.nonzero(bad)[0])
        raise ValueError(
            f"{name} must hold rotation matrices (orthonormal within {_ORTHONORMAL_TOLERANCE}, det +1); "
            f"matrix at index {index} is {rotations[index].tolist()}"
        )
    # Project the round-off away so relative steps are exact rotations.
    return rotation_6d_to_matrix(matrix_to_rotation_6d(rotations), name=name)


def _validated(
    trajectory: EmbodimentTrajectory, min_frames: int, max_frames: int | None
) -> tuple[ActionLayout, dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, torch.Tensor]]:
    """Check a trajectory; return its layout, world poses as (positions, matrices) and joints.

    Everything is cast to the widest input dtype, so float64 joints beside float32 poses work.
    """
    layout = get_layout(trajectory.kind)
    _require_keys(trajectory.poses, layout.pose_parts, "poses", layout.name)
    _require_keys(trajectory.joints, tuple(n for n, _ in layout.joint_parts), "joints", layout.name)
    ego_positions = _require_tensor(trajectory.poses[EGO].positions, f"poses[{EGO!r}].positions")
    if ego_positions.dim() < 2 or ego_positions.shape[-1] != 3:
        raise ValueError(f"poses[{EGO!r}].positions must have shape (batch..., T, 3), got {tuple(ego_positions.shape)}")
    frames_shape = tuple(ego_positions.shape[:-1])
    num_frames = frames_shape[-1]
    if num_frames < min_frames or (max_frames is not None and num_frames > max_frames):
        need = f"exactly {min_frames}" if max_frames == min_frames else f"at least {min_frames}"
        raise ValueError(
            f"poses[{EGO!r}].positions needs {need} frame(s) on axis -2, got T={num_frames} "
            f"(shape {tuple(ego_positions.shape)})"
        )

    tensors = [t for p in trajectory.poses.values() for t in (p.positions, p.rotations)]
    tensors += list(trajectory.joints.values())
    dtypes = [t.dtype for t in tensors if isinstance(t, torch.Tensor) and t.is_floating_point()]
    dtype = functools.reduce(torch.promote_types, dtypes)

    poses = {}
    for part in layout.pose_parts:
        positions = _require_tensor(trajectory.poses[part].positions, f"poses[{part!r}].positions")
        _require_shape(positions, f"poses[{part!r}].positions", frames_shape, (3,))
        rotations = _require_tensor(trajectory.poses[part].rotations, f"poses[{part!r}].rotations")
        matrices = _as_matrices(rotations.to(dtype), f"poses[{part!r}].rotations", frames_shape)
        poses[part] = (positions.to(dtype), matrices)
    joints = {}
    for joint, width in layout.joint_parts:
        values = _require_tensor(trajectory.joints[joint], f"joints[{joint!r}]")
        _require_shape(values, f"joints[{joint!r}]", frames_shape, (width,))
        joints[joint] = values.to(dtype)
    return layout, poses, joints


# ---------------------------------------------------------------------------------------------
# SE(3) algebra on (positions (..., 3), matrices (..., 3, 3)) pairs.


def _compose(p_a, r_a, p_b, r_b):
    """``T_a T_b``."""
    return p_a + (r_a @ p_b[..., None])[..., 0], r_a @ r_b


def _inverse_compose(p_a, r_a, p_b, r_b):
    """``T_a^{-1} T_b``."""
    r_a_t = r_a.transpose(-1, -2)
    return (r_a_t @ (p_b - p_a)[..., None])[..., 0], r_a_t @ r_b


def _body_poses(trajectory_poses, layout):
    """World poses -> the poses that get differenced: ego in world, other parts in ego frame."""
    ego_p, ego_r = trajectory_poses[EGO]
    return {
        part: (ego_p, ego_r) if part == EGO else _inverse_compose(ego_p, ego_r, *trajectory_poses[part])
        for part in layout.pose_parts
    }


def encode_pseudo_actions(trajectory: EmbodimentTrajectory) -> torch.Tensor:
    """``T`` absolute frames -> ``(..., T-1, layout.dim)`` pseudo-actions (layout: module doc).

    Raises ValueError (naming the field and the bad shape/value) for an unknown kind, missing or
    extra parts, wrong shapes, NaN/inf, non-rotation matrices, zero quaternions or ``T < 2``.
    """
    layout, poses, joints = _validated(trajectory, min_frames=2, max_frames=None)
    pieces = []
    for p, r in _body_poses(poses, layout).values():
        step_p, step_r = _inverse_compose(p[..., :-1, :], r[..., :-1, :, :], p[..., 1:, :], r[..., 1:, :, :])
        pieces += [step_p, matrix_to_rotation_6d(step_r)]
    pieces += [joints[name][..., 1:, :] for name, _ in layout.joint_parts]
    return torch.cat(pieces, dim=-1)


def decode_pseudo_actions(
    actions: torch.Tensor, initial: EmbodimentTrajectory, *, strict: bool = True
) -> EmbodimentTrajectory:
    """Integrate ``(..., T, layout.dim)`` pseudo-actions from a one-frame ``initial`` state.

    Returns the ``T+1``-frame absolute trajectory (frame 0 = ``initial``) with rotations as
    ``(..., T+1, 3, 3)`` matrices. ``strict`` goes to ``rotation_6d_to_matrix``: keep it for
    data, pass ``strict=False`` to roll out model predictions whose 6D may be degenerate.
    """
    layout, start_poses, start_joints = _validated(initial, min_frames=1, max_frames=1)
    actions = _require_tensor(actions, "actions")
    batch_shape = next(iter(start_poses.values()))[0].shape[:-2]
    if actions.dim() < 2 or actions.shape[-1] != layout.dim or tuple(actions.shape[:-2]) != tuple(batch_shape):
        raise ValueError(
            f"actions for kind {layout.name!r} must have shape {tuple(batch_shape)} + (T, {layout.dim}), "
            f"got {tuple(actions.shape)}"
        )
    dtype = torch.promote_types(actions.dtype, start_poses[EGO][0].dtype)
    actions = actions.to(dtype)
    start_poses = {part: (p.to(dtype), r.to(dtype)) for part, (p, r) in start_poses.items()}
    start_joints = {name: values.to(dtype) for name, values in start_joints.items()}
    slices = layout.slices

    body = {}
    for part, (p, r) in _body_poses(start_poses, layout).items():
        steps_p = actions[..., slices[f"{part}.translation"]]
        steps_r = rotation_6d_to_matrix(
            actions[..., slices[f"{part}.rotation_6d"]], strict=strict, name=f"actions[..., {part}.rotation_6d]"
        )
        positions, matrices = [p[..., 0, :]], [r[..., 0, :, :]]
        for i in range(actions.shape[-2]):  # sequential by nature: each step starts where the last ended
            next_p, next_r = _compose(positions[-1], matrices[-1], steps_p[..., i, :], steps_r[..., i, :, :])
            positions.append(next_p)
            matrices.append(next_r)
        body[part] = (torch.stack(positions, dim=-2), torch.stack(matrices, dim=-3))

    ego_p, ego_r = body[EGO]
    poses = {
        part: BodyPoses(*((ego_p, ego_r) if part == EGO else _compose(ego_p, ego_r, *body[part])))
        for part in layout.pose_parts
    }
    joints = {
        name: torch.cat((start_joints[name], actions[..., slices[name]]), dim=-2) for name, _ in layout.joint_parts
    }
    return EmbodimentTrajectory(layout.name, poses, joints)
