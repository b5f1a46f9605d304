"""DeepSpeed as the second engine: ZeRO-1/2/3 over the data ranks behind the parallel plan's
interface, so the one training loop drives either engine (docs/DESIGN.md, "The DeepSpeed engine").

``DeepSpeedPlan`` answers the calls the loop makes of a ``ParallelPlan`` (``allocate``, ``apply``,
``build_optimizer``, ``run``, ``optimizer_step``, ``everywhere``, who is who); the DeepSpeed engine
does the gradient reduction, clipping and the (sharded) AdamW step. ``DeepSpeedCheckpointer``
answers the ``Checkpointer``'s calls: DeepSpeed's ``save_checkpoint``/``load_checkpoint`` for the
weights and optimizer state, plus this project's per-rank RNG and loader state, committed in the same
``step_<N>`` folders, ``meta.json``, checksums and ``latest`` pointer.

DeepSpeed is imported only when ``engine=deepspeed`` (here, in ``parallel/deepspeed_comm.py`` and
for DeepSpeed-Ulysses in ``parallel/ulysses.py``).
"""

from __future__ import annotations

import contextlib
import enum
import importlib.util
import io
import json
import logging
import pickle
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from megatron_cosmos3.atomic_files import write_atomically
from megatron_cosmos3.checkpoint.checkpointer import (
    Checkpointer,
    CheckpointMismatchError,
    CheckpointSaveError,
    _named,
    _PendingSave,
    _save_error,
    load_state,
    read_meta,
)
from megatron_cosmos3.checkpoint.engine_layout import (
    CONVERTER,
    DEEPSPEED_FOLDER,
    CheckpointLayoutError,
    SavedLayout,
    check_same_parameter_groups,
    is_deepspeed_checkpoint,
    reads_own_files,
    saved_layout,
    write_layout,
)
from megatron_cosmos3.checkpoint.safe_reader import (
    RANK_MANIFEST_SUFFIX,
    CheckpointCorruptError,
    UnsafeCheckpointError,
    file_record,
    verify_checkpoint,
)
from megatron_cosmos3.checkpoint.sharded_state import ShardingMeshes
from megatron_cosmos3.checkpoint.weights_folder import fill_parameters
from megatron_cosmos3.model.mot import MoTModel
from megatron_cosmos3.objectives.losses import LossBreakdown, LossFunction, model_losses
from megatron_cosmos3.parallel.context_parallel import split_losses
from megatron_cosmos3.parallel.deepspeed_comm import start_deepspeed_comm
from megatron_cosmos3.parallel.failures import RankFailedError, fail_together
from megatron_cosmos3.training.config import TrainConfig
from megatron_cosmos3.training.deepspeed_config import deepspeed_config
from megatron_cosmos3.training.deepspeed_partitions import MASTER, SavedPartitions

log = logging.getLogger(__name__)

CONFIG_FILE = "deepspeed_config.json"  # the translated config, beside config.yaml in the run folder
ENGINE_TAG = DEEPSPEED_FOLDER  # DeepSpeed's own files live in step_<N>/deepspeed/ (its checkpoint tag)
TRAINER_STATE = "trainer_state_rank{rank}.pt"  # this project's per-rank state: RNG and loader position
ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")


