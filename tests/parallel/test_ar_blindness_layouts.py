"""AR blindness under the layouts whose own test files do not check it: data parallelism (each rank
its own pack, through DDP), expert parallelism (AR and DM tokens of several ranks meet in the
all-to-all), sequence parallelism (rows gathered over tensor ranks), sequence parallelism inside
context parallelism, and 4-rank combinations with pipeline stages (run by the trainer's 1F1B
schedule). Changing every DM input of the pack changes no AR output, bit for bit, while the DM
outputs do change (the control)."""

from __future__ import annotations

import copy

import pytest
import torch

from megatron_cosmos3.data.synthetic_packs import random_pack
from megatron_cosmos3.model.mot import MoTModel
from megatron_cosmos3.objectives.flow_matching import FlowMatchingConfig, add_flow_matching_noise
from megatron_cosmos3.parallel.sizes import ParallelSizes
from megatron_cosmos3.testing.distributed import run_on_ranks
from megatron_cosmos3.testing.training import tiny_mot_config

# Experts in both towers; 8 / 4 heads so that TP=2 x CP=2 still splits the KV heads.
CONFIG = tiny_mot_config(num_attention_heads=8, num_kv_heads=4, num_experts=4, moe_top_k=2, moe_ffn_hidden_size=16)
LAYOUTS = {
    "dp2": (2, ParallelSizes()),
    "ep2": (2, ParallelSizes(expert=2)),
    "tp2-sp": (2, ParallelSizes(tensor=2, sequence_parallel=True)),
    "tp2-sp-x-cp2": (4, ParallelSizes(tensor=2, context=2, sequence_parallel=True)),
    "tp2-x-pp2": (4, ParallelSizes(tensor=2, pipeline=2)),
    "ep2-x-pp2-x-cp2": (4, ParallelSizes(pipeline=2, context=2, expert=2)),
}


def packs(data_rank: int):
    """(pack, the same pack with every DM input changed: latents, noise mask, timesteps), each with
    the velocity targets (the pipeline's last stage computes a loss)."""
    g = torch.Generator().manual_seed(40 + data_rank)
    batch, targets = add_flow_matching_noise(random_pack(CONFIG, g, num_samples=5), FlowMatchingConfig(), g)
    changed = batch.replace(
        dm_tokens={k: torch.randn(v.shape, generator=g) * 100 for k, v in batch.dm_tokens.items()},
        dm_noise_mask=torch.ones_like(batch.dm_noise_mask),
        dm_timesteps=torch.rand(batch.num_dm_tokens, generator=g),
    )
    return (batch, targets), (changed, targets)


def _layout_forward(model, groups):
    """The forward pass the trainer runs under the layout of ``groups``: the pipeline schedule over
    this rank's stages, the context/sequence-parallel runner, or the (DDP-wrapped) model. Returns a
    function of a pack and its targets giving this rank's output (None on pipeline ranks without
    the last stage)."""
    from megatron_cosmos3.objectives.losses import loss_breakdown
    from megatron_cosmos3.parallel.context_parallel import sequence_split, split_forward
    from megatron_cosmos3.parallel.data_parallel import wrap_data_parallel
    from megatron_cosmos3.parallel.pipeline import split_into_stages
    from megatron_cosmos3.parallel.pipeline_schedules import forward_backward

    split = sequence_split(groups)
    if groups.sizes.pipeline > 1:
        stages = split_into_stages(model, groups)

        def through_pipeline(batch, targets):
            outputs = []

            def record(output, batch, targets, **kwargs):
                outputs.append(output)
                return loss_breakdown(output, batch, targets, **kwargs)

            forward_backward(stages, [(batch, targets)], record, forward_only=True, split=split)
            return outputs[0] if outputs else None

        return through_pipeline
    if split is not None:
        return lambda batch, targets: split_forward(model, batch, split)[0]
    trained = wrap_data_parallel(model, groups)
    return lambda batch, targets: trained(batch)


def _ar_outputs_with_changed_dm_inputs(rank, world_size, name):
    from megatron_cosmos3.parallel.expert_parallel import apply_expert_parallel
    from megatron_cosmos3.parallel.state import destroy_parallel, initialize_parallel
    from megatron_cosmos3.parallel.tensor_parallel import apply_tensor_parallel

    sizes = LAYOUTS[name][1]
    groups = initialize_parallel(sizes, CONFIG, CONFIG.num_experts)
    try:
        torch.manual_seed(0)
        model = apply_expert_parallel(apply_tensor_parallel(MoTModel(copy.deepcopy(CONFIG)), groups), groups)
        forward = _layout_forward(model, groups)
        with torch.no_grad():
            before, after = (forward(*pack) for pack in packs(groups.data_rank))
        if before is None:  # a pipeline rank without the last stage: its outputs are sent on
            return None
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
    reports = [r for r in run_on_ranks(_ar_outputs_with_changed_dm_inputs, LAYOUTS[name][0], name) if r]
    assert len(reports) == LAYOUTS[name][0] // LAYOUTS[name][1].pipeline  # every last-stage rank reported
    assert all(report["ar_hidden"] and report["lm_logits"] for report in reports), reports
    assert any(report["dm_changed"] for report in reports)  # the comparison is not vacuous
