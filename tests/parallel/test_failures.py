"""A rank failing inside collectives ends every rank, each naming the failure (docs/DESIGN.md, "The
parallel plan"; ``parallel/failures.py``): the plain mechanism on gloo ranks, the Megatron-style
engine's forward under tensor and data parallelism, a rank failing anywhere else in the
training loop, and one failing in the start-up (building the run, the resume). DeepSpeed's own
collectives: tests/deepspeed/."""

from __future__ import annotations

import contextlib
import datetime
import time
from functools import partial
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.distributed as dist

from megatron_cosmos3.checkpoint.checkpointer import Checkpointer
from megatron_cosmos3.model.mot import MoTModel
from megatron_cosmos3.parallel.failures import fail_together
from megatron_cosmos3.parallel.plan import ParallelPlan
from megatron_cosmos3.parallel.state import destroy_parallel
from megatron_cosmos3.testing.distributed import failing_call, raised_by, restart_world, run_on_ranks
from megatron_cosmos3.testing.training import TINY_MODEL, TINY_SYNTHETIC
from megatron_cosmos3.training import train as train_module
from megatron_cosmos3.training.batches import MicroBatches
from megatron_cosmos3.training.config import load_config
from megatron_cosmos3.training.distributed import DistributedContext
from megatron_cosmos3.training.metrics import MetricsWindow
from megatron_cosmos3.training.tracking import MLflowTracker

TIMEOUT_S = 3  # how long the collectives of these worlds wait


def _one_rank_fails_while_the_other_waits(rank: int, world_size: int, root: Path) -> tuple:
    """Rank 1 raises inside ``fail_together`` while holding a group that rank 0 waits in (a library's
    reference keeps its connections open: rank 0's collective ends at the timeout, not at once)."""
    restart_world(rank, world_size, root / "store", TIMEOUT_S)
    held = dist.new_group([0, 1], timeout=datetime.timedelta(seconds=TIMEOUT_S))

    def work():
        with fail_together("the test's step"):
            if rank == 1:
                raise ValueError("rank 1's step failed")
            dist.all_reduce(torch.ones(1), group=held)

    return (*raised_by(work), dist.is_initialized())


@pytest.mark.multiprocess
def test_a_rank_failing_inside_a_collective_region_ends_every_rank_naming_its_error(tmp_path):
    """Rank 0 raises RankFailedError naming rank 1 and its error (not the transport's "timed out")
    within the groups' timeout; rank 1 its own error; neither keeps a process group."""
    waiting, failing = run_on_ranks(_one_rank_fails_while_the_other_waits, 2, tmp_path, timeout_s=60)
    assert waiting[:2] == (
        "RankFailedError",
        "the test's step stopped on rank 0: rank 1 failed in the test's step: ValueError: rank 1's step failed",
    ), waiting
    assert failing[:2] == ("ValueError", "rank 1's step failed"), failing
    assert waiting[2] < 3 * TIMEOUT_S, waiting
    assert not waiting[3] and not failing[3]


def _every_rank_raises_an_agreed_error(rank: int, world_size: int, root: Path) -> tuple:
    """Both ranks raise the same agreed error type inside ``fail_together``, rank 1 after rank 0."""
    restart_world(rank, world_size, root / "store", TIMEOUT_S)
    dist.barrier()

    def work():
        with fail_together("the test's step", agreed=(ValueError,)):
            if rank == 1:
                time.sleep(0.5)  # rank 0 has left the region by now
            raise ValueError(f"rank {rank}'s save failed, as every rank's")

    return (*raised_by(work), dist.is_initialized())


@pytest.mark.multiprocess
def test_an_error_every_rank_raises_together_passes_unchanged_on_every_rank(tmp_path):
    """An agreed error (a checkpoint save that failed somewhere: every rank raises it) is no one
    rank's failure: each rank raises its own, none RankFailedError naming the other, groups kept."""
    for rank, outcome in enumerate(run_on_ranks(_every_rank_raises_an_agreed_error, 2, tmp_path, timeout_s=60)):
        assert outcome[:2] == ("ValueError", f"rank {rank}'s save failed, as every rank's"), outcome
        assert outcome[3], outcome


def test_in_one_process_an_error_passes_unchanged(tmp_path):
    """Without a process group, and in a world of one, the error is the rank's own and a group stays."""
    with pytest.raises(ValueError, match="^alone$"), fail_together("a step"):
        raise ValueError("alone")
    restart_world(0, 1, tmp_path / "store", TIMEOUT_S)
    try:
        with pytest.raises(ValueError, match="^alone$"), fail_together("a step"):
            raise ValueError("alone")
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()


