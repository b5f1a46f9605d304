from pathlib import Path

import pytest

from megatron_cosmos3.tasks.registry import TASK_REGISTRY
from megatron_cosmos3.testing.shared_cache import shared_folder
from megatron_cosmos3.testing.training import TINY_MODEL, TINY_SYNTHETIC, train_on_ranks


@pytest.fixture(scope="session")
def tiny_tp2_checkpoint() -> Path:
    """The checkpoint directory of the tiny model trained one step under TP=2 on random packs of
    every task (byte tokenizer, pooled latents): what ``cosmos3-generate`` and ``cosmos3-eval`` read.
    Trained once per test session, shared by the test workers: tests only read it."""
    return shared_folder("tiny-tp2-checkpoint", _train_tiny_tp2) / "checkpoints"


def _train_tiny_tp2(root: Path) -> None:
    train_on_ranks(
        2,
        *TINY_MODEL,
        "model.vocab_size=260",  # the byte tokenizer's 256 bytes + EOS + BOG
        *TINY_SYNTHETIC,
        f"synthetic.tasks=[{','.join(TASK_REGISTRY)}]",
        "data.encoders.kind=pooled",
        "parallel.tensor=2",
        "steps=1",
        "optimizer.micro_batches_per_step=1",
        "checkpoint.async_save=false",
        "tracking.enabled=false",
        f"checkpoint.directory={root / 'checkpoints'}",
    )
