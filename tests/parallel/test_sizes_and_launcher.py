import dataclasses

import pytest

from megatron_cosmos3.model.config import MoTConfig
from megatron_cosmos3.parallel.sizes import ParallelSizes
from megatron_cosmos3.testing.distributed import run_on_ranks

MODEL = MoTConfig(hidden_size=64, num_layers=4, num_attention_heads=4, num_kv_heads=2, head_dim=16, ffn_hidden_size=128)


@pytest.mark.parametrize(
    "sizes, world, message",
    [
        (
            ParallelSizes(tensor=2, pipeline=2),
            6,
            r"world_size=6 is not divisible by tensor\*pipeline\*context=2\*2\*1=4",
        ),
        (ParallelSizes(tensor=4), 4, "num_kv_heads=2 is not divisible by tensor=4"),
        (ParallelSizes(tensor=3), 3, "num_attention_heads=4 is not divisible by tensor=3"),
        (
            ParallelSizes(pipeline=2, virtual_pipeline=4),
            2,
            r"num_layers=4 is not divisible by pipeline\*virtual_pipeline",
        ),
        (ParallelSizes(virtual_pipeline=2), 1, "virtual_pipeline=2 needs pipeline > 1"),
        # Query heads split over context ranks; KV heads fewer than them are repeated (test_context_parallel).
        (ParallelSizes(tensor=2, context=4), 8, "num_attention_heads/tensor=2 is not divisible by context=4"),
        (ParallelSizes(expert=2), 2, "expert=2 needs a mixture-of-experts model"),
        (ParallelSizes(sequence_parallel=True), 1, "sequence_parallel=True needs tensor > 1"),
        (ParallelSizes(tensor=0), 1, "tensor=0 must be an int >= 1"),
        # Uneven pipeline stages (megatron-core's fields; MODEL has 4 layers).
        (
            ParallelSizes(num_layers_in_first_pipeline_stage=1),
            1,
            "num_layers_in_first_pipeline_stage=1 needs pipeline > 1",
        ),
        (  # the first stage holds the embeddings (and the ViT): it runs at least one layer
            ParallelSizes(pipeline=2, num_layers_in_first_pipeline_stage=0),
            2,
            "num_layers_in_first_pipeline_stage=0 must be an int >= 1",
        ),
        (
            ParallelSizes(pipeline=2, num_layers_in_last_pipeline_stage=-1),
            2,
            "num_layers_in_last_pipeline_stage=-1 must be an int >= 1",
        ),
        (
            ParallelSizes(pipeline=3, num_layers_in_first_pipeline_stage=1),
            3,
            r"num_layers=4 with num_layers_in_first_pipeline_stage=1 leaves 3 layers for the other 2 pipeline "
            r"ranks, not a positive multiple of their 2\*virtual_pipeline=2 chunks",
        ),
        (  # no middle rank left without layers (nor with fewer than none: megatron-core accepts this)
            ParallelSizes(pipeline=3, num_layers_in_first_pipeline_stage=3, num_layers_in_last_pipeline_stage=3),
            3,
            "leaves -2 layers for the other 1 pipeline ranks",
        ),
        (
            ParallelSizes(pipeline=2, num_layers_in_first_pipeline_stage=2, num_layers_in_last_pipeline_stage=1),
            2,
            "num_layers_in_first_pipeline_stage=2, num_layers_in_last_pipeline_stage=1 hold 3 layers, but "
            "num_layers=4 and pipeline=2 has no other rank",
        ),
        (  # interleaved: every chunk of the first rank takes the same number of layers
            ParallelSizes(pipeline=2, virtual_pipeline=2, num_layers_in_first_pipeline_stage=1),
            2,
            "num_layers_in_first_pipeline_stage=1 is not divisible by virtual_pipeline=2",
        ),
        (
            ParallelSizes(pipeline=3, virtual_pipeline=2, num_layers_in_first_pipeline_stage=2),
            3,
            r"leaves 2 layers for the other 2 pipeline ranks, not a positive multiple of their "
            r"2\*virtual_pipeline=4 chunks",
        ),
    ],
)
def test_invalid_layouts_name_the_offending_pair(sizes, world, message):
    with pytest.raises(ValueError, match=message):
        sizes.validate(world, MODEL)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["parallel.tensor=3", "model.num_attention_heads=6"], "num_kv_heads=2 is not divisible by tensor=3"),
        (["parallel.tensor=2", "model.ffn_hidden_size=63"], r"ffn_hidden_size=63 \(the dense MLPs of \['generator', "),
        (
            ["parallel.tensor=2", "model.ffn_hidden_size=63", "model.num_experts=2", "model.moe_ffn_hidden_size=16"]
            + ["model.moe_towers=[generator]"],
            r"ffn_hidden_size=63 \(the dense MLPs of \['reasoner'\]\) is not divisible by tensor=2",
        ),
        (["parallel.pipeline=2", "model.num_layers=3"], r"num_layers=3 is not divisible by pipeline\*virtual_pipeline"),
        (
            ["parallel.pipeline=2", "model.num_layers=3", "parallel.num_layers_in_last_pipeline_stage=0"],
            "num_layers_in_last_pipeline_stage=0 must be an int >= 1",
        ),
        # MQA under TP: refused (megatron-core would replicate the one KV head; our TP plan splits heads).
        (["parallel.tensor=2", "model.num_kv_heads=1"], "num_kv_heads=1 is not divisible by tensor=2"),
        (
            ["parallel.expert=2", "model.num_experts=3", "model.moe_top_k=1"],
            "num_experts=3 is not divisible by expert=2",
        ),
        (["model.num_experts=2", "model.moe_top_k=3"], r"moe_top_k=3 must be in \[1, num_experts=2\]"),
        # Interleaved 1F1B takes micro-batches in groups of `pipeline`: refused in the first step before.
        (
            ["parallel.pipeline=2", "parallel.virtual_pipeline=2", "model.num_layers=4"],
            r"optimizer.micro_batches_per_step=1 \(per data-parallel rank\) is not a multiple of parallel.pipeline=2",
        ),
    ],
)
def test_a_layout_the_model_can_never_take_is_refused_when_the_config_loads(overrides, message):
    """Before any launch or world size: the training config itself refuses it, naming field and value."""
    from megatron_cosmos3.testing.training import TINY_MODEL
    from megatron_cosmos3.training.config import load_config

    with pytest.raises(ValueError, match=message):
        load_config(None, [*TINY_MODEL, *overrides])