def _megatron_forward_fails(rank: int, world_size: int, root: Path) -> dict:
    """Training runs of the Megatron-style engine (tensor parallel; data parallel) in which rank 1
    alone raises in its second forward: {layout: (type, message, seconds, a process group left)}."""
    outcomes = {}
    for layout in ("parallel.tensor=2", "parallel.tensor=1"):  # tensor parallel; data parallel
        restart_world(rank, world_size, root / f"store-{layout}", TIMEOUT_S)
        # Megatron-core's record of the last run's groups is let go only once both ranks have ended
        # it (``restart_world`` met): while it holds them their connections stay open, so rank 0's
        # wait is ended by its groups' timeout, not by rank 1 letting go.
        destroy_parallel()
        settings = [*TINY_MODEL, *TINY_SYNTHETIC, "steps=2", "tracking.enabled=false", "eval.every=0", layout]
        settings.append(f"distributed.init_timeout_s={TIMEOUT_S}")  # megatron-core's groups wait as long
        config = load_config(None, [*settings, f"checkpoint.directory={root / layout}"])
        context = DistributedContext(rank, world_size, rank, torch.device("cpu"))
        with failing_call(MoTModel, "forward", rank == 1, 2, "rank 1's forward failed"):
            outcomes[layout] = (*raised_by(partial(train_module.train, config, context)), dist.is_initialized())
    destroy_parallel()
    return outcomes


@pytest.mark.multiprocess
def test_a_rank_failing_in_the_megatron_style_forward_ends_every_rank_naming_its_error(tmp_path):
    """Under tensor or data parallelism rank 0 raises RankFailedError naming rank 1's error (it ended
    with gloo's "Connection closed by peer" alone), rank 1 its own, within the configured timeout
    (megatron-core's groups waited its default 30 minutes)."""
    waiting, failing = run_on_ranks(_megatron_forward_fails, 2, tmp_path, timeout_s=120)
    for layout in waiting:
        assert waiting[layout][:2] == (
            "RankFailedError",
            "the forward and backward stopped on rank 0: rank 1 failed in the forward and backward: "
            "RuntimeError: rank 1's forward failed",
        ), (layout, waiting[layout])
        assert failing[layout][:2] == ("RuntimeError", "rank 1's forward failed"), (layout, failing[layout])
        assert waiting[layout][2] < 3 * TIMEOUT_S, (layout, waiting[layout])  # megatron-core's default: 30 min
        assert not waiting[layout][3] and not failing[layout][3]


# Where a rank raises outside the forward and backward, and what its peer is waiting in then:
# {case: (failing rank, class, method, its failing call)}.
OUTSIDE_THE_DRIVER = {
    "data loading": (1, MicroBatches, "get", 2),  # the peer: step 2's forward
    "loss accounting": (1, MetricsWindow, "add", 1),  # the peer: everywhere(finite)
    "metric sums": (1, MetricsWindow, "reduce", 1),  # the peer: the metrics' all-reduce
    "checkpoint save": (1, Checkpointer, "save", 1),  # the peer: the checkpointer's agreement
    "tracking": (0, MLflowTracker, "log_metrics", 1),  # the peer: the preemption flag's all-reduce
}


def _loop_fails_outside_the_driver(rank: int, world_size: int, root: Path) -> dict:
    """Data-parallel training runs in which one rank raises at each point of ``OUTSIDE_THE_DRIVER``:
    {case: (type, message, seconds, a process group left)}."""
    outcomes = {}
    for case, (failing, target, method, call) in OUTSIDE_THE_DRIVER.items():
        restart_world(rank, world_size, root / f"store-{case}", TIMEOUT_S)
        destroy_parallel()  # megatron-core's groups of the last run (see _megatron_forward_fails)
        settings = [*TINY_MODEL, *TINY_SYNTHETIC, "steps=2", "log_every=1", "tracking.enabled=false", "eval.every=0"]
        settings += [f"distributed.init_timeout_s={TIMEOUT_S}", f"checkpoint.directory={root / case}"]
        config = load_config(None, settings)
        context = DistributedContext(rank, world_size, rank, torch.device("cpu"))
        # The failing rank's last MLflow delivery takes longer than its peer's groups wait (a
        # stalled server): the peer must have been told before it, not time out meanwhile.
        slow = mock.patch.object(MLflowTracker, "suspend", _a_stalled_last_delivery)
        with failing_call(target, method, rank == failing, call, f"rank {failing}'s {case} failed"):
            with slow if rank == failing else contextlib.nullcontext():
                outcomes[case] = (*raised_by(partial(train_module.train, config, context)), dist.is_initialized())
    destroy_parallel()
    return outcomes


