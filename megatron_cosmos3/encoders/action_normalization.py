"""Per-embodiment normalisation of actions, with statistics stored beside the dataset.

Translations (metres per step) and joint values live on very different scales across robots,
cars and cameras; each embodiment's projection sees them standardised — the 6D rotation dims too.
They are components of unit vectors, but a per-step rotation is close to the identity: in the
generated world a single arm's first component varies by a std of 0.0085 around 0.99. Left raw,
that signal sits 100x below the flow-matching noise (std 1), and a trained policy's rotation
components came out 10-170 dataset stds off while every standardised dim was within a few
(docs/DESIGN.md, "Action normalisation").

File format (``<dataset>/action_stats.json``)::

    {"format_version": 2,
     "embodiments": {"single_arm": {"count": N, "mean": [...19], "std": [...19],
                                    "q01": [...19] | null, "q99": [...19] | null,
                                    "rotation_6d": "standardised" | "raw",
                                    "fields": {"ego.translation": [0, 3], ...}},
                     "so100": {"layout": "raw", "count": N, "mean": [...6], ..., "fields": {"raw": [0, 6]}}}}

``fields`` is informational (for people reading the file); loading checks it against the layout.
Format 1 (written before rotations were standardised) is read with ``rotation_6d: "raw"``, so a
model trained on such statistics un-normalises its actions as it learned them.

Raw layouts: an embodiment whose actions are a dataset's own columns (a LeRobot robot's joint
commands, registered in ``model.embodiments`` under any name) has no pseudo-action layout. Its entry
says ``"layout": "raw"``, its width is that of its ``mean``, its ``fields`` are ``{"raw": [0, dim]}``,
and every dim is normalised (none is a rotation the code knows of). ``data_pipelines/ingest_lerobot.py``
writes such entries.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from megatron_cosmos3.atomic_files import write_atomically
from megatron_cosmos3.encoders.pseudo_actions import get_layout
from megatron_cosmos3.json_files import read_json

__all__ = [
    "ACTION_STATS_FILENAME",
    "RAW_LAYOUT",
    "STD_FLOOR",
    "ActionStats",
    "EmbodimentActionStats",
    "denormalize_actions",
    "normalize_actions",
]

ACTION_STATS_FILENAME = "action_stats.json"
# A constant dim (a gripper never used, a camera that never rolls) has std 0; dividing by it
# would blow rounding noise up to huge values. 1e-6 is far below any real per-step motion
# (a micrometre, a microradian) yet keeps the result finite.
STD_FLOOR = 1e-6
_FORMAT_VERSION = 2
_READABLE_VERSIONS = (1, 2)
ROTATION_6D_MODES = ("standardised", "raw")

NormalizationMode = Literal["mean_std", "quantile"]


# The sample schema bounds every action value by its MAX_ABS_VALUE (1e6), so no statistic of real
# actions exceeds it; a crafted std of 1e308 would un-normalise every generated action to inf.
MAX_ABS_STAT = 1e6


def _as_floats(values, name: str, dim: int) -> tuple[float, ...]:
    values = tuple(float(v) for v in values)
    if len(values) != dim:
        raise ValueError(f"{name} must have {dim} values, got {len(values)}")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"{name} must be finite, got {list(values)}")
    if any(abs(v) > MAX_ABS_STAT for v in values):
        raise ValueError(f"{name} must lie within +-{MAX_ABS_STAT:g} (the schema's bound), got {list(values)}")
    return values


def _json_numbers(entry: Mapping, kind: str) -> None:
    """ValueError naming the field unless each statistic is a list of JSON numbers (not strings,
    booleans or lists, which ``float`` would take or misread) and ``count`` an int."""
    count = entry.get("count")
    if type(count) is not int:
        raise ValueError(f"{kind}.count must be an int, got {count!r}")
    for name in ("mean", "std", "q01", "q99"):
        values = entry.get(name)
        if values is None and name in ("q01", "q99"):
            continue
        if not isinstance(values, list) or not all(type(v) in (int, float) for v in values):
            raise ValueError(f"{kind}.{name} must be a list of numbers, got {values!r:.200}")


RAW_LAYOUT = "raw"


@dataclass(frozen=True)
class EmbodimentActionStats:
    """Statistics of one embodiment's actions, one value per action dim.

    count: number of action vectors measured. mean/std: per dim (population std).
    q01/q99: optional 1st/99th percentiles, needed only for ``mode="quantile"``.
    rotation_6d: "standardised" (like every other dim) or "raw" (left as they are: statistics of
    format 1, module doc).
    raw: the actions are a dataset's own columns, not the pseudo-action layout of ``kind`` (module
    doc): any width, no rotation dims.
    """

    kind: str
    count: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    q01: tuple[float, ...] | None = None
    q99: tuple[float, ...] | None = None
    rotation_6d: str = "standardised"
    raw: bool = False

    def __post_init__(self) -> None:
        dim = len(tuple(self.mean)) if self.raw else get_layout(self.kind).dim
        if dim == 0:
            raise ValueError(f"{self.kind}.mean must have at least one value")
        if self.rotation_6d not in ROTATION_6D_MODES:
            raise ValueError(f"{self.kind}.rotation_6d={self.rotation_6d!r} is not one of {ROTATION_6D_MODES}")
        # Accept lists (as read from JSON) but store tuples, so the dataclass stays immutable.
        for name in ("mean", "std", "q01", "q99"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, _as_floats(value, f"{self.kind}.{name}", dim))
        if (self.q01 is None) != (self.q99 is None):
            raise ValueError(f"{self.kind}: q01 and q99 must be given together")
        if min(self.std) < 0:
            raise ValueError(f"{self.kind}.std must be >= 0, got {list(self.std)}")
        if self.q01 is not None and any(low > high for low, high in zip(self.q01, self.q99)):
            wrong = [i for i, (low, high) in enumerate(zip(self.q01, self.q99)) if low > high]
            raise ValueError(f"{self.kind}: q01 > q99 in dims {wrong} (the quantile scale would be negative)")
        if self.count < 0:
            raise ValueError(f"{self.kind}.count must be >= 0, got {self.count}")

    @property
    def dim(self) -> int:
        return len(self.mean)

    @property
    def rotation_6d_dims(self) -> tuple[int, ...]:
        """The layout's 6D rotation dims (none when raw): left as they are where ``rotation_6d`` is raw."""
        return () if self.raw else get_layout(self.kind).rotation_6d_dims

    @classmethod
    def from_actions(cls, kind: str, actions, *, quantiles: bool = True, raw: bool = False) -> EmbodimentActionStats:
        """Measure ``(N, dim)`` actions (numpy or torch), accumulating in float64; ``dim`` is the
        layout's, or any width when ``raw``."""
        values = np.asarray(actions, dtype=np.float64)
        if raw:  # any width the dataset has
            dim = values.shape[1] if values.ndim == 2 and values.shape[1] > 0 else "D>0"
        else:
            dim = get_layout(kind).dim
        if values.ndim != 2 or values.shape[1] != dim or values.shape[0] == 0:
            raise ValueError(f"actions for kind {kind!r} must have shape (N>0, {dim}), got {values.shape}")
        q01, q99 = np.quantile(values, (0.01, 0.99), axis=0) if quantiles else (None, None)
        return cls(kind, len(values), values.mean(0), values.std(0), q01, q99, raw=raw)

    @property
    def fields(self) -> dict[str, list[int]]:
        """Field name -> [start, stop] of the layout (``{"raw": [0, dim]}`` for a raw one)."""
        if self.raw:
            return {RAW_LAYOUT: [0, self.dim]}
        return {name: [s.start, s.stop] for name, s in get_layout(self.kind).slices.items()}

    def to_json(self) -> dict:
        entry = {"layout": RAW_LAYOUT} if self.raw else {}
        return entry | {
            "count": self.count,
            "mean": list(self.mean),
            "std": list(self.std),
            "q01": None if self.q01 is None else list(self.q01),
            "q99": None if self.q99 is None else list(self.q99),
            "rotation_6d": self.rotation_6d,
            "fields": self.fields,
        }

    @classmethod
    def from_json(cls, kind: str, entry: Mapping, format_version: int = _FORMAT_VERSION) -> EmbodimentActionStats:
        _json_numbers(entry, kind)
        layout = entry.get("layout")
        if layout not in (None, RAW_LAYOUT):
            raise ValueError(f"{kind}.layout must be {RAW_LAYOUT!r} or absent (pseudo-actions), got {layout!r}")
        stats = cls(
            kind,
            int(entry["count"]),
            entry["mean"],
            entry["std"],
            entry.get("q01"),
            entry.get("q99"),
            rotation_6d="raw" if format_version == 1 else entry["rotation_6d"],
            raw=layout is not None,
        )
        expected = stats.fields
        if "fields" in entry and entry["fields"] != expected:
            raise ValueError(f"{kind}.fields {entry['fields']} do not match the current layout {expected}")
        return stats


