"""Tensor parallelism (megatron-core column/row-parallel linears, experts split over FFN units) equals one process."""

import copy

import pytest
import torch

from megatron_cosmos3.data.synthetic_packs import random_pack
from megatron_cosmos3.model.moe import MoEMLP
from megatron_cosmos3.model.mot import MoTModel
from megatron_cosmos3.objectives.flow_matching import FlowMatchingConfig, add_flow_matching_noise
from megatron_cosmos3.objectives.losses import mot_losses
from megatron_cosmos3.parallel.sizes import ParallelSizes
from megatron_cosmos3.testing.distributed import run_on_ranks
from megatron_cosmos3.testing.training import tiny_mot_config

CONFIG = tiny_mot_config()
# Mixture-of-experts MLPs in both towers (expert tensor parallelism), with the balancing loss on.
MOE_CONFIG = tiny_mot_config(num_experts=4, moe_top_k=2, moe_ffn_hidden_size=16, moe_aux_loss_weight=0.1)


# Another shape: 3 query heads per KV head, head_dim 24 (not a power of two), an odd number of
# layers, widths that are not multiples of 64.
ODD_CONFIG = tiny_mot_config(
    hidden_size=40, num_layers=3, num_attention_heads=6, num_kv_heads=2, head_dim=24, ffn_hidden_size=50
)


def noised_pack(seed, config=CONFIG):
    g = torch.Generator().manual_seed(seed)
    return add_flow_matching_noise(random_pack(config, g, num_samples=5), FlowMatchingConfig(), g)


def aux_losses(model):
    """The balancing loss of every MoE layer in the last forward."""
    return [float(m.aux_loss.detach()) for m in model.modules() if isinstance(m, MoEMLP)]


def _tensor_parallel_matches_one_process(rank, world_size, steps, dtype, config=CONFIG):
    from megatron_cosmos3.parallel.state import destroy_parallel, initialize_parallel
    from megatron_cosmos3.parallel.tensor_parallel import apply_tensor_parallel, finalize_tensor_parallel_grads
    from megatron_cosmos3.testing.reference import compare_to_reference

    groups = initialize_parallel(ParallelSizes(tensor=world_size), config, config.num_experts)
    try:
        torch.manual_seed(0)
        reference = MoTModel(copy.deepcopy(config)).to(dtype)
        model = apply_tensor_parallel(copy.deepcopy(reference), groups)
        optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (reference, model)]
        report = {"losses": [], "aux": [], "grad": [], "data": None, "sharded": 0}
        for step in range(steps):
            batch, targets = noised_pack(step, config)
            losses = []
            for m, optimizer in zip((reference, model), optimizers):
                optimizer.zero_grad()
                loss = mot_losses(m, batch, targets)
                loss.total.backward()
                losses.append(float(loss.total.detach()))
            finalize_tensor_parallel_grads(model, groups)
            report["losses"].append(losses)
            report["aux"].append((aux_losses(reference), aux_losses(model)))
            report["grad"].append(compare_to_reference(model, reference, groups.tensor_rank, world_size))
            for optimizer in optimizers:
                optimizer.step()
        report["data"] = compare_to_reference(model, reference, groups.tensor_rank, world_size, what="data")
        report["sharded"] = sum(getattr(p, "tensor_model_parallel", False) for p in model.parameters())
        report["local_heads"] = model.layers[0].generator.self_attn.q_proj.weight.shape[0] // config.head_dim
        return report
    finally:
        destroy_parallel()


# fp64 shows the parallel math is exact; fp32 bounds the summation-order noise of row-parallel
# partial sums, which reaches ~1.2e-5 (norm-relative) on norm-weight gradients, a sum over all tokens.
GRADIENT_TOLERANCE = {torch.float64: 1e-10, torch.float32: 5e-5}


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    "dtype, config",
    [(torch.float64, CONFIG), (torch.float32, CONFIG), (torch.float64, ODD_CONFIG)],
    ids=["fp64", "fp32", "odd"],
)
def test_tp2_loss_gradients_and_steps_match_one_process(dtype, config):
    tolerance = GRADIENT_TOLERANCE[dtype]
    for report in run_on_ranks(_tensor_parallel_matches_one_process, 2, 3, dtype, config):
        assert report["sharded"] == config.num_layers * 2 * 7  # 7 linears per tower, 2 towers per layer
        assert report["local_heads"] == config.num_attention_heads // 2
        for reference_loss, parallel_loss in report["losses"]:
            assert parallel_loss == pytest.approx(reference_loss, rel=1e-5)
        for step_grads in report["grad"]:
            worst = max(step_grads, key=step_grads.get)
            assert step_grads[worst] <= tolerance, (worst, step_grads[worst])
        worst = max(report["data"], key=report["data"].get)
        assert report["data"][worst] <= tolerance, (worst, report["data"][worst])


# MoE: fp64 shows the math is exact; fp32 compares one step: the gradients (same parameters) to 1e-5,
# the values after one AdamW step looser, since AdamW's first update is ~lr x sign(gradient) and an
# expert weight element whose gradient is ~1e-9 gets its sign from summation-order noise (measured:
# 2.5e-4 norm-relative on a gate_up_proj slice).
MOE_TOLERANCE = {torch.float64: (2, 1e-10, 1e-10), torch.float32: (1, 1e-5, 1e-3)}  # steps, grads, values


