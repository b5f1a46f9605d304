"""Pseudo-actions: relative SE(3) steps checked against scipy, exact layouts, lossless decoding."""

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from megatron_cosmos3.encoders.pseudo_actions import (
    ACTION_LAYOUTS,
    BodyPoses,
    EmbodimentTrajectory,
    decode_pseudo_actions,
    encode_pseudo_actions,
    get_layout,
)
from megatron_cosmos3.encoders.rotations import rotation_6d_to_matrix

T = 8
ROUND_TRIP_ATOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def random_trajectory(kind, frames=T, seed=0, dtype=torch.float64, matrices=False, batch=()):
    """Random world poses (positions within a few metres) and joint values for ``kind``."""
    rng = np.random.default_rng(seed)
    layout = get_layout(kind)
    shape = (*batch, frames)

    def pose(index):
        rotations = Rotation.random(int(np.prod(shape)), random_state=seed * 100 + index)
        values = rotations.as_matrix().reshape(*shape, 3, 3) if matrices else rotations.as_quat().reshape(*shape, 4)
        positions = rng.uniform(-3, 3, size=(*shape, 3))
        return BodyPoses(torch.tensor(positions, dtype=dtype), torch.tensor(values, dtype=dtype))

    poses = {part: pose(i) for i, part in enumerate(layout.pose_parts)}
    joints = {
        name: torch.tensor(rng.uniform(0, 1.5, size=(*shape, width)), dtype=dtype) for name, width in layout.joint_parts
    }
    return EmbodimentTrajectory(kind, poses, joints)


def world_matrices(poses: BodyPoses) -> torch.Tensor:
    if poses.rotations.shape[-1] == 4:
        return torch.tensor(Rotation.from_quat(poses.rotations.double().reshape(-1, 4).numpy()).as_matrix()).reshape(
            *poses.rotations.shape[:-1], 3, 3
        )
    return poses.rotations.double()


def test_layout_dimensions_and_field_order():
    assert {k: v.dim for k, v in ACTION_LAYOUTS.items()} == {
        "single_arm": 19,
        "humanoid": 57,
        "vehicle": 9,
        "camera": 9,
        "planar_pusher": 10,
    }
    humanoid = ACTION_LAYOUTS["humanoid"].slices
    assert humanoid["left_wrist.rotation_6d"] == slice(12, 18)
    assert humanoid["left_fingers"] == slice(27, 42) and humanoid["right_fingers"] == slice(42, 57)
    assert ACTION_LAYOUTS["single_arm"].slices["gripper"] == slice(18, 19)
    for layout in ACTION_LAYOUTS.values():
        covered = [i for s in layout.slices.values() for i in range(s.start, s.stop)]
        assert covered == list(range(layout.dim)), f"{layout.name}: fields must tile the vector"
        assert len(layout.rotation_6d_dims) == 6 * len(layout.pose_parts)


@pytest.mark.parametrize("kind", sorted(ACTION_LAYOUTS))
def test_encoded_shape_is_frames_minus_one_by_layout_dim(kind):
    actions = encode_pseudo_actions(random_trajectory(kind, batch=(2,)))
    assert actions.shape == (2, T - 1, ACTION_LAYOUTS[kind].dim)


def scipy_relative_steps(positions: np.ndarray, rotations: Rotation):
    """Reference: T_i^{-1} T_{i+1} with scipy, as (translations, relative Rotation)."""
    previous, following = rotations[:-1], rotations[1:]
    return previous.inv().apply(positions[1:] - positions[:-1]), previous.inv() * following


def test_ego_steps_match_scipy_relative_transforms():
    trajectory = random_trajectory("vehicle", frames=20, seed=4)
    actions = encode_pseudo_actions(trajectory)
    ego = trajectory.poses["ego"]
    translations, relative = scipy_relative_steps(ego.positions.numpy(), Rotation.from_quat(ego.rotations.numpy()))
    np.testing.assert_allclose(actions[:, :3].numpy(), translations, atol=1e-12)
    np.testing.assert_allclose(rotation_6d_to_matrix(actions[:, 3:9]).numpy(), relative.as_matrix(), atol=1e-12)


