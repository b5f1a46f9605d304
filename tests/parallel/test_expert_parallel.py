"""Expert parallelism (experts spread over ranks, all-to-all dispatch) equals one process."""

import copy

import pytest
import torch
from torch import nn

from megatron_cosmos3.model.config import MoTConfig
from megatron_cosmos3.model.moe import MoEMLP
from megatron_cosmos3.parallel.sizes import ParallelSizes
from megatron_cosmos3.testing.distributed import run_on_ranks

NUM_EXPERTS = 4


class TinyMoENet(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.moe = MoEMLP(hidden_size=8, ffn_hidden_size=10, num_experts=NUM_EXPERTS, top_k=2)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        h = self.inp(x)
        return self.out(h + self.moe(h))


def loss_of(model, x, y):
    moe = next(m for m in model.modules() if isinstance(m, MoEMLP))
    return (model(x) - y).square().mean() + 0.01 * moe.aux_loss


def micro_batch(step, data_rank):
    g = torch.Generator().manual_seed(100 * step + data_rank)
    n = 7 + 3 * data_rank  # ranks route different numbers of tokens
    return torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randn(n, 3, generator=g, dtype=torch.float64)


def _expert_parallel_matches_one_process(rank, world_size, steps):
    from megatron_cosmos3.parallel.data_parallel import build_optimizer, wrap_data_parallel
    from megatron_cosmos3.parallel.expert_parallel import apply_expert_parallel, finalize_expert_grads
    from megatron_cosmos3.parallel.state import destroy_parallel, initialize_parallel
    from megatron_cosmos3.testing.reference import relative_difference

    groups = initialize_parallel(ParallelSizes(expert=world_size), MoTConfig(), num_experts=NUM_EXPERTS)
    try:
        torch.manual_seed(0)
        reference = TinyMoENet().double()
        model = apply_expert_parallel(copy.deepcopy(reference), groups)
        wrapped = wrap_data_parallel(model, groups)
        optimizer = build_optimizer(model.parameters(), groups, lr=1e-2)
        reference_optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.0)
        per_rank = NUM_EXPERTS // world_size
        block = slice(rank * per_rank, (rank + 1) * per_rank)
        worst = 0.0
        for step in range(steps):
            reference_optimizer.zero_grad()
            for data_rank in range(world_size):
                (loss_of(reference, *micro_batch(step, data_rank)) / world_size).backward()
            optimizer.zero_grad()
            loss_of(wrapped, *micro_batch(step, rank)).backward()
            finalize_expert_grads(model, groups)
            ref = dict(reference.named_parameters())
            for name, param in model.named_parameters():
                want = ref[name].grad[block] if name.endswith(("gate_up_proj", "down_proj")) else ref[name].grad
                worst = max(worst, relative_difference(param.grad, want))
            optimizer.step()
            reference_optimizer.step()
        local_experts = model.moe.gate_up_proj.shape[0]
        values = max(
            relative_difference(
                p.data,
                dict(reference.named_parameters())[n].data[block]
                if n.endswith(("gate_up_proj", "down_proj"))
                else dict(reference.named_parameters())[n].data,
            )
            for n, p in model.named_parameters()
        )
        return worst, values, local_experts
    finally:
        destroy_parallel()


@pytest.mark.multiprocess
def test_ep2_gradients_and_steps_match_one_process():
    for worst_grad, worst_value, local_experts in run_on_ranks(_expert_parallel_matches_one_process, 2, 3):
        assert local_experts == NUM_EXPERTS // 2
        assert worst_grad <= 1e-10
        assert worst_value <= 1e-10


def test_expert_layout_errors():
    with pytest.raises(ValueError, match="num_experts=3 is not divisible by expert=2"):
        ParallelSizes(expert=2).validate(2, MoTConfig(), num_experts=3)


