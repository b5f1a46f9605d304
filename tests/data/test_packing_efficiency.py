"""On the generated world's mix, packs are at least 95% real tokens (real tokens / token budget)."""

from __future__ import annotations

import pytest
from world_helpers import data_config, model_config, tiny_world

from megatron_cosmos3.data.loader import PackedLoader


@pytest.mark.parametrize("tokens_per_pack", [1024, 4096])
def test_packs_are_at_least_95_percent_full(tokens_per_pack):
    config = data_config(
        [str(tiny_world()["latent"])], tokens_per_pack=tokens_per_pack, pool_size=64, shuffle_buffer=64
    )
    with PackedLoader(config, model_config()) as loader:
        fills = [(p.num_ar_tokens + p.num_dm_tokens) / tokens_per_pack for p in (next(loader) for _ in range(20))]
        tasks = set()
        for _ in range(5):
            tasks |= set(next(loader).task_names)
    assert min(fills) > 0.9 and loader.efficiency >= 0.95, fills
    assert len(tasks) >= 6, f"the mix exercises most tasks: {tasks}"
