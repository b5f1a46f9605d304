"""Graceful preemption: a signal asks for a checkpoint at the end of the current step, then a clean stop.

SIGUSR1 or SIGTERM reaches every trainer process (docs/DESIGN.md, "Preemption and requeue"): under
SLURM the batch script forwards its ``--signal=B:USR1@<lead>`` warning to every process of the job
step, and SLURM's own preemption or cancel sends SIGTERM to all of them; under plain torchrun, a
SIGTERM to torchrun is forwarded to its workers. Data-loader workers ignore both
(``data/slot_stream.py``). Ranks may receive the signal at slightly different moments, so the
decision to stop is all-reduced every step: every rank stops after the same step and writes the
same checkpoint.

A stopped run exits with code 0 (a launcher's exit-code mapping cannot lose the outcome) and, when
asked (``--status-file``), rank 0 writes the outcome as one line: ``<outcome> <step> <start_step>``
with outcome ``finished`` or ``preempted``; ``step`` is the step of the last committed checkpoint
and ``start_step`` the step this attempt started from. ``slurm/train.sbatch`` requeues only a
preempted attempt that made progress (``step > start_step``).
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_cosmos3.atomic_files import unwritable_reason
from megatron_cosmos3.data.slot_stream import PREEMPTION_SIGNALS

log = logging.getLogger(__name__)

FINISHED, PREEMPTED = "finished", "preempted"


class PreemptionWatcher:
    def __init__(self):
        self.signal_name: str | None = None  # the first preemption signal received, if any
        self._previous = {}
        for sig in PREEMPTION_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name

    def should_stop(self) -> bool:
        """Collective: True on every rank if any rank was signalled."""
        flag = torch.tensor([0.0 if self.signal_name is None else 1.0])
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def status_file_problem(path: str | Path) -> str | None:
    """Why ``write_status`` could not write ``path`` when the run ends, or None: checked at launch,
    since a folder there (or a folder nothing can be written to) was an OSError traceback after
    the last step, and the job script read no outcome."""
    path = Path(path)
    if path.is_dir():
        return f"--status-file {str(path)!r} is a folder, not a file"
    reason = unwritable_reason(path.parent)
    if reason is not None:
        return f"--status-file {str(path)!r}: no file can be written in its folder ({reason})"
    return None


def write_status(path: str | Path, outcome: str, step: int, start_step: int) -> None:
    """Writes the run's outcome line (module doc) atomically: a reader never sees half a line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(f"{outcome} {step} {start_step}\n")
    os.replace(partial, path)