def test_the_dense_mlp_width_is_not_split_where_every_tower_routes_through_experts():
    """ffn_hidden_size sizes no MLP when both towers are mixtures of experts (their experts are
    moe_ffn_hidden_size wide): TP=2 was refused for an odd value nothing splits."""
    from megatron_cosmos3.testing.training import TINY_MODEL
    from megatron_cosmos3.training.config import load_config

    experts = ["model.num_experts=2", "model.moe_ffn_hidden_size=16", "parallel.tensor=2"]
    load_config(None, [*TINY_MODEL, "model.ffn_hidden_size=63", *experts])
    with pytest.raises(ValueError, match=r"moe_ffn_hidden_size=63 \(num_experts=2\) is not divisible by tensor=2"):
        load_config(None, [*TINY_MODEL, "model.ffn_hidden_size=63", *experts, "model.moe_ffn_hidden_size=0"])


def test_fewer_kv_heads_per_tensor_rank_than_context_ranks_is_a_valid_layout():
    """One KV head per tensor rank (MQA, or the Super config's 8 KV heads at TP=8) under CP=2: the
    Ulysses exchange repeats the KV heads (it was refused: kv_heads/tensor not divisible by context)."""
    ParallelSizes(tensor=2, context=2).validate(4, MODEL)
    ParallelSizes(context=2).validate(2, dataclasses.replace(MODEL, num_kv_heads=1))


def test_valid_layout_derives_data_parallel_size():
    sizes = ParallelSizes(tensor=2, pipeline=2)
    sizes.validate(8, MODEL)
    assert sizes.data(8) == 2


def _rank_and_sum(rank, world_size, offset):
    import torch
    import torch.distributed as dist

    value = torch.tensor([float(rank + offset)])
    dist.all_reduce(value)
    return rank, float(value)


def _fail_on_rank_one(rank, world_size):
    if rank == 1:
        raise ValueError("rank one is broken")
    return rank


@pytest.mark.multiprocess
def test_launcher_runs_real_gloo_ranks_and_reports_failures(tmp_path, monkeypatch):
    """A failing rank's error file (torch's ``pytorch-errorfile-*``) is left in no temporary folder."""
    import tempfile

    assert run_on_ranks(_rank_and_sum, 3, 10) == [(0, 33.0), (1, 33.0), (2, 33.0)]
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.raises(RuntimeError, match="rank one is broken"):
        run_on_ranks(_fail_on_rank_one, 2)
    assert list(tmp_path.iterdir()) == []


def _frozen_and_collected(rank, world_size):
    import gc
    import time

    start = time.process_time()
    gc.collect()
    return gc.get_freeze_count(), time.process_time() - start


