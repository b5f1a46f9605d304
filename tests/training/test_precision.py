import pytest
import torch

from megatron_cosmos3.data.synthetic_packs import random_pack
from megatron_cosmos3.model.mot import MoTModel
from megatron_cosmos3.objectives.flow_matching import FlowMatchingConfig, add_flow_matching_noise
from megatron_cosmos3.objectives.losses import mot_losses
from megatron_cosmos3.training.precision import autocast


def test_bf16_computes_in_bf16_and_keeps_fp32_main_weights(tiny_config):
    g = torch.Generator().manual_seed(0)
    batch, targets = add_flow_matching_noise(random_pack(tiny_config, g, num_samples=5), FlowMatchingConfig(), g)
    torch.manual_seed(0)
    model = MoTModel(tiny_config)
    fp32_loss = float(mot_losses(model, batch, targets).total)
    matmul_dtypes = []
    model.layers[0].generator.self_attn.q_proj.register_forward_hook(lambda m, i, o: matmul_dtypes.append(o.dtype))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with autocast("bf16", torch.device("cpu")):
        losses = mot_losses(model, batch, targets)
    losses.total.backward()
    optimizer.step()
    assert matmul_dtypes == [torch.bfloat16]
    assert losses.total.dtype == torch.float32
    assert float(losses.total) == pytest.approx(fp32_loss, rel=2e-2)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(s["exp_avg"].dtype == torch.float32 for s in optimizer.state.values())
    with pytest.raises(ValueError, match="precision='fp8'"):
        autocast("fp8", torch.device("cpu"))
