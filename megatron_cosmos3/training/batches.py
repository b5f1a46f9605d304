"""Where each step's micro-batches come from, and how that position is checkpointed.

``shards``: the streaming PackedLoader over WebDataset shards, one per data-parallel rank: of the
ranks that share a data rank (tensor, pipeline and context parallel peers), one reads and
broadcasts each pack to the others (Megatron broadcasts over the tensor group the same way), so
shard decoding and packing run once per data rank, not once per GPU. The reader's loader state goes
into the checkpoint, so a resumed run continues with the exact next pack.
``synthetic``: random packs with the real layout, a pure function of (seed, step, index).

Either way the flow-matching noise of micro-batch ``index`` of ``step`` is drawn from a generator
seeded by (seed, step, index), where index = data_rank * micro_batches + micro: the global batch
does not depend on the layout.
"""

from __future__ import annotations

import dataclasses
import json
import logging

import torch
import torch.distributed as dist

from megatron_cosmos3.checkpoint.safe_reader import CheckpointCorruptError
from megatron_cosmos3.data.errors import DataExhaustedError, DataStreamChangedError
from megatron_cosmos3.data.synthetic_packs import random_pack
from megatron_cosmos3.objectives.flow_matching import add_flow_matching_noise
from megatron_cosmos3.training.config import TrainConfig

log = logging.getLogger(__name__)


