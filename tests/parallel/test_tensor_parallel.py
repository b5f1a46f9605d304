"""Tensor parallelism (megatron-core column/row-parallel linears) equals one process."""

import copy

import pytest
import torch

from megatron_cosmos3.data.synthetic_packs import random_pack
from megatron_cosmos3.model.mot import MoTModel
from megatron_cosmos3.parallel.sizes import ParallelSizes
from megatron_cosmos3.testing.distributed import run_on_ranks
from megatron_cosmos3.testing.training import tiny_mot_config
from megatron_cosmos3.training.flow_matching import FlowMatchingConfig, add_flow_matching_noise
from megatron_cosmos3.training.losses import mot_losses

CONFIG = tiny_mot_config()


def noised_pack(seed):
    g = torch.Generator().manual_seed(seed)
    return add_flow_matching_noise(random_pack(CONFIG, g, num_samples=5), FlowMatchingConfig(), g)


def _tensor_parallel_matches_one_process(rank, world_size, steps, dtype):
    from megatron_cosmos3.parallel.state import destroy_parallel, initialize_parallel
    from megatron_cosmos3.parallel.tensor_parallel import apply_tensor_parallel, finalize_tensor_parallel_grads
    from megatron_cosmos3.testing.reference import compare_to_reference

    groups = initialize_parallel(ParallelSizes(tensor=world_size), CONFIG)
    try:
        torch.manual_seed(0)
        reference = MoTModel(copy.deepcopy(CONFIG)).to(dtype)
        model = apply_tensor_parallel(copy.deepcopy(reference), groups)
        optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (reference, model)]
        report = {"losses": [], "grad": [], "data": None, "sharded": 0}
        for step in range(steps):
            batch, targets = noised_pack(step)
            losses = []
            for m, optimizer in zip((reference, model), optimizers):
                optimizer.zero_grad()
                loss = mot_losses(m, batch, targets)
                loss.total.backward()
                losses.append(float(loss.total.detach()))
            finalize_tensor_parallel_grads(model, groups)
            report["losses"].append(losses)
            report["grad"].append(compare_to_reference(model, reference, groups.tensor_rank, world_size))
            for optimizer in optimizers:
                optimizer.step()
        report["data"] = compare_to_reference(model, reference, groups.tensor_rank, world_size, what="data")
        report["sharded"] = sum(getattr(p, "tensor_model_parallel", False) for p in model.parameters())
        report["local_heads"] = model.layers[0].generator.self_attn.q_proj.weight.shape[0] // CONFIG.head_dim
        return report
    finally:
        destroy_parallel()


# fp64 shows the parallel math is exact; fp32 bounds the summation-order noise of row-parallel
# partial sums, which reaches ~1.2e-5 (norm-relative) on norm-weight gradients, a sum over all tokens.
GRADIENT_TOLERANCE = {torch.float64: 1e-10, torch.float32: 5e-5}


@pytest.mark.multiprocess
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_tp2_loss_gradients_and_steps_match_one_process(dtype):
    tolerance = GRADIENT_TOLERANCE[dtype]
    for report in run_on_ranks(_tensor_parallel_matches_one_process, 2, 3, dtype):
        assert report["sharded"] == CONFIG.num_layers * 2 * 7  # 7 linears per tower, 2 towers per layer
        assert report["local_heads"] == CONFIG.num_attention_heads // 2
        for reference_loss, parallel_loss in report["losses"]:
            assert parallel_loss == pytest.approx(reference_loss, rel=1e-5)
        for step_grads in report["grad"]:
            worst = max(step_grads, key=step_grads.get)
            assert step_grads[worst] <= tolerance, (worst, step_grads[worst])
        worst = max(report["data"], key=report["data"].get)
        assert report["data"][worst] <= tolerance, (worst, report["data"][worst])


def _ar_blind_under_tensor_parallel(rank, world_size):
    from megatron_cosmos3.parallel.state import destroy_parallel, initialize_parallel
    from megatron_cosmos3.parallel.tensor_parallel import apply_tensor_parallel

    groups = initialize_parallel(ParallelSizes(tensor=world_size), CONFIG)
    try:
        torch.manual_seed(0)
        model = apply_tensor_parallel(MoTModel(copy.deepcopy(CONFIG)), groups)
        batch, _ = noised_pack(0)
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
def test_reasoner_stays_blind_to_dm_inputs_under_tensor_parallel():
    for ar_same, logits_same, dm_same in run_on_ranks(_ar_blind_under_tensor_parallel, 2):
        assert ar_same and logits_same and not dm_same


def _sequence_parallel_matches_one_process(rank, world_size, steps):
    from megatron_cosmos3.parallel.context_parallel import sequence_parallel_losses
    from megatron_cosmos3.parallel.state import destroy_parallel, initialize_parallel
    from megatron_cosmos3.parallel.tensor_parallel import apply_tensor_parallel, finalize_tensor_parallel_grads
    from megatron_cosmos3.testing.reference import compare_to_reference

    groups = initialize_parallel(ParallelSizes(tensor=world_size, sequence_parallel=True), CONFIG)
    try:
        torch.manual_seed(0)
        reference = MoTModel(copy.deepcopy(CONFIG)).double()
        model = apply_tensor_parallel(copy.deepcopy(reference), groups)
        optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (reference, model)]
        report = {"losses": [], "grad": []}
        for step in range(steps):
            batch, targets = noised_pack(step)
            for optimizer in optimizers:
                optimizer.zero_grad()
            want = mot_losses(reference, batch, targets)
            want.total.backward()
            got = sequence_parallel_losses(model, batch, targets, groups.tensor)
            got.total.backward()
            finalize_tensor_parallel_grads(model, groups)
            report["losses"].append((float(want.total.detach()), float(got.total.detach())))
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
