"""Batched rotation conversions in torch: quaternions, matrices and the 6D representation.

Conventions (shared by every action module):

- Quaternions are ``(..., 4)`` in ``(x, y, z, w)`` order, the scalar last, as in
  ``scipy.spatial.transform.Rotation.as_quat``. Inputs need not be unit length; outputs are
  unit length with ``w >= 0`` (``q`` and ``-q`` are the same rotation; one sign makes outputs
  comparable).
- Rotation matrices are ``(..., 3, 3)`` and act on column vectors: ``v_world = R @ v_body``.
- The 6D representation (Zhou et al., "On the Continuity of Rotation Representations in Neural
  Networks", CVPR 2019) is the first two COLUMNS of the matrix, flattened column by column:
  ``d6 = (R[0,0], R[1,0], R[2,0], R[0,1], R[1,1], R[2,1])``. Unlike quaternions it is continuous
  over SO(3), which is why regression heads predict it.

All functions work on any leading batch shape and on float32 or float64; they validate their
input eagerly (one host sync), because a silently wrong rotation poisons a whole trajectory.
"""

from __future__ import annotations

import torch

__all__ = [
    "euler_xyz_to_matrix",
    "matrix_to_quaternion",
    "matrix_to_rotation_6d",
    "quaternion_to_matrix",
    "rotation_6d_to_matrix",
    "rotation_vector_to_matrix",
]


def _first_bad(mask: torch.Tensor) -> tuple[int, ...]:
    """Multi-index of the first True entry of ``mask`` (for error messages)."""
    return tuple(int(i) for i in torch.nonzero(mask)[0])


def _where(index: tuple[int, ...]) -> str:
    """`` at index (i, j)`` for batched inputs, nothing for a single row."""
    return f" at index {index}" if index else ""


def _require_finite(x: torch.Tensor, name: str, event_dims: int) -> None:
    """Raise ValueError naming ``name`` and the first row that holds NaN or inf."""
    bad = ~torch.isfinite(x)
    if event_dims:
        bad = bad.flatten(-event_dims).any(-1)
    if bad.any():
        index = _first_bad(bad)
        raise ValueError(f"{name} must be finite; got {x[index].tolist()}{_where(index)}")


def _require_trailing_shape(x: torch.Tensor, name: str, trailing: tuple[int, ...]) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if tuple(x.shape[-len(trailing) :]) != trailing or x.dim() < len(trailing):
        want = "(..., " + ", ".join(map(str, trailing)) + ")"
        raise ValueError(f"{name} must have shape {want}, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


def quaternion_to_matrix(quaternions: torch.Tensor, *, name: str = "quaternions") -> torch.Tensor:
    """``(..., 4)`` xyzw quaternions (any non-zero norm) -> ``(..., 3, 3)`` rotation matrices.

    Raises ValueError naming ``name`` for a wrong shape, NaN/inf or a zero-norm quaternion.
    """
    _require_trailing_shape(quaternions, name, (4,))
    _require_finite(quaternions, name, event_dims=1)
    norm = torch.linalg.vector_norm(quaternions, dim=-1, keepdim=True)
    if (norm == 0).any():
        index = _first_bad(norm[..., 0] == 0)
        raise ValueError(f"{name} must have non-zero norm; got all zeros{_where(index)}")
    x, y, z, w = (quaternions / norm).unbind(-1)
    rows = (
        (1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)),
        (2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)),
        (2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)),
    )
    return torch.stack([torch.stack(row, dim=-1) for row in rows], dim=-2)


def euler_xyz_to_matrix(angles: torch.Tensor, *, name: str = "angles") -> torch.Tensor:
    """``(..., 3)`` (roll, pitch, yaw) radians about the fixed x, y, z axes, in that order
    (extrinsic; scipy's ``from_euler("xyz", ...)``) -> ``(..., 3, 3)``: ``Rz(yaw) Ry(pitch) Rx(roll)``."""
    _require_trailing_shape(angles, name, (3,))
    _require_finite(angles, name, event_dims=1)
    half_sin, half_cos = torch.sin(angles / 2), torch.cos(angles / 2)
    zero = torch.zeros_like(angles[..., 0])
    # One quaternion per axis, composed z * y * x (the last applied leftmost).
    x, y, z = (
        torch.stack([half_sin[..., i] if j == i else zero for j in range(3)] + [half_cos[..., i]], dim=-1)
        for i in range(3)
    )
    return quaternion_to_matrix(_quaternion_product(z, _quaternion_product(y, x)), name=name)


