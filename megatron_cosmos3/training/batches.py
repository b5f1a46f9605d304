"""Where each step's micro-batches come from, and how that position is checkpointed.

``shards``: the streaming PackedLoader over WebDataset shards (one per data-parallel rank; ranks
that share a data rank — tensor, pipeline and context parallel — read identical streams). Its
state goes into the checkpoint per rank, so a resumed run continues with the exact next pack.
``synthetic``: random packs with the real layout, a pure function of (seed, step, index).

Either way the flow-matching noise of micro-batch ``index`` of ``step`` is drawn from a generator
seeded by (seed, step, index), where index = data_rank * micro_batches + micro: the global batch
does not depend on the layout.
"""

from __future__ import annotations

import json

import torch

from megatron_cosmos3.data.synthetic_packs import random_pack
from megatron_cosmos3.training.config import TrainConfig
from megatron_cosmos3.training.flow_matching import add_flow_matching_noise

LOADER_STATE = "loader"


def _generator(config: TrainConfig, step: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed(hash((config.seed, step, index)) % (2**63))


class MicroBatches:
    def __init__(self, config: TrainConfig, data_rank: int, data_size: int, device: torch.device):
        self.config, self.data_rank, self.device = config, data_rank, device
        self.loader = None
        if config.data_source == "shards":
            from megatron_cosmos3.data.loader import PackedLoader

            self.loader = PackedLoader(config.data, config.model, data_rank, data_size)

    def get(self, step: int, micro: int):
        """(noised PackedBatch on the device, velocity targets) of one micro-batch."""
        config = self.config
        index = self.data_rank * config.optimizer.micro_batches_per_step + micro
        g = _generator(config, step, index)
        if self.loader is not None:
            batch = next(self.loader)
        else:
            s = config.synthetic
            batch = random_pack(config.model, g, s.samples_per_pack, tuple(s.tasks), s.scale)
        noised, targets = add_flow_matching_noise(batch, config.flow_matching, g)
        return noised.to(self.device), {k: v.to(self.device) for k, v in targets.items()}

    def skip_counts(self) -> dict[str, float]:
        """Samples used and skipped per reason so far (this rank), for the metrics."""
        if self.loader is None:
            return {}
        stats = self.loader.stats
        counts = {"data/samples_used": float(stats.used)}
        counts.update({f"data/skipped/{reason}": float(n) for reason, n in stats.per_reason.items()})
        return counts

    def state(self) -> dict[str, torch.Tensor]:
        """Per-rank checkpoint entries (JSON bytes as a uint8 tensor: no pickle in checkpoints)."""
        if self.loader is None:
            return {}
        blob = json.dumps(self.loader.state_dict()).encode()
        return {LOADER_STATE: torch.frombuffer(bytearray(blob), dtype=torch.uint8).clone()}

    def load_state(self, per_rank: dict[str, torch.Tensor]) -> None:
        if self.loader is None:
            return
        if LOADER_STATE not in per_rank:
            raise ValueError(
                "the checkpoint holds no data loader state for this rank (saved with another "
                "world size or with data_source=synthetic); resuming mid-epoch is impossible"
            )
        self.loader.load_state_dict(json.loads(bytes(per_rank[LOADER_STATE].tolist()).decode()))

    def close(self) -> None:
        if self.loader is not None:
            self.loader.close()
