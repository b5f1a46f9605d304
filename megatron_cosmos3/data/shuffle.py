"""The cross-shard shuffle buffer, with counter-based randomness (no hidden generator state).

Samples arrive shard by shard; the buffer mixes them: once full, every insertion swaps the new
sample with a uniformly drawn resident, which leaves. The n-th insertion's draw is a hash of
(seed, rank, n), so the buffer's whole state is its contents and one counter.
"""

from __future__ import annotations

from typing import Generic, TypeVar

from megatron_cosmos3.data.determinism import randbelow

Item = TypeVar("Item")


class ShuffleBuffer(Generic[Item]):
    """A buffer of ``capacity`` samples (0 = pass-through)."""

    def __init__(self, capacity: int, seed: int, rank: int = 0) -> None:
        if capacity < 0:
            raise ValueError(f"shuffle buffer capacity must be >= 0, got {capacity}")
        self.capacity, self.seed, self.rank = capacity, seed, rank
        self.items: list[Item] = []
        self.insertions = 0

    def push(self, item: Item) -> Item | None:
        """Adds ``item``; returns the sample that leaves (None while the buffer fills)."""
        self.insertions += 1
        if len(self.items) < self.capacity:
            self.items.append(item)
            return None
        if self.capacity == 0:
            return item
        slot = randbelow(self.capacity, self.seed, "shuffle", self.rank, self.insertions)
        leaving, self.items[slot] = self.items[slot], item
        return leaving

    def drain(self) -> list[Item]:
        """Everything left, in buffer order (the end of a finite stream)."""
        items, self.items = self.items, []
        return items
