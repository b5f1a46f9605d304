"""Graceful preemption: a signal asks for a checkpoint at the end of the current step, then exit.

SLURM sends SIGUSR1 ahead of the time limit when the job asks for it (``#SBATCH --signal=B:USR1@120``),
and SIGTERM on preemption/cancel; torchrun forwards SIGTERM to its workers. Ranks may receive the
signal at slightly different moments, so the decision to stop is all-reduced every step: every
rank stops after the same step and writes the same checkpoint.
"""

from __future__ import annotations

import logging
import signal

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# The exit code a preempted run ends with; slurm/train.sbatch requeues the job when it sees it.
REQUEUE_EXIT_CODE = 3


class PreemptionWatcher:
    def __init__(self):
        self._requested = False
        self._previous = {}
        for sig in PREEMPTION_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if not self._requested:
            log.warning("received %s: will checkpoint after this step and exit", signal.Signals(signum).name)
        self._requested = True

    def should_stop(self) -> bool:
        """Collective: True on every rank if any rank was signalled."""
        flag = torch.tensor([1.0 if self._requested else 0.0])
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
