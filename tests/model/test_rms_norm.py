"""The towers' RMSNorm on torch's rms_norm kernel equals Qwen3's hand-written norm bit for bit on CPU
(docs/DESIGN.md, "Fused kernels")."""

import pytest
import torch

from megatron_cosmos3.model.tower import RMSNorm


def qwen3_rms_norm(x, weight, eps):
    """Qwen3's RMSNorm as Hugging Face writes it: fp32 statistics, cast back, then the weight."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("autocast", [False, True])
def test_rms_norm_equals_the_hand_written_norm_in_outputs_and_gradients(dtype, autocast):
    g = torch.Generator().manual_seed(0)
    norm = RMSNorm(48, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(48, generator=g))
    x = (3 * torch.randn(7, 48, generator=g)).to(dtype)
    grad = torch.randn(7, 48, generator=g)
    results = []
    for fn in (norm, lambda t: qwen3_rms_norm(t, norm.weight, norm.eps)):
        inputs = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = fn(inputs)
        out.backward(grad.to(out.dtype))
        results.append((out.detach(), inputs.grad, norm.weight.grad))
        norm.weight.grad = None
    for got, want in zip(*results):
        assert got.dtype == want.dtype and torch.equal(got, want)
    assert not torch.equal(results[0][0], (x.float() * norm.weight).to(results[0][0].dtype))  # it normalises