class DeepSpeedPlan:
    """The DeepSpeed engine behind the parallel plan's interface (see the module docstring).

    Every rank holds the whole model (sharded by ZeRO inside DeepSpeed). Without context
    parallelism every rank is a data rank reading its own packs and there are no megatron-core
    groups (``groups`` is None); with ``parallel.context`` > 1 the context ranks of a data rank share
    its packs and split each one's rows, DeepSpeed-Ulysses exchanging them around the attention
    (``parallel/ulysses.py``, ``DeepSpeedUlyssesAttention``); ZeRO then shards over every rank,
    which averages the gradients over data x context as the context split expects."""

    def __init__(self, config: TrainConfig, world_size: int, groups=None):
        self.config = config
        self.world_size = world_size
        self.groups = groups  # megatron-core's groups when parallel.context > 1
        self.split = None
        if groups is not None:
            from megatron_cosmos3.parallel.context_parallel import SequenceSplit

            self.split = SequenceSplit(groups.context, context=groups.context, deepspeed_ulysses=True)
        self.model: MoTModel | None = None
        self.engine = None  # deepspeed.DeepSpeedEngine, from build_optimizer
        self.ds_config: dict | None = None
        self.param_groups: list[dict] = []  # parameter_groups_record, taken before DeepSpeed rewrites the groups

    @classmethod
    def create(cls, config: TrainConfig, world_size: int) -> DeepSpeedPlan:
        """Collective: with context parallelism, creates the groups (megatron-core's parallel state)."""
        if config.parallel.context == 1 or world_size == 1:
            return cls(config, world_size)
        from megatron_cosmos3.parallel.state import initialize_parallel

        groups = initialize_parallel(
            config.parallel, config.model, config.model.num_experts, config.distributed.init_timeout_s
        )
        return cls(config, world_size, groups)

    @property
    def data_rank(self) -> int:
        if self.groups is not None:
            return self.groups.data_rank
        return dist.get_rank() if dist.is_initialized() else 0

    @property
    def data_size(self) -> int:
        return self.groups.data_size if self.groups is not None else self.world_size

    @property
    def data_share(self) -> tuple | None:
        """(group, reader rank) of the context ranks that train on this data rank's packs."""
        return (self.groups.same_data, self.groups.data_reader) if self.groups is not None else None

    @property
    def model_parallel_size(self) -> int:
        return self.config.parallel.context if self.groups is not None else 1

    @property
    def state_owner(self) -> nn.Module:
        """The model itself (DeepSpeed wraps it; under ZeRO-3 its parameters are partitioned)."""
        return self.model

    @property
    def zero_stage(self) -> int:
        return self.config.deepspeed.zero_stage

    def allocate(self, model: MoTModel, device: torch.device) -> None:
        """Every rank materialises the whole model; DeepSpeed partitions it in ``build_optimizer``."""
        model.materialize(device)
        model.reset_parameters()

    def apply(self, model: MoTModel, trainable, unused=None) -> list[dict]:
        """``unused`` (which parameters a step may leave out) is for DDP; DeepSpeed's engine reduces itself."""
        self.model = model
        return trainable(model)

    def build_optimizer(self, param_groups: list[dict], *_ignored) -> object:
        """Starts the DeepSpeed engine over ``param_groups`` and returns its (ZeRO) optimizer. The
        learning rate, betas and weight decay come from the translated config (``deepspeed_config``),
        made from the same ``optimizer`` section the positional arguments repeat."""
        start_deepspeed_comm(self.config.distributed.init_timeout_s)
        import deepspeed

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        self.ds_config = deepspeed_config(self.config, self.world_size)
        self.param_groups = self._groups_record(param_groups)  # ZeRO puts its flat partitions in their place
        self.engine, optimizer, _, _ = deepspeed.initialize(
            model=self.model, model_parameters=param_groups, config=self.ds_config, dist_init_required=False
        )
        if self.data_rank == 0:  # saved with the run on every attempt, beside config.yaml
            path = self.write_config(self.config.checkpoint.directory)
            log.info("engine=deepspeed (ZeRO-%d): translated config in %s", self.zero_stage, path)
        return optimizer

    def write_config(self, folder: str | Path) -> Path:
        """Writes the translated DeepSpeed config into ``folder`` (rank 0 calls it), whole or not at
        all (a run killed while writing leaves the previous attempt's file); returns the file."""
        return write_atomically(Path(folder) / CONFIG_FILE, json.dumps(self.ds_config, indent=2, sort_keys=True) + "\n")

    def parameter_groups_record(self) -> list[dict]:
        """The engine's optimizer parameter groups as a checkpoint records them (``engine_layout``):
        each group's hyperparameters and the names of its parameters, in the engine's order."""
        return [dict(group, params=list(group["params"])) for group in self.param_groups]

    def _groups_record(self, param_groups: list[dict]) -> list[dict]:
        names = {id(param): name for name, param in self.model.named_parameters()}
        opt = self.config.optimizer
        return [
            {
                "lr_multiplier": float(group.get("lr_multiplier", 1.0)),
                "weight_decay": float(group.get("weight_decay", opt.weight_decay)),
                "betas": [float(b) for b in group.get("betas", opt.betas)],
                "params": [names[id(param)] for param in group["params"]],
            }
            for group in param_groups
        ]

    # -- the driver -----------------------------------------------------------------------------
    def run(
        self,
        micro_batches: Sequence,
        loss_fn: LossFunction,
        forward_only: bool = False,
        forward_context=contextlib.nullcontext,
    ) -> dict[int, LossBreakdown]:
        """As ``ParallelPlan.run``: every micro-batch's losses, and the backward of ``total /
        len(micro_batches)`` through the engine (which accumulates; ``optimizer_step`` reduces)."""
        with fail_together("DeepSpeed's forward and backward"):  # a rank failing there ends every rank
            return self._run(micro_batches, loss_fn, forward_only, forward_context)

    def _run(self, micro_batches, loss_fn, forward_only, forward_context) -> dict[int, LossBreakdown]:
        losses_of = {}
        for m, (batch, targets) in enumerate(micro_batches):
            batch, targets = self._every_module(batch, targets)
            with torch.set_grad_enabled(not forward_only):
                with forward_context():
                    if self.split is not None:  # this rank's rows; the loss is the whole micro-batch's
                        losses = split_losses(self.model, batch, targets, self.split, loss_fn)
                    else:
                        losses = model_losses(self.engine, batch, targets, loss_fn)
                if not forward_only:
                    with torch.profiler.record_function("backward"):  # a profiling region (docs/DESIGN.md, "Profiling")
                        self._backward(losses.total / len(micro_batches))
            losses_of[m] = losses
        return losses_of

    def _every_module(self, batch, targets):
        """Under ZeRO-3, the micro-batch padded so that the forward enters every stream projection
        and the ViT on every rank, in one order (``MoTModel.with_every_module``): ZeRO-3 gathers a
        module's parameters from every rank as the forward enters it, and reduces their gradients in
        the order the backward produces them, so ranks whose packs hold different streams would
        otherwise run mismatched collectives. The padding changes no loss; the modules a pack does
        not reach get exactly zero gradient (which DeepSpeed steps, as it steps every parameter)."""
        if self.zero_stage != 3:
            return batch, targets
        batch = self.model.with_every_module(batch)
        return batch, {key: targets.get(key, values) for key, values in batch.dm_tokens.items()}

    def _backward(self, loss: torch.Tensor) -> None:
        """``loss``'s gradients into the engine, reaching ZeRO's reduction in the same parameter order
        on every rank.

        ZeRO-1/2 reduce gradients in buckets filled in the order the backward produces them, and
        that order (and which parameters get one at all) depends on the pack: a pack without audio
        never reaches the audio projections. Ranks with different packs would then all-reduce
        mismatched buckets (a gloo size error, or silently mixed gradients). So the gradients are
        computed first (``torch.autograd.grad``, which fires no ZeRO hook; zeros for unused
        parameters) and handed to the engine by the backward of sum(p * g) in the model's parameter
        order: exactly g for every p, in one order everywhere. ZeRO-3's parameters are not whole
        outside the forward, so there the loss goes to the engine's backward as it is: every rank's
        forward entered the same modules in the same order (``_every_module``), so every parameter
        gets its gradient in the same order everywhere, and DeepSpeed sorts each bucket by
        parameter id."""
        if self.zero_stage == 3:
            self.engine.backward(loss, scale_wrt_gas=False)
            return
        params = [p for p in self.model.parameters() if p.requires_grad]
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        surrogate = sum((p * (g if g is not None else torch.zeros_like(p))).sum() for p, g in zip(params, grads))
        self.engine.backward(surrogate, scale_wrt_gas=False)

    def everywhere(self, flag: bool) -> bool:
        """Collective: whether ``flag`` holds on every rank."""
        if not dist.is_initialized() or self.world_size == 1:
            return flag
        failed = torch.tensor([0.0 if flag else 1.0])
        dist.all_reduce(failed)
        return not bool(failed.item())

    @contextlib.contextmanager
    def writing_weights(self):
        """Yields a whole replica (``replica``) for a stage's starting weights (a weights folder) to
        be written into, then hands them to the engine (``load_replica``): its working copy and its
        fp32 masters, which ZeRO-3 holds only in partitions and which would otherwise undo the load at
        the first step. Collective."""
        model, _ = self.replica()
        yield model
        self.load_replica(model, None)

    def optimizer_step(self, optimizer, max_norm: float, finite: bool) -> tuple[torch.Tensor, bool]:
        """The engine's step: reduces (ZeRO) the accumulated gradients, clips them to the configured
        norm (``max_norm``, the same value) and updates, unless a gradient is not finite (DeepSpeed
        skips that update). Returns (norm before clipping, whether the weights changed).

        A non-finite loss (``finite`` False on some rank) makes its gradients non-finite too, so the
        engine skips that update as well; the step is still taken so that the engine's gradient
        buffers are cleared for the next one."""
        with fail_together("DeepSpeed's optimizer step"):
            self.engine.step()
        norm = self.engine.get_global_grad_norm()
        norm = torch.tensor(float("nan") if norm is None else float(norm))
        return norm, finite and self.engine.was_step_applied()

    def close(self) -> None:
        # After a rank failed inside the engine's collectives (``fail_together``) no process group
        # is left, and DeepSpeed's clean-up asks it for this rank's number: nothing to release then.
        if self.engine is not None and (dist.is_initialized() or self.world_size == 1):
            self.engine.destroy()
        if self.groups is not None:  # the next run in this process creates its own
            from megatron_cosmos3.parallel.state import destroy_parallel

            destroy_parallel()

    # -- switching engines ----------------------------------------------------------------------
    def replica(self) -> tuple[MoTModel, torch.optim.AdamW]:
        """A plain, whole copy of the model on the CPU, with torch's AdamW over the parameters this
        engine trains (in the same groups): the Megatron-style engine's state in one process."""
        from megatron_cosmos3.parallel.plan import ParallelPlan
        from megatron_cosmos3.parallel.sizes import ParallelSizes
        from megatron_cosmos3.training.train import build_model, stage_param_groups

        model = build_model(self.config, ParallelPlan(ParallelSizes()), torch.device("cpu"))
        opt = self.config.optimizer
        groups = stage_param_groups(model, self.config)
        return model, torch.optim.AdamW(groups, lr=opt.lr, betas=tuple(opt.betas), weight_decay=opt.weight_decay)

    def _flat_partitions(self) -> list[torch.Tensor]:
        """The engine's flat fp32 master partitions, the tensors its inner AdamW steps."""
        zero = self.engine.optimizer
        if self.zero_stage == 3:  # its sub-groups take turns in the inner optimizer's param_groups
            return list(zero.fp32_partitioned_groups_flat)
        return [flat for group in zero.optimizer.param_groups for flat in group["params"]]

    def _link_optimizer_state(self) -> None:
        """Makes every flat fp32 partition's AdamW state exist (torch creates it lazily, at the first
        step) so that DeepSpeed's ``safe_*_optimizer_state`` reach it; under ZeRO-1/2 each
        parameter's slice of it is (re)linked, because loading a checkpoint replaces the state's
        tensors (ZeRO-3 looks its slices up on every call)."""
        zero = self.engine.optimizer
        inner = zero.optimizer
        for flat in self._flat_partitions():
            state = inner.state[flat]
            if not state:
                state.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(flat), exp_avg_sq=torch.zeros_like(flat))
        if self.zero_stage != 3:
            zero._hp_optimizer_states_linked = False  # DeepSpeed links once, after its first step
            zero._lazy_init_hp_params_optimizer_state()

    def _local_part(self, param: nn.Parameter, full: torch.Tensor) -> torch.Tensor:
        """ZeRO-3: this rank's partition of the whole tensor ``full`` of ``param`` (the last one
        padded with zeros to the partition size, as ZeRO-3 pads it)."""
        size, rank = param.ds_tensor.numel(), dist.get_rank()
        flat = full.detach().reshape(-1)
        flat = torch.nn.functional.pad(flat, (0, size * self.world_size - flat.numel()))
        return flat.narrow(0, size * rank, size)

    def _set_full(self, param: nn.Parameter, value: torch.Tensor, state: dict) -> None:
        """Sets ``param``'s working copy, and if it trains its fp32 master and the AdamW moments in
        ``state``, from whole tensors."""
        from deepspeed.utils import (
            safe_set_full_fp32_param,
            safe_set_full_optimizer_state,
            safe_set_local_fp32_param,
            safe_set_local_optimizer_state,
        )

        with torch.no_grad():
            if self.zero_stage == 3:  # each rank holds its partition only
                param.ds_tensor.copy_(self._local_part(param, value))
            else:
                param.copy_(value)
        if not param.requires_grad:
            return
        if self.zero_stage == 3:  # DeepSpeed's full setters do not pad the last partition
            safe_set_local_fp32_param(param, self._local_part(param, value).float())
            for key in ADAM_MOMENTS:
                if key in state:
                    safe_set_local_optimizer_state(param, self._local_part(param, state[key]), key)
            return
        safe_set_full_fp32_param(param, value)
        for key in ADAM_MOMENTS:
            if key in state:
                safe_set_full_optimizer_state(param, state[key], key)

    def _working_copy(self, param: nn.Parameter) -> torch.Tensor:
        """``param``'s whole working copy (collective under ZeRO-3)."""
        if self.zero_stage != 3:
            return param.detach()
        import deepspeed

        with deepspeed.zero.GatheredParameters([param]):
            return param.detach().clone()

    def load_replica(self, model: MoTModel, optimizer: torch.optim.AdamW | None) -> None:
        """Sets the engine's weights (working copy and fp32 master) and, with ``optimizer``, its AdamW
        moments and step from a ``replica`` (every ZeRO stage; collective under ZeRO-3).

        DeepSpeed keeps one AdamW step count per flat partition; torch's AdamW one per parameter,
        and it skips a parameter that no pack of a step reached, so a Megatron-style checkpoint's
        counts may differ (by parameter, and so between the ranks that saved them). The engine
        continues from the largest: the run's own step count, which every parameter trained from
        the start has reached."""
        self._link_optimizer_state()
        source = dict(model.named_parameters())
        steps = {}
        for name, param in self.model.named_parameters():
            state = optimizer.state.get(source[name], {}) if optimizer is not None and param.requires_grad else {}
            self._set_full(param, source[name].detach(), state)
            if "step" in state:
                steps[name] = float(state["step"])
        if steps:
            step = max(steps.values())
            behind = sorted(name for name, taken in steps.items() if taken < step)
            if behind and self.data_rank == 0:
                log.info(
                    "the checkpoint's parameters took different numbers of AdamW steps (%s: %d, the most: %d); "
                    "DeepSpeed continues every partition from %d",
                    behind[0],
                    steps[behind[0]],
                    step,
                    step,
                )
            for flat in self._flat_partitions():
                self.engine.optimizer.optimizer.state[flat]["step"] = torch.tensor(step, dtype=torch.float32)

    def load_partitions(self, saved: SavedPartitions, path: Path, allow_missing: tuple[str, ...] = ()) -> None:
        """Sets this rank's part of the engine from the saved partitions (``saved``, of any ZeRO stage
        and world size) of the checkpoint folder ``path``, reading only the ranges this rank
        holds: the fp32 masters and AdamW moments of its own partitions, and the working copy of
        what it holds whole (ZeRO-1/2: every parameter) or partitioned (ZeRO-3). The working copy of
        a trained parameter is its master (ZeRO-1/2: every rank's masters all-gathered, as after a
        step); one without a master (frozen) takes its saved weights. The AdamW step of every flat
        partition becomes the largest saved. A parameter the checkpoint lacks is a
        CheckpointMismatchError naming it, unless its name starts with one of ``allow_missing`` (it
        keeps its initial value); one of another shape names both shapes. Collective."""
        from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

        names = [name for name, _ in self.model.named_parameters()]
        _refuse_missing(f"checkpoint {path}", [name for name in names if not saved.holds(name)], allow_missing)
        where = f"checkpoint {path / ENGINE_TAG}"
        self._link_optimizer_state()
        rank = dist.get_rank() if dist.is_initialized() else 0
        for name, param in self.model.named_parameters():
            if not saved.holds(name):
                continue
            saved.check_shape(name, param.ds_shape if self.zero_stage == 3 else param.shape, where)
            with torch.no_grad():
                if self.zero_stage == 3:  # this rank's slice of every parameter
                    size = param.ds_tensor.numel()
                    master = saved.read(name, MASTER, size * rank, size)
                    param.ds_tensor.copy_(master)
                    if param.requires_grad:
                        safe_set_local_fp32_param(param, master.float())
                        for key in ADAM_MOMENTS:
                            safe_set_local_optimizer_state(param, saved.read(name, key, size * rank, size), key)
                elif not param.requires_grad:  # whole on every rank, without a master
                    param.copy_(saved.read(name, MASTER, 0, param.numel()).view_as(param))
                elif param._hp_mapping is not None:  # the part of it in this rank's flat partition
                    mapping, address = param._hp_mapping, param._hp_mapping.lp_fragment_address
                    mapping.hp_fragment.copy_(saved.read(name, MASTER, address.start, address.numel))
                    for key in ADAM_MOMENTS:
                        fragment = mapping.get_optim_state_fragment(key)
                        fragment.copy_(saved.read(name, key, address.start, address.numel))
        if self.zero_stage != 3:  # the working copies from the masters, as a step leaves them
            self.engine.optimizer.update_lp_params()
        step = torch.tensor(saved.step or 0.0, dtype=torch.float32)
        for flat in self._flat_partitions():
            self.engine.optimizer.optimizer.state[flat]["step"] = step.clone()

    def replica_of_engine(self) -> tuple[MoTModel, torch.optim.AdamW]:
        """The engine's fp32 weights, AdamW moments and step as a ``replica`` (every ZeRO stage;
        collective under ZeRO-3)."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        self._link_optimizer_state()
        model, optimizer = self.replica()
        target = dict(model.named_parameters())
        inner = self.engine.optimizer.optimizer
        step = inner.state[self._flat_partitions()[0]]["step"]
        for name, param in self.model.named_parameters():
            copy = target[name]
            with torch.no_grad():
                copy.copy_(safe_get_full_fp32_param(param) if param.requires_grad else self._working_copy(param))
            if param.requires_grad and float(step) > 0:  # an engine that has stepped
                state = optimizer.state[copy]
                for key in ADAM_MOMENTS:
                    state[key] = safe_get_full_optimizer_state(param, key).detach().clone().cpu()
                state["step"] = step.detach().clone().cpu()
        return model, optimizer

    # -- generation -----------------------------------------------------------------------------
    def samples_here(self, is_main: bool, has_targets: bool) -> bool:
        """Under ZeRO-3 every forward gathers parameters from every rank, so all ranks denoise
        together (and all skip when a pack lacks targets); otherwise rank 0 alone."""
        if self.zero_stage == 3 and self.world_size > 1:
            return self.everywhere(has_targets)
        return is_main and has_targets  # the whole model on rank 0: the cached sampler, no row split

    def velocity(self, targets):
        return None  # the whole model runs on every rank: the cached sampler runs it


def _deepspeed_checkpoint_classes() -> list:
    """The classes DeepSpeed's own checkpoint files hold besides tensors and plain data (measured on
    ZeRO-1/2/3 in fp32 and bf16): the ZeRO stage enum, the loss scaler's state and the addresses of
    parameter fragments. Nothing with behaviour on unpickling."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    # Python 3.11.0-3.11.4 pickle an enum member as getattr(EnumClass, name): the file then names
    # the builtin getattr, which stands for the member lookup below and nothing else.
    return [ZeroStageEnum, LossScaler, fragment_address, (_enum_member, "builtins.getattr")]


