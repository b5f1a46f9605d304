"""A tiny MoT learns: both towers overfit one fixed packed batch."""

import torch

from megatron_cosmos3.data.synthetic_packs import random_pack
from megatron_cosmos3.model.mot import MoTModel
from megatron_cosmos3.objectives.flow_matching import FlowMatchingConfig, add_flow_matching_noise
from megatron_cosmos3.objectives.losses import mot_losses


def test_tiny_mot_overfits_a_fixed_batch_in_both_towers(tiny_config):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    batch = random_pack(tiny_config, g, num_samples=6, tasks=("understanding", "text_to_video", "policy"))
    batch, targets = add_flow_matching_noise(batch, FlowMatchingConfig(), g)
    model = MoTModel(tiny_config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    history = []
    for _ in range(300):
        losses = mot_losses(model, batch, targets)
        optimizer.zero_grad()
        losses.total.backward()
        optimizer.step()
        history.append((float(losses.ce_sum / losses.ce_count), float(losses.fm_sum / losses.fm_count)))
    (ce0, fm0), (ce1, fm1) = history[0], history[-1]
    assert ce1 <= 0.1 * ce0, f"reasoner CE {ce0:.3f} -> {ce1:.3f}"
    assert fm1 <= 0.1 * fm0, f"generator FM {fm0:.3f} -> {fm1:.3f}"