def _tp_times_ep_matches_one_process(rank, world_size, steps, tensor=2, expert=2):
    from megatron_cosmos3.data.synthetic_packs import random_pack
    from megatron_cosmos3.model.moe import set_aux_loss_scale
    from megatron_cosmos3.model.mot import MoTModel
    from megatron_cosmos3.objectives.flow_matching import FlowMatchingConfig, add_flow_matching_noise
    from megatron_cosmos3.objectives.losses import mot_losses
    from megatron_cosmos3.parallel.data_parallel import wrap_data_parallel
    from megatron_cosmos3.parallel.expert_parallel import apply_expert_parallel, finalize_expert_grads
    from megatron_cosmos3.parallel.grad_norm import global_grad_norm
    from megatron_cosmos3.parallel.state import destroy_parallel, initialize_parallel
    from megatron_cosmos3.parallel.tensor_parallel import apply_tensor_parallel, finalize_tensor_parallel_grads
    from megatron_cosmos3.testing.reference import compare_to_reference
    from megatron_cosmos3.testing.training import tiny_mot_config

    config = tiny_mot_config(num_experts=NUM_EXPERTS, moe_top_k=2, moe_ffn_hidden_size=16, moe_aux_loss_weight=0.1)

    def pack(step, data_rank):
        g = torch.Generator().manual_seed(100 * step + data_rank)
        return add_flow_matching_noise(random_pack(config, g, num_samples=3 + data_rank), FlowMatchingConfig(), g)

    groups = initialize_parallel(ParallelSizes(tensor=tensor, expert=expert), config, config.num_experts)
    try:
        torch.manual_seed(0)
        reference = MoTModel(copy.deepcopy(config)).double()
        model = apply_expert_parallel(apply_tensor_parallel(copy.deepcopy(reference), groups), groups)
        set_aux_loss_scale(reference, 1 / groups.data_size)  # its loss is the mean of data_size micro-batches
        wrapped = wrap_data_parallel(model, groups)
        expert_rank = torch.distributed.get_rank(groups.expert)
        report = []
        for step in range(steps):
            reference.zero_grad(set_to_none=True)
            model.zero_grad(set_to_none=True)
            for data_rank in range(groups.data_size):  # DDP averages the data-parallel micro-batches
                (mot_losses(reference, *pack(step, data_rank)).total / groups.data_size).backward()
            mot_losses(wrapped, *pack(step, groups.data_rank)).total.backward()
            finalize_tensor_parallel_grads(model, groups)
            finalize_expert_grads(model, groups)
            grads = compare_to_reference(model, reference, groups.tensor_rank, tensor, "grad", expert_rank, expert)
            norms = (float(global_grad_norm(model, groups)), float(global_grad_norm(reference)))
            report.append((grads, norms))
        local = model.layers[0].generator.mlp.gate_up_proj.shape
        return report, tuple(local), (groups.tensor_rank, expert_rank, groups.data_rank)
    finally:
        destroy_parallel()


@pytest.mark.multiprocess
def test_tp2_times_ep2_gradients_match_one_process():
    results = run_on_ranks(_tp_times_ep_matches_one_process, 4, 2)
    # tp-cp-ep-dp-pp order: tensor rank = rank % 2; the expert ranks are the data ranks.
    assert [r[2] for r in results] == [(0, 0, 0), (1, 0, 0), (0, 1, 1), (1, 1, 1)]
    for report, local, _ in results:
        assert local == (NUM_EXPERTS // 2, 2 * 16 // 2, 32)  # half the experts, half of each one's FFN units
        for grads, (norm, reference_norm) in report:
            worst = max(grads, key=grads.get)
            assert grads[worst] <= 1e-10, (worst, grads[worst])
            assert norm == pytest.approx(reference_norm, rel=1e-10)


def test_moe_ffn_hidden_size_must_split_over_tensor():
    model = MoTConfig(num_attention_heads=4, num_kv_heads=2, ffn_hidden_size=64, moe_ffn_hidden_size=9)
    with pytest.raises(ValueError, match=r"moe_ffn_hidden_size=9 \(num_experts=4\) is not divisible by tensor=2"):
        ParallelSizes(tensor=2).validate(2, model, num_experts=4)
    ParallelSizes(tensor=2).validate(2, model)  # a dense model never uses moe_ffn_hidden_size
