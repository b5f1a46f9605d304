"""Which shard a data-parallel rank reads next: the slot schedule.

A rank's stream is a sequence of *slots* j = 0, 1, 2, ...; each slot is one whole shard. Slot j
draws its dataset from the stage's blend (a counter-based draw, ``determinism.py``), with
probability proportional to weight / mean samples per shard, so the weights are shares of
samples. The k-th slot that drew dataset d reads the k-th shard of d's stream for this rank:

* split (default): epoch e is a seeded permutation of d's shards, dealt round-robin to the
  ranks: rank r reads positions r, r + W, r + 2W, ... (the n mod W left over are skipped that
  epoch — a different few each epoch); every rank reads n // W shards per epoch;
* resample: shards drawn with replacement, independently on every rank (WebDataset's
  ``ResampledShards``), for datasets with fewer shards than ranks or for endless mixing.

All of it is a pure function of (seed, rank, world size, slot): nothing depends on dataloader
workers, and a resumed stream needs only the next slot and one counter per dataset.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from megatron_cosmos3.data.determinism import permutation, randbelow, uniform
from megatron_cosmos3.data.shards import ShardInfo

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DatasetSource:
    """A dataset as the schedule sees it: its shards, share of samples and sampling mode."""

    name: str
    shards: tuple[ShardInfo, ...]
    weight: float
    resample: bool = False

    @property
    def mean_samples_per_shard(self) -> float | None:
        counts = [s.samples for s in self.shards]
        return float(np.mean(counts)) if counts and all(c is not None for c in counts) else None


@dataclass(frozen=True)
class SlotAddress:
    """Slot ``slot`` reads the ``shard_number``-th shard of dataset ``dataset``'s stream."""

    slot: int
    dataset: int
    shard_number: int


class ShardSchedule:
    """The slot schedule of one data-parallel rank (module doc)."""

    def __init__(
        self, sources: list[DatasetSource], seed: int, dp_rank: int, dp_world_size: int, epochs: int = 0
    ) -> None:
        if not 0 <= dp_rank < dp_world_size:
            raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_world_size={dp_world_size})")
        self.sources = [s for s in sources if s.weight > 0]
        if not self.sources:
            raise ValueError("the schedule needs at least one dataset with positive weight")
        self.seed, self.rank, self.world = seed, dp_rank, dp_world_size
        for source in self.sources:
            if not source.shards:
                raise ValueError(f"dataset {source.name!r} has no shards")
            if not source.resample and len(source.shards) < dp_world_size:
                raise ValueError(
                    f"dataset {source.name!r} has {len(source.shards)} shard(s) for {dp_world_size} data-parallel "
                    f"ranks: every rank needs at least one per epoch. Write more, smaller shards or set resample: true"
                )
        means = [s.mean_samples_per_shard for s in self.sources]
        for source, mean in zip(self.sources, means):
            if mean == 0:
                raise ValueError(f"dataset {source.name!r}: its index lists 0 samples in every shard")
        if any(m is None for m in means):
            if len(self.sources) > 1:
                log.warning(
                    "some datasets have no index with sample counts: blend weights are per shard, not per sample"
                )
            means = [1.0] * len(self.sources)
        shares = np.array([s.weight / m for s, m in zip(self.sources, means)])
        self._cumulative = np.cumsum(shares / shares.sum())
        self.end_slot = epochs * self.shards_per_epoch(0) if epochs else None
        self._orders: dict[tuple[int, int], np.ndarray] = {}

    def shards_per_epoch(self, dataset: int) -> int:
        """Shards this rank reads from ``dataset`` per epoch (split mode)."""
        return len(self.sources[dataset].shards) // self.world

    def dataset_of(self, slot: int) -> int:
        if len(self.sources) == 1:
            return 0
        u = uniform(self.seed, "blend", self.rank, slot)
        return int(min(np.searchsorted(self._cumulative, u, side="right"), len(self.sources) - 1))

    def _epoch_order(self, dataset: int, epoch: int) -> np.ndarray:
        """Dataset ``dataset``'s shard permutation of ``epoch`` (the last few are kept)."""
        key = (dataset, epoch)
        if key not in self._orders:
            if len(self._orders) >= 8:
                self._orders.pop(next(iter(self._orders)))
            self._orders[key] = permutation(
                len(self.sources[dataset].shards), self.seed, "epoch", self.sources[dataset].name, epoch
            )
        return self._orders[key]

    def shard(self, address: SlotAddress) -> ShardInfo:
        """The shard a slot reads."""
        source = self.sources[address.dataset]
        if source.resample:
            return source.shards[
                randbelow(len(source.shards), self.seed, "resample", source.name, self.rank, address.shard_number)
            ]
        per_epoch = self.shards_per_epoch(address.dataset)
        epoch, position = divmod(address.shard_number, per_epoch)
        return source.shards[int(self._epoch_order(address.dataset, epoch)[position * self.world + self.rank])]

    def walk(self, start_slot: int, counters: list[int]) -> Iterator[SlotAddress]:
        """Slot addresses from ``start_slot`` on, given each dataset's shard counter there."""
        counters = list(counters)
        slot = start_slot
        while self.end_slot is None or slot < self.end_slot:
            dataset = self.dataset_of(slot)
            yield SlotAddress(slot, dataset, counters[dataset])
            counters[dataset] += 1
            slot += 1