@dataclass(frozen=True)
class ActionStats:
    """The action statistics of one dataset: embodiment kind -> ``EmbodimentActionStats``."""

    embodiments: Mapping[str, EmbodimentActionStats]

    def __getitem__(self, kind: str) -> EmbodimentActionStats:
        if kind not in self.embodiments:
            raise ValueError(f"no action statistics for kind {kind!r}; have {sorted(self.embodiments)}")
        return self.embodiments[kind]

    def to_document(self) -> dict:
        """The JSON document ``save`` writes (module doc)."""
        return {
            "format_version": _FORMAT_VERSION,
            "embodiments": {kind: s.to_json() for kind, s in sorted(self.embodiments.items())},
        }

    @classmethod
    def from_document(cls, document: Mapping, source: str) -> ActionStats:
        """Statistics from a document of any readable format; ``source`` names it in errors."""
        if not isinstance(document, Mapping):
            raise ValueError(f"{source}: holds a JSON {type(document).__name__}, not an object of action statistics")
        version = document.get("format_version")
        if version not in _READABLE_VERSIONS:
            raise ValueError(f"{source}: format_version must be one of {_READABLE_VERSIONS}, got {version!r}")
        embodiments = document.get("embodiments")
        if not isinstance(embodiments, Mapping) or not all(isinstance(e, Mapping) for e in embodiments.values()):
            raise ValueError(f"{source}: 'embodiments' must be an object of objects (kind -> statistics)")
        try:
            return cls({kind: EmbodimentActionStats.from_json(kind, e, version) for kind, e in embodiments.items()})
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{source}: malformed action statistics: {error!r}") from error

    def save(self, path: str | os.PathLike) -> Path:
        """Write JSON atomically (a reader never sees half a file); a directory gets the default name."""
        path = Path(path)
        if path.is_dir():
            path = path / ACTION_STATS_FILENAME
        return write_atomically(path, json.dumps(self.to_document(), indent=1))

    @classmethod
    def load(cls, path: str | os.PathLike) -> ActionStats:
        """Read a file written by ``save`` (a directory means its ``action_stats.json``)."""
        path = Path(path)
        if path.is_dir():
            path = path / ACTION_STATS_FILENAME
        return cls.from_document(read_json(path), str(path))


