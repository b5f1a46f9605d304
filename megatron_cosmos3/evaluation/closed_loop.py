"""Closed-loop success over seeded episodes, with a Wilson score interval (docs/DESIGN.md,
"Evaluation"). The episode runner (generated action chunks executed in the world, receding
horizon) hands its outcomes here, failed episodes among them; this module only aggregates them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import norm


@dataclass(frozen=True)
class Episode:
    """One closed-loop episode: its seed, whether the success predicate held, steps taken.
    ``failure``: why the episode could not go on (the policy gave NaN actions, say), where it
    stopped at ``steps``; a failed episode is no success."""

    seed: int
    success: bool
    steps: int = 0
    failure: str | None = None

    def __post_init__(self) -> None:
        if self.failure is not None and self.success:
            raise ValueError(f"episode {self.seed}: failed ({self.failure}) and succeeded: it is one or the other")


def wilson_interval(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval for a success probability after ``successes`` of ``trials``: unlike
    rate ± z·se it stays inside [0, 1] and is not empty at 0 or N successes."""
    if isinstance(trials, bool) or not isinstance(trials, (int, np.integer)) or trials < 1:
        raise ValueError(f"trials must be a positive integer, got {trials!r}")
    if isinstance(successes, bool) or not isinstance(successes, (int, np.integer)) or not 0 <= successes <= trials:
        raise ValueError(f"successes must be an integer in [0, trials={trials}], got {successes!r}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    z = float(norm.ppf(0.5 + confidence / 2))
    rate = successes / trials
    centre = (rate + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z / (1 + z * z / trials) * np.sqrt(rate * (1 - rate) / trials + z * z / (4 * trials * trials))
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


@dataclass(frozen=True)
class SuccessRate:
    """rate: successes / episodes, a failed episode (``Episode.failure``) counting as no success;
    low/high: the Wilson interval at ``confidence``; failed: the episodes that failed."""

    successes: int
    episodes: int
    rate: float
    low: float
    high: float
    confidence: float
    failed: int = 0

    @classmethod
    def of(cls, episodes: Sequence[Episode], confidence: float = 0.95) -> SuccessRate:
        if not episodes:
            raise ValueError("episodes is empty: a success rate needs at least one episode")
        seeds = [e.seed for e in episodes]
        if len(set(seeds)) != len(seeds):
            raise ValueError(
                f"episodes repeat seeds {sorted({s for s in seeds if seeds.count(s) > 1})}: each counts once"
            )
        successes = sum(bool(e.success) for e in episodes)
        low, high = wilson_interval(successes, len(episodes), confidence)
        failed = sum(e.failure is not None for e in episodes)
        return cls(successes, len(episodes), successes / len(episodes), low, high, confidence, failed)
