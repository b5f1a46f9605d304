"""A CPU run whose model state cannot fit in the host's memory is refused by name before anything is
allocated (docs/DESIGN.md, "Host memory"), and the estimate it is refused by never exceeds what a
model really takes."""

from __future__ import annotations

import re
import resource

import pytest
import torch

from megatron_cosmos3.model.mot import MoTModel
from megatron_cosmos3.parallel.pipeline import split_model
from megatron_cosmos3.testing.training import TINY_MODEL, TINY_VIT
from megatron_cosmos3.training.config import load_config
from megatron_cosmos3.training.distributed import DistributedContext
from megatron_cosmos3.training.host_memory import (
    GiB,
    HostMemoryError,
    available_host_bytes,
    cgroup_room,
    model_state_bytes,
)
from megatron_cosmos3.training.train import build_run

# 2 x 4M x 64k embedding and head parameters: at least 8 TB of weights, gradients and AdamW moments.
HUGE = [*TINY_MODEL, "model.vocab_size=4194304", "model.hidden_size=65536", "synthetic.tasks=[understanding]"]


def test_a_model_over_the_hosts_memory_is_refused_naming_the_estimate_before_allocating(tmp_path):
    config = load_config(None, [*HUGE, f"checkpoint.directory={tmp_path}"])
    need, (available, _) = model_state_bytes(config, 1), available_host_bytes()
    if need <= available:
        pytest.skip(f"this host has {available / GiB:.0f} GiB available")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(HostMemoryError) as refused:
        build_run(config, DistributedContext(0, 1, 0, torch.device("cpu")))
    message = str(refused.value)
    assert f"take at least {need / GiB:.1f} GiB of host memory" in message, message
    assert "model.num_layers=2, hidden_size=65536, vocab_size=4194304" in message
    assert "GiB available (" in message, message
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 256 * 1024, "refused after allocating"


@pytest.mark.parametrize(
    "settings",
    [(), ("parallel.tensor=2",), ("engine=deepspeed", "deepspeed.zero_stage=3"), ("stage.freeze=[layers.*]",)],
)
def test_the_estimate_is_at_most_what_a_model_takes(settings):
    """The tiny model's real weights, gradients and two AdamW moments (fp32) on one rank bound the
    estimate from above under every engine and layout setting; splitting the model lowers it."""
    config = load_config(None, [*TINY_MODEL, *settings])
    real = 16 * sum(p.numel() for p in MoTModel(config.model).parameters())
    world = 2 if settings and settings[0].startswith("parallel.tensor") else 1
    assert 0 < model_state_bytes(config, world) <= real
    assert model_state_bytes(config, 2) <= model_state_bytes(config, 1)


@pytest.mark.parametrize(
    "layout",
    [
        (*TINY_VIT, "parallel.pipeline=4"),
        # Uneven stages: the first holds one layer of four, fewer than the two an even split gives it.
        ("parallel.pipeline=2", "parallel.num_layers_in_first_pipeline_stage=1"),
        # Interleaved: two layers of six on the first rank, one per chunk.
        (
            *("model.num_layers=6", "parallel.pipeline=2", "parallel.virtual_pipeline=2"),
            *("optimizer.micro_batches_per_step=2", "parallel.num_layers_in_first_pipeline_stage=2"),
        ),
    ],
)
def test_every_pipeline_stage_holds_at_least_the_estimate(layout):
    """Under pipeline parallelism the end stages hold the embeddings, heads and ViT, a middle stage
    its layers alone, and the stages may hold different numbers of layers: a rank's estimate is at
    most what the smallest stage's weights, gradients and AdamW moments (fp32) really take."""
    config = load_config(None, [*TINY_MODEL, "model.num_layers=4", *layout])
    model = MoTModel(config.model)
    pipeline = config.parallel.pipeline

    def held(rank: int) -> int:  # each parameter once: a tied one may appear in two chunks
        return sum(
            {
                id(p): p.numel() for chunk in split_model(model, config.parallel, rank) for p in chunk.parameters()
            }.values()
        )

    smallest = min(held(rank) for rank in range(pipeline))
    estimate = model_state_bytes(config, pipeline)
    assert 0 < estimate <= 16 * smallest, (estimate, 16 * smallest)


