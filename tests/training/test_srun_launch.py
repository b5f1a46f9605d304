"""Ranks srun starts itself, one task per rank (no torchrun): their rank, world and rendezvous come
from SLURM's step variables (docs/DESIGN.md, "Preemption and requeue", launch). SLURM's variables
as env dicts, as a real srun step and batch script set them (22.05)."""

from __future__ import annotations

import re

import pytest

from megatron_cosmos3.testing.training import TINY_MODEL
from megatron_cosmos3.training.distributed import (
    PORT_BASE,
    PORT_SPAN,
    cluster_port_offset,
    first_host,
    gpu_index,
    launcher_env,
    slurm_port,
    srun_world,
    started_by_srun,
)
from megatron_cosmos3.training.train import checked_config, parse_args

# Task 1 of `srun --ntasks=2` in job 5 on node "vm".
SRUN_TASK = {
    "SLURM_JOB_ID": "5",
    "SLURM_PROCID": "1",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "0",
    "SLURM_NTASKS": "2",
    "SLURM_STEP_NUM_TASKS": "2",
    "SLURM_STEP_NODELIST": "vm",
    "SLURM_JOB_NODELIST": "vm",
}
# The batch script of `sbatch --ntasks=2`: the allocation's task count, no step.
BATCH_SCRIPT = {"SLURM_JOB_ID": "5", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "2"}


def test_a_process_the_batch_script_runs_without_srun_is_one_process_not_rank_0_of_the_allocation():
    """It was taken for rank 0 of SLURM_NTASKS and waited for ranks that never start (or, without
    MASTER_ADDR, was refused as an srun launch)."""
    assert not started_by_srun(BATCH_SCRIPT)
    assert started_by_srun(SRUN_TASK)
    assert not started_by_srun({**SRUN_TASK, "WORLD_SIZE": "2"})  # torchrun under srun: torchrun's world
    assert not started_by_srun({**SRUN_TASK, "SLURM_STEP_NUM_TASKS": "1"})


def test_an_srun_rank_finds_rank_0s_node_and_a_port_of_its_job():
    """MASTER_ADDR was required by hand (and MASTER_PORT was 29500 for every job on a node)."""
    assert srun_world(SRUN_TASK) == (1, 2, 1, "vm", "20005")
    two_nodes = {**SRUN_TASK, "SLURM_JOB_ID": "123456", "SLURM_STEP_NODELIST": "gpu[07-08]"}
    assert srun_world(two_nodes) == (1, 2, 1, "gpu07", "28544")  # 20000 + 123456 % 12768
    chosen = {**SRUN_TASK, "MASTER_ADDR": "head", "MASTER_PORT": "29999"}
    assert srun_world(chosen)[3:] == ("head", "29999")
    no_step_list = {k: v for k, v in SRUN_TASK.items() if k != "SLURM_STEP_NODELIST"}
    assert srun_world({**no_step_list, "SLURM_JOB_NODELIST": "n[3,5]"})[3] == "n3"


def test_two_steps_of_a_job_and_neighbouring_jobs_meet_on_ports_of_their_own_below_the_ephemeral_range():
    """The port came from the job id alone (20000 + id % 20000): two srun steps of one job running at
    once derived the same, and ids ending in 12768-19999 gave ports in Linux's ephemeral range
    (32768-60999), where any outgoing connection may hold them."""
    step_1 = {**SRUN_TASK, "SLURM_STEP_ID": "1"}
    assert srun_world(step_1)[4] == str(20000 + (5 + 7919) % 12768) != srun_world(SRUN_TASK)[4]
    assert srun_world({**SRUN_TASK, "SLURM_STEP_ID": "0"})[4] == srun_world(SRUN_TASK)[4] == "20005"
    for job in (5, 12767, 123456, 4294967294):
        ports = [slurm_port(str(job), str(step)) for step in range(200)]
        assert len(set(ports)) == 200 and all(20000 <= port <= 32767 for port in ports), job
    neighbours = [slurm_port(str(job)) for job in range(30000, 30000 + 12768)]
    assert len(set(neighbours)) == 12768 and max(neighbours) == 32767
    with pytest.raises(ValueError, match=re.escape("srun launch: no MASTER_PORT, and SLURM_STEP_ID='x': not a")):
        srun_world({**SRUN_TASK, "SLURM_STEP_ID": "x"})


def test_jobs_of_one_id_on_two_clusters_meet_on_ports_of_their_own():
    """The port came from the job and step ids alone: two SLURM clusters sharing a host (two test
    sessions, each numbering its jobs from 1) gave their job 1 one port, and their trainings met in
    one rendezvous or failed to bind it. The cluster's name (SLURM_CLUSTER_NAME) shifts its ports;
    within a cluster jobs and steps still differ, and without a name the port is as before."""
    names = ["cosmos3test-0a1b2c3d", "cosmos3test-0a1b2c3e", "prod", "gpu-cluster-é"]
    ports = {name: srun_world({**SRUN_TASK, "SLURM_JOB_ID": "1", "SLURM_CLUSTER_NAME": name})[4] for name in names}
    assert len(set(ports.values())) == len(names), ports
    assert ports["prod"] == str(PORT_BASE + (cluster_port_offset("prod") + 1) % PORT_SPAN)
    assert cluster_port_offset("foobar") == 0xBF9CF968 % PORT_SPAN  # FNV-1a's published 32-bit hash of it
    assert cluster_port_offset("") == 0 and srun_world({**SRUN_TASK, "SLURM_CLUSTER_NAME": ""})[4] == "20005"
    for name in names:
        neighbours = [slurm_port(str(job), "0", name) for job in range(1, 1 + PORT_SPAN)]
        assert len(set(neighbours)) == PORT_SPAN and min(neighbours) == PORT_BASE, name
        steps = [slurm_port("1", str(step), name) for step in range(200)]
        assert len(set(steps)) == 200 and max(steps) < PORT_BASE + PORT_SPAN, name


