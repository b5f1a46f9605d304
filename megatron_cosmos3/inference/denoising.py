"""Cached generation: the AR section runs once; every denoising step runs only the DM tokens
(docs/DESIGN.md, "Generation").

Because the reasoner never sees DM tokens, the AR keys/values of a full forward pass do not depend
on the DM inputs; ``prefill`` computes them once, and each step's ``velocity`` attends to that
frozen cache. ``sample_dm_tokens`` integrates the flow ODE from t = 1 (noise) to t = 0 (data) with
a solver of ``inference/solvers.py`` on the noisy targets only; clean conditioning tokens stay as
given. Classifier-free guidance runs a second pack, the same samples with an empty prompt and its
own AR cache, and mixes the two velocities: v = v_uncond + g (v_cond - v_uncond).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from megatron_cosmos3.data.determinism import hash64
from megatron_cosmos3.inference.solvers import SamplerConfig, State, integrate
from megatron_cosmos3.model.mot import ARPass, MoTModel
from megatron_cosmos3.model.packed_batch import PackedBatch
from megatron_cosmos3.parallel.plan import Velocity


@torch.no_grad()
def prefill(model: MoTModel, batch: PackedBatch) -> ARPass:
    """Runs the AR stream once; the returned pass holds every layer's AR keys/values."""
    return model.forward_ar(batch)


def velocity(model: MoTModel, batch: PackedBatch, cache: ARPass) -> dict[str, torch.Tensor]:
    """The model's velocity prediction for every DM token of ``batch``, against the AR cache."""
    return model.dm_predictions(model.forward_dm(batch, cache), batch)


def full_forward_velocity(model: MoTModel) -> Velocity:
    """Each step's velocities from a whole forward pass (AR section included): no cache. The
    reference the cached sampler is tested against, and the uncached side of the latency bench."""
    return lambda batch: model(batch).dm_predictions


def sample_rows(batch: PackedBatch, key: str) -> torch.Tensor:
    """(n_key,) the sample each row of ``batch.dm_tokens[key]`` belongs to."""
    return torch.searchsorted(batch.dm_cu_seqlens[1:].cpu(), batch.dm_token_index[key].cpu(), right=True)


def initial_noise(batch: PackedBatch, seeds: Sequence[int]) -> State:
    """``batch.dm_tokens`` with every noisy row replaced by standard normal noise drawn from its
    sample's seed: stream ``key`` of sample i draws its noisy rows, in order, from a generator seeded
    by (seeds[i], key), so a sample's noise depends on its seed and its own layout only — not on
    the samples that share its pack, nor on its other streams."""
    if len(seeds) != batch.num_samples:
        raise ValueError(f"seeds: {len(seeds)} seeds for a pack of {batch.num_samples} samples")
    noised = {}
    for key, values in batch.dm_tokens.items():
        noisy = batch.dm_noise_mask[batch.dm_token_index[key]].cpu()
        owner = sample_rows(batch, key)
        out = values.clone()
        for sample in owner[noisy].unique().tolist():
            rows = (noisy & (owner == sample)).nonzero().squeeze(1)
            generator = torch.Generator().manual_seed(hash64(int(seeds[sample]), key))
            noise = torch.randn(rows.numel(), values.shape[1], generator=generator)
            out[rows.to(values.device)] = noise.to(values)
        noised[key] = out
    return noised


def _velocity_field(model: MoTModel, batch: PackedBatch, velocity_of: Velocity | None):
    """(tokens, t) -> velocities of ``batch`` with its noisy rows at ``tokens`` and noise level t."""
    if velocity_of is None:
        cache = prefill(model, batch)
        velocity_of = lambda step: velocity(model, step, cache)  # noqa: E731
    noisy = batch.dm_noise_mask

    def field(tokens: State, t: float) -> State:
        timesteps = torch.where(noisy, torch.full_like(batch.dm_timesteps, t), torch.zeros_like(batch.dm_timesteps))
        return velocity_of(batch.replace(dm_tokens=tokens, dm_timesteps=timesteps))

    return field


def _same_dm_section(batch: PackedBatch, other: PackedBatch) -> None:
    same = (
        batch.dm_tokens.keys() == other.dm_tokens.keys()
        and torch.equal(batch.dm_cu_seqlens, other.dm_cu_seqlens)
        and torch.equal(batch.dm_noise_mask, other.dm_noise_mask)
        and all(torch.equal(batch.dm_token_index[k], other.dm_token_index[k]) for k in batch.dm_token_index)
    )
    if not same:
        raise ValueError("unconditional: its DM section (streams, rows, noise mask) must be the conditional pack's")


@torch.no_grad()
def sample_dm_tokens(
    model: MoTModel,
    batch: PackedBatch,
    sampler: SamplerConfig,
    seeds: Sequence[int],
    velocity_of: Velocity | None = None,
    unconditional: PackedBatch | None = None,
    guidance: float | Sequence[float] = 1.0,
) -> dict[str, torch.Tensor]:
    """Generates the noisy-target DM tokens of ``batch``; clean conditioning tokens are kept.

    seeds: one per sample (``initial_noise``). velocity_of: each step's velocities from a full pass
    instead of the AR cache (a model split over ranks: ``ParallelPlan.velocity``; no cache:
    ``full_forward_velocity``). unconditional: the same samples with an empty prompt (the same DM
    section) for classifier-free guidance with scale ``guidance`` (one, or one per sample):
    v = v_uncond + g (v_cond - v_uncond), exactly v_cond at g = 1 and v_uncond at g = 0.
    Returns the final tokens per stream (the same keys and shapes as ``batch.dm_tokens``).
    """
    conditional = _velocity_field(model, batch, velocity_of)
    field = conditional
    if unconditional is not None:
        _same_dm_section(batch, unconditional)
        plain = _velocity_field(model, unconditional, velocity_of)
        scale = torch.as_tensor(guidance, dtype=torch.float32).expand(batch.num_samples)
        weights = {key: scale[sample_rows(batch, key)][:, None].to(x) for key, x in batch.dm_tokens.items()}

        def field(tokens: State, t: float) -> State:  # noqa: F811 - the guided field replaces the plain one
            v_cond, v_uncond = conditional(tokens, t), plain(tokens, t)
            # lerp is exact at both ends: weight 1 gives v_cond, weight 0 gives v_uncond.
            return {k: torch.lerp(v_uncond[k], v_cond[k], weights[k].to(v_cond[k])) for k in v_cond}

    moving = {key: batch.dm_noise_mask[index][:, None] for key, index in batch.dm_token_index.items()}
    return integrate(initial_noise(batch, seeds), field, sampler, moving)