def _write(path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.mark.parametrize("version", [1, 2])
def test_the_tightest_cgroup_above_this_process_bounds_what_is_available(tmp_path, version):
    """A SLURM job's or a container's memory limit, set on a cgroup above this process's own (which
    has none), bounds what is available; its page cache counts as free (the kernel reclaims it)."""
    proc, cgroups = tmp_path / "proc", tmp_path / "cgroup"
    _write(proc / "meminfo", f"MemTotal: {200 << 20} kB\nMemAvailable: {100 << 20} kB\n")
    if version == 2:
        _write(proc / "self" / "cgroup", "0::/slurm/job_7/step_0\n")
        job, step = cgroups / "slurm" / "job_7", cgroups / "slurm" / "job_7" / "step_0"
        _write(step / "memory.max", "max\n")
        files = ("memory.max", "memory.current", "file")
    else:
        _write(proc / "self" / "cgroup", "5:cpu,cpuacct:/job_7\n4:memory:/slurm/job_7/step_0\n")
        job = cgroups / "memory" / "slurm" / "job_7"
        _write(cgroups / "memory" / "memory.limit_in_bytes", "9223372036854771712\n")  # none at the root
        files = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_cache")
    _write(job / files[0], f"{8 * GiB}\n")
    _write(job / files[1], f"{6 * GiB}\n")
    _write(job / "memory.stat", f"anon {3 * GiB}\n{files[2]} {3 * GiB}\n")
    available, source = available_host_bytes(proc, cgroups)
    assert available == 5 * GiB, (available / GiB, source)
    assert source == "the limit of cgroup /slurm/job_7 (8.0 GiB) less its use", source
    assert cgroup_room(tmp_path / "nowhere", cgroups) is None  # no cgroup file: MemAvailable alone
    _write(job / files[0], "max\n" if version == 2 else "9223372036854771712\n")
    assert available_host_bytes(proc, cgroups) == (100 * GiB, "MemAvailable in /proc/meminfo")


def test_the_ranks_torchrun_starts_on_this_host_share_its_memory(monkeypatch):
    """Each rank's estimate fits, two do not: with LOCAL_WORLD_SIZE=2 the run is refused naming
    both (each rank compared its own share with the whole host, and two could not fit)."""
    from megatron_cosmos3.training import host_memory

    config = load_config(None, list(TINY_MODEL))
    each = model_state_bytes(config, 2)
    monkeypatch.setattr(host_memory, "available_host_bytes", lambda: (each * 3 // 2, "a test's figure"))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    host_memory.check_host_memory(config, 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(HostMemoryError, match=r"this host's 2 ranks' weights and optimizer state take at least"):
        host_memory.check_host_memory(config, 2)


# srun starting one task per rank (no torchrun): SLURM's step variables on the second of two nodes.
SRUN_RANK = {
    "SLURM_NTASKS": "7",
    "SLURM_STEP_NUM_TASKS": "7",
    "SLURM_PROCID": "5",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "1",
}


@pytest.mark.parametrize(
    "environ, ranks",
    [
        ({**SRUN_RANK, "SLURM_STEP_TASKS_PER_NODE": "4(x2)"}, 4),
        ({**SRUN_RANK, "SLURM_STEP_TASKS_PER_NODE": "3,2(x2)"}, 2),
        ({**SRUN_RANK, "SLURM_NODEID": "0", "SLURM_STEP_TASKS_PER_NODE": "3,2(x2)"}, 3),
        # the step's list wins over the allocation's, which may differ (srun -n)
        ({**SRUN_RANK, "SLURM_STEP_TASKS_PER_NODE": "2(x2)", "SLURM_TASKS_PER_NODE": "8(x2)"}, 2),
        ({**SRUN_RANK, "SLURM_TASKS_PER_NODE": "4(x2)"}, 4),
        ({**SRUN_RANK, "SLURM_NTASKS_PER_NODE": "4"}, 4),
        # one torchrun a node under srun: torchrun's count, not srun's one task
        ({**SRUN_RANK, "SLURM_STEP_TASKS_PER_NODE": "1(x2)", "LOCAL_WORLD_SIZE": "8", "WORLD_SIZE": "16"}, 8),
        (
            {"SLURM_NTASKS": "1", "SLURM_STEP_NUM_TASKS": "1", "SLURM_STEP_TASKS_PER_NODE": "1"},
            1,
        ),  # one task: no srun world
        ({"SLURM_NTASKS": "4", "SLURM_TASKS_PER_NODE": "4"}, 1),  # the batch script of --ntasks=4: one process
        ({}, 1),
    ],
)
def test_the_ranks_srun_starts_on_this_node_are_counted_from_slurms_variables(environ, ranks):
    """Ranks srun starts one task each (no LOCAL_WORLD_SIZE) were counted as one per host: this
    node's entry of SLURM's tasks-per-node list ("4(x2)": two nodes of 4), or SLURM_NTASKS_PER_NODE."""
    from megatron_cosmos3.training.host_memory import ranks_on_this_host

    assert ranks_on_this_host(environ) == ranks


@pytest.mark.parametrize(
    "changes, error",
    [
        ({"SLURM_STEP_TASKS_PER_NODE": "4(2)"}, "SLURM_STEP_TASKS_PER_NODE='4(2)': not SLURM's tasks per node"),
        ({"SLURM_STEP_TASKS_PER_NODE": "4(x2)", "SLURM_NODEID": "2"}, "SLURM_NODEID='2': no node of"),
        ({"SLURM_NTASKS_PER_NODE": "four"}, "SLURM_NTASKS_PER_NODE='four': not a number of tasks"),
    ],
)
def test_a_slurm_variable_not_in_slurms_format_is_named(changes, error):
    from megatron_cosmos3.training.host_memory import ranks_on_this_host

    with pytest.raises(ValueError, match=re.escape(error)):
        ranks_on_this_host({**SRUN_RANK, **changes})


def test_the_ranks_srun_starts_on_this_host_share_its_memory(monkeypatch):
    """Two ranks srun started on this node, each fitting alone, are refused together."""
    from megatron_cosmos3.training import host_memory

    config = load_config(None, list(TINY_MODEL))
    each = model_state_bytes(config, 4)
    monkeypatch.setattr(host_memory, "available_host_bytes", lambda: (each * 3 // 2, "a test's figure"))
    for name in ("LOCAL_WORLD_SIZE", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in {
        **SRUN_RANK,
        "SLURM_NTASKS": "4",
        "SLURM_STEP_NUM_TASKS": "4",
        "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
    }.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(HostMemoryError, match=r"this host's 2 ranks' weights and optimizer state take at least"):
        host_memory.check_host_memory(config, 4)
