"""The parallel plan: the one place that knows how this rank's part of the model is laid out and
driven (docs/DESIGN.md, "The parallel plan").

A ``ParallelPlan`` is built from the validated sizes and the process groups (a trivial plan in one
process: callers never ask whether there are groups). It owns three things, in the spirit of
torchtitan's ``parallelize_*`` and Megatron-Core's ``get_forward_backward_func``:

* **layout** — ``allocate`` materialises this rank's pipeline chunks of a meta-device model;
  ``apply`` gives the towers their linears (``model.linear_impl``), shards it (tensor, expert, the
  ViT's pictures), keeps this rank's pipeline chunks, and attaches the data-parallel gradient
  average (DDP, or the bucketed ``GradientReducer`` where the driver calls the layers itself);
* **the driver** — ``run(micro_batches, loss_fn, forward_only)``: one process (DDP-wrapped when data
  parallel), the pipeline schedule, or the context/sequence-parallel row split. Training, held-out
  evaluation and generation sampling (``velocity``) all go through it;
* **gradients** — ``finish_gradients``: the data-parallel average, tensor- and expert-parallel sums,
  and the global norm with clipping.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from megatron_cosmos3.model.config import MoTConfig
from megatron_cosmos3.model.mot import MoTModel
from megatron_cosmos3.model.packed_batch import PackedBatch
from megatron_cosmos3.model.transformer_engine import select_linear_impl
from megatron_cosmos3.objectives.losses import LossBreakdown, LossFunction, loss_breakdown, model_losses
from megatron_cosmos3.parallel.context_parallel import sequence_split, split_losses, stream_rows
from megatron_cosmos3.parallel.data_parallel import (
    GradientReducer,
    MegatronGradients,
    adamw,
    build_optimizer,
    wrap_data_parallel,
)
from megatron_cosmos3.parallel.expert_parallel import apply_expert_parallel, finalize_expert_grads
from megatron_cosmos3.parallel.failures import fail_together
from megatron_cosmos3.parallel.grad_norm import clip_grad_norm
from megatron_cosmos3.parallel.pipeline import PipelineStages, split_into_stages, split_model
from megatron_cosmos3.parallel.pipeline_schedules import MicroBatch, forward_backward
from megatron_cosmos3.parallel.sizes import ParallelSizes
from megatron_cosmos3.parallel.state import ParallelGroups, initialize_parallel
from megatron_cosmos3.parallel.tensor_parallel import apply_tensor_parallel, finalize_tensor_parallel_grads
from megatron_cosmos3.parallel.vision_parallel import PictureSharing

ForwardContext = Callable[[], contextlib.AbstractContextManager]
Velocity = Callable[[PackedBatch], dict[str, torch.Tensor]]


class ParallelPlan:
    """This rank's layout and driver (module doc). Build with ``ParallelPlan.create``."""

    def __init__(self, sizes: ParallelSizes, groups: ParallelGroups | None = None):
        self.sizes = sizes
        self.groups = groups  # None: one process
        self.split = sequence_split(groups)  # how each micro-batch's rows are spread, if they are
        self.model: MoTModel | None = None
        self.stages: PipelineStages | None = None  # this rank's pipeline chunks when pipeline > 1
        self.trained: nn.Module | None = None  # what the loss runs: DDP-wrapped when it can be
        self.reducer: GradientReducer | None = None  # the data x context average where DDP cannot wrap
        self.megatron: MegatronGradients | None = None  # parallel.ddp_impl=megatron: its DDP's gradients

    @classmethod
    def create(
        cls, sizes: ParallelSizes, model: MoTConfig, world_size: int, timeout_s: float | None = None
    ) -> ParallelPlan:
        """Collective: validates ``sizes`` and creates every process group, whose collectives wait
        ``timeout_s`` (``initialize_parallel``); one process needs none."""
        if world_size == 1:
            return cls(sizes)
        return cls(sizes, initialize_parallel(sizes, model, model.num_experts, timeout_s))

    # -- who is who -----------------------------------------------------------------------------
    @property
    def _pipelined(self) -> bool:
        return self.groups is not None and self.sizes.pipeline > 1

    @property
    def data_rank(self) -> int:
        return self.groups.data_rank if self.groups is not None else 0

    @property
    def data_size(self) -> int:
        return self.groups.data_size if self.groups is not None else 1

    @property
    def data_share(self) -> tuple | None:
        """(group, reader rank) of the ranks that train on this data rank's packs; None in one process."""
        return (self.groups.same_data, self.groups.data_reader) if self.groups is not None else None

    @property
    def model_parallel_size(self) -> int:
        """Ranks that share one micro-batch's work (tensor x pipeline x context)."""
        sizes = self.sizes
        return sizes.tensor * sizes.pipeline * sizes.context if self.groups is not None else 1

    @property
    def state_owner(self):
        """What this rank trains and checkpoints: its pipeline chunks, or the whole (maybe sharded) model."""
        return self.stages if self.stages is not None else self.model

    # -- layout ---------------------------------------------------------------------------------
    def allocate(self, model: MoTModel, device: torch.device) -> None:
        """Materialises and initialises this rank's part of ``model`` (built on the meta device): its
        pipeline chunks, or all of it without pipeline parallelism; no rank ever holds the whole model."""
        owned = split_model(model, self.sizes, self.groups.pipeline_rank) if self._pipelined else []
        model.materialize(device, *owned)
        model.reset_parameters(*owned)

    def apply(
        self,
        model: MoTModel,
        trainable: Callable[[nn.Module], list[dict]],
        unused: Callable[[nn.Module], list[str]] | None = None,
    ) -> list[dict]:
        """Lays ``model`` out on this rank and returns this rank's optimizer groups.

        ``trainable(model)`` freezes what should not train and groups the rest (dicts with
        ``params``); it runs after the tensor and expert sharding (so it sees the sharded
        parameters) and before the data-parallel average is attached (which skips frozen ones).
        ``unused(model)``: the trained parameters a step may leave out of the graph (None: any may),
        so DDP searches for unused ones only where some may be.
        """
        self.model = model
        groups = self.groups
        # A pipeline rank holds some layers only: its device is that of any parameter it allocated.
        device = next((p.device for p in model.parameters() if not p.is_meta), torch.device("cpu"))
        apply_tensor_parallel(model, groups, select_linear_impl(model.config.linear_impl, device))
        if groups is not None:
            apply_expert_parallel(model, groups)
            if model.vision is not None:  # tensor and context ranks encode a share of each pack's pictures
                model.vision.sharing = PictureSharing.of(groups)
        param_groups = trainable(model)
        if self._pipelined:  # this rank trains (and checkpoints) only its own chunks
            self.stages = split_into_stages(model, groups)
            owned = {id(p) for p in self.stages.parameters()}
            param_groups = [{**g, "params": [p for p in g["params"] if id(p) in owned]} for g in param_groups]
            param_groups = [g for g in param_groups if g["params"]]
        # DDP overlaps the gradient reduce with backward when one forward call covers the step; the
        # pipeline schedule and the row-split runner drive the layers themselves, so there the
        # GradientReducer does the same average, started from parameter hooks.
        whole_forward = self.stages is None and self.split is None
        self.trained = model
        if groups is not None and whole_forward and dist.get_world_size(groups.data_and_context) > 1:
            may_be_unused = unused is None or bool(unused(model))
            if self.sizes.ddp_impl == "megatron":  # megatron overlaps only where every step uses every parameter
                self.megatron = MegatronGradients(model, groups, overlap=not may_be_unused)
                self.trained = self.megatron.ddp
            else:
                self.trained = wrap_data_parallel(model, groups, find_unused_parameters=may_be_unused)
        if groups is not None and not whole_forward and dist.get_world_size(groups.data_and_context) > 1:
            late = self.stages.shared_parameters() if self.stages is not None else ()
            self.reducer = GradientReducer(self.state_owner.parameters(), groups.data_and_context, late=late)
        return param_groups

    def build_optimizer(
        self,
        param_groups: list[dict],
        lr: float,
        betas: tuple[float, float],
        weight_decay: float,
        shard_state: bool,
        implementation: str = "auto",
    ):
        """AdamW over ``param_groups``; its state sharded over the data ranks when ``shard_state``;
        ``implementation``: its kernel (``data_parallel.ADAMW_IMPLS``)."""
        if self.groups is None:
            return adamw(param_groups, implementation, lr=lr, betas=betas, weight_decay=weight_decay)
        return build_optimizer(param_groups, self.groups, lr, betas, weight_decay, shard_state, implementation)

    # -- the driver -----------------------------------------------------------------------------
    def run(
        self,
        micro_batches: Sequence[MicroBatch],
        loss_fn: LossFunction,
        forward_only: bool = False,
        forward_context: ForwardContext = contextlib.nullcontext,
    ) -> dict[int, LossBreakdown]:
        """This rank's losses of ``micro_batches`` (the same on every rank that shares them), and their
        backward unless ``forward_only``: {micro-batch index: LossBreakdown} where this rank computes
        losses (the last pipeline stage). Each micro-batch backpropagates ``total / len(micro_batches)``.
        ``loss_fn(output, batch, targets[, group=...])``: e.g. ``loss_breakdown`` with its weight bound.
        ``forward_context`` wraps each forward and loss, never a backward (e.g. autocast). A rank
        failing in there ends every rank, each naming its error (``fail_together``)."""
        with fail_together("the forward and backward"):
            if self.stages is not None:
                return self._run_pipeline(micro_batches, loss_fn, forward_only, forward_context)
            return self._run_one_stage(micro_batches, loss_fn, forward_only, forward_context)

    def _run_one_stage(self, micro_batches, loss_fn, forward_only, forward_context) -> dict[int, LossBreakdown]:
        if self.megatron is not None and not forward_only:
            self.megatron.start_step()
        losses_of = {}
        for m, (batch, targets) in enumerate(micro_batches):
            last = m == len(micro_batches) - 1
            # DDP reduces gradients once, after the last micro-batch.
            deferred = not last and not forward_only and hasattr(self.trained, "no_sync")
            sync = self.trained.no_sync() if deferred else contextlib.nullcontext()
            with sync, torch.set_grad_enabled(not forward_only):
                with forward_context():
                    if self.split is not None:  # context and/or sequence parallel: this rank's rows
                        losses = split_losses(self.model, batch, targets, self.split, loss_fn)
                    else:
                        losses = model_losses(self.model if forward_only else self.trained, batch, targets, loss_fn)
                if not forward_only:
                    if last and self.reducer is not None:
                        self.reducer.arm()  # buckets are all-reduced as this backward completes them
                    with torch.profiler.record_function("backward"):  # a profiling region (docs/DESIGN.md, "Profiling")
                        (losses.total / len(micro_batches)).backward()
            losses_of[m] = losses
        return losses_of

    def _run_pipeline(self, micro_batches, loss_fn, forward_only, forward_context) -> dict[int, LossBreakdown]:
        arm = None
        if self.reducer is not None and not forward_only:
            arm = lambda chunk: self.reducer.arm(self.stages.chunks[chunk].parameters())  # noqa: E731
        reports = forward_backward(
            self.stages,
            micro_batches,
            loss_fn,
            forward_only=forward_only,
            forward_context=forward_context,
            split=self.split,
            before_last_backward=arm,
        )
        return dict(enumerate(reports)) if self.groups.is_last_stage else {}

    def everywhere(self, flag: bool) -> bool:
        """Collective: whether ``flag`` holds on every rank."""
        if self.groups is None:
            return flag
        failed = torch.tensor([0.0 if flag else 1.0])
        dist.all_reduce(failed)
        return not bool(failed.item())

    # -- gradients ------------------------------------------------------------------------------
    def finish_gradients(self, max_norm: float) -> torch.Tensor:
        """Completes the gradients of replicated and sharded parameters and clips them to the global
        norm ``max_norm``; returns the norm before clipping (the same on every rank)."""
        if self.groups is not None:
            if self.reducer is not None:  # no DDP: the average over data x context, started in backward
                self.reducer.finish()
            if self.megatron is not None:  # megatron's DDP: its buffers' averages become the grads
                self.megatron.finish()
            finalize_tensor_parallel_grads(self.model, self.groups)
            finalize_expert_grads(self.model, self.groups)
        counted = self.stages.norm_parameters() if self.stages is not None else None
        return clip_grad_norm(self.state_owner.parameters(), max_norm, self.groups, counted)

    @contextlib.contextmanager
    def writing_weights(self):
        """Yields the module whose parameters a stage's starting weights (a weights folder) are
        written into in place: this rank's ``state_owner``; the optimizer reads them as they are."""
        yield self.state_owner

    def optimizer_step(self, optimizer, max_norm: float, finite: bool) -> tuple[torch.Tensor, bool]:
        """Completes and clips the gradients (``finish_gradients``) and steps ``optimizer`` when the
        loss was ``finite`` on every rank and so is the norm; returns (norm before clipping, whether
        it stepped). Every rank sees the same norm and flag, so every rank skips together."""
        with torch.profiler.record_function("finish_gradients"):  # a profiling region (docs/DESIGN.md, "Profiling")
            norm = self.finish_gradients(max_norm)
        stepped = finite and bool(torch.isfinite(norm))
        if stepped:
            optimizer.step()
        return norm, stepped

    def close(self) -> None:
        if self.reducer is not None:
            self.reducer.close()
        if self.megatron is not None:
            self.megatron.close()

    # -- generation -----------------------------------------------------------------------------
    def samples_here(self, is_main: bool, has_targets: bool) -> bool:
        """Whether this rank denoises a generation sample now. Where the layers exchange activations
        in each forward (tensor, expert, pipeline, context or sequence parallel) every rank must run
        the same calls, so all take part, and all skip when any pack lacks targets (collective);
        elsewhere rank 0 alone samples."""
        sizes = self.sizes
        together = self.groups is not None and (
            sizes.tensor > 1 or sizes.expert > 1 or self.stages is not None or self.split is not None
        )
        if not together:
            return is_main and has_targets
        return self.everywhere(has_targets)

    def velocity(self, targets: dict[str, torch.Tensor]) -> Velocity | None:
        """The whole pack's velocity predictions through this layout's driver, for a sampler that
        cannot keep an AR cache because the model is split by its layers (pipeline) or its rows
        (context / sequence parallelism); None where it can (the cached sampler runs the model).

        Each denoising step is one forward-only ``run``: the same velocities (the AR keys and values
        never depend on DM inputs). Each rank's rows of each DM stream are summed into the whole
        stream over the split group (disjoint rows: an exact gather), and the last pipeline stage
        broadcasts them, so every rank holds the same tokens for the next step. ``targets``: the
        pack's velocity targets (the loss computed on the way is ignored). Collective over the
        model-parallel group.
        """
        if self.stages is None and self.split is None:
            return None

        def velocity_of(batch: PackedBatch) -> dict[str, torch.Tensor]:
            outputs = []  # this rank's predictions: on every rank of a row split, on the last stage only

            def record(output, *args, **kwargs):
                outputs.append(output.dm_predictions)
                return loss_breakdown(output, *args, **kwargs)

            self.run([(batch, targets)], record, forward_only=True)
            if self.stages is None:
                return self._whole_streams(batch, outputs[0])
            return self._from_last_stage(batch, outputs[0] if outputs else None)

        return velocity_of

    def _whole_streams(self, batch: PackedBatch, local: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's rows of each DM stream -> the whole streams, on every rank of the split group."""
        group = self.split.group
        whole = {}
        for key, rows in stream_rows(batch, dist.get_rank(group), dist.get_world_size(group)).items():
            prediction = local[key]
            full = prediction.new_zeros(batch.dm_tokens[key].shape[0], prediction.shape[1])
            full[rows] = prediction
            dist.all_reduce(full, group=group)
            whole[key] = full
        return whole

    def _from_last_stage(self, batch: PackedBatch, local: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        """The last pipeline stage's whole streams, in fp32 (autocast may have made them bf16), on every stage."""
        if local is not None:  # the last stage
            whole = self._whole_streams(batch, local) if self.split is not None else local
            whole = {key: whole[key].float() for key in batch.dm_tokens}
        else:
            whole = {key: torch.empty(tokens.shape, dtype=torch.float32) for key, tokens in batch.dm_tokens.items()}
        groups = self.groups
        last = dist.get_global_rank(groups.pipeline, groups.sizes.pipeline - 1)
        for key in batch.dm_tokens:  # the same order on every rank
            whole[key] = whole[key].to(batch.dm_tokens[key].device).contiguous()
            dist.broadcast(whole[key], src=last, group=groups.pipeline)
        return whole