def test_a_heterogeneous_jobs_srun_ranks_are_refused_naming_it():
    """A step of a heterogeneous job (``sbatch ... : ...``) numbers its tasks per component or over
    several, with per-component variables this launcher does not read."""
    for name in ("SLURM_HET_SIZE", "SLURM_PACK_SIZE"):
        with pytest.raises(ValueError, match=re.escape("a heterogeneous job (SLURM_HET_SIZE=2) is not supported")):
            launcher_env({**SRUN_TASK, name: "2"})


@pytest.mark.parametrize(
    "nodelist, host",
    [
        ("vm", "vm"),
        ("node[03-05,9],gpu1", "node03"),
        ("gpu1,node[03-05]", "gpu1"),
        ("rack[2-3]-n[10-11]", "rack2-n10"),
        ("n[7]", "n7"),
    ],
)
def test_the_first_host_of_a_slurm_host_list(nodelist, host):
    assert first_host(nodelist) == host


@pytest.mark.parametrize("nodelist", ["", "node[a-b]", "node[1-2", ",vm"])
def test_a_host_list_not_in_slurms_format_is_named(nodelist):
    with pytest.raises(ValueError, match=re.escape(f"{nodelist!r}: not a SLURM host list")):
        first_host(nodelist)


@pytest.mark.parametrize(
    "changes, error",
    [
        ({"SLURM_PROCID": None}, "SLURM_PROCID=None, not a number"),
        ({"SLURM_LOCALID": "x"}, "SLURM_LOCALID='x', not a number"),
        ({"SLURM_LOCALID": "\u00b2"}, "SLURM_LOCALID='\u00b2', not a number"),  # a digit int() refuses
        ({"SLURM_JOB_ID": "1\u00b2", "MASTER_PORT": None}, "SLURM_JOB_ID='1\u00b2': not a number"),
        ({"SLURM_STEP_NODELIST": None, "SLURM_JOB_NODELIST": None}, "no MASTER_ADDR, SLURM_STEP_NODELIST or"),
        ({"SLURM_JOB_ID": None}, "no MASTER_PORT, and SLURM_JOB_ID=''"),
    ],
)
def test_what_an_srun_rank_misses_is_named(changes, error):
    environ = {k: v for k, v in {**SRUN_TASK, **changes}.items() if v is not None}
    with pytest.raises(ValueError, match=re.escape(error)):
        srun_world(environ)


@pytest.mark.parametrize(
    "local_rank, visible, index",
    [
        (3, 8, 3),  # torchrun, or srun with the node's GPUs visible to every task
        (3, 1, 0),  # srun --gpus-per-task=1: the task sees its own GPU only, as device 0
        (5, 2, 1),  # --gpus-per-task=2: ranks take the visible GPUs in turn
    ],
)
def test_a_rank_takes_a_gpu_it_can_see(local_rank, visible, index):
    """srun's --gpus-per-task=1 shows each task one GPU: local rank 3 asked for device 3."""
    assert gpu_index(local_rank, visible) == index


def test_an_srun_rank_sets_the_variables_libraries_written_for_torchrun_read():
    """DeepSpeed asserted 'DeepSpeed requires the LOCAL_RANK environment variable' under srun.
    WORLD_SIZE stays unset: the host-memory count must still see an srun world."""
    environ = dict(SRUN_TASK)
    assert launcher_env(environ) == (1, 2, 1)
    assert {k: environ[k] for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK")} == {
        "MASTER_ADDR": "vm",
        "MASTER_PORT": "20005",
        "RANK": "1",
        "LOCAL_RANK": "1",
    }
    assert "WORLD_SIZE" not in environ and started_by_srun(environ)
    assert launcher_env(dict(BATCH_SCRIPT)) is None


def test_the_config_is_checked_against_the_world_srun_starts(monkeypatch, tmp_path):
    """srun's ranks have no WORLD_SIZE, and the parallel sizes were checked against a world of one:
    ``srun --ntasks=2 ... parallel.tensor=2`` was refused ("world_size=1 is not divisible by
    tensor*pipeline*context=2*1*1=2") before any rank started."""
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in SRUN_TASK.items():
        monkeypatch.setenv(name, value)
    args = parse_args([*TINY_MODEL, "parallel.tensor=2", f"checkpoint.directory={tmp_path / 'run'}"])
    assert checked_config(args).parallel.tensor == 2
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "3")
    with pytest.raises(ValueError, match=re.escape("world_size=3 is not divisible by tensor*pipeline*context=2*1*1")):
        checked_config(args)


@pytest.mark.parametrize(
    "environ, error",
    [
        ({"WORLD_SIZE": "2"}, "torchrun launch: RANK=None, not a number; torchrun sets it in every worker it starts"),
        ({"WORLD_SIZE": "two", "RANK": "0"}, "torchrun launch: WORLD_SIZE='two', not a number"),
        ({"WORLD_SIZE": "2", "RANK": "2"}, "torchrun launch: RANK=2 is not a rank of WORLD_SIZE=2"),
        ({**SRUN_TASK, "SLURM_PROCID": "2"}, "srun launch: SLURM_PROCID=2 is not a rank of SLURM_STEP_NUM_TASKS=2"),
    ],
)
def test_launch_variables_that_are_not_a_world_are_named(environ, error):
    """A WORLD_SIZE exported by hand without RANK (a shell left from another job) was a KeyError 'RANK'."""
    with pytest.raises(ValueError, match=re.escape(error)):
        launcher_env(dict(environ))