def _enum_member(cls, name: str):
    """``getattr`` as an enum member's pickle uses it, for allowlisted enum classes only."""
    if not (isinstance(cls, type) and issubclass(cls, enum.Enum)) or name not in cls.__members__:
        raise pickle.UnpicklingError(f"GLOBAL getattr({cls!r}, {name!r}) is not an enum member")
    return cls[name]


class WeightsOnlyCheckpointEngine:
    """DeepSpeed's checkpoint engine with ``load`` through torch's weights-only unpickler (the stock
    one passes ``weights_only=False``: a crafted file would run code on every rank). Everything else
    is the engine's own."""

    def __init__(self, inner) -> None:
        self._inner = inner

    def __getattr__(self, name: str):
        return getattr(self._inner, name)

    def load(self, path: str, map_location=None, mmap: bool = False):
        with torch.serialization.safe_globals(_deepspeed_checkpoint_classes()):
            try:
                return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
            except pickle.UnpicklingError as error:
                reason = next((line for line in str(error).splitlines() if "GLOBAL" in line), str(error)[:300])
                raise UnsafeCheckpointError(
                    f"checkpoint file {path} refers to code, which a weights-only load refuses: {reason.strip()}"
                ) from None


class _WeightsOnlyTorch:
    """``torch`` as DeepSpeed's ``zero_to_fp32`` module sees it in ``deepspeed_weights``: its
    ``torch.load`` passes ``weights_only=False``; here every load is ``WeightsOnlyCheckpointEngine``'s,
    memory-mapped where it asks: it reads every saving rank's optimizer files on every rank, and
    read whole they would all be in memory at once, the AdamW moments it never touches included."""

    def __init__(self) -> None:
        self._load = WeightsOnlyCheckpointEngine(None).load

    def __getattr__(self, name: str):
        return getattr(torch, name)

    def load(self, f, map_location=None, mmap: bool = False, **_ignored):
        return self._load(str(f), map_location, mmap)


