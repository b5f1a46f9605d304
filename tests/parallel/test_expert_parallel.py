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
