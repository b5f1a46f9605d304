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

# The draws that must stay apart in float32, unshifted and shifted: the logit-normal's mean - 2 std
# to mean + 2 std (95% of the draws lie between them), every half std.
SPREAD_STDS = 2.0
SPREAD_POINTS = 9


@dataclass
class FlowMatchingConfig:
    """The training timesteps' distribution (module doc); ValueError naming the field for a bad value:
    a ``logit_normal_mean``/``logit_normal_std`` whose draws, or a shift whose shifted draws, are one
    float32 value where they should differ (docs/DESIGN.md, "The data path, from shard to loss")."""

    logit_normal_mean: float = 0.0
    logit_normal_std: float = 1.0
    # t' = shift * t / (1 + (shift - 1) * t); shift > 1 spends more steps at high noise.
    shift: float = 1.0

    def __post_init__(self) -> None:
        if not self.logit_normal_std > 0:  # NaN too
            raise ValueError(f"flow_matching.logit_normal_std={self.logit_normal_std!r} must be > 0")
        if not self.shift > 0:
            raise ValueError(f"flow_matching.shift={self.shift!r} must be > 0")
        # The rule generation's shift keeps (solvers.standing_step): times that differ stay apart in
        # float32, computed as sample_timesteps does. A mean of 1e6 drew 1.0 (pure noise) for every
        # sample and a std of 1e6 0.0 or 1.0; a shift of 1e10 drew 1.0 for all but a sliver of the
        # samples, 1e300 NaN (inf / inf), 1e-300 0.0 (clean data: no loss).
        spread = f"{SPREAD_STDS:g} x logit_normal_std={self.logit_normal_std!r}, every half std,"
        drawn = spread_timesteps(self.logit_normal_mean, self.logit_normal_std)
        if first_standing(drawn) is not None:
            # the std alone (about a mean of 0) collapses them, or the mean moves them where float32 does
            alone = first_standing(spread_timesteps(0.0, self.logit_normal_std)) is not None
            field = "logit_normal_std" if alone else "logit_normal_mean"
            raise ValueError(
                f"flow_matching.{field}={getattr(self, field)!r}: the timesteps drawn at logit_normal_mean="
                f"{self.logit_normal_mean!r} + and - {spread} are not all distinct in float32, the model's "
                f"time ({[round(t, 9) for t in drawn.tolist()]}): the training timesteps would be one value "
                "for most samples (1.0: pure noise, 0.0: clean data); keep the mean and std within a few units"
            )
        if first_standing(shift_timesteps(drawn, self.shift)) is not None:
            raise ValueError(
                f"flow_matching.shift={self.shift!r}: the timesteps drawn at logit_normal_mean="
                f"{self.logit_normal_mean!r} + and - {spread} are not all distinct in float32 once shifted, "
                "the model's time (a shift this far from 1 makes every training timestep 1.0 or 0.0)"
            )


def spread_timesteps(mean: float, std: float) -> torch.Tensor:
    """The unshifted timesteps drawn at ``mean`` + 2 ``std`` down to ``mean`` - 2 ``std``, every
    half std (falling), computed as ``logit_normal`` does, on the CPU (not a meta context's)."""
    normal = torch.linspace(SPREAD_STDS, -SPREAD_STDS, SPREAD_POINTS, device="cpu")
    return torch.sigmoid(normal * std + mean)


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * t / (1.0 + (shift - 1.0) * t)


def first_standing(times: torch.Tensor) -> int | None:
    """The first i where ``times[i + 1]``, in float32, is not below ``times[i]`` (equal, or NaN), or
    None where the times fall strictly: times meant to differ that the model cannot tell apart."""
    times = times.to(torch.float32)
    standing = (~(times[1:] < times[:-1])).nonzero()
    return int(standing[0]) if len(standing) else None


def logit_normal(normal: torch.Tensor, config: FlowMatchingConfig) -> torch.Tensor:
    """The unshifted timesteps of standard-normal draws ``normal``: sigmoid(mean + std x normal)."""
    return torch.sigmoid(normal * config.logit_normal_std + config.logit_normal_mean)


def sample_timesteps(num: int, config: FlowMatchingConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """(num,) timesteps in (0, 1) from the shifted logit-normal distribution."""
    return shift_timesteps(logit_normal(torch.randn(num, generator=generator), config), config.shift)


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