def load_deepspeed_weights(folder: Path, owner: nn.Module, groups=None, allow_missing: tuple[str, ...] = ()) -> None:
    """Fills ``owner`` (this rank's part of the model; ``groups``: its megatron-core groups, None for
    a whole model) from the ``engine=deepspeed`` checkpoint ``folder``: the fp32 masters of its ZeRO
    partitions merged into whole tensors (``deepspeed_weights``), of any stage and number of saving
    ranks, each rank taking its part as from a weights folder. A parameter the checkpoint lacks is a
    CheckpointMismatchError naming it, unless its name starts with one of ``allow_missing``."""
    if importlib.util.find_spec("deepspeed") is None:
        raise CheckpointLayoutError(
            f"checkpoint {folder} was written by engine=deepspeed, and reading its ZeRO partitions needs DeepSpeed, "
            "which is not installed here"
        )
    held = dict(owner.named_parameters())
    weights = deepspeed_weights(folder)
    _refuse_missing(f"checkpoint {folder}", [name for name in held if name not in weights], allow_missing)
    where = f"checkpoint {folder / ENGINE_TAG}"
    fill_parameters(held, ((where, name, tensor) for name, tensor in weights.items()), groups)


def _refuse_missing(where: str, missing: list[str], allow_missing: tuple[str, ...]) -> None:
    """CheckpointMismatchError naming the first of the parameters ``missing`` from the DeepSpeed
    checkpoint ``where`` whose name starts with none of ``allow_missing``."""
    missing = sorted(name for name in missing if not name.startswith(tuple(allow_missing)))
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise CheckpointMismatchError(f"{where}: DeepSpeed's files lack parameter {missing[0]!r}{more}")


