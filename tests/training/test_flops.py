import torch

from megatron_cosmos3.model.attention import PackLayout
from megatron_cosmos3.model.mot import MoTModel
from megatron_cosmos3.training.flops import attention_pairs, step_flops, tower_parameter_counts


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
    flops = step_flops(model, layout, num_labelled_ar_tokens=3)
    c = tiny_config
    timestep = sum(p.numel() for p in model.timestep_embedding.mlp.parameters()) * 6
    assert flops.matmul == 6 * (
        towers["reasoner"] * 4 + towers["generator"] * 6 + c.vocab_size * c.hidden_size * 3 + timestep
    )
    assert flops.attention == 12 * c.num_layers * c.num_attention_heads * c.head_dim * (10 + 6 * 10)
    assert flops.megatron_convention > flops.attention  # one causal sequence of 10 tokens: 55 pairs + LM head on all
