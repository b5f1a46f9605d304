"""Cached generation: the AR section runs once; every denoising step runs only the DM tokens.

Because the reasoner never sees DM tokens, the AR keys/values of a full forward pass do not depend
on the DM inputs; ``prefill`` computes them once, and each step's ``velocity`` attends to that
frozen cache. The sampler integrates the flow ODE dx/dt = v from t = 1 (noise) to t = 0 (data)
with Euler steps on the noisy targets only; clean conditioning tokens stay as given.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from megatron_cosmos3.model.mot import ARPass, MoTModel
from megatron_cosmos3.model.packed_batch import PackedBatch


@torch.no_grad()
def prefill(model: MoTModel, batch: PackedBatch) -> ARPass:
    """Runs the AR stream once; the returned pass holds every layer's AR keys/values."""
    return model.forward_ar(batch)


def velocity(model: MoTModel, batch: PackedBatch, cache: ARPass) -> dict[str, torch.Tensor]:
    """The model's velocity prediction for every DM token of ``batch``, against the AR cache."""
    return model.dm_predictions(model.forward_dm(batch, cache), batch)


@torch.no_grad()
def sample_dm_tokens(
    model: MoTModel,
    batch: PackedBatch,
    num_steps: int,
    generator: torch.Generator | None = None,
    velocity_of: Callable[[PackedBatch], dict[str, torch.Tensor]] | None = None,
) -> dict[str, torch.Tensor]:
    """Generates the noisy-target DM tokens of ``batch``; clean conditioning tokens are kept.

    ``velocity_of``: each step's velocities from a full pass instead of the AR cache (a model split
    over ranks: ``ParallelPlan.velocity``). Returns the final tokens per stream (the same keys and
    shapes as ``batch.dm_tokens``).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if velocity_of is None:
        cache = prefill(model, batch)
        velocity_of = lambda step: velocity(model, step, cache)  # noqa: E731
    noisy = {key: batch.dm_noise_mask[index][:, None] for key, index in batch.dm_token_index.items()}
    tokens = {
        key: torch.where(noisy[key], torch.randn(x.shape, generator=generator).to(x), x)
        for key, x in batch.dm_tokens.items()
    }
    schedule = torch.linspace(1.0, 0.0, num_steps + 1)
    for t_now, t_next in zip(schedule[:-1], schedule[1:]):
        timesteps = torch.where(batch.dm_noise_mask, t_now.to(batch.dm_timesteps), torch.zeros_like(batch.dm_timesteps))
        step = batch.replace(dm_tokens=tokens, dm_timesteps=timesteps)
        v = velocity_of(step)
        tokens = {key: torch.where(noisy[key], x - (t_now - t_next) * v[key], x) for key, x in tokens.items()}
    return tokens
