"""Learning-rate schedules: linear warm-up, then cosine, warmup-stable-decay (WSD) or constant."""

from __future__ import annotations

import math


def learning_rate(
    step: int,
    total_steps: int,
    lr: float,
    min_lr: float,
    warmup_steps: int,
    schedule: str = "cosine",
    decay_fraction: float = 0.2,
) -> float:
    """The learning rate of 0-based ``step`` of ``total_steps``."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))
    if schedule == "wsd":
        decay_steps = max(1, round(decay_fraction * total_steps))
        decay_start = total_steps - decay_steps
        if step < decay_start:
            return lr
        return lr + (min_lr - lr) * min(1.0, (step - decay_start + 1) / decay_steps)
    raise ValueError(f"schedule={schedule!r} is not one of ('cosine', 'wsd', 'constant')")
