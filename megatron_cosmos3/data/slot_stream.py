"""Slots through torch DataLoader workers, in slot order whatever the number of workers.

Worker w of N processes the slots ``start + w, start + w + N, ...``. The DataLoader hands out
requests to its workers round-robin and returns their answers in request order, so the training
process receives slot ``start``, ``start + 1``, ... exactly as with N = 0 (everything in the
training process). A worker's answer is one pickled ``ShardResult``: one transfer per shard instead
of one shared-memory handle per tensor.

Workers ignore the preemption signals (``PREEMPTION_SIGNALS``): SLURM signals every process of a
job, and a worker that died of it would crash the trainer before it could checkpoint; the trainer
decides when to stop and then shuts its workers down (docs/DESIGN.md, "Preemption and requeue").
"""

from __future__ import annotations

import pickle
import signal
from collections.abc import Iterator

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from megatron_cosmos3.data.schedule import ShardSchedule
from megatron_cosmos3.data.shard_processor import ShardProcessor, ShardResult

# The signals that ask a trainer to checkpoint and stop (training/preemption.py handles them).
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def ignore_preemption_signals(worker_id: int = 0) -> None:
    """A DataLoader ``worker_init_fn``: this process ignores ``PREEMPTION_SIGNALS`` (module doc)."""
    for sig in PREEMPTION_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class SlotStream(IterableDataset):
    """ShardResults of the slots from ``start_slot`` (dataset counters ``counters`` there), pickled
    when produced in a worker process."""

    def __init__(
        self, schedule: ShardSchedule, processor: ShardProcessor, start_slot: int, counters: list[int]
    ) -> None:
        super().__init__()
        self.schedule, self.processor, self.start_slot, self.counters = schedule, processor, start_slot, counters

    def __iter__(self) -> Iterator[bytes | ShardResult]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for address in self.schedule.walk(self.start_slot, self.counters):
            if (address.slot - self.start_slot) % workers == worker:
                result = self.processor.process(address)
                yield result if info is None else pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)


def iterate_slots(stream: SlotStream, num_workers: int, prefetch_factor: int) -> Iterator[ShardResult]:
    """ShardResults in slot order, computed by ``num_workers`` DataLoader workers (0 = here)."""
    loader = DataLoader(
        stream,
        batch_size=None,
        num_workers=num_workers,
        prefetch_factor=prefetch_factor if num_workers else None,
        worker_init_fn=ignore_preemption_signals,
    )
    for payload in loader:
        yield pickle.loads(payload) if isinstance(payload, bytes) else payload  # bytes: from our own workers
