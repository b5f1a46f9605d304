"""The mixture-of-experts MLP against a per-token loop written out, and its balancing loss."""

import pytest
import torch
import torch.nn.functional as F

from megatron_cosmos3.model.moe import MoEMLP


def per_token_reference(moe: MoEMLP, x: torch.Tensor) -> torch.Tensor:
    probs = F.softmax(moe.router(x), dim=-1)
    out = torch.zeros_like(x)
    for i in range(x.shape[0]):
        top_p, top_e = probs[i].topk(moe.top_k)
        top_p = top_p / top_p.sum()
        for p, e in zip(top_p, top_e.tolist()):
            gate, up = (moe.gate_up_proj[e] @ x[i]).chunk(2)
            out[i] += p * (moe.down_proj[e] @ (F.silu(gate) * up))
    return out


def test_moe_matches_a_per_token_loop_in_outputs_and_gradients():
    torch.manual_seed(0)
    moe = MoEMLP(hidden_size=8, ffn_hidden_size=12, num_experts=4, top_k=2).double()
    x = torch.randn(10, 8, dtype=torch.float64, requires_grad=True)
    got = moe(x)
    want = per_token_reference(moe, x)
    torch.testing.assert_close(got, want)
    grads_got = torch.autograd.grad(got.square().sum(), [x, moe.router.weight, moe.gate_up_proj])
    grads_want = torch.autograd.grad(want.square().sum(), [x, moe.router.weight, moe.gate_up_proj])
    for g, w in zip(grads_got, grads_want):
        torch.testing.assert_close(g, w)


def test_load_balancing_loss_is_one_for_a_uniform_router_and_larger_when_collapsed():
    moe = MoEMLP(hidden_size=4, ffn_hidden_size=4, num_experts=4, top_k=1)
    x = torch.eye(4)
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(4) * 10)  # token i -> expert i, confidently
    moe(x)
    assert float(moe.aux_loss) == pytest.approx(1.0, rel=1e-3)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0] = 10.0  # every token -> expert 0
    moe(torch.ones(4, 4))
    assert float(moe.aux_loss) > 3.5
    assert moe.aux_loss.requires_grad  # it trains the router


def test_invalid_top_k_is_a_clear_error():
    with pytest.raises(ValueError, match="moe_top_k=5 must be in"):
        MoEMLP(hidden_size=4, ffn_hidden_size=4, num_experts=4, top_k=5)


def test_balancing_loss_gradient_rides_along_the_output_backward():
    torch.manual_seed(0)
    attached = MoEMLP(hidden_size=8, ffn_hidden_size=12, num_experts=4, top_k=2, aux_loss_weight=0.3).double()
    explicit = MoEMLP(hidden_size=8, ffn_hidden_size=12, num_experts=4, top_k=2).double()
    explicit.load_state_dict(attached.state_dict())
    x = torch.randn(9, 8, dtype=torch.float64)
    attached(x).sum().backward()
    out = explicit(x)
    (out.sum() + 0.3 * explicit.aux_loss).backward()
    torch.testing.assert_close(attached.router.weight.grad, explicit.router.weight.grad)
    assert attached.router.weight.grad.abs().sum() > 0


def test_mot_with_moe_generator_trains_and_keeps_the_reasoner_blind(tiny_config):
    from megatron_cosmos3.data.synthetic_packs import random_pack
    from megatron_cosmos3.model.mot import MoTModel
    from megatron_cosmos3.objectives.flow_matching import FlowMatchingConfig, add_flow_matching_noise
    from megatron_cosmos3.objectives.losses import mot_losses

    tiny_config.num_experts, tiny_config.moe_top_k, tiny_config.moe_towers = 4, 2, ["generator"]
    g = torch.Generator().manual_seed(0)
    batch, targets = add_flow_matching_noise(random_pack(tiny_config, g, 5), FlowMatchingConfig(), g)
    model = MoTModel(tiny_config)
    assert isinstance(model.layers[0].generator.mlp, MoEMLP)
    assert not isinstance(model.layers[0].reasoner.mlp, MoEMLP)
    mot_losses(model, batch, targets).total.backward()
    assert model.layers[0].generator.mlp.router.weight.grad.abs().sum() > 0
    changed = batch.replace(dm_tokens={k: v + 5 for k, v in batch.dm_tokens.items()})
    with torch.no_grad():
        assert torch.equal(model(batch).ar_hidden, model(changed).ar_hidden)
