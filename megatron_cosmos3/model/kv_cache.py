"""The Reasoner's key/value cache for token-by-token text generation.

A prompt pack runs once through the Reasoner (``MoTModel.forward_ar``); its per-layer AR keys and
values, packed sample after sample, are copied into one padded buffer per layer, a row per
sequence, with room for the tokens still to come. Each decoding step then runs one new AR token
per sequence (``MoTModel.decode_ar``): every layer writes that token's key/value at the sequence's
length and attends over the filled part of its own row (``AttentionBackend.ar_decode_attention``).
Only AR keys/values ever enter the cache, so the Reasoner stays blind to DM tokens by construction
(docs/DESIGN.md, "Text generation").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_cosmos3.model.attention import PackLayout


@dataclass
class ReasonerCache:
    """Every layer's AR keys/values of S sequences, padded to ``capacity`` tokens.

    keys / values: per layer, (S, capacity, kv_heads, head_dim); lengths: (S,) int64, the filled
    tokens of each row (the rest is unused padding that attention never sees).
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    lengths: torch.Tensor

    @classmethod
    def from_prefill(
        cls, keys_values: list[tuple[torch.Tensor, torch.Tensor]], layout: PackLayout, capacity: int
    ) -> ReasonerCache:
        """The cache of a prefill pass: ``keys_values`` per layer (n_ar, kv_heads, d) as
        ``ARPass.keys_values`` holds them, the pack's ``layout``, ``capacity`` >= the longest sample."""
        longest = max(layout.ar_lengths, default=0)
        if capacity < longest:
            raise ValueError(f"ReasonerCache: capacity={capacity} is below the longest prompt ({longest})")
        device = layout.ar_cu_seqlens.device
        sample = layout.sample_ids("ar")
        offset = torch.arange(sample.numel(), device=device) - layout.ar_cu_seqlens[sample]
        keys, values = [], []
        for k, v in keys_values:
            for packed, padded in ((k, keys), (v, values)):
                buffer = packed.new_zeros(len(layout.ar_lengths), capacity, *packed.shape[1:])
                buffer[sample, offset] = packed
                padded.append(buffer)
        return cls(keys, values, torch.tensor(layout.ar_lengths, dtype=torch.long, device=device))

    @property
    def num_sequences(self) -> int:
        return int(self.lengths.numel())

    @property
    def capacity(self) -> int:
        return int(self.keys[0].shape[1]) if self.keys else 0

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stores one new token per sequence (k, v: (S, kv_heads, d)) at row ``lengths`` of layer
        ``layer``; returns that layer's buffers. Lengths move on in ``advance``, after every layer;
        the caller checks ``has_room`` once per step (a check per layer would sync the device per layer)."""
        rows = torch.arange(self.num_sequences, device=self.lengths.device)
        self.keys[layer][rows, self.lengths] = k.to(self.keys[layer].dtype)
        self.values[layer][rows, self.lengths] = v.to(self.values[layer].dtype)
        return self.keys[layer], self.values[layer]

    def has_room(self) -> bool:
        """Whether every sequence can take one more token."""
        return int(self.lengths.max()) < self.capacity

    def grown(self, capacity: int) -> ReasonerCache:
        """The same cache with room for ``capacity`` tokens per sequence (>= the current one)."""
        more = capacity - self.capacity
        if more < 0:
            raise ValueError(f"ReasonerCache.grown: capacity={capacity} is below the current {self.capacity}")
        padded = [
            [torch.cat([t, t.new_zeros(t.shape[0], more, *t.shape[2:])], 1) for t in ts]
            for ts in (self.keys, self.values)
        ]
        return ReasonerCache(*padded, self.lengths)

    def advance(self) -> None:
        self.lengths = self.lengths + 1

    def keep(self, rows: torch.Tensor) -> ReasonerCache:
        """The cache of the sequences ``rows`` (indices, in the order given): e.g. the unfinished ones."""
        return ReasonerCache(
            [k.index_select(0, rows) for k in self.keys],
            [v.index_select(0, rows) for v in self.values],
            self.lengths.index_select(0, rows),
        )