def rotation_vector_to_matrix(rotation_vectors: torch.Tensor, *, name: str = "rotation_vectors") -> torch.Tensor:
    """``(..., 3)`` axis * angle (radians; scipy's ``from_rotvec``) -> ``(..., 3, 3)``."""
    _require_trailing_shape(rotation_vectors, name, (3,))
    _require_finite(rotation_vectors, name, event_dims=1)
    angle = torch.linalg.vector_norm(rotation_vectors, dim=-1, keepdim=True)
    # sin(angle / 2) / angle without 0 / 0: its Taylor series below 1e-4 rad (error < 1e-17).
    small = angle < 1e-4
    safe = torch.where(small, torch.ones_like(angle), angle)
    scale = torch.where(small, 0.5 - angle * angle / 48, torch.sin(safe / 2) / safe)
    quaternions = torch.cat([rotation_vectors * scale, torch.cos(angle / 2)], dim=-1)
    return quaternion_to_matrix(quaternions, name=name)


def _quaternion_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Hamilton product of xyzw quaternions: the rotation ``b`` then ``a``."""
    ax, ay, az, aw = a.unbind(-1)
    bx, by, bz, bw = b.unbind(-1)
    return torch.stack(
        (
            aw * bx + ax * bw + ay * bz - az * by,
            aw * by - ax * bz + ay * bw + az * bx,
            aw * bz + ax * by - ay * bx + az * bw,
            aw * bw - ax * bx - ay * by - az * bz,
        ),
        dim=-1,
    )


def matrix_to_quaternion(matrices: torch.Tensor, *, name: str = "matrices") -> torch.Tensor:
    """``(..., 3, 3)`` rotation matrices -> ``(..., 4)`` unit xyzw quaternions with ``w >= 0``.

    Uses Shepperd's method: of the four algebraically equal formulas, each row takes the one
    whose divisor (2|w|, 2|x|, 2|y| or 2|z|) is largest, so no branch divides by ~0.
    """
    _require_trailing_shape(matrices, name, (3, 3))
    _require_finite(matrices, name, event_dims=2)
    m = matrices
    m00, m11, m22 = m[..., 0, 0], m[..., 1, 1], m[..., 2, 2]
    # 4 * (w², x², y², z²); clamp only guards rounding below zero.
    four_sq = torch.stack(
        (1 + m00 + m11 + m22, 1 + m00 - m11 - m22, 1 - m00 + m11 - m22, 1 - m00 - m11 + m22), dim=-1
    ).clamp_min(0)
    s21, s02, s10 = m[..., 2, 1] - m[..., 1, 2], m[..., 0, 2] - m[..., 2, 0], m[..., 1, 0] - m[..., 0, 1]
    p10, p02, p21 = m[..., 1, 0] + m[..., 0, 1], m[..., 0, 2] + m[..., 2, 0], m[..., 2, 1] + m[..., 1, 2]
    # Row k holds 4·q_k·(w, x, y, z); dividing by 2·sqrt(four_sq[k]) = 4|q_k| gives ±(w, x, y, z).
    candidates = torch.stack(
        (
            torch.stack((four_sq[..., 0], s21, s02, s10), dim=-1),
            torch.stack((s21, four_sq[..., 1], p10, p02), dim=-1),
            torch.stack((s02, p10, four_sq[..., 2], p21), dim=-1),
            torch.stack((s10, p02, p21, four_sq[..., 3]), dim=-1),
        ),
        dim=-2,
    )
    best = four_sq.argmax(dim=-1, keepdim=True)
    chosen = torch.gather(candidates, -2, best[..., None].expand(*best.shape[:-1], 1, 4))[..., 0, :]
    wxyz = chosen / torch.linalg.vector_norm(chosen, dim=-1, keepdim=True)
    wxyz = torch.where(wxyz[..., :1] < 0, -wxyz, wxyz)
    return torch.cat((wxyz[..., 1:], wxyz[..., :1]), dim=-1)


def matrix_to_rotation_6d(matrices: torch.Tensor, *, name: str = "matrices") -> torch.Tensor:
    """``(..., 3, 3)`` rotation matrices -> ``(..., 6)``: first column, then second column."""
    _require_trailing_shape(matrices, name, (3, 3))
    return matrices[..., :, :2].transpose(-1, -2).reshape(*matrices.shape[:-2], 6)


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / torch.linalg.vector_norm(v, dim=-1, keepdim=True)


def _reject(v: torch.Tensor, unit_axis: torch.Tensor) -> torch.Tensor:
    """Component of ``v`` orthogonal to ``unit_axis`` (one Gram-Schmidt step)."""
    return v - (v * unit_axis).sum(-1, keepdim=True) * unit_axis


def _scale_to_unit_max(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Divide each 3-vector by its largest |component|; returns (scaled, is_zero).

    Gram-Schmidt is scale invariant, and this makes it so numerically too: norms of the scaled
    vectors lie in [1, sqrt(3)], so 1e300 does not overflow and 1e-300 does not underflow.
    """
    peak = v.abs().amax(dim=-1, keepdim=True)
    is_zero = peak[..., 0] == 0
    return v / torch.where(peak == 0, torch.ones_like(peak), peak), is_zero