def deepspeed_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The whole model's weights, by parameter name, of the ``engine=deepspeed`` checkpoint folder
    ``path`` (any ZeRO stage, saved on any number of ranks), read in one process without DeepSpeed's
    engine: DeepSpeed's ``zero_to_fp32`` merges the ranks' fp32 partitions; a parameter it leaves
    out (one that did not train, under ZeRO-1/2) is the saved module's. Every file is checked
    against the checksums first and unpickled weights-only (docs/DESIGN.md, "Release")."""
    path = Path(path)
    verify_checkpoint(path)
    with weights_only_zero_to_fp32() as zero_to_fp32:
        weights = dict(zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(path), tag=ENGINE_TAG))
    module_file = path / ENGINE_TAG / "mp_rank_00_model_states.pt"  # ZeRO-1/2: the whole module
    if module_file.is_file():
        module = WeightsOnlyCheckpointEngine(None).load(str(module_file), "cpu")["module"]
        weights.update({name: tensor for name, tensor in module.items() if name not in weights})
    return weights


@contextlib.contextmanager
def weights_only_zero_to_fp32():
    """Yields DeepSpeed's ``zero_to_fp32`` module with its every ``torch.load`` weights-only
    (``_WeightsOnlyTorch``) and its progress output silenced."""
    from deepspeed.utils import zero_to_fp32

    stock = zero_to_fp32.torch
    zero_to_fp32.torch = _WeightsOnlyTorch()
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield zero_to_fp32
    finally:
        zero_to_fp32.torch = stock


@contextlib.contextmanager
def weights_only_loads(engine):
    """Within: ``engine.load_checkpoint`` unpickles no code (``WeightsOnlyCheckpointEngine``)."""
    stock = engine.checkpoint_engine
    engine.checkpoint_engine = WeightsOnlyCheckpointEngine(stock)
    try:
        yield
    finally:
        engine.checkpoint_engine = stock


class _FailuresKept:
    """DeepSpeed's checkpoint engine with ``save`` keeping a failure in ``failures`` instead of raising it."""

    def __init__(self, inner, failures: list) -> None:
        self._inner = inner
        self._failures = failures

    def __getattr__(self, name: str):
        return getattr(self._inner, name)

    def save(self, state_dict, path: str):
        try:
            self._inner.save(state_dict, path)
        except Exception as error:
            self._failures.append(error)


