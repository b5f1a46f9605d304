"""AdamW's kernel selection (docs/DESIGN.md, "Fused kernels"): fused where the device has it, equal
to torch's per-parameter AdamW; named errors for what cannot run."""

import pytest
import torch

from megatron_cosmos3.parallel.data_parallel import adamw, adamw_kernel
from megatron_cosmos3.parallel.plan import ParallelPlan
from megatron_cosmos3.parallel.sizes import ParallelSizes
from megatron_cosmos3.training.config import OptimizerConfig


def parameters(device="cpu"):
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(shape, generator=g).to(device)) for shape in [(6, 5), (5,), (3, 2, 4)]]


def test_auto_picks_fused_on_cpu_and_foreach_where_torch_has_no_fused_kernel():
    assert adamw_kernel(parameters(), "auto") == {"fused": True, "foreach": False}
    assert adamw_kernel([{"params": parameters("meta")}], "auto") == {"fused": False, "foreach": True}
    assert adamw_kernel(parameters(), "loop") == {"fused": False, "foreach": False}
    with pytest.raises(
        ValueError, match=r"optimizer.implementation='fused': torch has no fused AdamW for devices \['meta'\]"
    ):
        adamw_kernel(parameters("meta"), "fused")
    with pytest.raises(ValueError, match="optimizer.implementation='apex' is not one of"):
        OptimizerConfig(implementation="apex")
    plan = ParallelPlan(ParallelSizes())  # the trainer's one-process optimizer
    optimizer = plan.build_optimizer([{"params": parameters()}], 1e-3, (0.9, 0.95), 0.1, shard_state=True)
    assert optimizer.defaults["fused"] is True


def test_fused_adamw_equals_the_per_parameter_loop():
    """Three steps with two param groups (one without weight decay): fused equals torch's reference
    loop to float rounding, and a different learning rate would not."""
    g = torch.Generator().manual_seed(1)
    grads = [[torch.randn(p.shape, generator=g) for p in parameters()] for _ in range(3)]

    def trained(implementation, lr=1e-2):
        params = parameters()
        groups = [{"params": params[:2]}, {"params": params[2:], "weight_decay": 0.0}]
        optimizer = adamw(groups, implementation, lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
        for step in grads:
            for p, grad in zip(params, step):
                p.grad = grad.clone()
            optimizer.step()
        return params

    fused, loop, other = trained("fused"), trained("loop"), trained("loop", lr=1.1e-2)
    for a, b, c in zip(fused, loop, other):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        assert not torch.allclose(a, c, rtol=1e-6, atol=1e-7)
