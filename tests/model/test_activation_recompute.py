"""Activation recomputation changes memory, never results."""

import pytest
import torch

from megatron_cosmos3.data.synthetic_packs import random_pack
from megatron_cosmos3.model.attention import SdpaVarlenAttention
from megatron_cosmos3.model.mot import MoTModel
from megatron_cosmos3.objectives.flow_matching import FlowMatchingConfig, add_flow_matching_noise
from megatron_cosmos3.objectives.losses import mot_losses


class CountingAttention(SdpaVarlenAttention):
    def __init__(self):
        self.calls = 0

    def ar_attention(self, *args):
        self.calls += 1
        return super().ar_attention(*args)

    def dm_attention(self, *args):
        self.calls += 1
        return super().dm_attention(*args)


@pytest.mark.parametrize("mode, extra_attention_calls", [("none", 0), ("selective", 2), ("full", 2)])
def test_recompute_gives_identical_loss_and_gradients(tiny_config, mode, extra_attention_calls, monkeypatch):
    g = torch.Generator().manual_seed(0)
    batch, targets = add_flow_matching_noise(random_pack(tiny_config, g, num_samples=5), FlowMatchingConfig(), g)
    torch.manual_seed(0)
    model = MoTModel(tiny_config)
    reference = mot_losses(model, batch, targets)
    reference.total.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    counter = CountingAttention()
    monkeypatch.setattr(model, "_attention", lambda: counter)
    for layer in model.layers:
        layer.set_recompute(mode)
    losses = mot_losses(model, batch, targets)
    forward_calls = counter.calls
    losses.total.backward()
    assert torch.equal(losses.total, reference.total)
    for name, grad in want.items():
        assert torch.equal(model.get_parameter(name).grad, grad), name
    # Recomputation re-runs both attention halves of every layer during backward.
    assert counter.calls - forward_calls == extra_attention_calls * tiny_config.num_layers


def test_unknown_recompute_mode_is_a_clear_error(tiny_config):
    with pytest.raises(ValueError, match="recompute='some'"):
        MoTModel(tiny_config).layers[0].set_recompute("some")
