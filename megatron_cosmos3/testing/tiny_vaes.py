"""Tiny random frozen VAEs with the real structure, built from configs (no downloads): for the
tests and the data benchmark. Their folders load through the real local-folder loaders."""

from __future__ import annotations

import torch


def tiny_wan_vae(
    z_dim: int, latents_mean: list[float] | None = None, latents_std: list[float] | None = None, **overrides
):
    """diffusers AutoencoderKLWan in the Wan2.2 TI2V structure (patch 2 + residual blocks + 3
    downsamples = 16x spatial, 4x temporal) at tiny widths; seeded, so every build is identical."""
    from diffusers import AutoencoderKLWan

    config = dict(
        base_dim=8,
        decoder_base_dim=8,
        z_dim=z_dim,
        dim_mult=[1, 2, 4, 4],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        is_residual=True,
        in_channels=12,
        out_channels=12,
        patch_size=2,
        scale_factor_spatial=16,
        scale_factor_temporal=4,
        latents_mean=latents_mean if latents_mean is not None else [0.0] * z_dim,
        latents_std=latents_std if latents_std is not None else [1.0] * z_dim,
    )
    config.update(overrides)
    torch.manual_seed(0)
    return AutoencoderKLWan(**config)


def tiny_oobleck_vae(latent_dim: int, ratios=(2, 4, 5, 6, 8), **overrides):
    """diffusers AutoencoderOobleck for 48 kHz stereo whose down-sampling ratios multiply to the
    real hop of 1920 (25 tokens per second), at tiny widths; seeded."""
    from diffusers import AutoencoderOobleck

    config = dict(
        encoder_hidden_size=2 * latent_dim,
        downsampling_ratios=list(ratios),
        channel_multiples=[1] * len(ratios),
        decoder_channels=4,
        decoder_input_channels=latent_dim,
        audio_channels=2,
        sampling_rate=48_000,
    )
    config.update(overrides)
    torch.manual_seed(0)
    return AutoencoderOobleck(**config)
