"""Prompt dropout (``data.prompt_dropout``): generation samples are built with an empty prompt at the
configured rate — the unconditional model classifier-free guidance needs — deterministically, for
tasks with DM targets only, and counted by the loader."""

import json

import pytest
from world_helpers import assert_same_batch, data_config, model_config, tiny_world

from megatron_cosmos3.data.loader import PackedLoader
from megatron_cosmos3.data.shard_processor import drops_prompt
from megatron_cosmos3.data.tokenizer import ByteTokenizer
from megatron_cosmos3.tasks.registry import TASK_REGISTRY, get_task


@pytest.mark.parametrize("rate", [0.0, 0.1, 0.3, 1.0])
def test_prompts_drop_at_the_configured_rate(rate):
    task = get_task("text_to_video")
    n = 20_000  # binomial standard deviation <= 0.0036: the bound is over 4 of them
    drops = [drops_prompt(task, rate, 7, slot, index) for slot in range(200) for index in range(n // 200)]
    assert abs(sum(drops) / n - rate) < 0.015
    if rate in (0.0, 1.0):
        assert all(d == bool(rate) for d in drops)  # 0 drops nothing, 1 everything
    assert drops == [drops_prompt(task, rate, 7, slot, index) for slot in range(200) for index in range(n // 200)]
    assert not any(drops_prompt(get_task("understanding"), rate, 7, 0, index) for index in range(100))


def test_dropout_draws_differ_by_seed():
    task = get_task("policy")
    first = [drops_prompt(task, 0.5, 1, 0, i) for i in range(200)]
    assert first != [drops_prompt(task, 0.5, 2, 0, i) for i in range(200)]


def _dropped_in_pack(batch, eos_id):
    """Samples of generation tasks whose AR section starts, after any ViT tokens, with EOS."""
    dropped = 0
    for s in range(batch.num_samples):
        start, stop = batch.ar_cu_seqlens[s], batch.ar_cu_seqlens[s + 1]
        ids = batch.ar_token_ids[start:stop]
        if batch.ar_is_vision is not None:
            ids = ids[~batch.ar_is_vision[start:stop]]
        task = TASK_REGISTRY[batch.task_names[batch.sample_task[s]]]
        dropped += bool(task.dm) and int(ids[0]) == eos_id
    return dropped


@pytest.mark.parametrize("rate", [0.0, 0.5])
def test_the_loader_builds_dropped_samples_without_their_prompt_and_counts_them(rate):
    config = data_config([str(tiny_world()["latent"])], epochs=1, prompt_dropout=rate)
    eos = ByteTokenizer(model_config().vocab_size).eos_id
    with PackedLoader(config, model_config()) as loader:
        seen = sum(_dropped_in_pack(batch, eos) for batch in loader)
        assert seen == loader.prompts_dropped
        assert loader.state_dict()["prompts_dropped"] == seen
    if rate == 0.0:
        assert seen == 0
    else:
        assert 0 < seen < loader.stats.used


def test_a_resumed_stream_drops_the_same_prompts():
    config = data_config([str(tiny_world()["latent"])], prompt_dropout=0.5)
    with PackedLoader(config, model_config()) as loader:
        whole = [next(loader) for _ in range(6)]
        dropped = loader.prompts_dropped
    with PackedLoader(config, model_config()) as loader:
        [next(loader) for _ in range(3)]
        state = json.loads(json.dumps(loader.state_dict()))  # what a checkpoint stores
    with PackedLoader(config, model_config()) as loader:
        loader.load_state_dict(state)
        for want in whole[3:]:
            assert_same_batch(next(loader), want)
        assert loader.prompts_dropped == dropped > 0


def test_prompt_dropout_is_validated_and_changes_the_stream_fingerprint():
    shards = [str(tiny_world()["latent"])]
    with pytest.raises(ValueError, match="data.prompt_dropout=1.5 must be in \\[0, 1\\]"):
        data_config(shards, prompt_dropout=1.5).validate()
    assert data_config(shards).fingerprint() != data_config(shards, prompt_dropout=0.1).fingerprint()
