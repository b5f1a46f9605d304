"""The launch check (``training/distributed.py``, ``preflight``): the layout in one line, and a rank
that does not answer in time is named instead of hanging the job, on every rank."""

import socket
import time
from pathlib import Path

import pytest
import torch

from megatron_cosmos3.testing.distributed import raised_by, restart_world, run_on_ranks
from megatron_cosmos3.training.config import load_config
from megatron_cosmos3.training.distributed import DistributedContext, preflight


def _context(rank: int, world_size: int) -> DistributedContext:
    return DistributedContext(rank, world_size, rank, torch.device("cpu"))


def _answer(rank: int, world_size: int) -> str:
    return preflight(_context(rank, world_size), timeout_s=30)


def _rank_2_silent(rank: int, world_size: int, root: Path) -> tuple:
    """What each rank raised, rank 2 arriving after the others' preflight timeout (2 s). The ranks
    meet in a file store, as torchrun's workers meet in its agent's: it outlives rank 0's process."""
    restart_world(rank, world_size, root / "store", timeout_s=3)
    if rank == 2:
        time.sleep(4)  # e.g. a node still loading, or lost
    return raised_by(lambda: preflight(_context(rank, world_size), timeout_s=2))


@pytest.mark.multiprocess
def test_preflight_prints_the_layout_and_names_a_silent_rank():
    layouts = run_on_ranks(_answer, 3)
    assert layouts[0].startswith(f"world 3 on 1 node(s), backend gloo, device cpu: {socket.gethostname()} ranks 0-2;")
    assert "MASTER_ADDR=127.0.0.1" in layouts[0]


@pytest.mark.multiprocess
def test_a_silent_rank_ends_every_rank_each_naming_it(tmp_path):
    """Rank 0 named the silent rank, but the rank that had answered waited on in the barrier and
    failed with its own timeout, and the late rank with a closed connection, neither naming it."""
    rank_0, *others = run_on_ranks(_rank_2_silent, 3, tmp_path, timeout_s=120)
    verdict = "preflight: not every rank answered within distributed.preflight_timeout_s=2: "
    assert rank_0[0] == "PreflightError" and rank_0[1].startswith(verdict), rank_0
    assert "Ranks 2 failed to pass monitoredBarrier" in rank_0[1]  # the silent rank, and only it
    for rank, (kind, message, seconds) in enumerate(others, start=1):
        assert kind == "RankFailedError", (rank, kind, message)
        assert message.startswith(f"the preflight stopped on rank {rank}: rank 0 failed in the preflight: "), message
        assert "Ranks 2 failed to pass monitoredBarrier" in message
        assert seconds < 10, (rank, seconds)  # not the world's collective timeout, nor a hang


def test_process_group_timeouts_are_settings_checked_by_field():
    config = load_config(None, ["distributed.init_timeout_s=120", "distributed.preflight_timeout_s=5"])
    assert (config.distributed.init_timeout_s, config.distributed.preflight_timeout_s) == (120, 5)
    with pytest.raises(ValueError, match="init_timeout_s=0.0"):
        load_config(None, ["distributed.init_timeout_s=0"])
