"""Data parallelism (DDP + sharded optimizer state), alone and under tensor parallelism, equals one process."""

import contextlib
import copy

import pytest
import torch

from megatron_cosmos3.data.synthetic_packs import random_pack
from megatron_cosmos3.model.moe import set_aux_loss_scale
from megatron_cosmos3.model.mot import MoTModel
from megatron_cosmos3.objectives.flow_matching import FlowMatchingConfig, add_flow_matching_noise
from megatron_cosmos3.objectives.losses import mot_losses
from megatron_cosmos3.parallel.sizes import ParallelSizes
from megatron_cosmos3.testing.distributed import run_on_ranks
from megatron_cosmos3.testing.training import tiny_mot_config

CONFIG = tiny_mot_config()


MOE_CONFIG = copy.deepcopy(CONFIG)
MOE_CONFIG.num_experts, MOE_CONFIG.moe_top_k = 4, 2


def micro_batch(step, data_rank):
    g = torch.Generator().manual_seed(1000 * step + data_rank)
    return add_flow_matching_noise(random_pack(CONFIG, g, num_samples=4), FlowMatchingConfig(), g)


def _data_parallel_matches_one_process(rank, world_size, tensor, steps, expert=1):
    from megatron_cosmos3.parallel.data_parallel import build_optimizer, wrap_data_parallel
    from megatron_cosmos3.parallel.expert_parallel import apply_expert_parallel, finalize_expert_grads
    from megatron_cosmos3.parallel.state import destroy_parallel, initialize_parallel
    from megatron_cosmos3.parallel.tensor_parallel import apply_tensor_parallel, finalize_tensor_parallel_grads
    from megatron_cosmos3.testing.reference import compare_to_reference

    config = MOE_CONFIG if expert > 1 else CONFIG
    groups = initialize_parallel(ParallelSizes(tensor=tensor, expert=expert), config, config.num_experts)
    try:
        torch.manual_seed(0)
        reference = MoTModel(copy.deepcopy(config)).double()
        model = apply_expert_parallel(apply_tensor_parallel(copy.deepcopy(reference), groups), groups)
        set_aux_loss_scale(reference, 1 / groups.data_size)  # it backpropagates loss / data_size
        expert_rank = torch.distributed.get_rank(groups.expert)
        wrapped = wrap_data_parallel(model, groups)
        optimizer = build_optimizer(model.parameters(), groups, lr=1e-2)
        reference_optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.0)
        report = {"losses": [], "grad": [], "state_numel": 0}
        for step in range(steps):
            # The reference accumulates every data-parallel rank's micro-batch.
            reference_optimizer.zero_grad()
            reference_total = 0.0
            for data_rank in range(groups.data_size):
                batch, targets = micro_batch(step, data_rank)
                loss = mot_losses(reference, batch, targets)
                (loss.total / groups.data_size).backward()
                reference_total += float(loss.total.detach()) / groups.data_size
            optimizer.zero_grad()
            batch, targets = micro_batch(step, groups.data_rank)
            loss = mot_losses(wrapped, batch, targets)
            loss.total.backward()
            finalize_tensor_parallel_grads(model, groups)
            finalize_expert_grads(model, groups)
            report["losses"].append((reference_total, float(loss.total.detach()), groups.data_rank))
            report["grad"].append(
                compare_to_reference(
                    model, reference, groups.tensor_rank, tensor, expert_rank=expert_rank, expert_size=expert
                )
            )
            optimizer.step()
            reference_optimizer.step()
        report["data"] = compare_to_reference(
            model, reference, groups.tensor_rank, tensor, what="data", expert_rank=expert_rank, expert_size=expert
        )
        from megatron_cosmos3.checkpoint.sharded_state import local_optimizers

        report["state_numel"] = sum(
            s["exp_avg"].numel() for o in local_optimizers(optimizer) for s in o.state.values() if s
        )
        report["param_numel"] = sum(p.numel() for p in model.parameters())
        return report
    finally:
        destroy_parallel()


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    "world_size, tensor, expert", [(2, 1, 1), (4, 2, 1), (2, 1, 2)], ids=["dp2", "tp2xdp2", "moe-ep2xdp2"]
)
def test_data_parallel_with_sharded_optimizer_matches_one_process(world_size, tensor, expert):
    reports = run_on_ranks(_data_parallel_matches_one_process, world_size, tensor, 3, expert)
    for report in reports:
        for step_grads in report["grad"]:
            worst = max(step_grads, key=step_grads.get)
            assert step_grads[worst] <= 1e-10, (worst, step_grads[worst])
        worst = max(report["data"], key=report["data"].get)
        assert report["data"][worst] <= 1e-10, (worst, report["data"][worst])
        # The optimizer state is sharded: each rank holds about half of it, never all.
        assert 0 < report["state_numel"] < report["param_numel"]
    # Each rank's loss is its micro-batch's; their mean is the reference's accumulated loss.
    for step in range(3):
        by_data_rank = {r["losses"][step][2]: r["losses"][step][1] for r in reports}
        reference = reports[0]["losses"][step][0]
        assert sum(by_data_rank.values()) / len(by_data_rank) == pytest.approx(reference, rel=1e-12)