def _a_stalled_last_delivery(tracker: MLflowTracker, status: str | None = None) -> None:
    time.sleep(2 * TIMEOUT_S)


@pytest.mark.multiprocess
def test_a_rank_failing_anywhere_in_the_training_loop_ends_every_rank_naming_its_error(tmp_path):
    """A rank raising in data loading, the loss accounting, the metric sums, a checkpoint save or
    tracking: its peer raises RankFailedError naming that rank and its error within the groups'
    timeout (it ended with gloo's "Connection closed by peer" or "timed out" alone), also where the
    failing rank's last MLflow delivery then takes longer than that timeout; the failing rank
    raises its own error, and neither keeps a process group."""
    outcomes = run_on_ranks(_loop_fails_outside_the_driver, 2, tmp_path, timeout_s=180)
    for case, (failing, *_) in OUTSIDE_THE_DRIVER.items():
        failed, waited = outcomes[failing][case], outcomes[1 - failing][case]
        error = f"RuntimeError: rank {failing}'s {case} failed"
        assert failed[:2] == ("RuntimeError", f"rank {failing}'s {case} failed"), (case, failed)
        assert waited[0] == "RankFailedError", (case, waited)
        assert waited[1].endswith(f"stopped on rank {1 - failing}: rank {failing} failed in the training loop: {error}")
        assert waited[2] < 3 * TIMEOUT_S, (case, waited)
        assert not waited[3] and not failed[3], case


# Where a rank raises in the start-up (building the run; the resume: the checkpoint's load, as a
# rank's own file read failing; the load of the weights stage.init_from names), and the settings of
# that run: {case: (class, method, settings)}. The peer waits in the next collective of the start-up.
AT_THE_START = {
    "building the run": (ParallelPlan, "build_optimizer", ()),  # the peer: the checkpointer's groups
    "the resume": (Checkpointer, "load", ("steps=2",)),  # the peer: the checkpoint's load
    "stage.init_from": (Checkpointer, "load", ("steps=2", "stage.init_from={saved}", "stage.name=midtrain")),
}


def _start_up_fails(rank: int, world_size: int, root: Path) -> dict:
    """Data-parallel training runs in which rank 1 raises at each point of ``AT_THE_START``, after a
    first run has saved the checkpoint of step 1 that they resume or start from:
    {case: (type, message, seconds, a process group left)}."""
    settings = [*TINY_MODEL, *TINY_SYNTHETIC, "steps=1", "tracking.enabled=false", "eval.every=0"]
    settings.append(f"distributed.init_timeout_s={TIMEOUT_S}")
    context = DistributedContext(rank, world_size, rank, torch.device("cpu"))
    saved = root / "saved"
    restart_world(rank, world_size, root / "store-saved", 60)
    train_module.train(load_config(None, [*settings, f"checkpoint.directory={saved}"]), context)
    outcomes = {}
    for case, (target, method, extra) in AT_THE_START.items():
        restart_world(rank, world_size, root / f"store-{case}", TIMEOUT_S)
        destroy_parallel()  # megatron-core's groups of the last run (see _megatron_forward_fails)
        directory = saved if case == "the resume" else root / case
        extra = [setting.format(saved=saved) for setting in extra]
        config = load_config(None, [*settings, *extra, f"checkpoint.directory={directory}"])
        with failing_call(target, method, rank == 1, 1, f"rank 1's {case} failed"):
            outcomes[case] = (*raised_by(partial(train_module.train, config, context)), dist.is_initialized())
    destroy_parallel()
    return outcomes


@pytest.mark.multiprocess
def test_a_rank_failing_in_the_start_up_ends_every_rank_naming_its_error(tmp_path):
    """A rank raising while the run is built, in the resume's load of a checkpoint or in the load
    of the weights stage.init_from names: its peer raises RankFailedError naming that rank and its
    error within the groups' timeout (it waited in its next collective until gloo's "timed out"
    before), the failing rank its own error, and neither keeps a process group."""
    waiting, failing = run_on_ranks(_start_up_fails, 2, tmp_path, timeout_s=180)
    for case in AT_THE_START:
        assert failing[case][:2] == ("RuntimeError", f"rank 1's {case} failed"), (case, failing[case])
        assert waiting[case][0] == "RankFailedError", (case, waiting[case])
        error = f"rank 1 failed in the start-up: RuntimeError: rank 1's {case} failed"
        assert waiting[case][1].endswith(f"stopped on rank 0: {error}"), (case, waiting[case])
        assert waiting[case][2] < 3 * TIMEOUT_S, (case, waiting[case])
        assert not waiting[case][3] and not failing[case][3], case
