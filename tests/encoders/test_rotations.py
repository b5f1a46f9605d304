"""Rotation conversions agree with scipy, and 6D -> matrix is always a proper rotation."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.transform import Rotation

from megatron_cosmos3.encoders.rotations import (
    euler_xyz_to_matrix,
    matrix_to_quaternion,
    matrix_to_rotation_6d,
    quaternion_to_matrix,
    rotation_6d_to_matrix,
    rotation_vector_to_matrix,
)

DTYPES = [torch.float64, torch.float32]
ATOL = {torch.float64: 1e-12, torch.float32: 1e-5}


def assert_proper_rotation(matrices: torch.Tensor) -> None:
    atol = ATOL[matrices.dtype]
    eye = torch.eye(3, dtype=matrices.dtype).expand_as(matrices)
    assert torch.isfinite(matrices).all()
    torch.testing.assert_close(matrices.transpose(-1, -2) @ matrices, eye, atol=atol, rtol=0)
    torch.testing.assert_close(
        torch.linalg.det(matrices), torch.ones(matrices.shape[:-2], dtype=matrices.dtype), atol=atol, rtol=0
    )


def random_rotations(n: int, seed: int = 0) -> Rotation:
    return Rotation.random(n, random_state=seed)


@pytest.mark.parametrize("dtype", DTYPES)
def test_quaternion_to_matrix_matches_scipy_for_unnormalised_xyzw(dtype):
    rotations = random_rotations(200)
    scales = np.random.default_rng(1).uniform(0.1, 10.0, size=(200, 1))
    quaternions = torch.tensor(rotations.as_quat() * scales, dtype=dtype)
    expected = torch.tensor(rotations.as_matrix(), dtype=dtype)
    torch.testing.assert_close(quaternion_to_matrix(quaternions), expected, atol=ATOL[dtype], rtol=0)


def test_matrix_to_quaternion_matches_scipy_up_to_sign_including_half_turns():
    # Half turns (w = 0) are where naive trace-based formulas divide by ~0.
    half_turns = Rotation.from_rotvec(np.pi * np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0] / np.sqrt(2)]))
    near_half = Rotation.from_rotvec((np.pi - 1e-9) * np.array([[0, 0.6, 0.8]]))
    rotations = Rotation.concatenate([random_rotations(200), half_turns, near_half])
    quaternions = matrix_to_quaternion(torch.tensor(rotations.as_matrix()))
    expected = torch.tensor(rotations.as_quat())
    sign = torch.where((quaternions * expected).sum(-1, keepdim=True) < 0, -1.0, 1.0)
    torch.testing.assert_close(quaternions, sign * expected, atol=1e-9, rtol=0)
    assert (quaternions[..., 3] >= 0).all(), "canonical sign: w >= 0"


def test_rotation_6d_is_first_two_columns_and_round_trips_to_scipy_matrix():
    matrices = torch.tensor(random_rotations(100).as_matrix())
    six_d = matrix_to_rotation_6d(matrices)
    assert six_d.shape == (100, 6)
    torch.testing.assert_close(six_d[:, :3], matrices[:, :, 0], atol=0, rtol=0)
    torch.testing.assert_close(six_d[:, 3:], matrices[:, :, 1], atol=0, rtol=0)
    torch.testing.assert_close(rotation_6d_to_matrix(six_d), matrices, atol=1e-12, rtol=0)


def test_gram_schmidt_keeps_first_column_direction_and_second_in_its_plane():
    rng = np.random.default_rng(2)
    a1, a2 = rng.normal(size=(50, 3)), rng.normal(size=(50, 3))
    matrices = rotation_6d_to_matrix(torch.tensor(np.concatenate([a1, a2], axis=1))).numpy()
    b1 = a1 / np.linalg.norm(a1, axis=1, keepdims=True)
    u2 = a2 - np.sum(a2 * b1, axis=1, keepdims=True) * b1
    np.testing.assert_allclose(matrices[:, :, 0], b1, atol=1e-12)
    np.testing.assert_allclose(matrices[:, :, 1], u2 / np.linalg.norm(u2, axis=1, keepdims=True), atol=1e-12)
    np.testing.assert_allclose(matrices[:, :, 2], np.cross(matrices[:, :, 0], matrices[:, :, 1]), atol=1e-12)


def test_each_column_is_scale_invariant_even_at_extreme_magnitudes():
    base = torch.tensor([[0.3, -1.2, 0.5, 2.0, 0.1, -0.7]], dtype=torch.float64)
    expected = rotation_6d_to_matrix(base)
    for s1, s2 in [(1e300, 1e-300), (1e-300, 1e300), (7.0, 0.01), (1e-310, 1e-310)]:
        scaled = base * torch.tensor([[s1] * 3 + [s2] * 3], dtype=torch.float64)
        torch.testing.assert_close(rotation_6d_to_matrix(scaled), expected, atol=1e-9, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("angle", [1e-1, 1e-2, 1e-3])
def test_nearly_parallel_columns_still_give_a_proper_rotation(dtype, angle):
    rng = np.random.default_rng(3)
    a1 = rng.normal(size=(64, 3))
    helper = rng.normal(size=(64, 3))
    perpendicular = np.cross(a1, helper)
    perpendicular /= np.linalg.norm(perpendicular, axis=1, keepdims=True)
    a2 = 1e3 * (a1 / np.linalg.norm(a1, axis=1, keepdims=True) * np.cos(angle) + perpendicular * np.sin(angle))
    matrices = rotation_6d_to_matrix(torch.tensor(np.concatenate([a1, a2], axis=1), dtype=dtype))
    assert_proper_rotation(matrices)


finite64 = st.floats(allow_nan=False, allow_infinity=False, width=64)
finite32 = st.floats(allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=100, deadline=None)
@given(st.lists(finite64, min_size=6, max_size=6))
def test_any_finite_float64_input_gives_proper_rotation_in_fallback_mode(values):
    assert_proper_rotation(rotation_6d_to_matrix(torch.tensor(values, dtype=torch.float64), strict=False))


@settings(max_examples=100, deadline=None)
@given(st.lists(finite32, min_size=6, max_size=6))
def test_any_finite_float32_input_is_proper_rotation_or_degenerate_error(values):
    six_d = torch.tensor(values, dtype=torch.float32)
    try:
        matrices = rotation_6d_to_matrix(six_d)
    except ValueError as error:
        assert "degenerate" in str(error)
        assert_proper_rotation(rotation_6d_to_matrix(six_d, strict=False))
    else:
        assert_proper_rotation(matrices)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.floats(-1, 1), min_size=3, max_size=3).filter(lambda v: max(map(abs, v)) > 1e-3),
    st.floats(-1e6, 1e6).filter(lambda s: abs(s) > 1e-6),
    st.lists(st.floats(-1e-12, 1e-12), min_size=3, max_size=3),
)
def test_parallel_columns_raise_in_strict_mode_and_fall_back_deterministically(a1, scale, jitter):
    a2 = [scale * (x + j) for x, j in zip(a1, jitter)]  # sin(angle) <= ~2e-9, below eps
    six_d = torch.tensor(a1 + a2, dtype=torch.float64)
    with pytest.raises(ValueError, match="rotation_6d .* is degenerate"):
        rotation_6d_to_matrix(six_d)
    first = rotation_6d_to_matrix(six_d, strict=False)
    assert_proper_rotation(first)
    torch.testing.assert_close(rotation_6d_to_matrix(six_d, strict=False), first, atol=0, rtol=0)
    # The first column still follows a1; only the second is invented.
    b1 = torch.tensor(a1, dtype=torch.float64)
    torch.testing.assert_close(first[:, 0], b1 / b1.norm(), atol=1e-12, rtol=0)


def test_fallback_values_are_the_documented_ones():
    zero = torch.zeros(6, dtype=torch.float64)
    torch.testing.assert_close(rotation_6d_to_matrix(zero, strict=False), torch.eye(3, dtype=torch.float64))
    # a1 along z, a2 parallel: the least aligned axis is x (lowest index among the ties x, y).
    parallel = torch.tensor([0, 0, 2.0, 0, 0, -5.0], dtype=torch.float64)
    expected = torch.tensor([[0, 1, 0], [0, 0, 1], [1, 0, 0]], dtype=torch.float64)
    torch.testing.assert_close(rotation_6d_to_matrix(parallel, strict=False), expected)
    # A zero a1 with a usable a2 keeps a2's direction (made orthogonal to the fallback x axis).
    zero_a1 = torch.tensor([0, 0, 0, 1.0, 0, 3.0], dtype=torch.float64)
    torch.testing.assert_close(
        rotation_6d_to_matrix(zero_a1, strict=False)[:, 1], torch.tensor([0, 0, 1.0], dtype=torch.float64)
    )


def test_bad_inputs_raise_errors_that_name_the_input():
    with pytest.raises(ValueError, match=r"head_output must have shape \(\.\.\., 6\), got \(4, 5\)"):
        rotation_6d_to_matrix(torch.zeros(4, 5), name="head_output")
    nan_row = torch.ones(3, 6)
    nan_row[2, 4] = float("nan")
    with pytest.raises(ValueError, match=r"rotation_6d must be finite; got \[.*nan.*\] at index \(2,\)"):
        rotation_6d_to_matrix(nan_row, strict=False)
    with pytest.raises(
        ValueError, match=r"rotation_6d = \[0\.0, 0\.0, 0\.0, 1\.0, 0\.0, 0\.0\] at index \(1,\) is degenerate"
    ):
        rotation_6d_to_matrix(torch.tensor([[1.0, 0, 0, 0, 1, 0], [0, 0, 0, 1, 0, 0]]))
    with pytest.raises(ValueError, match=r"quaternions must have non-zero norm; got all zeros at index \(1,\)"):
        quaternion_to_matrix(torch.tensor([[0, 0, 0, 1.0], [0, 0, 0, 0]]))
    with pytest.raises(ValueError, match=r"quaternions must have shape \(\.\.\., 4\), got \(3,\)"):
        quaternion_to_matrix(torch.zeros(3))
    with pytest.raises(ValueError, match=r"matrices must have shape \(\.\.\., 3, 3\), got \(2, 3, 4\)"):
        matrix_to_quaternion(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="floating-point"):
        rotation_6d_to_matrix(torch.ones(6, dtype=torch.int64))


def test_euler_angles_and_rotation_vectors_agree_with_scipy():
    rotations = random_rotations(100, seed=7)
    angles = rotations.as_euler("xyz")
    got = euler_xyz_to_matrix(torch.tensor(angles))
    np.testing.assert_allclose(got.numpy(), Rotation.from_euler("xyz", angles).as_matrix(), atol=1e-12)
    vectors = np.concatenate([rotations.as_rotvec(), [[0.0, 0.0, 0.0], [3e-5, -1e-5, 2e-5], [0.0, 0.0, np.pi]]])
    got = rotation_vector_to_matrix(torch.tensor(vectors))
    np.testing.assert_allclose(got.numpy(), Rotation.from_rotvec(vectors).as_matrix(), atol=1e-12)
    with pytest.raises(ValueError, match=r"roll_pitch_yaw must have shape \(\.\.\., 3\), got \(2, 4\)"):
        euler_xyz_to_matrix(torch.zeros(2, 4), name="roll_pitch_yaw")
