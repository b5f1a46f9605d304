"""A rank failing inside collectives ends every rank, each naming the failure (docs/DESIGN.md, "The
parallel plan"; ``parallel/failures.py``): the plain mechanism on gloo ranks. DeepSpeed's own
collectives: tests/deepspeed/."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from megatron_cosmos3.parallel.failures import fail_together
from megatron_cosmos3.testing.distributed import raised_by, restart_world, run_on_ranks

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
