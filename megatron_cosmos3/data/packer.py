"""Packing samples into micro-batches of at most ``tokens_per_pack`` tokens (AR + DM).

The packer holds a pool of waiting samples. A pack starts with the oldest waiting sample — so no
sample waits for more than ``pool_size`` packs, however awkward its length — and is then filled
best-fit-decreasing from the rest of the pool: the largest sample that still fits (the one that
leaves the least room), then the next, until nothing fits. With a pool of a few packs' worth of
samples this leaves almost no padding
(see ``tests/data/test_packing_efficiency.py``). Samples are never split across packs; their
order inside a pack is their arrival order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

Item = TypeVar("Item")


@dataclass(frozen=True)
class PackEntry(Generic[Item]):
    item: Item
    num_tokens: int


class Packer(Generic[Item]):
    """Pool of waiting samples -> packs (module doc). ``max_samples_per_pack`` 0 = no limit."""

    def __init__(self, tokens_per_pack: int, pool_size: int, max_samples_per_pack: int = 0) -> None:
        if tokens_per_pack < 1 or pool_size < 1 or max_samples_per_pack < 0:
            raise ValueError(
                f"Packer: tokens_per_pack={tokens_per_pack} and pool_size={pool_size} must be >= 1, "
                f"max_samples_per_pack={max_samples_per_pack} >= 0"
            )
        self.tokens_per_pack, self.pool_size, self.max_samples = tokens_per_pack, pool_size, max_samples_per_pack
        self.pending: list[PackEntry[Item]] = []

    def add(self, item: Item, num_tokens: int) -> None:
        if not 0 < num_tokens <= self.tokens_per_pack:
            raise ValueError(f"a sample of {num_tokens} tokens cannot go into packs of {self.tokens_per_pack}")
        self.pending.append(PackEntry(item, num_tokens))

    def has_pack(self, final: bool = False) -> bool:
        """A full pool is ready to pack; at the end of a finite stream (``final``) any leftover is."""
        return len(self.pending) >= self.pool_size or (final and bool(self.pending))

    def pop_pack(self) -> list[PackEntry[Item]]:
        """The next pack's entries, removed from the pool (module doc for the rule)."""
        if not self.pending:
            raise ValueError("Packer.pop_pack: the pool is empty")
        chosen, room = [0], self.tokens_per_pack - self.pending[0].num_tokens
        by_size = sorted(range(1, len(self.pending)), key=lambda i: (-self.pending[i].num_tokens, i))
        for i in by_size:
            if self.max_samples and len(chosen) >= self.max_samples:
                break
            if self.pending[i].num_tokens <= room:
                chosen.append(i)
                room -= self.pending[i].num_tokens
        taken = set(chosen)
        pack = [self.pending[i] for i in sorted(taken)]
        self.pending = [entry for i, entry in enumerate(self.pending) if i not in taken]
        return pack