def rotation_6d_to_matrix(
    rotation_6d: torch.Tensor,
    *,
    strict: bool = True,
    eps: float | None = None,
    name: str = "rotation_6d",
) -> torch.Tensor:
    """``(..., 6)`` 6D rotations (two columns, see module doc) -> ``(..., 3, 3)`` proper rotations.

    Gram-Schmidt: ``b1 = a1/|a1|``, ``b2`` = unit part of ``a2`` orthogonal to ``b1``,
    ``b3 = b1 × b2``. The result is orthonormal with det +1 for every finite input; each column
    pair is scale invariant. A second orthogonalisation pass keeps ``b1 · b2`` at rounding level
    even when ``a2`` is nearly parallel to ``a1`` (classic "twice is enough" re-orthogonalisation).

    Degenerate rows — ``a1 == 0``, ``a2 == 0``, or ``sin(angle(a1, a2)) < eps`` (default
    ``sqrt(finfo(dtype).eps)``: below it the second column is mostly rounding noise):

    - ``strict=True`` (data path): ValueError naming ``name``, the row index and its values.
    - ``strict=False`` (decoding model outputs, where a crash is worse than an arbitrary but
      valid rotation): deterministic fallback — a zero ``a1`` becomes the x axis; a degenerate
      ``a2`` is replaced by the coordinate axis least aligned with ``b1`` (lowest index on ties).

    NaN/inf always raise ValueError: no rotation is a meaningful answer to them.
    """
    _require_trailing_shape(rotation_6d, name, (6,))
    _require_finite(rotation_6d, name, event_dims=1)
    if eps is None:
        eps = torch.finfo(rotation_6d.dtype).eps ** 0.5
    a1, a1_zero = _scale_to_unit_max(rotation_6d[..., :3])
    a2, a2_zero = _scale_to_unit_max(rotation_6d[..., 3:])
    x_axis = torch.zeros_like(a1)
    x_axis[..., 0] = 1
    b1 = _unit(torch.where(a1_zero[..., None], x_axis, a1))
    u2 = _reject(a2, b1)
    # |a2| >= 1 after scaling, so |u2| / |a2| is the sine of the angle between the columns.
    sine = torch.linalg.vector_norm(u2, dim=-1) / torch.linalg.vector_norm(a2, dim=-1)
    # Measured against the fallback b1 when a1 is zero, so a valid a2 is still honoured then.
    a2_degenerate = a2_zero | (sine < eps)
    if strict and (a1_zero | a2_degenerate).any():
        index = _first_bad(a1_zero | a2_degenerate)
        raise ValueError(
            f"{name} = {rotation_6d[index].tolist()}{_where(index)} is degenerate: its two 3-vectors "
            f"are zero or parallel within eps={eps:g}; pass strict=False for a deterministic fallback"
        )
    # Fallback helper: the basis vector least aligned with b1 is at least ~55° away from it.
    least_aligned = torch.nn.functional.one_hot(b1.abs().argmin(-1), 3).to(b1.dtype)
    u2 = torch.where(a2_degenerate[..., None], _reject(least_aligned, b1), u2)
    b2 = _unit(_reject(_unit(u2), b1))
    b3 = torch.linalg.cross(b1, b2, dim=-1)
    return torch.stack((b1, b2, b3), dim=-1)
