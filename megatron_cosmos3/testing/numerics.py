"""The numerical settings every process of a test runs under, set explicitly on both sides.

Tests compare tensors bit for bit across processes (resume, resharding, AR blindness, one process
against a layout). A CPU matmul's summation order depends on the intra-op thread count, so two
processes that inherit different counts (the pytest process's default against a child's) can differ
in the last bit. Every side of such a comparison calls ``use_test_numerics`` (the pytest process
before each test, each rank of ``run_on_ranks``) or starts its children with ``child_environment``;
nothing depends on what the shell or an earlier test left behind.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

# One intra-op thread: several ranks share a 2-core CI machine, and one thread is the count every
# process of a test can have, whatever the machine.
TEST_THREADS = 1


def use_test_numerics() -> None:
    """Sets this process's torch numerics to the tests' settings."""
    torch.set_num_threads(TEST_THREADS)
    torch.set_default_dtype(torch.float32)
    torch.use_deterministic_algorithms(False)


def numerics_state() -> dict[str, object]:
    """What ``use_test_numerics`` sets, as it is now (compared before and after each test)."""
    return {
        "torch.get_num_threads()": torch.get_num_threads(),
        "torch.get_default_dtype()": torch.get_default_dtype(),
        "torch.are_deterministic_algorithms_enabled()": torch.are_deterministic_algorithms_enabled(),
        "torch.is_grad_enabled()": torch.is_grad_enabled(),
    }


def child_environment(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a child process (trainer, script, torchrun) whose results a test compares:
    ``base`` (default: this process's) with the thread count pinned."""
    threads = str(TEST_THREADS)
    return {**(os.environ if base is None else base), "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
