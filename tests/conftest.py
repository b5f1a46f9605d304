import os

import pytest
import torch

from megatron_cosmos3.model.config import MoTConfig
from megatron_cosmos3.testing.numerics import child_environment, numerics_state, use_test_numerics
from megatron_cosmos3.testing.training import tiny_mot_config


def pytest_configure(config):
    # Children that a test starts without naming an environment get the same thread count too.
    os.environ.update(child_environment({}))


@pytest.fixture(autouse=True)
def test_numerics():
    """Every test computes under the same numerical settings as the processes it compares with, and
    leaves them as it found them: a test that changes them fails here, whatever order tests run in."""
    use_test_numerics()
    before = numerics_state()
    yield
    after = numerics_state()
    use_test_numerics()
    changed = {name: (before[name], after[name]) for name in before if before[name] != after[name]}
    assert not changed, f"the test left torch's numerical settings changed (before, after): {changed}"


@pytest.fixture
def tiny_config() -> MoTConfig:
    """A two-layer MoT small enough for exact fp32 comparisons in milliseconds."""
    return tiny_mot_config()


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(1234)