@contextlib.contextmanager
def failures_kept_for_later(engine):
    """Within: a file write of ``engine.save_checkpoint`` that fails (its checkpoint engine's ``save``,
    rank 0's copy of the recovery scripts) is appended to the yielded list instead of raised, so this
    rank still reaches the collectives that follow it in DeepSpeed's save (its closing barrier): a
    rank that raised there would leave the others waiting at it forever."""
    failures: list[BaseException] = []
    stock = engine.checkpoint_engine
    engine.checkpoint_engine = _FailuresKept(stock, failures)
    stock_copy = engine._copy_recovery_script

    def copy_recovery_script(save_path):
        try:
            stock_copy(save_path)
        except Exception as error:
            failures.append(error)

    engine._copy_recovery_script = copy_recovery_script
    try:
        yield failures
    finally:
        engine.checkpoint_engine = stock
        del engine._copy_recovery_script  # the class's method again


class DeepSpeedCheckpointer(Checkpointer):
    """``Checkpointer`` whose weights and optimizer state go through DeepSpeed's save/load
    (``step_<N>/deepspeed/``, DeepSpeed's layout and its ``zero_to_fp32.py``), with this project's
    per-rank RNG and loader state beside them (``trainer_state_rank<r>.pt``, tensors only) and the
    same commit: ``.step_<N>.partial`` renamed when whole, ``meta.json``, checksums, ``latest``.
    Saving is synchronous (DeepSpeed writes before it returns)."""

    def __init__(self, root: str | Path, keep_last: int, plan: DeepSpeedPlan):
        super().__init__(
            root, keep_last, groups=None, async_save=False, timeout_s=plan.config.distributed.init_timeout_s
        )
        self.plan = plan

    def save(self, step, model, optimizer, per_rank, meta, named=None) -> None:
        """Writes every rank's files, then rank 0 commits them. A write that fails on any rank (a full
        disk) is a CheckpointSaveError on every rank naming that rank and its error, the staging
        folder removed and ``latest`` unchanged: the ranks agree (``Checkpointer._raise_together``)
        instead of waiting at a barrier for one that stopped."""
        staging = self._new_staging(step)
        failed = None
        try:
            # A failure DeepSpeed's save raises between its collectives (not a file write, which is
            # held: a directory it cannot make) would leave the others at its barrier.
            with fail_together("DeepSpeed's save_checkpoint"):
                with failures_kept_for_later(self.plan.engine) as failures:
                    self.plan.engine.save_checkpoint(str(staging), tag=ENGINE_TAG, client_state={}, save_latest=False)
            if failures:
                raise failures[0]
            state = {"per_rank": dict(per_rank), "named": dict(named or {})}
            torch.save(state, staging / TRAINER_STATE.format(rank=self.rank))
            if self.rank == 0:  # what a resume checks before it loads DeepSpeed's files
                plan = self.plan
                write_layout(staging, plan.zero_stage, plan.world_size, plan.parameter_groups_record())
        except RankFailedError as error:  # another rank's failure, named
            failed = _save_error(f"checkpoint of step {step} not saved to {staging}: {error}; {self._kept()}", error)
        except Exception as error:  # any failure here must reach the other ranks, or they wait forever
            failed = _save_error(
                f"checkpoint of step {step} not saved to {staging}: rank {self.rank}: {_named(error)}; {self._kept()}",
                error,
            )
        if failed is not None and not dist.is_initialized():  # fail_together closed the groups: nothing to agree on
            if self.rank == 0:
                shutil.rmtree(staging, ignore_errors=True)
            raise failed
        try:  # every rank's files are on disk before rank 0 checksums and commits them
            self._raise_together(failed)
        except CheckpointSaveError:
            if self.rank == 0:  # every rank has stopped writing: a full disk gets its space back
                shutil.rmtree(staging, ignore_errors=True)
            raise
        self._commit(_PendingSave(None, step, staging, meta))

    def _commit_files(self, pending: _PendingSave, final: Path) -> None:
        """Rank 0: every file (DeepSpeed's too) checksummed, so a damaged one is found before loading;
        then the ``Checkpointer``'s commit (a failure here too is agreed on, by ``_commit``)."""
        staging = pending.staging
        try:
            records = {str(p.relative_to(staging)): file_record(p) for p in sorted(staging.rglob("*")) if p.is_file()}
            (staging / f"__0_{RANK_MANIFEST_SUFFIX}").write_text(json.dumps(records))
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        super()._commit_files(pending, final)

    def load(self, path, model, optimizer=None, per_rank=None, allow_missing=(), named=None) -> dict:
        """Loads a checkpoint this engine saved: DeepSpeed's weights and optimizer state into the
        engine (``optimizer`` None: the weights only, its fp32 masters through ``load_deepspeed_weights``),
        from any ZeRO stage and world size: DeepSpeed's own loader where this run's stage and world
        size read the saved partitions (``reads_own_files``), else the partitions reassembled into
        whole tensors and re-partitioned (``_load_resharded``); then this rank's RNG (``per_rank``;
        a rank the saving run did not have keeps its own) and the loader positions (``named``, found
        in whichever rank's file holds them) in place, as the Megatron-style engine does. Before
        anything is read, a CheckpointLayoutError names a checkpoint saved with other parameter
        groups (``engine_layout``). Every file is checked against the checksums first; DeepSpeed's
        files are unpickled weights-only (``weights_only_loads``). A Megatron-style checkpoint is the
        engine switch."""
        path = Path(path)
        layout = saved_layout(path)  # a DeepSpeed universal checkpoint is refused here, by name
        if layout.engine != "deepspeed":
            return self._load_megatron_style(path, optimizer, per_rank, allow_missing, named)
        if optimizer is None:
            meta = read_meta(path)
            with self.plan.writing_weights() as owner:
                load_deepspeed_weights(path, owner, None, allow_missing)
        else:
            check_same_parameter_groups(path, layout.param_groups, self.plan.parameter_groups_record())
            if reads_own_files(layout, self.plan.zero_stage, self.plan.world_size):
                verify_together(path)
                meta = read_meta(path)
                with weights_only_loads(self.plan.engine):
                    self.plan.engine.load_checkpoint(
                        str(path), tag=ENGINE_TAG, load_optimizer_states=True, load_lr_scheduler_states=False
                    )
            else:
                meta = read_meta(path)
                self._load_resharded(path, layout, allow_missing)
        mine = path / TRAINER_STATE.format(rank=self.rank)
        if per_rank is not None:
            saved = torch.load(mine, weights_only=True)["per_rank"] if mine.is_file() else {}
            for name in list(per_rank):
                if name in saved:
                    per_rank[name] = saved[name]
                else:
                    del per_rank[name]
        if named:
            found = {}
            for part in sorted(path.glob(TRAINER_STATE.format(rank="*"))):
                found.update(torch.load(part, weights_only=True)["named"])
            for name in list(named):
                if name in found:
                    named[name] = found[name]
                else:
                    del named[name]
        return meta

    def _load_resharded(self, path: Path, layout: SavedLayout, allow_missing) -> None:
        """A checkpoint of another world size or ZeRO-3 against ZeRO-1/2 (``reads_own_files`` false):
        every file checked against the checksums (``verify_together``, each hashed by one rank), then each
        rank reads from the saving ranks' mapped files (``SavedPartitions``) only the ranges of the
        fp32 masters, AdamW moments and weights that its own new partitions hold
        (``DeepSpeedPlan.load_partitions``). Exact: the reads move values only, at the offsets of
        DeepSpeed's ``zero_to_fp32`` reassembly."""
        verify_together(path)
        saved = SavedPartitions(path / ENGINE_TAG, WeightsOnlyCheckpointEngine(None).load)
        self.plan.load_partitions(saved, path, tuple(allow_missing))
        if self.rank == 0:
            plan = self.plan
            current = SavedLayout("deepspeed", plan.zero_stage, plan.world_size).describe()
            log.info(
                "checkpoint %s was saved under %s, and this run is %s: each rank read its own partitions of the "
                "fp32 masters and AdamW state from the saved ones",
                path,
                layout.describe(),
                current,
            )

    def _load_megatron_style(self, path: Path, optimizer, per_rank, allow_missing, named) -> dict:
        """The engine switch: a checkpoint of the Megatron-style engine, of any layout (its entries
        describe global tensors), is read into a whole replica and handed to the engine
        (``DeepSpeedPlan.load_replica``), RNG and loader state as saved."""
        model, adam = self.plan.replica()
        meta = load_state(
            path,
            model,
            ShardingMeshes(),
            self.group,
            adam if optimizer is not None else None,
            per_rank,
            self.rank,
            allow_missing,
            named,
        )
        self.plan.load_replica(model, adam if optimizer is not None else None)
        return meta

    def save_megatron_style(self, root: str | Path, step: int, per_rank, meta: dict, named=None) -> Path:
        """Writes the engine's state as a checkpoint of the Megatron-style engine under ``root``
        (``step_<N>``, committed as that engine commits): the other direction of the switch."""
        model, adam = self.plan.replica_of_engine()
        target = Checkpointer(root, self.keep_last, groups=None, async_save=False)
        target.save(step, model, adam, per_rank, meta, named)
        return Path(root) / f"step_{step:08d}"


