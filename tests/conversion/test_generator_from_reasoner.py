"""Both towers start from Qwen3-VL; a DM training step moves the Generator, a frozen Reasoner stays put."""

import torch
from qwen3_vl_tiny import TINY_YAML, processor_like_inputs

from megatron_cosmos3.conversion import load_qwen3_vl, reasoner_logits
from megatron_cosmos3.data.synthetic_packs import random_pack
from megatron_cosmos3.model.config import load_model_config
from megatron_cosmos3.objectives.flow_matching import FlowMatchingConfig, add_flow_matching_noise
from megatron_cosmos3.objectives.losses import mot_losses


def tower_pairs(model):
    """(name, reasoner tensor, generator tensor) for every tower parameter and the final norms."""
    for i, layer in enumerate(model.layers):
        generator = dict(layer.generator.named_parameters())
        for name, p in layer.reasoner.named_parameters():
            yield f"layers.{i}.{name}", p, generator[name]
    yield "final_norm.weight", model.reasoner_norm.weight, model.generator_norm.weight


def test_generator_equals_reasoner_after_import_and_diverges_after_a_dm_step(hf_folder):
    model, vision = load_qwen3_vl(hf_folder, config=load_model_config(TINY_YAML))
    for name, reasoner, generator in tower_pairs(model):
        assert torch.equal(reasoner, generator), name
        assert reasoner.data_ptr() != generator.data_ptr(), f"{name}: the towers must be copies, not shared"

    # Freeze everything on the AR path: embeddings, Reasoner towers, its final norm, the LM head.
    for module in [model.embed_tokens, model.reasoner_norm, model.lm_head] + [layer.reasoner for layer in model.layers]:
        module.requires_grad_(False)
    text = processor_like_inputs("text", seed=3)
    with torch.no_grad():
        before = reasoner_logits(model, vision, **text)

    g = torch.Generator().manual_seed(0)
    batch, targets = add_flow_matching_noise(
        random_pack(model.config, g, num_samples=3, tasks=("text_to_video",)), FlowMatchingConfig(), g
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = mot_losses(model, batch, targets)
    assert int(losses.fm_count) > 0
    losses.total.backward()
    optimizer.step()

    for name, reasoner, generator in tower_pairs(model):
        assert not torch.equal(reasoner, generator), f"{name}: the Generator did not move"
    with torch.no_grad():
        after = reasoner_logits(model, vision, **text)
    assert torch.equal(before, after)
