"""An ``engine=deepspeed`` checkpoint's ZeRO partitions read by range (docs/DESIGN.md, "The DeepSpeed
engine", resuming under another world size or ZeRO stage).

DeepSpeed saves each rank's share of the fp32 masters and of both AdamW moments as flat tensors, one
per parameter group (ZeRO-1/2: the group's parameters laid end to end and cut into equal slices, one
per rank) or per sub-group (ZeRO-3: every parameter cut into equal slices, the last padded, each
rank's slices laid end to end). ``SavedPartitions`` opens every saving rank's files memory-mapped and
answers "elements ``start``..``start + count`` of this parameter's master or moment" by copying only
the pieces of the slices that hold them: a resuming rank reads the bytes of its own new partition,
not the whole model (the pages of a mapped file are read when touched). The layout arithmetic is
DeepSpeed's ``zero_to_fp32`` reassembly (the same parameter order, alignment paddings and partition
sizes), so the values are the ones it merges, bit for bit.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from pathlib import Path

import torch

from megatron_cosmos3.checkpoint.checkpointer import CheckpointMismatchError
from megatron_cosmos3.checkpoint.engine_layout import CheckpointLayoutError

MASTER = "fp32"  # the key of the fp32 masters beside the AdamW moments' own keys
MOMENTS = ("exp_avg", "exp_avg_sq")


class SavedPartitions:
    """Every saving rank's ZeRO partitions of the DeepSpeed checkpoint files in ``folder`` (DeepSpeed's
    own folder, ``step_<N>/deepspeed``), memory-mapped through ``load`` (``torch.load``'s signature,
    with ``mmap``; the caller's weights-only reader). Nothing is read beyond the pickled headers until
    ``read`` asks for a range. Optimizer files of DeepSpeed's elastic layout are a
    CheckpointLayoutError naming the file."""

    def __init__(self, folder: str | Path, load: Callable) -> None:
        from deepspeed.checkpoint.constants import (
            FROZEN_PARAM_FRAGMENTS,
            FROZEN_PARAM_SHAPES,
            PARAM_SHAPES,
        )
        from deepspeed.utils import zero_to_fp32

        folder = str(folder)
        optim_files = zero_to_fp32.get_optim_files(folder)
        self.ranks = [_OptimizerFile(file, load) for file in optim_files]
        self.world_size = len(self.ranks)
        self.zero_stage = self.ranks[0].zero_stage
        counts = self.ranks[0].partition_count
        count = max(counts) if isinstance(counts, list) else counts
        if count != self.world_size:
            raise CheckpointLayoutError(
                f"{optim_files[0]} was saved by {count} ZeRO ranks, and {folder} holds {self.world_size} "
                "optimizer files"
            )
        self.step = max((r.step for r in self.ranks if r.step is not None), default=None)
        models = [load(file, map_location="cpu", mmap=True) for file in zero_to_fp32.get_model_state_files(folder)]
        self.shapes: dict[str, torch.Size] = {}  # every saved parameter, trained or not
        self._trained: dict[str, tuple[int, int]] = {}  # name -> (group, offset in the group's flat)
        group_sizes = [m.numel() for m in self.ranks[0].flats[MASTER]]
        if self.zero_stage <= 2:
            paddings = self.ranks[0].paddings
            for g, shapes in enumerate(models[0][PARAM_SHAPES]):
                offset = 0
                for i, (name, shape) in enumerate(shapes.items()):
                    self._trained[name], self.shapes[name] = (g, offset), torch.Size(shape)
                    offset += math.prod(shape) + (paddings[g][i] if paddings is not None else 0)
            # Every rank's slice of a group has one size; only the last rank's masters are saved
            # without the group's end padding.
            self._slice = [max(r.flats[MASTER][g].numel() for r in self.ranks) for g in range(len(group_sizes))]
        else:
            offset = 0
            for shapes in models[0][PARAM_SHAPES]:  # one run of slices over the sub-groups
                for name, shape in shapes.items():
                    self._trained[name], self.shapes[name] = (0, offset), torch.Size(shape)
                    offset += self._slice_size(math.prod(shape))
            self._bounds = [0, *itertools.accumulate(group_sizes)]
        # Parameters without masters: ZeRO-2/3 save them (whole, or each rank's slice under ZeRO-3)
        # with their shapes; ZeRO-1 only in the saved module, whole.
        self._frozen: list[dict[str, torch.Tensor]] = [m.get(FROZEN_PARAM_FRAGMENTS) or {} for m in models]
        for name, shape in (models[0].get(FROZEN_PARAM_SHAPES) or {}).items():
            self.shapes.setdefault(name, torch.Size(shape))
        if self.zero_stage <= 2:
            buffers = set(models[0].get("buffer_names", ()))
            module = {k: v for k, v in models[0]["module"].items() if k not in buffers and k not in self._trained}
            self._frozen = [{**module, **self._frozen[0]}]
            for name, tensor in self._frozen[0].items():
                self.shapes.setdefault(name, tensor.shape)

    def holds(self, name: str) -> bool:
        return name in self.shapes

    def trained(self, name: str) -> bool:
        """Whether the checkpoint holds fp32 masters and AdamW moments of ``name``."""
        return name in self._trained

    def check_shape(self, name: str, shape: torch.Size, where: str) -> None:
        """CheckpointMismatchError naming ``where``, the parameter and both shapes unless the saved
        parameter ``name`` has ``shape``."""
        if self.shapes[name] != shape:
            raise CheckpointMismatchError(
                f"{where}: parameter {name!r} has shape {tuple(self.shapes[name])}; this run's model has {tuple(shape)}"
            )

    def read(self, name: str, key: str, start: int, count: int) -> torch.Tensor:
        """Elements ``start``..``start + count`` of the flattened whole ``key`` (``MASTER`` or one of
        ``MOMENTS``) of parameter ``name``, as a new 1-D tensor; elements past its end are zero (ZeRO-3
        pads a parameter's last partition so). A parameter saved without masters gives its saved
        weights (the working copy's dtype) for ``MASTER`` and zeros for a moment."""
        numel = math.prod(self.shapes[name])
        real = max(0, min(count, numel - start))
        if name not in self._trained:
            frozen = self._frozen_range(name, start, real) if key == MASTER else None
            out = torch.zeros(count, dtype=frozen.dtype if frozen is not None else torch.float32)
            if frozen is not None:
                out[:real] = frozen
            return out
        out = torch.zeros(count, dtype=torch.float32)
        group, offset = self._trained[name]
        if self.zero_stage <= 2:  # the group's flat, cut into equal slices in rank order
            size = self._slice[group]
            for pos, rank, local, take in _pieces(offset + start, real, size):
                flat = self.ranks[rank].flats[key][group]
                if flat is not None:
                    out[pos - offset - start : pos - offset - start + take] = flat[local : local + take]
            return out
        size = self._slice_size(numel)  # ZeRO-3: the parameter cut into equal slices
        for pos, rank, local, take in _pieces(start, real, size):
            out[pos - start : pos - start + take] = self._run(rank, key, offset + local, take)
        return out

    def _slice_size(self, numel: int) -> int:
        return math.ceil(numel / self.world_size)

    def _run(self, rank: int, key: str, pos: int, take: int) -> torch.Tensor:
        """ZeRO-3: elements ``pos``..``pos + take`` of ``rank``'s sub-group flats laid end to end."""
        pieces = []
        for g, (low, high) in enumerate(zip(self._bounds, self._bounds[1:])):
            a, b = max(pos, low), min(pos + take, high)
            if a < b:
                flat = self.ranks[rank].flats[key][g]
                pieces.append(flat[a - low : b - low] if flat is not None else torch.zeros(b - a))
        return torch.cat(pieces) if len(pieces) != 1 else pieces[0]

    def _frozen_range(self, name: str, start: int, count: int) -> torch.Tensor:
        if len(self._frozen) == 1:  # whole
            return self._frozen[0][name].reshape(-1)[start : start + count]
        size = self._slice_size(math.prod(self.shapes[name]))
        slices = _pieces(start, count, size)
        pieces = [self._frozen[rank][name][local : local + take] for _, rank, local, take in slices]
        return torch.cat(pieces) if pieces else torch.zeros(0)


class _OptimizerFile:
    """One saving rank's optimizer file, mapped: its flat fp32 master slices and AdamW moments per
    (sub-)group (None where that group never stepped: zero moments), step count, stage and paddings."""

    def __init__(self, file: str, load: Callable) -> None:
        from deepspeed.checkpoint.constants import (
            BASE_OPTIMIZER_STATE,
            FP32_FLAT_GROUPS,
            OPTIMIZER_STATE_DICT,
            PARAM_ALIGNMENT_PADDINGS,
            PARTITION_COUNT,
            SINGLE_PARTITION_OF_FP32_GROUPS,
            ZERO_STAGE,
        )

        saved = load(file, map_location="cpu", mmap=True)[OPTIMIZER_STATE_DICT]
        self.zero_stage, self.partition_count = saved[ZERO_STAGE], saved[PARTITION_COUNT]
        self.paddings = saved.get(PARAM_ALIGNMENT_PADDINGS)
        if self.zero_stage <= 2:
            masters, inner = saved[SINGLE_PARTITION_OF_FP32_GROUPS], saved[BASE_OPTIMIZER_STATE]
        else:
            masters, inner = saved[FP32_FLAT_GROUPS], saved[OPTIMIZER_STATE_DICT]
        if not isinstance(inner, dict):
            raise CheckpointLayoutError(
                f"{file} holds DeepSpeed's elastic optimizer state (a {type(inner).__name__} per group, "
                "zero_optimization.elastic_checkpoint), which this project does not read"
            )
        states = [inner["state"].get(i, {}) for i in range(len(masters))]
        self.flats = {MASTER: list(masters), **{key: [state.get(key) for state in states] for key in MOMENTS}}
        steps = [float(state["step"]) for state in states if "step" in state]
        self.step = max(steps) if steps else None


def _pieces(start: int, count: int, size: int):
    """Elements ``start``..``start + count`` of a flat cut into slices of ``size``, one rank's each:
    (position, rank, offset in its slice, elements) per slice they touch."""
    pos, end = start, start + count
    while pos < end:
        rank, local = divmod(pos, size)
        take = min(end - pos, size - local)
        yield pos, rank, local, take
        pos += take