def test_end_effector_steps_match_scipy_in_the_ego_frame():
    trajectory = random_trajectory("single_arm", frames=12, seed=5)
    actions = encode_pseudo_actions(trajectory)
    ego, arm = trajectory.poses["ego"], trajectory.poses["end_effector"]
    ego_rot, arm_rot = Rotation.from_quat(ego.rotations.numpy()), Rotation.from_quat(arm.rotations.numpy())
    local_positions = ego_rot.inv().apply(arm.positions.numpy() - ego.positions.numpy())
    translations, relative = scipy_relative_steps(local_positions, ego_rot.inv() * arm_rot)
    slices = ACTION_LAYOUTS["single_arm"].slices
    np.testing.assert_allclose(actions[:, slices["end_effector.translation"]].numpy(), translations, atol=1e-12)
    got = rotation_6d_to_matrix(actions[:, slices["end_effector.rotation_6d"]]).numpy()
    np.testing.assert_allclose(got, relative.as_matrix(), atol=1e-12)
    np.testing.assert_array_equal(actions[:, slices["gripper"]].numpy(), trajectory.joints["gripper"][1:].numpy())


def test_arm_carried_by_a_moving_base_has_zero_end_effector_action():
    base = random_trajectory("vehicle", frames=6, seed=6).poses["ego"]
    base_rot = Rotation.from_quat(base.rotations.numpy())
    grip_offset, grip_rot = np.array([0.4, 0.1, 0.3]), Rotation.from_rotvec([0.2, -0.1, 0.5])
    arm = BodyPoses(
        torch.tensor(base.positions.numpy() + base_rot.apply(grip_offset)),
        torch.tensor((base_rot * grip_rot).as_quat()),
    )
    trajectory = EmbodimentTrajectory(
        "single_arm", {"ego": base, "end_effector": arm}, {"gripper": torch.zeros(6, 1, dtype=torch.float64)}
    )
    actions = encode_pseudo_actions(trajectory)
    slices = ACTION_LAYOUTS["single_arm"].slices
    assert actions[:, slices["ego.translation"]].abs().max() > 0.1
    torch.testing.assert_close(
        actions[:, slices["end_effector.translation"]], torch.zeros(5, 3, dtype=torch.float64), atol=1e-12, rtol=0
    )
    identity_6d = torch.tensor([1.0, 0, 0, 0, 1, 0], dtype=torch.float64).expand(5, 6)
    torch.testing.assert_close(actions[:, slices["end_effector.rotation_6d"]], identity_6d, atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("matrices", [False, True], ids=["quaternions", "matrices"])
@pytest.mark.parametrize("kind", sorted(ACTION_LAYOUTS))
def test_decode_inverts_encode_for_every_kind(kind, matrices, dtype):
    trajectory = random_trajectory(kind, frames=16, seed=7, dtype=dtype, matrices=matrices, batch=(2,))
    decoded = decode_pseudo_actions(encode_pseudo_actions(trajectory), trajectory.frames(0, 1))
    assert decoded.kind == kind
    atol = ROUND_TRIP_ATOL[dtype]
    for part, poses in trajectory.poses.items():
        got = decoded.poses[part]
        assert got.positions.shape == (2, 16, 3) and got.rotations.shape == (2, 16, 3, 3)
        torch.testing.assert_close(got.positions, poses.positions, atol=atol, rtol=0)
        torch.testing.assert_close(got.rotations.double(), world_matrices(poses), atol=atol, rtol=0)
    for name, values in trajectory.joints.items():
        torch.testing.assert_close(decoded.joints[name], values, atol=0, rtol=0)


def test_decoding_with_strict_false_turns_degenerate_6d_into_identity_steps():
    trajectory = random_trajectory("camera", frames=3, seed=8)
    actions = torch.zeros(4, 9, dtype=torch.float64)  # an untrained head may output all zeros
    with pytest.raises(ValueError, match=r"actions\[\.\.\., ego\.rotation_6d\].*degenerate"):
        decode_pseudo_actions(actions, trajectory.frames(0, 1))
    decoded = decode_pseudo_actions(actions, trajectory.frames(0, 1), strict=False)
    start = world_matrices(trajectory.poses["ego"])[0]
    torch.testing.assert_close(decoded.poses["ego"].rotations, start.expand(5, 3, 3))
    torch.testing.assert_close(decoded.poses["ego"].positions, trajectory.poses["ego"].positions[:1].expand(5, 3))


def _replace(trajectory, part=None, positions=None, rotations=None, joints=None, kind=None):
    poses = dict(trajectory.poses)
    if part is not None:
        old = poses[part]
        poses[part] = BodyPoses(
            old.positions if positions is None else positions, old.rotations if rotations is None else rotations
        )
    return EmbodimentTrajectory(kind or trajectory.kind, poses, trajectory.joints if joints is None else joints)


def _with_value(tensor, index, value):
    tensor = tensor.clone()
    tensor[index] = value
    return tensor


ARM = random_trajectory("single_arm", frames=6, seed=9)
ARM_MATRICES = random_trajectory("single_arm", frames=6, seed=9, matrices=True)
BAD_TRAJECTORIES = {
    "unknown kind": (
        _replace(ARM, kind="tank"),
        r"unknown embodiment kind 'tank'; expected one of \['camera', 'humanoid'",
    ),
    "nan position": (
        _replace(ARM, "end_effector", positions=_with_value(ARM.poses["end_effector"].positions, (3, 1), float("nan"))),
        r"poses\['end_effector'\]\.positions must be finite; value nan at index \(3, 1\)",
    ),
    "inf quaternion": (
        _replace(ARM, "ego", rotations=_with_value(ARM.poses["ego"].rotations, (0, 2), float("inf"))),
        r"poses\['ego'\]\.rotations must be finite; value inf at index \(0, 2\)",
    ),
    "zero quaternion": (
        _replace(ARM, "ego", rotations=_with_value(ARM.poses["ego"].rotations, 4, 0.0)),
        r"poses\['ego'\]\.rotations must have non-zero norm; got all zeros at index \(4,\)",
    ),
    "positions not 3d": (
        _replace(ARM, "end_effector", positions=torch.zeros(6, 2, dtype=torch.float64)),
        r"poses\['end_effector'\]\.positions must have shape \(6, 3\).*got \(6, 2\)",
    ),
    "too few rotations": (
        _replace(ARM, "end_effector", rotations=ARM.poses["end_effector"].rotations[:5]),
        r"poses\['end_effector'\]\.rotations must have shape \(6, 4\).*got \(5, 4\)",
    ),
    "rotations neither quaternion nor matrix": (
        _replace(ARM, "ego", rotations=torch.zeros(6, 3, dtype=torch.float64)),
        r"poses\['ego'\]\.rotations must have shape \(6, 3, 3\).*got \(6, 3\)",
    ),
    "reflection matrix": (
        _replace(
            ARM_MATRICES,
            "ego",
            rotations=_with_value(ARM_MATRICES.poses["ego"].rotations, 2, torch.diag(torch.tensor([1.0, 1, -1]))),
        ),
        r"poses\['ego'\]\.rotations must hold rotation matrices .*det \+1\); "
        r"matrix at index \(2,\) is \[\[1\.0, 0\.0, 0\.0\]",
    ),
    "scaled matrix": (
        _replace(ARM_MATRICES, "end_effector", rotations=1.01 * ARM_MATRICES.poses["end_effector"].rotations),
        r"poses\['end_effector'\]\.rotations must hold rotation matrices \(orthonormal within 0\.001",
    ),
    "one frame": (
        ARM.frames(0, 1),
        r"poses\['ego'\]\.positions needs at least 2 frame\(s\) on axis -2, got T=1 \(shape \(1, 3\)\)",
    ),
    "missing gripper": (
        _replace(ARM, joints={}),
        r"joints for kind 'single_arm' must have keys \['gripper'\]; missing \['gripper'\]",
    ),
    "extra part": (
        EmbodimentTrajectory("single_arm", {**ARM.poses, "head": ARM.poses["ego"]}, ARM.joints),
        r"poses for kind 'single_arm' must have keys \['ego', 'end_effector'\]; missing \[\], unexpected \['head'\]",
    ),
    "gripper too wide": (
        _replace(ARM, joints={"gripper": torch.zeros(6, 2, dtype=torch.float64)}),
        r"joints\['gripper'\] must have shape \(6, 1\).*got \(6, 2\)",
    ),
    "numpy positions": (
        _replace(ARM, "ego", positions=ARM.poses["ego"].positions.numpy()),
        r"poses\['ego'\]\.positions must be a floating-point torch\.Tensor, got ndarray",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_TRAJECTORIES))
def test_bad_trajectory_raises_error_naming_the_field(case):
    trajectory, message = BAD_TRAJECTORIES[case]
    with pytest.raises(ValueError, match=message):
        encode_pseudo_actions(trajectory)


def test_bad_decode_inputs_raise_errors_naming_the_field():
    actions = encode_pseudo_actions(ARM)
    start = ARM.frames(0, 1)
    with pytest.raises(
        ValueError, match=r"actions for kind 'single_arm' must have shape \(\) \+ \(T, 19\), got \(5, 18\)"
    ):
        decode_pseudo_actions(actions[:, :18], start)
    with pytest.raises(ValueError, match=r"actions must be finite; value nan at index \(2, 18\)"):
        decode_pseudo_actions(_with_value(actions, (2, 18), float("nan")), start)
    with pytest.raises(ValueError, match=r"poses\['ego'\]\.positions needs exactly 1 frame\(s\) on axis -2, got T=6"):
        decode_pseudo_actions(actions, ARM)
