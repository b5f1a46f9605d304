"""Action error per dimension, in units of each dimension's spread, for inverse dynamics and the
open-loop policy (docs/DESIGN.md, "Evaluation").

The unit is the dataset's per-dimension standard deviation (``action_stats.json``'s ``std``, the
statistics that normalised the training actions), so a dimension that barely moves does not hide
under one that moves a lot and 1.0 means "as wrong as predicting the mean". Where no statistics
exist, ``spread_of(true)`` gives the true actions' own spread instead; a report says which.
Reference points: predicting the dataset mean scores 1, an independent draw from the action
distribution sqrt(2), the truth 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from megatron_cosmos3.encoders.action_normalization import STD_FLOOR


@dataclass(frozen=True)
class ActionError:
    """per_dim_rmse: (D,) root mean square error of each dimension over every step, divided by
    that dimension's scale. per_dim_mae: (D,) the mean absolute error, likewise divided."""

    per_dim_rmse: np.ndarray
    per_dim_mae: np.ndarray

    @property
    def mean_rmse(self) -> float:
        """The mean over dimensions: each dimension weighs the same."""
        return float(self.per_dim_rmse.mean())


def _check_actions(actions, name: str) -> np.ndarray:
    if not isinstance(actions, np.ndarray):
        raise ValueError(f"{name} must be a numpy array (..., D) of floats, got {type(actions).__name__}")
    if not np.issubdtype(actions.dtype, np.floating):
        raise ValueError(f"{name} must hold floats, got dtype {actions.dtype}")
    if actions.ndim < 1 or actions.size == 0:
        raise ValueError(f"{name} is empty or has no action dimension: shape {actions.shape}")
    bad = int((~np.isfinite(actions)).sum())
    if bad:  # a diverged model's actions: never scored as a (NaN) number
        raise ValueError(f"{name} actions must be finite; {bad} of {actions.size} values are NaN or Inf")
    return actions.astype(np.float64).reshape(-1, actions.shape[-1])


def spread_of(true: np.ndarray) -> np.ndarray:
    """(D,) the population std of each dimension of ``true`` (..., D), floored at ``STD_FLOOR``."""
    return np.maximum(_check_actions(true, "true").std(axis=0), STD_FLOOR)


def action_error(predicted: np.ndarray, true: np.ndarray, scale: np.ndarray) -> ActionError:
    """Error of ``predicted`` against ``true`` actions, both (..., D) of one shape, per dimension in
    units of ``scale`` (D,): the dataset's action std (module doc) or ``spread_of(true)``."""
    flat_true = _check_actions(true, "true")
    flat_predicted = _check_actions(predicted, "predicted")
    if predicted.shape != true.shape:
        raise ValueError(f"predicted has shape {predicted.shape} but true has shape {true.shape}; they must match")
    scale = np.asarray(scale, dtype=np.float64)
    if scale.shape != (flat_true.shape[1],) or not np.isfinite(scale).all() or (scale <= 0).any():
        raise ValueError(
            f"scale must be {flat_true.shape[1]} positive finite values (one per dim), got {scale.tolist()}"
        )
    difference = flat_predicted - flat_true
    return ActionError(
        per_dim_rmse=np.sqrt((difference**2).mean(axis=0)) / scale,
        per_dim_mae=np.abs(difference).mean(axis=0) / scale,
    )
