"""A stage's task mixture: which task each sample trains, among those its modalities allow."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from megatron_cosmos3.tasks.registry import Modality, TaskSpec, get_task


@dataclass(frozen=True)
class TaskMixture:
    """Task name -> weight. A sample draws a task with probability proportional to the weights of
    the tasks it allows (its modalities and clip length); tasks it cannot serve drop out, so a
    caption-only sample in a video-heavy mixture still trains understanding."""

    weights: Mapping[str, float]

    def __post_init__(self) -> None:
        for name, weight in self.weights.items():
            get_task(name)  # ValueError for an unknown task
            if not weight >= 0:
                raise ValueError(f"task weight {name}={weight} must be >= 0")
        if not any(w > 0 for w in self.weights.values()):
            raise ValueError(f"a task mixture needs a positive weight, got {dict(self.weights)}")
        if not math.isfinite(sum(self.weights.values())):  # else u * total is inf: always the last task
            raise ValueError(f"task weights must have a finite sum, got {dict(self.weights)}")

    def allowed(self, modalities: frozenset[Modality], latent_frames: int, has_picture: bool = True) -> list[TaskSpec]:
        """Tasks with positive weight that the sample can serve (``TaskSpec.allows``), in name order."""
        return [
            get_task(name)
            for name, weight in sorted(self.weights.items())
            if weight > 0 and get_task(name).allows(modalities, latent_frames, has_picture)
        ]

    def choose(
        self, modalities: frozenset[Modality], latent_frames: int, u: float, has_picture: bool = True
    ) -> TaskSpec | None:
        """The task for uniform draw ``u`` in [0, 1) (inverse CDF over the allowed tasks); None if none fits."""
        allowed = self.allowed(modalities, latent_frames, has_picture)
        if not allowed:
            return None
        total = sum(self.weights[t.name] for t in allowed)
        threshold, cumulative = u * total, 0.0
        for task in allowed:
            cumulative += self.weights[task.name]
            if threshold < cumulative:
                return task
        return allowed[-1]  # u * total rounded up to total
