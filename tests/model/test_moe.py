"""The mixture-of-experts MLP against a per-token loop written out, and its balancing loss."""

import pytest
import torch
import torch.nn.functional as F

from megatron_cosmos3.model.moe import MoEMLP, grouped_mm_takes


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


def twin_moes(top_k: int, aux_loss_weight: float = 0.1, ffn: int = 16) -> tuple[MoEMLP, MoEMLP]:
    """The same fp32 MoE with grouped-GEMM experts and with the expert loop; the router never picks
    expert 3 (every input has a positive first feature, its logit is -100 times it) and favours 0."""
    torch.manual_seed(0)
    grouped = MoEMLP(hidden_size=8, ffn_hidden_size=ffn, num_experts=5, top_k=top_k, aux_loss_weight=aux_loss_weight)
    with torch.no_grad():
        grouped.router.weight[3] = 0.0
        grouped.router.weight[3, 0] = -100.0
        grouped.router.weight[0, 0] = 0.3
    looped = MoEMLP(8, ffn, 5, top_k, aux_loss_weight=aux_loss_weight, expert_impl="loop")
    looped.load_state_dict(grouped.state_dict())
    return grouped, looped


def moe_inputs(n: int) -> torch.Tensor:
    x = torch.randn(n, 8, generator=torch.Generator().manual_seed(1))
    x[:, 0] = x[:, 0].abs() + 0.5
    return x


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_grouped_experts_equal_the_loop_in_outputs_aux_loss_and_every_gradient(top_k):
    grouped, looped = twin_moes(top_k)
    assert grouped_mm_takes(torch.float32, 8, 16)  # the grouped GEMM really runs here
    x = moe_inputs(23)
    weights = torch.randn(23, 8, generator=torch.Generator().manual_seed(2))
    results = []
    for moe in (grouped, looped):
        inputs = x.clone().requires_grad_()
        out = moe(inputs)
        (out * weights).sum().backward()
        results.append((out, moe.aux_loss, inputs.grad, {n: p.grad for n, p in moe.named_parameters()}))
    (out_g, aux_g, dx_g, grads_g), (out_l, aux_l, dx_l, grads_l) = results
    chosen = grouped.route(x).experts
    counts = torch.bincount(chosen, minlength=5)
    assert counts[3] == 0 and len(set(counts.tolist())) > 2  # an empty expert, uneven loads
    torch.testing.assert_close(out_g, out_l)
    torch.testing.assert_close(aux_g, aux_l)
    torch.testing.assert_close(dx_g, dx_l)
    assert grads_g.keys() == grads_l.keys() == {"router.weight", "gate_up_proj", "down_proj"}
    for name in grads_g:
        torch.testing.assert_close(grads_g[name], grads_l[name], msg=name)
    assert grads_g["gate_up_proj"][3].abs().sum() == 0  # the empty expert gets a zero gradient...
    assert grads_g["gate_up_proj"][0].abs().sum() > 0  # ...and the others a real one


def test_grouped_experts_under_bf16_autocast_equal_the_loop():
    grouped, looped = twin_moes(2)
    assert grouped_mm_takes(torch.bfloat16, 8, 16)
    x = moe_inputs(16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_g, out_l = grouped(x), looped(x)
    assert out_g.dtype == out_l.dtype
    torch.testing.assert_close(out_g, out_l)


def test_grouped_falls_back_to_the_loop_where_grouped_mm_refuses():
    assert not grouped_mm_takes(torch.float64, 8, 16)  # no float64 kernel
    assert not grouped_mm_takes(torch.bfloat16, 8, 12)  # 24-byte rows: not 16-byte aligned
    assert grouped_mm_takes(torch.float32, 8, 12)
    grouped, looped = twin_moes(2, ffn=12)
    x = moe_inputs(9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(grouped(x), looped(x), rtol=0, atol=0)


def test_grouped_experts_read_no_value_on_the_host():
    """Forward and backward run on the meta device (no data at all), so no per-layer host sync;
    the loop, which reads its per-expert counts, cannot run there."""
    with torch.device("meta"):
        moe = MoEMLP(hidden_size=16, ffn_hidden_size=32, num_experts=4, top_k=2, aux_loss_weight=0.01)
        moe = moe.to(torch.bfloat16)  # the dtype grouped_mm's meta kernel takes
        x = torch.randn(10, 16, dtype=torch.bfloat16, requires_grad=True)
    moe(x).sum().backward()
    assert moe.gate_up_proj.grad.shape == moe.gate_up_proj.shape and moe.router.weight.grad is not None
    moe.expert_impl = "loop"
    with pytest.raises(NotImplementedError, match="meta"):
        moe(x)


def test_unknown_expert_impl_is_a_clear_error(tiny_config):
    with pytest.raises(ValueError, match="moe_expert_impl='gmm' is not one of"):
        MoEMLP(hidden_size=4, ffn_hidden_size=4, num_experts=4, top_k=2, expert_impl="gmm")
    from megatron_cosmos3.model.config import MoTConfig

    with pytest.raises(ValueError, match="moe_expert_impl='gmm'"):
        MoTConfig(num_experts=4, moe_expert_impl="gmm")
