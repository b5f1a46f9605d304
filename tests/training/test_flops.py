from pathlib import Path

import pytest
import torch

from megatron_cosmos3.model.attention import PackLayout
from megatron_cosmos3.model.config import load_model_config
from megatron_cosmos3.model.mot import MoTModel
from megatron_cosmos3.testing.training import TINY_VISION, tiny_mot_config
from megatron_cosmos3.training.flops import FlopCounter, attention_pairs, megatron_lm_flops, tower_parameter_counts

NANO = Path(__file__).resolve().parents[2] / "configs" / "model" / "nano.yaml"


def test_attention_pairs_equal_the_allowed_entries_of_the_dense_masks():
    lengths = [(5, 3), (0, 4), (7, 0), (1, 1)]
    layout = PackLayout.from_cu_seqlens(torch.tensor([0, 5, 5, 12, 13]), torch.tensor([0, 3, 7, 7, 8]))
    # Count what the dense reference allows by probing it with one-hot values.
    allowed = 0
    for stream, _n_q in (("ar", 13), ("dm", 8)):
        sample_q = layout.sample_ids(stream)
        if stream == "ar":
            idx = torch.arange(13)
            allowed += int(((sample_q[:, None] == sample_q[None]) & (idx[None] <= idx[:, None])).sum())
        else:
            allowed += int((sample_q[:, None] == torch.cat([layout.sample_ids("ar"), sample_q])[None]).sum())
    assert attention_pairs(layout) == allowed == sum(a * (a + 1) // 2 + d * (a + d) for a, d in lengths)


def test_step_flops_follow_the_6n_plus_attention_rule(tiny_config):
    model = MoTModel(tiny_config)
    towers = tower_parameter_counts(model)
    per_layer = sum(p.numel() for p in model.layers[0].reasoner.parameters())
    assert towers["reasoner"] == towers["generator"] == tiny_config.num_layers * per_layer + tiny_config.hidden_size
    layout = PackLayout.from_cu_seqlens(torch.tensor([0, 4]), torch.tensor([0, 6]))
    flops = FlopCounter(tiny_config).step(layout, num_labelled_ar_tokens=3)
    c = tiny_config
    timestep = sum(p.numel() for p in model.timestep_embedding.mlp.parameters()) * 6
    assert flops.matmul == 6 * (
        towers["reasoner"] * 4 + towers["generator"] * 6 + c.vocab_size * c.hidden_size * 3 + timestep
    )
    assert flops.attention == 12 * c.num_layers * c.num_attention_heads * c.head_dim * (10 + 6 * 10)
    assert flops.megatron_convention == megatron_lm_flops(c, seq_length=10)  # the pack as one sequence


# Megatron-LM's num_floating_point_operations (megatron/training/training.py) for a GQA SwiGLU GPT,
# written out by hand: batch * s * [3*2*h*(3*ffn)*L + L*3*2*(h*(q + k + v) + q*s/2*2 + q*h) + 3*2*h*V],
# q = heads*d, k = v = kv_heads*d, V the vocabulary padded to a multiple of 128.


def test_megatron_convention_matches_megatron_lms_formula_on_the_tiny_model():
    # hidden 32, 2 layers, 4 heads / 2 KV heads of 8, FFN 64, vocab 64 (padded to 128), s = 10.
    by_hand = (
        1 * 10 * (6 * 32 * (3 * 64) * 2 + 2 * 6 * (32 * (32 + 16 + 16) + 32 * 10 / 2 * 2 + 32 * 32) + 6 * 32 * 128)
    )
    assert by_hand == 1_390_080
    assert megatron_lm_flops(tiny_mot_config(), seq_length=10) == by_hand


def test_megatron_convention_counts_top_k_experts_of_a_moe_reasoner():
    config = tiny_mot_config(num_experts=4, moe_top_k=2, moe_ffn_hidden_size=16)
    by_hand = 2 * 10 * (6 * 32 * (3 * 16 * 2) * 2 + 2 * 6 * (32 * 64 + 32 * 10 + 32 * 32) + 6 * 32 * 128)
    assert megatron_lm_flops(config, seq_length=10, batch_size=2) == by_hand


def test_megatron_convention_of_nano_on_a_16k_pack():
    # hidden 4096, 36 layers, 32 heads / 8 KV heads of 128, FFN 12288, vocab 151936 (= 1187 * 128).
    per_token = 6 * (36 * (4096 * (4096 + 1024 + 1024) + 4096 * 16384 + 4096 * 4096 + 3 * 12288 * 4096) + 4096 * 151936)
    assert per_token * 16384 == 981_468_746_612_736
    assert megatron_lm_flops(load_model_config(NANO), seq_length=16384) == per_token * 16384


def test_a_token_counts_top_k_experts_and_every_rank_counts_the_whole_model():
    dense, moe = tiny_mot_config(), tiny_mot_config(num_experts=4, moe_top_k=2, moe_ffn_hidden_size=16)
    model = MoTModel(moe)
    expert = moe.hidden_size * 16 * 3  # one SwiGLU expert: gate, up, down
    per_layer_total = sum(p.numel() for p in model.layers[0].reasoner.parameters())
    towers = FlopCounter(moe).towers
    # Each token runs through 2 of the 4 experts: the 2 others' weights are no FLOPs of its own.
    assert towers["reasoner"] == moe.num_layers * (per_layer_total - 2 * expert) + moe.hidden_size
    assert towers == tower_parameter_counts(model)
    # Counted from the config alone, so a tensor-parallel shard counts what one process counts.
    assert FlopCounter(dense).towers == tower_parameter_counts(MoTModel(dense))


def test_a_trained_vits_flops_match_what_torch_counts_for_its_forward_and_backward():
    """6 N per patch (and per merged token for the mergers) plus the within-picture attention pairs,
    against torch's own count of every matmul, convolution and attention kernel the ViT runs forward
    and backward. What torch does not count — biases, LayerNorm weights — keeps the two ~1% apart."""
    from torch.utils.flop_counter import FlopCounterMode

    from megatron_cosmos3.model.config import VisionConfig
    from megatron_cosmos3.model.vision import VisionEncoder

    # TINY_VISION (placeholder ids in the tiny vocabulary), four times as wide: the biases and norms
    # torch does not count are then a small part of the weights.
    vision = VisionConfig(**{**TINY_VISION, "hidden_size": 64, "intermediate_size": 256, "num_heads": 4})
    config = tiny_mot_config(vision=vision)
    vit = VisionEncoder(vision)
    vit.vit.config._attn_implementation = "eager"  # torch's counter misses the CPU SDPA kernel
    grids = torch.tensor([[1, 4, 6], [1, 2, 2], [2, 4, 4]])  # two pictures and a two-step clip
    pixels = torch.randn(int(grids.prod(-1).sum()), vit.patch_dim, requires_grad=True)  # 6N: input grads too
    with FlopCounterMode(display=False) as counted:
        features = vit(pixels, grids)
        (features.embeds.sum() + features.deepstack.sum()).backward()

    layout = PackLayout.from_cu_seqlens(torch.tensor([0, 4]), torch.tensor([0, 0]))
    counter = FlopCounter(config, vision=vit)
    with_vit, without = counter.step(layout, 0, vision_grid_thw=grids), counter.step(layout, 0)
    ours = with_vit.total - without.total
    assert ours == pytest.approx(counted.get_total_flops(), rel=0.01)

    vit.requires_grad_(False)  # frozen: forward only
    frozen = FlopCounter(config, vision=vit).step(layout, 0, vision_grid_thw=grids).total - without.total
    assert frozen == pytest.approx(ours / 3)