def verify_together(path: Path) -> None:
    """Every file of the checkpoint ``path`` checked against the checksums, each hashed by one rank
    (``verify_checkpoint``'s share: file i by rank i mod the world size; each rank checks every size
    and the listing): a damaged or unreadable file is a CheckpointCorruptError naming it on every
    rank (the lowest rank's finding when several), so that every rank takes the same way
    (``fallback_to_verified``). Collective."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    try:
        verify_checkpoint(path, (rank, world))
        found = None
    except CheckpointCorruptError as error:
        found = str(error)
    except OSError as error:
        found = f"checkpoint {path}: a file could not be read: {_named(error)}"
    if world > 1:
        everyone = [None] * world
        dist.all_gather_object(everyone, found)
        found = next((finding for finding in everyone if finding is not None), None)
    if found is not None:
        raise CheckpointCorruptError(found)


def convert_checkpoint(config: TrainConfig, ctx, source: str | Path, target_root: str | Path) -> Path:
    """Converts the checkpoint folder ``source`` between the engines: a DeepSpeed one (any ZeRO
    stage, saved on any number of ranks: the load reshards) into a Megatron-style one, or a
    Megatron-style one into a DeepSpeed one, committed as ``target_root/step_<N>`` with the same
    step, RNG, loader state and meta.
    Collective on the ranks of an ``engine=deepspeed`` run of ``config`` (``ctx``): a rank failing
    in the load or the save (a file it cannot read) ends every rank, each naming it
    (``fail_together``; a save that failed somewhere raises ``CheckpointSaveError`` on every rank).
    A source no conversion reads (a DeepSpeed universal checkpoint, DeepSpeed's files without their
    step folder, a folder without meta.json) is a CheckpointLayoutError naming it on every rank,
    before DeepSpeed starts."""
    import copy

    from megatron_cosmos3.training.train import build_run

    source = Path(source)
    saved_layout(source)  # refuses a universal checkpoint and DeepSpeed's bare files by name
    if not (source / "meta.json").is_file():
        raise CheckpointLayoutError(f"{source} is not a committed step_<N> checkpoint folder (it has no meta.json)")
    config = copy.deepcopy(config)
    config.engine, config.checkpoint.directory = "deepspeed", str(target_root)
    run = build_run(config, ctx)
    try:
        with fail_together("converting the checkpoint", agreed=(CheckpointSaveError,)):
            per_rank, named = {"rng": torch.get_rng_state()}, run.batches.state()
            meta = run.checkpointer.load(source, run.plan.state_owner, run.optimizer, per_rank, named=named)
            step, rest = meta["step"], {k: v for k, v in meta.items() if k != "step"}
            if is_deepspeed_checkpoint(source):
                return run.checkpointer.save_megatron_style(target_root, step, per_rank, rest, named)
            run.checkpointer.save(step, run.plan.state_owner, run.optimizer, per_rank, rest, named)
            return Path(target_root) / f"step_{step:08d}"
    finally:
        run.batches.close()
        run.plan.close()


# A source the converter refuses, printed as one line (exit status 2) instead of a traceback; a
# RankFailedError is a peer's, which names that rank and its error.
SOURCE_ERRORS = (
    CheckpointLayoutError,
    CheckpointCorruptError,
    UnsafeCheckpointError,
    CheckpointMismatchError,
    RankFailedError,
)


def main(argv: list[str] | None = None) -> int:
    """``torchrun --nproc-per-node N -m megatron_cosmos3.training.deepspeed_engine --config FILE SOURCE
    TARGET [key=value ...]``: ``convert_checkpoint`` on N ranks (any N: a DeepSpeed checkpoint saved
    on another number of ranks is resharded as it is read). A source it
    refuses (``SOURCE_ERRORS``) is one line on stderr from rank 0 (its own refusal, every rank reading
    the same files, or the rank that failed to read it, named) and exit status 2 on every rank."""
    import argparse

    from megatron_cosmos3.training.config import load_config
    from megatron_cosmos3.training.distributed import init_distributed

    parser = argparse.ArgumentParser(
        prog=CONVERTER,
        description="Convert a checkpoint folder between engine=megatron and engine=deepspeed (ZeRO-1/2/3).",
    )
    parser.add_argument("--config", action="append", default=[], help="the run's YAML config; repeat to layer")
    parser.add_argument("source", help="a step_<N> checkpoint folder of either engine")
    parser.add_argument("target", help="the checkpoint directory the converted step_<N> is committed in")
    parser.add_argument("overrides", nargs="*", help="OmegaConf dotlist overrides, e.g. deepspeed.zero_stage=2")
    args = parser.parse_args(argv)
    config = load_config(args.config, [*args.overrides, "engine=deepspeed"])
    ctx = init_distributed(config.distributed.init_timeout_s)
    try:
        converted = convert_checkpoint(config, ctx, args.source, args.target)
    except SOURCE_ERRORS as error:
        if ctx.is_main:
            print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if ctx.is_main:
        print(f"converted {args.source} -> {converted}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