def assert_moe_matches(report, dtype):
    _, grad_tolerance, data_tolerance = MOE_TOLERANCE[dtype]
    for (want, got), (want_aux, got_aux), grads in zip(report["losses"], report["aux"], report["grad"]):
        assert got == pytest.approx(want, rel=grad_tolerance)
        assert len(want_aux) == MOE_CONFIG.num_layers * 2 and got_aux == pytest.approx(want_aux, rel=grad_tolerance)
        worst = max(grads, key=grads.get)
        assert grads[worst] <= grad_tolerance, (worst, grads[worst])
    worst = max(report["data"], key=report["data"].get)
    assert report["data"][worst] <= data_tolerance, (worst, report["data"][worst])


@pytest.mark.multiprocess
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_tp2_with_experts_split_over_ffn_units_matches_one_process(dtype):
    steps = MOE_TOLERANCE[dtype][0]
    for report in run_on_ranks(_tensor_parallel_matches_one_process, 2, steps, dtype, MOE_CONFIG):
        # Per tower: q, k, v, o linears and the two expert weights (a slice of each expert's FFN units).
        assert report["sharded"] == MOE_CONFIG.num_layers * 2 * 6
        assert_moe_matches(report, dtype)


def _ar_blind_under_tensor_parallel(rank, world_size, config=CONFIG):
    from megatron_cosmos3.parallel.state import destroy_parallel, initialize_parallel
    from megatron_cosmos3.parallel.tensor_parallel import apply_tensor_parallel

    groups = initialize_parallel(ParallelSizes(tensor=world_size), config, config.num_experts)
    try:
        torch.manual_seed(0)
        model = apply_tensor_parallel(MoTModel(copy.deepcopy(config)), groups)
        batch, _ = noised_pack(0, config)
        changed = batch.replace(
            dm_tokens={k: v * 3 + 1 for k, v in batch.dm_tokens.items()},
            dm_timesteps=torch.where(batch.dm_noise_mask, torch.full_like(batch.dm_timesteps, 0.7), batch.dm_timesteps),
        )
        with torch.no_grad():
            a, b = model(batch), model(changed)
        return (
            torch.equal(a.ar_hidden, b.ar_hidden),
            torch.equal(a.lm_logits, b.lm_logits),
            torch.equal(a.dm_hidden, b.dm_hidden),
        )
    finally:
        destroy_parallel()


@pytest.mark.multiprocess
@pytest.mark.parametrize("config", [CONFIG, MOE_CONFIG], ids=["dense", "moe"])
def test_reasoner_stays_blind_to_dm_inputs_under_tensor_parallel(config):
    for ar_same, logits_same, dm_same in run_on_ranks(_ar_blind_under_tensor_parallel, 2, config):
        assert ar_same and logits_same and not dm_same


def _sequence_parallel_matches_one_process(rank, world_size, steps, dtype=torch.float64, config=CONFIG):
    from megatron_cosmos3.parallel.context_parallel import SequenceSplit, split_losses
    from megatron_cosmos3.parallel.state import destroy_parallel, initialize_parallel
    from megatron_cosmos3.parallel.tensor_parallel import apply_tensor_parallel, finalize_tensor_parallel_grads
    from megatron_cosmos3.testing.reference import compare_to_reference

    groups = initialize_parallel(ParallelSizes(tensor=world_size, sequence_parallel=True), config, config.num_experts)
    try:
        torch.manual_seed(0)
        reference = MoTModel(copy.deepcopy(config)).to(dtype)
        model = apply_tensor_parallel(copy.deepcopy(reference), groups)
        optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (reference, model)]
        report = {"losses": [], "aux": [], "grad": []}
        for step in range(steps):
            batch, targets = noised_pack(step, config)
            for optimizer in optimizers:
                optimizer.zero_grad()
            want = mot_losses(reference, batch, targets)
            want.total.backward()
            got = split_losses(model, batch, targets, SequenceSplit(groups.tensor, sequence_parallel=True))
            got.total.backward()
            finalize_tensor_parallel_grads(model, groups)
            report["losses"].append((float(want.total.detach()), float(got.total.detach())))
            report["aux"].append((aux_losses(reference), aux_losses(model)))
            report["grad"].append(compare_to_reference(model, reference, groups.tensor_rank, world_size))
            for optimizer in optimizers:
                optimizer.step()
        report["data"] = compare_to_reference(model, reference, groups.tensor_rank, world_size, what="data")
        return report
    finally:
        destroy_parallel()


@pytest.mark.multiprocess
def test_sequence_parallel_tp2_matches_one_process():
    for report in run_on_ranks(_sequence_parallel_matches_one_process, 2, 3):
        for want, got in report["losses"]:
            assert got == pytest.approx(want, rel=1e-10)
        for step_grads in report["grad"]:
            worst = max(step_grads, key=step_grads.get)
            assert step_grads[worst] <= 1e-10, (worst, step_grads[worst])
        worst = max(report["data"], key=report["data"].get)
        assert report["data"][worst] <= 1e-10, (worst, report["data"][worst])


@pytest.mark.multiprocess
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sequence_parallel_tp2_with_experts_matches_one_process(dtype):
    # The packs' streams have odd lengths: the gathered stream ends in a pad row the balancing loss skips.
    steps = MOE_TOLERANCE[dtype][0]
    for report in run_on_ranks(_sequence_parallel_matches_one_process, 2, steps, dtype, MOE_CONFIG):
        assert_moe_matches(report, dtype)
