"""Shared by the data tests: a tiny generated world (written once per test session), the model
config the loader targets, loader configs, and bitwise comparison of packed batches."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from megatron_cosmos3.data.config import DataConfig, DatasetConfig, MixtureConfig, PackingConfig
from megatron_cosmos3.model.config import EmbodimentConfig, MoTConfig
from megatron_cosmos3.model.packed_batch import PackedBatch
from megatron_cosmos3.tasks.registry import TASK_REGISTRY
from megatron_cosmos3.testing.scripts import load_script
from megatron_cosmos3.testing.shared_cache import shared_folder
from megatron_cosmos3.testing.training import tiny_mot_config

VIDEO_LATENT_CHANNELS, AUDIO_LATENT_DIM = 4, 6


def model_config() -> MoTConfig:
    """The tiny model the loader packs for: byte vocabulary, one layer, both world embodiments."""
    return tiny_mot_config(
        vocab_size=256,
        num_layers=1,
        video_latent_channels=VIDEO_LATENT_CHANNELS,
        audio_latent_dim=AUDIO_LATENT_DIM,
        embodiments={"single_arm": EmbodimentConfig(19, 10.0), "humanoid": EmbodimentConfig(57, 30.0)},
    )


@functools.cache
def tiny_world(samples: int = 48, shard_size: int = 6, video_format: str = "npy") -> dict[str, Path]:
    """A 32x32, 1 s generated world: {"raw": dir, "latent": dir} (pooled latents), made once per
    test session (``shared_folder``: the test workers share it; tests only read it);
    ``video_format="mp4"``: raw video as mp4 with its audio muxed in."""
    from megatron_cosmos3.world.world import WorldConfig

    def make(root: Path) -> None:
        load_script("generate_world").write_world(
            root,
            samples,
            seed=7,
            config=WorldConfig(resolution=32, duration_s=1.0),
            shard_size=shard_size,
            latents="pooled",
            video_latent_channels=VIDEO_LATENT_CHANNELS,
            audio_latent_dim=AUDIO_LATENT_DIM,
            video_format=video_format,
        )

    root = shared_folder(f"world-{samples}-{shard_size}-{video_format}", make)
    return {"raw": root / "raw", "latent": root / "latent"}


def data_config(
    shards: list[str],
    *,
    tasks: dict[str, float] | None = None,
    tokens_per_pack: int = 1024,
    num_workers: int = 0,
    shuffle_buffer: int = 16,
    pool_size: int = 24,
    epochs: int = 0,
    **overrides,
) -> DataConfig:
    """A one-dataset loader config over ``shards`` with every task (or ``tasks``) in its mixture."""
    return DataConfig(
        datasets=[DatasetConfig("world", list(shards))],
        stages={"pretrain": MixtureConfig({"world": 1.0}, tasks or {name: 1.0 for name in TASK_REGISTRY})},
        stage="pretrain",
        packing=PackingConfig(tokens_per_pack=tokens_per_pack, pool_size=pool_size),
        shuffle_buffer=shuffle_buffer,
        num_workers=num_workers,
        epochs=epochs,
        **overrides,
    )


def assert_same_batch(a: PackedBatch, b: PackedBatch) -> None:
    """Bitwise equality of every field of two packs."""
    assert a.task_names == b.task_names
    for name in (
        "sample_task",
        "ar_token_ids",
        "ar_labels",
        "ar_positions",
        "ar_cu_seqlens",
        "dm_cu_seqlens",
        "dm_positions",
        "dm_noise_mask",
        "dm_timesteps",
    ):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.dm_tokens.keys() == b.dm_tokens.keys()
    for key in a.dm_tokens:
        assert torch.equal(a.dm_tokens[key], b.dm_tokens[key]), key
        assert torch.equal(a.dm_token_index[key], b.dm_token_index[key]), key
    for name in ("ar_vision_embeds", "ar_is_vision", "vision_pixels", "vision_grid_thw"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None and y is None) or torch.equal(x, y), name
