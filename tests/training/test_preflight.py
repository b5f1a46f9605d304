"""The launch check (``training/distributed.py``, ``preflight``): the layout in one line, and a rank
that does not answer in time is named instead of hanging the job."""

import socket
import time

import pytest
import torch

from megatron_cosmos3.testing.distributed import run_on_ranks
from megatron_cosmos3.training.config import load_config
from megatron_cosmos3.training.distributed import DistributedContext, preflight


def _context(rank: int, world_size: int) -> DistributedContext:
    return DistributedContext(rank, world_size, rank, torch.device("cpu"))


def _answer(rank: int, world_size: int) -> str:
    return preflight(_context(rank, world_size), timeout_s=30)


def _rank_2_silent(rank: int, world_size: int) -> str:
    if rank == 2:
        time.sleep(5)  # e.g. a node still loading, or lost
    return preflight(_context(rank, world_size), timeout_s=2)


@pytest.mark.multiprocess
def test_preflight_prints_the_layout_and_names_a_silent_rank():
    layouts = run_on_ranks(_answer, 3)
    assert layouts[0].startswith(f"world 3 on 1 node(s), backend gloo, device cpu: {socket.gethostname()} ranks 0-2;")
    assert "MASTER_ADDR=127.0.0.1" in layouts[0]

    with pytest.raises(RuntimeError) as failure:
        run_on_ranks(_rank_2_silent, 3)
    rank_0 = str(failure.value).split("--- rank 0 ---")[1].split("--- rank")[0]
    assert "PreflightError" in rank_0 and "preflight_timeout_s=2" in rank_0
    assert "Ranks 2 failed to pass monitoredBarrier" in rank_0  # the silent rank, and only it


def test_process_group_timeouts_are_settings_checked_by_field():
    config = load_config(None, ["distributed.init_timeout_s=120", "distributed.preflight_timeout_s=5"])
    assert (config.distributed.init_timeout_s, config.distributed.preflight_timeout_s) == (120, 5)
    with pytest.raises(ValueError, match="init_timeout_s=0.0"):
        load_config(None, ["distributed.init_timeout_s=0"])
