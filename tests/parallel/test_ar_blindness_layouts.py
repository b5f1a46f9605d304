"""AR blindness under the layouts whose own test files do not check it: expert parallelism (AR and DM
tokens of several ranks meet in the all-to-all), sequence parallelism (rows gathered over tensor
ranks) and sequence parallelism inside context parallelism. Changing every DM input of the pack
changes no AR output, bit for bit, while the DM outputs do change (the control)."""

from __future__ import annotations

import copy

import pytest
import torch

from megatron_cosmos3.data.synthetic_packs import random_pack
from megatron_cosmos3.model.mot import MoTModel
from megatron_cosmos3.parallel.sizes import ParallelSizes
from megatron_cosmos3.testing.distributed import run_on_ranks
from megatron_cosmos3.testing.training import tiny_mot_config
from megatron_cosmos3.training.flow_matching import FlowMatchingConfig, add_flow_matching_noise

# Experts in both towers; 8 / 4 heads so that TP=2 x CP=2 still splits the KV heads.
CONFIG = tiny_mot_config(num_attention_heads=8, num_kv_heads=4, num_experts=4, moe_top_k=2, moe_ffn_hidden_size=16)
LAYOUTS = {
    "ep2": (2, ParallelSizes(expert=2)),
    "tp2-sp": (2, ParallelSizes(tensor=2, sequence_parallel=True)),
    "tp2-sp-x-cp2": (4, ParallelSizes(tensor=2, context=2, sequence_parallel=True)),
}


def packs(data_rank: int):
    """(pack, the same pack with every DM input changed): latents, noise mask, timesteps."""
    g = torch.Generator().manual_seed(40 + data_rank)
    batch, _ = add_flow_matching_noise(random_pack(CONFIG, g, num_samples=5), FlowMatchingConfig(), g)
    changed = batch.replace(
        dm_tokens={k: torch.randn(v.shape, generator=g) * 100 for k, v in batch.dm_tokens.items()},
        dm_noise_mask=torch.ones_like(batch.dm_noise_mask),
        dm_timesteps=torch.rand(batch.num_dm_tokens, generator=g),
    )
    return batch, changed


def _ar_outputs_with_changed_dm_inputs(rank, world_size, name):
    from megatron_cosmos3.parallel.context_parallel import SequenceSplit, split_forward
    from megatron_cosmos3.parallel.expert_parallel import apply_expert_parallel
    from megatron_cosmos3.parallel.state import destroy_parallel, initialize_parallel
    from megatron_cosmos3.parallel.tensor_parallel import apply_tensor_parallel

    sizes = LAYOUTS[name][1]
    groups = initialize_parallel(sizes, CONFIG, CONFIG.num_experts)
    try:
        torch.manual_seed(0)
        model = apply_expert_parallel(apply_tensor_parallel(MoTModel(copy.deepcopy(CONFIG)), groups), groups)
        if sizes.sequence_parallel:
            context = groups.context if sizes.context > 1 else None
            split = SequenceSplit(groups.tensor_and_context, context=context, sequence_parallel=True)
            forward = lambda batch: split_forward(model, batch, split)[0]  # noqa: E731
        else:
            forward = model
        with torch.no_grad():
            before, after = (forward(batch) for batch in packs(groups.data_rank))
        return {
            "ar_hidden": torch.equal(before.ar_hidden, after.ar_hidden),
            "lm_logits": torch.equal(before.lm_logits, after.lm_logits),
            "dm_changed": not torch.equal(before.dm_hidden, after.dm_hidden),
        }
    finally:
        destroy_parallel()


@pytest.mark.multiprocess
@pytest.mark.parametrize("name", LAYOUTS)
def test_changing_dm_inputs_changes_no_ar_output_bit_for_bit(name):
    reports = run_on_ranks(_ar_outputs_with_changed_dm_inputs, LAYOUTS[name][0], name)
    assert all(report["ar_hidden"] and report["lm_logits"] for report in reports), reports
    assert any(report["dm_changed"] for report in reports)  # the comparison is not vacuous
