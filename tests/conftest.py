import pytest
import torch

from megatron_cosmos3.model.config import MoTConfig
from megatron_cosmos3.testing.training import tiny_mot_config


@pytest.fixture
def tiny_config() -> MoTConfig:
    """A two-layer MoT small enough for exact fp32 comparisons in milliseconds."""
    return tiny_mot_config()


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(1234)