def _ranks_with_and_without_dm_targets(rank, world_size):
    from megatron_cosmos3.parallel.data_parallel import wrap_data_parallel
    from megatron_cosmos3.parallel.state import destroy_parallel, initialize_parallel

    groups = initialize_parallel(ParallelSizes(), CONFIG)
    try:
        torch.manual_seed(0)
        model = MoTModel(copy.deepcopy(CONFIG))
        wrapped = wrap_data_parallel(model, groups)
        g = torch.Generator().manual_seed(rank)
        tasks = ("understanding",) if rank == 0 else ("text_to_video", "policy")
        batch, targets = add_flow_matching_noise(random_pack(CONFIG, g, 3, tasks=tasks), FlowMatchingConfig(), g)
        for _ in range(2):
            mot_losses(wrapped, batch, targets).total.backward()
        return float(model.layers[0].generator.mlp.up_proj.weight.grad.abs().sum())
    finally:
        destroy_parallel()


@pytest.mark.multiprocess
def test_a_rank_whose_pack_has_no_dm_targets_does_not_hang_ddp():
    """Rank 0 trains on text only: the generator is reachable from its outputs but not its loss."""
    grads = run_on_ranks(_ranks_with_and_without_dm_targets, 2, timeout_s=120)
    assert grads[0] == grads[1] > 0  # rank 1's generator gradient, averaged onto both


def _reducer_averages_while_backward_runs(rank, world_size):
    import torch.distributed as dist

    from megatron_cosmos3.parallel.data_parallel import GradientReducer

    torch.manual_seed(0)
    # Six parameters; rank 0 never uses "b", no rank uses "c", "late" is reduced at finish only.
    params = {name: torch.nn.Parameter(torch.randn(64, 64)) for name in ("a", "b", "c", "d", "e", "late")}
    reducer = GradientReducer(params.values(), dist.group.WORLD, bucket_mb=64 * 64 * 4 / 2**20, late=[params["late"]])
    g = torch.Generator().manual_seed(10 + rank)
    inputs = [torch.randn(64, generator=g) for _ in range(2)]

    def loss_of(x):
        used = ["a", "d", "e", "late"] + (["b"] if rank == 1 else [])
        return sum((params[n] @ x).square().sum() * (i + 1) for i, n in enumerate(used))

    loss_of(inputs[0]).backward()  # the first micro-batch: gradients accumulate, nothing is sent
    assert reducer._next == 0
    reducer.arm()
    loss_of(inputs[1]).backward()
    local = {n: (p.grad.clone() if p.grad is not None else None) for n, p in params.items()}
    started_before_finish = reducer._next
    reducer.finish()
    reducer.close()
    return {
        "local": local,
        "reduced": {n: p.grad for n, p in params.items()},
        "started_before_finish": started_before_finish,
        "buckets": len(reducer.buckets),
    }


@pytest.mark.multiprocess
def test_gradient_reducer_averages_like_ddp_and_starts_buckets_during_backward():
    reports = run_on_ranks(_reducer_averages_while_backward_runs, 2)
    for report in reports:
        assert report["buckets"] == 6  # one parameter per bucket at this bucket size
        # Buckets in reverse parameter order: [e], [d], [c], [b], [a], [late]. "e" and "d" start as
        # the backward completes them; "c" is used by no rank, so it and the buckets after it
        # (kept in order on every rank) wait for finish.
        assert report["started_before_finish"] == 2
        reduced = report["reduced"]
        assert reduced["c"] is None  # used by no rank: stays None, as in one process
        for name in ("a", "b", "d", "e", "late"):
            parts = [r["local"][name] if r["local"][name] is not None else torch.zeros(64, 64) for r in reports]
            assert torch.allclose(reduced[name], sum(parts) / 2, rtol=1e-6, atol=1e-6), name
    assert reports[0]["local"]["b"] is None and reports[0]["reduced"]["b"] is not None


def test_megatron_gradients_refuse_groups_made_without_megatron_core():
    """Plain data parallelism's groups come from torch, and megatron-core's DDP would find its
    parallel state empty: MegatronGradients names the setting instead of megatron's assertion."""
    import dataclasses

    from megatron_cosmos3.parallel.data_parallel import MegatronGradients
    from megatron_cosmos3.parallel.state import ParallelGroups

    fields = {field.name: None for field in dataclasses.fields(ParallelGroups)}
    fields.update(sizes=ParallelSizes(), tensor_rank=0, pipeline_rank=0, context_rank=0, data_rank=0, data_size=1)
    with pytest.raises(ValueError, match=r"parallel.ddp_impl='megatron'.* ddp_impl='torch'"):
        MegatronGradients(MoTModel(copy.deepcopy(CONFIG)), ParallelGroups(**fields))


