"""The global gradient norm of a sharded model equals the single-process norm."""

import copy

import pytest
import torch

from megatron_cosmos3.data.synthetic_packs import random_pack
from megatron_cosmos3.model.mot import MoTModel
from megatron_cosmos3.objectives.flow_matching import FlowMatchingConfig, add_flow_matching_noise
from megatron_cosmos3.objectives.losses import mot_losses
from megatron_cosmos3.parallel.grad_norm import global_grad_norm
from megatron_cosmos3.parallel.sizes import ParallelSizes
from megatron_cosmos3.testing.distributed import run_on_ranks
from megatron_cosmos3.testing.training import tiny_mot_config

CONFIG = tiny_mot_config()


def _norms_under_tensor_parallel(rank, world_size):
    from megatron_cosmos3.parallel.state import destroy_parallel, initialize_parallel
    from megatron_cosmos3.parallel.tensor_parallel import apply_tensor_parallel, finalize_tensor_parallel_grads

    groups = initialize_parallel(ParallelSizes(tensor=2), CONFIG)
    try:
        torch.manual_seed(0)
        reference = MoTModel(copy.deepcopy(CONFIG)).double()
        model = apply_tensor_parallel(copy.deepcopy(reference), groups)
        g = torch.Generator().manual_seed(3)
        batch, targets = add_flow_matching_noise(random_pack(CONFIG, g, 5), FlowMatchingConfig(), g)
        for m in (reference, model):
            mot_losses(m, batch, targets).total.backward()
        finalize_tensor_parallel_grads(model, groups)
        return float(global_grad_norm(reference)), float(global_grad_norm(model, groups))
    finally:
        destroy_parallel()


@pytest.mark.multiprocess
def test_tensor_parallel_grad_norm_equals_one_process():
    for want, got in run_on_ranks(_norms_under_tensor_parallel, 2):
        assert got == pytest.approx(want, rel=1e-12)


def test_foreach_norm_and_clipping_equal_the_per_parameter_sums():
    """Every kind of parameter (replicated, tensor-, expert-, tensor-and-expert-sharded), fp32 and
    bf16 gradients, one without a gradient: the norm equals the per-entry float64 sum written out,
    and clipping scales every gradient by max_norm / norm."""
    from megatron_cosmos3.parallel.grad_norm import clip_grad_norm

    g = torch.Generator().manual_seed(0)
    params = []
    for i, (shape, dtype, tensor, expert) in enumerate(
        [
            ((5, 3), torch.float32, False, False),
            ((7,), torch.bfloat16, True, False),
            ((2, 4, 3), torch.float32, True, True),
            ((4, 2), torch.float32, False, True),
            ((3,), torch.float32, False, False),
        ]
    ):
        p = torch.nn.Parameter(torch.zeros(shape, dtype=dtype))
        p.tensor_model_parallel, p.expert_parallel = tensor, expert
        p.grad = None if i == 4 else (torch.randn(shape, generator=g) * 10.0 ** (i - 2)).to(dtype)
        params.append(p)
    want = sum(float(p.grad.double().square().sum()) for p in params if p.grad is not None) ** 0.5
    assert float(global_grad_norm(params)) == pytest.approx(want, rel=1e-12)
    before = [p.grad.clone() for p in params[:4]]
    norm = clip_grad_norm(params, max_norm=want / 4)
    assert float(norm) == pytest.approx(want, rel=1e-6)
    for p, grad in zip(params, before):
        torch.testing.assert_close(p.grad, grad * (want / 4 / (want + 1e-6)))
    assert float(global_grad_norm(params)) == pytest.approx(want / 4, rel=1e-2)  # bf16 rounding
