"""Cached inference: the AR section runs once and DM steps attend to its frozen K/V."""

import pytest
import torch

from megatron_cosmos3.data.synthetic_packs import random_pack
from megatron_cosmos3.inference.denoising import prefill, sample_dm_tokens, velocity
from megatron_cosmos3.inference.solvers import SamplerConfig
from megatron_cosmos3.model.mot import MoTModel
from megatron_cosmos3.objectives.flow_matching import FlowMatchingConfig, add_flow_matching_noise


@pytest.mark.parametrize("backend", ["dense", "sdpa"])
def test_cached_denoising_step_equals_the_full_forward(tiny_config, generator, backend):
    tiny_config.attention_backend = backend
    model = MoTModel(tiny_config).eval()
    batch = random_pack(tiny_config, generator, num_samples=5)
    cache = prefill(model, batch)
    for _step in range(3):  # several steps against the same cache, as a sampler does
        noised, _ = add_flow_matching_noise(batch, FlowMatchingConfig(), generator)
        with torch.no_grad():
            full = model(noised)
            want = full.dm_predictions
            got = velocity(model, noised, cache)
        assert torch.equal(full.ar_hidden, cache.hidden)
        for key in want:
            assert torch.equal(got[key], want[key]), key


def test_prefill_does_not_run_the_generator(tiny_config, generator):
    model = MoTModel(tiny_config)
    calls = []
    for layer in model.layers:
        layer.generator.register_forward_pre_hook(lambda *_: calls.append(1))
        layer.generator.input_layernorm.register_forward_pre_hook(lambda *_: calls.append(1))
    prefill(model, random_pack(tiny_config, generator, num_samples=3))
    assert calls == []


def test_sampler_keeps_clean_conditioning_and_generates_only_noisy_targets(tiny_config, generator):
    model = MoTModel(tiny_config).eval()
    batch = random_pack(tiny_config, generator, num_samples=4, tasks=("image_to_video", "policy"))
    out = sample_dm_tokens(model, batch, SamplerConfig("heun", num_steps=4), seeds=range(batch.num_samples))
    for key, values in batch.dm_tokens.items():
        clean = ~batch.dm_noise_mask[batch.dm_token_index[key]]
        assert out[key].shape == values.shape
        assert torch.equal(out[key][clean], values[clean])
        assert not torch.equal(out[key][~clean], values[~clean])
        assert torch.isfinite(out[key]).all()
    with pytest.raises(ValueError, match=r"num_steps must be an int in \[1, 1000\] \(solvers.MAX_STEPS\), got 0"):
        SamplerConfig(num_steps=0)
    with pytest.raises(ValueError, match="seeds: 3 seeds for a pack of 4 samples"):
        sample_dm_tokens(model, batch, SamplerConfig(), seeds=[0, 1, 2])
