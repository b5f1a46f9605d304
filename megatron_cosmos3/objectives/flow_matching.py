"""Flow-matching noise for DM targets (rectified flow, t = 0 clean, t = 1 pure noise).

x_t = (1 - t) * x0 + t * eps, and the model predicts the velocity eps - x0. Each sample draws one
t for its noisy targets from a logit-normal distribution, optionally shifted towards high noise
(SD3's shift, used for long high-resolution sequences); clean conditioning tokens keep t = 0, so
they enter the model exactly as the data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_cosmos3.model.packed_batch import PackedBatch


@dataclass
class FlowMatchingConfig:
    logit_normal_mean: float = 0.0
    logit_normal_std: float = 1.0
    # t' = shift * t / (1 + (shift - 1) * t); shift > 1 spends more steps at high noise.
    shift: float = 1.0

    def __post_init__(self) -> None:
        if self.logit_normal_std <= 0:
            raise ValueError(f"FlowMatchingConfig.logit_normal_std must be > 0, got {self.logit_normal_std}")
        if self.shift <= 0:
            raise ValueError(f"FlowMatchingConfig.shift must be > 0, got {self.shift}")


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * t / (1.0 + (shift - 1.0) * t)


def sample_timesteps(num: int, config: FlowMatchingConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """(num,) timesteps in (0, 1) from the shifted logit-normal distribution."""
    normal = torch.randn(num, generator=generator) * config.logit_normal_std + config.logit_normal_mean
    return shift_timesteps(torch.sigmoid(normal), config.shift)


def add_flow_matching_noise(
    batch: PackedBatch, config: FlowMatchingConfig, generator: torch.Generator | None = None
) -> tuple[PackedBatch, dict[str, torch.Tensor]]:
    """Noises the batch's noisy DM targets; returns the model input batch and velocity targets.

    ``batch.dm_tokens`` must hold clean data x0. The returned batch carries x_t and per-token
    timesteps; targets[key] = eps - x0 for every row of stream ``key`` (the loss reads only the
    noisy rows).
    """
    layout_sample = torch.repeat_interleave(
        torch.arange(batch.num_samples), (batch.dm_cu_seqlens[1:] - batch.dm_cu_seqlens[:-1]).cpu()
    )
    per_sample_t = sample_timesteps(batch.num_samples, config, generator)
    token_t = torch.where(batch.dm_noise_mask.cpu(), per_sample_t[layout_sample], torch.zeros(()))
    device = batch.dm_noise_mask.device
    token_t = token_t.to(device)
    noised, targets = {}, {}
    for key, x0 in batch.dm_tokens.items():
        noise = torch.randn(x0.shape, generator=generator).to(device=device, dtype=x0.dtype)
        t = token_t[batch.dm_token_index[key]][:, None].to(x0.dtype)
        noised[key] = (1.0 - t) * x0 + t * noise
        targets[key] = noise - x0
    return batch.replace(dm_tokens=noised, dm_timesteps=token_t), targets