def _megatron_ddp_against_torch_ddp(rank, world_size):
    """Two steps of two micro-batches through torch's DDP and megatron-core's (MegatronGradients),
    fp64, the same packs per rank: rank 0's packs hold no DM targets, so parameters go unused on one
    rank (the action heads on both). Then megatron with overlapped buckets on packs that use every
    trained parameter. Returns both sets of gradients per step."""
    from torch.nn.parallel import DistributedDataParallel

    from megatron_cosmos3.parallel.data_parallel import MegatronGradients
    from megatron_cosmos3.parallel.state import destroy_parallel, initialize_parallel

    groups = initialize_parallel(ParallelSizes(ddp_impl="megatron"), CONFIG)  # megatron-core's groups
    try:
        torch.manual_seed(0)
        reference = MoTModel(copy.deepcopy(CONFIG)).double()
        model = copy.deepcopy(reference)
        torch_ddp = DistributedDataParallel(
            reference, process_group=groups.data_and_context, find_unused_parameters=True
        )
        megatron = MegatronGradients(model, groups, overlap=False)

        def steps(wrapped, start_step, tasks):
            grads = []
            for step in range(2):
                wrapped.module.zero_grad(set_to_none=True)
                if start_step is not None:
                    start_step()
                for micro in range(2):
                    g = torch.Generator().manual_seed(100 * step + 10 * micro + rank)
                    batch, targets = add_flow_matching_noise(
                        random_pack(CONFIG, g, 3, tasks=tasks), FlowMatchingConfig(), g
                    )
                    sync = wrapped.no_sync() if micro == 0 else contextlib.nullcontext()
                    with sync:
                        (mot_losses(wrapped, batch, targets).total / 2).backward()
                grads.append(
                    {n: None if p.grad is None else p.grad.clone() for n, p in wrapped.module.named_parameters()}
                )
                if start_step is not None:
                    megatron.finish()
                    grads[-1] = {
                        n: None if p.grad is None else p.grad.clone() for n, p in wrapped.module.named_parameters()
                    }
            return grads

        tasks = ("understanding",) if rank == 0 else ("video_to_audio", "text_to_video")
        report = {"torch": steps(torch_ddp, None, tasks), "megatron": steps(megatron.ddp, megatron.start_step, tasks)}
        megatron.close()
        # Overlapped buckets: every step uses every trained parameter (the action heads frozen).
        torch.manual_seed(0)
        overlapped = MoTModel(copy.deepcopy(CONFIG)).double()
        for name, param in overlapped.named_parameters():
            param.requires_grad_(not name.startswith("dm_streams.action_"))
        megatron = MegatronGradients(overlapped, groups, overlap=True)
        report["overlapped"] = steps(megatron.ddp, megatron.start_step, ("video_to_audio",))
        report["overlapped_buckets"] = len(megatron.ddp.bucket_groups)
        return report
    finally:
        destroy_parallel()


@pytest.mark.multiprocess
def test_megatron_ddp_gives_torch_ddps_gradients_and_none_where_no_rank_used_a_parameter():
    reports = run_on_ranks(_megatron_ddp_against_torch_ddp, 2)
    for report in reports:
        for want, got in zip(report["torch"], report["megatron"], strict=True):
            assert want.keys() == got.keys()
            for name in want:
                assert (want[name] is None) == (got[name] is None), name
                if want[name] is not None:
                    torch.testing.assert_close(got[name], want[name], rtol=1e-12, atol=1e-15, msg=name)
        last = report["torch"][-1]
        assert last["dm_streams.action_in.single_arm.weight"] is None  # no rank used it
        assert last["layers.0.generator.self_attn.q_proj.weight"].abs().sum() > 0  # rank 1 did
    for step in range(2):  # overlapped: the same average on both ranks, every trained parameter set
        a, b = (report["overlapped"][step] for report in reports)
        for name in a:
            assert (a[name] is None) == name.startswith("dm_streams.action_"), name
            if a[name] is not None:
                assert torch.equal(a[name], b[name]), name
    assert reports[0]["torch"][0]["embed_tokens.weight"] is not None


def test_megatron_ddp_settings_translate_and_bad_choices_are_named():
    from megatron_cosmos3.parallel.data_parallel import megatron_ddp_config
    from megatron_cosmos3.training.config import load_config

    settings = megatron_ddp_config(bucket_cap_mb=4.0, overlap_grad_reduce=True)
    assert settings.overlap_grad_reduce and not settings.use_distributed_optimizer
    assert settings.bucket_size == 2**20 and not settings.grad_reduce_in_fp32 and not settings.average_in_collective
    assert not megatron_ddp_config(overlap_grad_reduce=False).overlap_grad_reduce
    with pytest.raises(ValueError, match="ddp_impl='nccl' is not one of"):
        ParallelSizes(ddp_impl="nccl").validate(2, CONFIG)
    with pytest.raises(ValueError, match="ddp_impl='megatron' wraps one whole forward per micro-batch; pipeline=2"):
        ParallelSizes(ddp_impl="megatron", pipeline=2).validate(2, CONFIG)
    ParallelSizes(ddp_impl="megatron", tensor=2).validate(4, CONFIG)
    with pytest.raises(ValueError, match="parallel.ddp_impl='megatron' is engine=megatron's; engine='deepspeed'"):
        load_config(None, ["engine=deepspeed", "parallel.ddp_impl=megatron"])