def _generator(config: TrainConfig, step: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed(hash((config.seed, step, index)) % (2**63))


class MicroBatches:
    """``share``: (group, reader's global rank) of the ranks that train on this data rank; None in
    one process. Only the reader builds a loader; every rank of the group calls ``get`` in step."""

    def __init__(
        self,
        config: TrainConfig,
        data_rank: int,
        data_size: int,
        device: torch.device,
        share: tuple[dist.ProcessGroup, int] | None = None,
    ):
        self.config, self.data_rank, self.device = config, data_rank, device
        self.loader = None
        shards = config.data_source == "shards"
        self.share = share if shards and share is not None and dist.get_world_size(share[0]) > 1 else None
        if shards and (self.share is None or dist.get_rank() == self.share[1]):
            from megatron_cosmos3.data.loader import PackedLoader

            self.loader = PackedLoader(config.data, config.stage_model, data_rank, data_size)

    @property
    def finite(self) -> bool:
        """Whether the stream may end before ``steps`` (shards read ``data.epochs`` > 0 times)."""
        return self.config.data_source == "shards" and self.config.data.epochs > 0

    def get(self, step: int, micro: int):
        """(noised PackedBatch on the device, velocity targets) of one micro-batch."""
        config = self.config
        index = self.data_rank * config.optimizer.micro_batches_per_step + micro
        g = _generator(config, step, index)
        if self.share is not None:  # the reader's next pack, on every rank of the group
            group, reader = self.share
            sent = [self._pack_or_end(step) if self.loader is not None else None]
            dist.broadcast_object_list(sent, src=reader, group=group, device=self._share_device())
            batch = sent[0]
            if isinstance(batch, DataExhaustedError):  # the reader's stream ended: the group raises it
                raise batch
        elif self.loader is not None:
            batch = self._next_pack(step)
        else:
            s = config.synthetic
            pixels = config.trains_vision  # pictures for the model's own ViT
            batch = random_pack(config.model, g, s.samples_per_pack, tuple(s.tasks), s.scale, pixels)
        noised, targets = add_flow_matching_noise(batch, config.flow_matching, g)
        return noised.to(self.device), {k: v.to(self.device) for k, v in targets.items()}

    def _pack_or_end(self, step: int):
        """The reader's next pack, or the DataExhaustedError that ends its stream (sent to the group,
        whose ranks would otherwise wait for a pack that never comes)."""
        try:
            return self._next_pack(step)
        except DataExhaustedError as error:
            return error

    def _next_pack(self, step: int):
        """The loader's next pack; DataExhaustedError where its finite stream (``data.epochs``) has
        ended before ``steps``."""
        try:
            return next(self.loader)
        except StopIteration:
            config = self.config
            names = ", ".join(
                repr(d.name) for d in config.data.datasets if config.data.active_stage.datasets.get(d.name)
            )
            raise DataExhaustedError(
                f"the data ran out at step {step + 1} of steps={config.steps}: data.epochs={config.data.epochs} "
                f"pass(es) over dataset {names} gave data rank {self.data_rank} {self.loader.packs} packs, and this "
                f"run takes optimizer.micro_batches_per_step={config.optimizer.micro_batches_per_step} a step; "
                "raise data.epochs, lower steps, or set data.epochs=0 (an endless stream). The steps done are "
                "saved; resuming them under other data settings takes checkpoint.restart_changed_data=true"
            ) from None

    def _share_device(self) -> torch.device | None:
        """NCCL moves the pickled pack through the GPU; gloo through host memory."""
        return self.device if self.device.type == "cuda" else None

    def skip_counts(self) -> dict[str, float]:
        """Samples used and skipped per reason so far (this rank), for the metrics."""
        if self.loader is None:
            return {}
        stats = self.loader.stats
        counts = {"data/samples_used": float(stats.used), "data/prompts_dropped": float(self.loader.prompts_dropped)}
        counts.update({f"data/skipped/{reason}": float(n) for reason, n in stats.per_reason.items()})
        return counts

    def state_key(self) -> str:
        """The checkpoint key of this data rank's loader position: keyed by data rank, not by global
        rank, so a run resumed with other tensor/pipeline/context sizes (same data ranks) finds it."""
        return f"data{self.data_rank}/loader"

    def state(self) -> dict[str, torch.Tensor]:
        """Checkpoint entries under their own keys (JSON bytes as a uint8 tensor: no pickle in
        checkpoints); only the rank that reads for this data rank has one."""
        if self.loader is None:
            return {}
        blob = json.dumps(self.loader.state_dict()).encode()
        return {self.state_key(): torch.frombuffer(bytearray(blob), dtype=torch.uint8).clone()}

    def load_state(self, state: dict[str, torch.Tensor], source: str = "the checkpoint") -> None:
        """Continues the loader from the entries ``state`` of the checkpoint ``source``. One of
        another data stream (``DataStreamChangedError``: other data settings or data-parallel ranks,
        shards whose samples no longer build, or no position for this data rank) is an error naming
        what changed, unless ``checkpoint.restart_changed_data``: then the stream restarts from the
        new settings' start, in a warning naming the same. An entry that is no loader state (crafted
        or damaged: not JSON, a field missing or of another kind) is a CheckpointCorruptError naming
        the checkpoint and the entry."""
        if self.loader is None:  # synthetic packs, or a rank that receives its packs
            return
        key = self.state_key()
        try:
            if key not in state:
                raise DataStreamChangedError(
                    f"{source} holds no loader position for data rank {self.data_rank} (saved with "
                    "fewer data-parallel ranks or with data_source=synthetic); resuming mid-epoch is impossible"
                )
            try:
                self.loader.load_state_json(bytes(state[key].tolist()))
            except DataStreamChangedError:
                raise
            except ValueError as error:
                raise CheckpointCorruptError(f"{source}: entry {key!r}: {error}") from None
        except DataStreamChangedError as error:
            self.loader.restart()  # a state refused part-way leaves nothing of itself behind
            if not self.config.checkpoint.restart_changed_data:
                raise DataStreamChangedError(
                    f"{error} (checkpoint.restart_changed_data=true restarts it from the start of this run's "
                    "data settings)",
                    error.changes,
                ) from None
            if self.data_rank == 0:  # the same on every data rank: said once
                log.warning(
                    "checkpoint.restart_changed_data: the data stream restarts from the start of this run's data "
                    "settings (%s)",
                    "; ".join(error.changes) or error,
                )

    def close(self) -> None:
        if self.loader is not None:
            self.loader.close()


def held_out_share(config: TrainConfig, data_size: int) -> int:
    """Held-out packs per data rank; a count the data ranks cannot share evenly is an error."""
    if config.eval.micro_batches % data_size:
        raise ValueError(
            f"eval.micro_batches={config.eval.micro_batches} is not divisible by the {data_size} data-parallel ranks"
        )
    return config.eval.micro_batches // data_size


def held_out_batches(
    config: TrainConfig,
    data_rank: int,
    data_size: int,
    device: torch.device,
    share: tuple[dist.ProcessGroup, int] | None = None,
) -> list[tuple]:
    """This data rank's share of the ``eval.micro_batches`` held-out packs (``EvalConfig``), noised:
    read through the same machinery as the training packs (one reader per data rank, broadcast to
    its peers), from the held-out shards or, with synthetic data, from a seed of their own."""
    per_rank = held_out_share(config, data_size)
    batches = MicroBatches(held_out_config(config, per_rank), data_rank, data_size, device, share)
    try:
        return [batches.get(0, micro) for micro in range(per_rank)]
    finally:
        batches.close()


def held_out_config(config: TrainConfig, per_rank: int) -> TrainConfig:
    """The run's config reading ``per_rank`` held-out packs as one step's micro-batches: the held-out
    shards, or synthetic packs and flow-matching noise of a seed of their own."""
    return dataclasses.replace(
        config,
        data=config.held_out_data() if config.data_source == "shards" else config.data,
        seed=config.seed + 1,
        optimizer=dataclasses.replace(config.optimizer, micro_batches_per_step=per_rank),
    )
