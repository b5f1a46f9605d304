from pathlib import Path

import pytest

from megatron_cosmos3.tasks.registry import TASK_REGISTRY
from megatron_cosmos3.testing.training import TINY_MODEL, TINY_SYNTHETIC, train_on_ranks


@pytest.fixture(scope="session")
def tiny_tp2_checkpoint(tmp_path_factory) -> Path:
    """The checkpoint directory of the tiny model trained one step under TP=2 on random packs of
    every task (byte tokenizer, pooled latents): what ``cosmos3-generate`` and ``cosmos3-eval`` read."""
    root = tmp_path_factory.mktemp("tiny-tp2")
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
    return root / "checkpoints"