def merge_action_stats(stats: Iterable[ActionStats | None]) -> ActionStats | None:
    """One embodiment -> statistics map over several datasets: for each embodiment, the first
    dataset (in the given order) that has it; None when none has any."""
    merged: dict[str, EmbodimentActionStats] = {}
    for dataset in stats:
        for kind, embodiment in dataset.embodiments.items() if dataset is not None else ():
            merged.setdefault(kind, embodiment)
    return ActionStats(merged) if merged else None


def _center_and_scale(
    actions: torch.Tensor, stats: EmbodimentActionStats, mode: NormalizationMode, std_floor: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dim affine ``normalized = (x - center) / scale``; rotation dims get (0, 1) where the
    statistics keep them raw."""
    if actions.shape[-1:] != (stats.dim,):
        raise ValueError(
            f"actions for kind {stats.kind!r} must have shape (..., {stats.dim}), got {tuple(actions.shape)}"
        )
    if mode == "mean_std":
        center, scale = np.array(stats.mean), np.maximum(np.array(stats.std), std_floor)
    elif mode == "quantile":
        if stats.q01 is None:
            raise ValueError(f"mode='quantile' needs q01/q99 in the {stats.kind!r} statistics; they were not computed")
        low, high = np.array(stats.q01), np.array(stats.q99)
        # Maps [q01, q99] onto [-1, 1]; values outside are not clipped, so the map stays invertible.
        center, scale = (low + high) / 2, np.maximum(high - low, std_floor) / 2
    else:
        raise ValueError(f"mode must be 'mean_std' or 'quantile', got {mode!r}")
    if stats.rotation_6d == "raw":
        rotation = list(stats.rotation_6d_dims)
        center[rotation], scale[rotation] = 0.0, 1.0
    return tuple(torch.as_tensor(v, dtype=actions.dtype, device=actions.device) for v in (center, scale))


def normalize_actions(
    actions: torch.Tensor,
    stats: EmbodimentActionStats,
    *,
    mode: NormalizationMode = "mean_std",
    std_floor: float = STD_FLOOR,
) -> torch.Tensor:
    """``(..., dim)`` actions -> normalised, same shape and dtype (module doc)."""
    center, scale = _center_and_scale(actions, stats, mode, std_floor)
    return (actions - center) / scale


def denormalize_actions(
    normalized: torch.Tensor,
    stats: EmbodimentActionStats,
    *,
    mode: NormalizationMode = "mean_std",
    std_floor: float = STD_FLOOR,
) -> torch.Tensor:
    """Inverse of ``normalize_actions`` (same ``mode`` and ``std_floor``)."""
    center, scale = _center_and_scale(normalized, stats, mode, std_floor)
    return normalized * scale + center
