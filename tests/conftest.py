import pytest
import torch

from megatron_cosmos3.model.config import MoTConfig


@pytest.fixture
def tiny_config() -> MoTConfig:
    """A two-layer MoT small enough for exact fp32 comparisons in milliseconds."""
    return MoTConfig(
        vocab_size=64,
        hidden_size=32,
        num_layers=2,
        num_attention_heads=4,
        num_kv_heads=2,
        head_dim=8,
        mrope_section=[2, 1, 1],
        ffn_hidden_size=64,
        video_latent_channels=4,
        audio_latent_dim=6,
        timestep_embedding_dim=16,
    )


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(1234)