@pytest.mark.multiprocess
def test_a_rank_leaves_the_fork_servers_imports_out_of_its_garbage_collections():
    """The objects a rank inherits (torch, megatron-core, MLflow, transformers: the fork server's
    preloads) are frozen, so a full collection (DeepSpeed's ZeRO-3 set-up calls one per engine)
    does not walk them: it took half a second of CPU each."""
    import gc
    import time

    ((frozen, seconds),) = run_on_ranks(_frozen_and_collected, 1)
    assert frozen > 100_000, frozen  # torch alone is hundreds of thousands of objects
    gc.unfreeze()  # a test that ran run_training in this process (it freezes) may have come first
    start = time.process_time()
    gc.collect()  # control: here nothing is frozen, and a collection walks them all
    assert gc.get_freeze_count() == 0 and seconds < time.process_time() - start, seconds


@pytest.mark.multiprocess
def test_a_rendezvous_port_taken_before_the_ranks_bind_it_is_replaced(monkeypatch):
    """Another process listens on the chosen port (as a concurrent test can, between choosing and
    binding): the ranks start again on a new port."""
    import socket

    from megatron_cosmos3.testing import distributed

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        ports = [taken.getsockname()[1], distributed.free_port()]
        monkeypatch.setattr(distributed, "free_port", lambda: ports.pop(0))
        assert run_on_ranks(_rank_and_sum, 2, 0) == [(0, 1.0), (1, 1.0)]
        assert ports == []


def _group_coordinates(rank, world_size):
    from megatron_cosmos3.parallel.state import destroy_parallel, initialize_parallel

    groups = initialize_parallel(ParallelSizes(tensor=2, pipeline=2), MODEL)
    try:
        return (groups.tensor_rank, groups.pipeline_rank, groups.data_rank, groups.data_size)
    finally:
        destroy_parallel()


def test_tearing_down_groups_never_made_imports_no_megatron(monkeypatch):
    """One unlaunched process made no megatron-core groups: destroy_parallel does not import
    megatron-core (seconds of CPU) to destroy nothing; where it is imported, the groups are destroyed."""
    import sys
    from types import SimpleNamespace

    from megatron_cosmos3.parallel import state

    destroyed = []
    monkeypatch.setattr(state, "_parallel_state", lambda: pytest.fail("megatron-core imported to destroy nothing"))
    monkeypatch.delitem(sys.modules, "megatron.core.parallel_state", raising=False)
    state.destroy_parallel()
    monkeypatch.setitem(sys.modules, "megatron.core.parallel_state", object())  # imported: groups may exist
    monkeypatch.setattr(
        state, "_parallel_state", lambda: SimpleNamespace(destroy_model_parallel=lambda: destroyed.append(1))
    )
    state.destroy_parallel()
    assert destroyed == [1]


@pytest.mark.multiprocess
def test_groups_follow_megatron_order_tensor_fastest_pipeline_slowest():
    coordinates = run_on_ranks(_group_coordinates, 8)
    # tp-cp-ep-dp-pp: rank = tp + 2 * dp + 4 * pp
    assert coordinates == [(r % 2, r // 4, (r // 2) % 2, 2) for r in range(8)]


def _plain_data_parallel_groups(rank, world_size):
    """The members of every group (and the ranks) that plain data parallelism gets, made by torch,
    beside those megatron-core's ``initialize_model_parallel`` makes for the same sizes."""
    import torch.distributed as dist

    from megatron_cosmos3.parallel import state

    def members(groups):
        return {
            field.name: dist.get_process_group_ranks(value) if isinstance(value, dist.ProcessGroup) else value
            for field in dataclasses.fields(groups)
            if field.name != "sizes" and (value := getattr(groups, field.name)) is not None
        }

    sizes = ParallelSizes()
    made_by_torch = state.initialize_parallel(sizes, MODEL, timeout_s=60)
    try:
        made_by_megatron = state._megatron_groups(sizes, 60)
    finally:
        state.destroy_parallel()
    groups = [value for value in vars(made_by_torch).values() if isinstance(value, dist.ProcessGroup)]
    return members(made_by_torch), members(made_by_megatron), len({id(group) for group in groups}) == len(groups)


@pytest.mark.multiprocess
def test_plain_data_parallel_groups_are_megatrons_without_megatron_core():
    """Plain data parallelism's groups come from torch (no megatron-core import at start-up), with
    the members and ranks megatron-core gives the same sizes, and a group of its own for each role."""
    ranks = run_on_ranks(_plain_data_parallel_groups, 3)
    for rank, (made_by_torch, made_by_megatron, each_its_own) in enumerate(ranks):
        assert made_by_torch == made_by_megatron
        assert made_by_torch["data"] == [0, 1, 2] and made_by_torch["tensor"] == [rank]  # not vacuous
        assert made_by_torch["data_rank"] == rank
        assert each_its_own
