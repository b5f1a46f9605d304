"""Generation samples for the tracker: the model denoises a training pack's noisy targets.

Written as ``.npz`` (per DM stream: the generated tokens, the data they should match, and the noise
mask) — latent-space media, decodable to pixels/waveforms with the frozen VAEs of
``megatron_cosmos3/encoders`` where the run has them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from megatron_cosmos3.inference.denoising import sample_dm_tokens
from megatron_cosmos3.inference.solvers import SamplerConfig
from megatron_cosmos3.model.mot import MoTModel
from megatron_cosmos3.model.packed_batch import PackedBatch
from megatron_cosmos3.parallel.plan import Velocity


def generation_sample(
    model: MoTModel,
    batch: PackedBatch,
    targets: dict[str, torch.Tensor],
    num_steps: int = 8,
    seed: int = 0,
    velocity_of: Velocity | None = None,
) -> dict[str, np.ndarray]:
    """Denoises ``batch`` (a noised training pack) from pure noise with Euler steps, sample i
    seeded by ``seed + i``: per DM stream, the generated tokens, the data they should match, and the
    noise mask. ``velocity_of``: see ``sample_dm_tokens``."""
    was_training = model.training
    model.eval()
    try:
        seeds = [seed + i for i in range(batch.num_samples)]
        generated = sample_dm_tokens(model, batch, SamplerConfig("euler", num_steps), seeds, velocity_of)
    finally:
        model.train(was_training)
    arrays = {}
    for key, tokens in generated.items():
        index = batch.dm_token_index[key]
        t = batch.dm_timesteps[index][:, None]
        # x_t = (1 - t) x0 + t eps and target = eps - x0, so x0 = x_t - t * target.
        data = batch.dm_tokens[key] - t * targets[key]
        name = key.replace("/", "_")
        arrays[f"{name}_generated"] = tokens.float().cpu().numpy()
        arrays[f"{name}_data"] = data.float().cpu().numpy()
        arrays[f"{name}_noise_mask"] = batch.dm_noise_mask[index].cpu().numpy()
    return arrays


def save_sample(arrays: dict[str, np.ndarray], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return path
