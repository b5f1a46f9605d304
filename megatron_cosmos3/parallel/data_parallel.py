"""Data parallelism: bucketed gradient all-reduce overlapped with backward, sharded optimizer state.

Two gradient paths behind one interface (``parallel.ddp_impl``): PyTorch's ``DistributedDataParallel``
(the default: gradient buckets all-reduced as soon as they are ready, i.e. overlapped with the rest
of the backward pass), and megatron-core's ``DistributedDataParallel`` (``MegatronGradients``: one
contiguous buffer per dtype, the fast path on GPUs; megatron-core allocates it on CUDA and
type-checks ``torch.cuda.*Tensor`` parameters, so on a CPU it runs through
``megatron_on_cpu.install_cpu_data_parallel``). Either way ``build_optimizer`` shards the
optimizer state (where asked) with ``ZeroRedundancyOptimizer`` (each data-parallel rank keeps the
optimizer state of its share of the parameters only — ZeRO-1, what Megatron's distributed optimizer
shards — and broadcasts its updated parameters); megatron-core's DistributedOptimizer is not used.

Gradients are averaged over the data-and-context group: context-parallel ranks hold replicas of
the same parameters too. Each rank's loss is the mean over its own micro-batch, so the step equals
one process averaging the per-micro-batch mean losses of all ranks.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

from megatron_cosmos3.parallel.state import ParallelGroups


def wrap_data_parallel(
    model: nn.Module, groups: ParallelGroups, bucket_cap_mb: float = 25.0, find_unused_parameters: bool = True
) -> nn.Module:
    """DDP over the data(-and-context) group; the model itself when that group has one rank.

    ``find_unused_parameters``: whether some step can leave a trained parameter out of the graph
    (packs differ in which DM streams they hold: ``training/unused_parameters.py`` decides it from
    the config); without, DDP skips its per-step graph search. Not ``static_graph``: the set of
    parameters a step uses changes with its pack whenever that search is needed.
    """
    group = groups.data_and_context
    if torch.distributed.get_world_size(group) == 1:
        return model
    # Expert weights differ across expert-parallel ranks: finalize_expert_grads reduces them instead.
    from megatron_cosmos3.parallel.expert_parallel import expert_parameter_names

    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, expert_parameter_names(model))
    return DistributedDataParallel(
        model, process_group=group, bucket_cap_mb=bucket_cap_mb, find_unused_parameters=find_unused_parameters
    )


def megatron_ddp_config(bucket_cap_mb: float = 25.0, overlap_grad_reduce: bool = True):
    """megatron-core's ``DistributedDataParallelConfig`` for this project's semantics: gradient
    buffers in the parameters' dtype (fp32 main weights), an average over the data-and-context
    ranks (each gradient pre-scaled by 1/size, then summed: as torch's DDP), all-reduce (the
    optimizer state is sharded by ``build_optimizer``, not by megatron's distributed optimizer) and
    buckets of about ``bucket_cap_mb`` of fp32 gradients. ``overlap_grad_reduce``: reduce each
    bucket as backward fills it; megatron allows it only where every step uses the same parameters."""
    from megatron.core.distributed import DistributedDataParallelConfig

    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=False,  # the parameters are fp32 already; fp64 ones (tests) stay fp64
        overlap_grad_reduce=overlap_grad_reduce,
        use_distributed_optimizer=False,
        bucket_size=int(bucket_cap_mb * 2**20) // 4,  # in parameters (fp32)
        average_in_collective=False,
    )


class MegatronGradients:
    """megatron-core's ``DistributedDataParallel`` behind the plan's gradient interface.

    Its backward hooks add every gradient into a contiguous buffer (one per dtype), bucket by bucket, and
    reduce the buckets (overlapped with backward when ``overlap``). ``finish`` then gives each
    replicated parameter ``grad`` = a view of its reduced slice, so tensor-parallel finalisation,
    the norm, clipping, ZeRO-1 AdamW and checkpoints see what torch's DDP leaves. One-process
    semantics as ``GradientReducer``: a parameter no rank used this step keeps ``grad=None``.
    Expert-parallel parameters are left out (``finalize_expert_grads`` reduces them).

    On a CPU it runs on gloo through ``megatron_on_cpu.install_cpu_data_parallel`` (the same code as
    on GPUs, where it is the fast path: one contiguous buffer, few large collectives).
    """

    def __init__(self, model: nn.Module, groups: ParallelGroups, bucket_cap_mb: float = 25.0, overlap: bool = True):
        # megatron's DDP reads its groups from megatron-core's parallel state, which only groups made
        # for ddp_impl="megatron" set up (plain data parallelism's come from torch: parallel/state.py).
        if groups.sizes.ddp_impl != "megatron":
            raise ValueError(
                f"MegatronGradients needs groups made for parallel.ddp_impl='megatron'; "
                f"these were made for ddp_impl={groups.sizes.ddp_impl!r}"
            )
        from megatron_cosmos3.parallel.megatron_on_cpu import install_cpu_data_parallel

        install_cpu_data_parallel()  # its buffers on the CPU where there is no CUDA (gloo)
        from megatron.core.distributed import DistributedDataParallel as MegatronDDP
        from megatron.core.transformer import TransformerConfig

        self.group = groups.data_and_context
        experts = [p for p in model.parameters() if getattr(p, "expert_parallel", False) and p.requires_grad]
        for param in experts:  # megatron wraps every trainable parameter: hide the experts meanwhile
            param.requires_grad_(False)
        try:
            # DDP reads only calculate_per_token_loss (False: the loss is a mean) from the model config.
            config = TransformerConfig(num_layers=1, hidden_size=1, num_attention_heads=1)
            self.ddp = MegatronDDP(config, megatron_ddp_config(bucket_cap_mb, overlap), model)
        finally:
            for param in experts:
                param.requires_grad_(True)
        self.params = list(self.ddp.params_with_grad)
        self._used: set[int] = set()
        self._hooks = [p.register_post_accumulate_grad_hook(self._mark_used) for p in self.params]

    def _mark_used(self, param: nn.Parameter) -> None:
        self._used.add(id(param))

    def start_step(self) -> None:
        """Before the first backward of a step: empties the gradient buffers."""
        self.ddp.zero_grad_buffer()
        self._used.clear()

    def finish(self) -> None:
        """Completes the reduction (collective over the data-and-context group) and sets the grads."""
        self.ddp.finish_grad_sync()
        if not self.params:  # nothing replicated trains here (a frozen stage, experts only)
            return
        used = torch.tensor([id(p) in self._used for p in self.params], dtype=torch.int32, device=self.params[0].device)
        torch.distributed.all_reduce(used, op=torch.distributed.ReduceOp.MAX, group=self.group)
        for param, flag in zip(self.params, used.tolist()):
            param.grad = param.main_grad.view_as(param) if flag else None

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()


# AdamW kernels: "fused" (torch's one-kernel-per-step fused AdamW; CPU and CUDA in torch 2.13),
# "foreach" (multi-tensor ops), "loop" (per parameter, torch's reference), "auto" (fused where the
# parameters' device has it, else foreach). docs/DESIGN.md, "Fused kernels".
ADAMW_IMPLS = ("auto", "fused", "foreach", "loop")


def adamw(params, implementation: str = "auto", **options) -> torch.optim.AdamW:
    """``torch.optim.AdamW(params, **options)`` with the kernel ``implementation`` names."""
    params = list(params)
    return torch.optim.AdamW(params, **options, **adamw_kernel(params, implementation))


def adamw_kernel(params, implementation: str) -> dict:
    """AdamW's kernel options (``fused``/``foreach``) for ``implementation`` and these parameters
    (a list of tensors or of param-group dicts); "fused" on a device without the kernel is an error."""
    if implementation not in ADAMW_IMPLS:
        raise ValueError(f"optimizer.implementation={implementation!r} is not one of {ADAMW_IMPLS}")
    if implementation == "loop":
        return {"foreach": False, "fused": False}
    if implementation == "foreach":
        return {"foreach": True, "fused": False}
    tensors = [p for group in params for p in (group["params"] if isinstance(group, dict) else [group])]
    devices = {p.device.type for p in tensors}
    fusable = devices <= set(_get_fused_kernels_supported_devices()) and all(p.is_floating_point() for p in tensors)
    if implementation == "fused" and not fusable:
        raise ValueError(f"optimizer.implementation='fused': torch has no fused AdamW for devices {sorted(devices)}")
    return {"foreach": not fusable, "fused": fusable}


class OptimizerGroup:
    """Several optimizers stepped as one: replicated parameters under ZeRO, expert parameters
    (different on every expert-parallel rank, so never partitioned or broadcast) under their own.

    ``param_groups`` lists every group of every optimizer, so a learning-rate schedule sets all.
    """

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()


def build_optimizer(
    params,
    groups: ParallelGroups,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.95),
    weight_decay: float = 0.0,
    shard_state: bool = True,
    implementation: str = "auto",
):
    """AdamW whose state is sharded over the data-parallel ranks (``shard_state``), else plain AdamW.

    ``params``: parameters, or param-group dicts (extra keys such as ``lr_multiplier`` are kept).
    Expert-parallel parameters are already sharded (each rank holds its own experts) and get a
    local AdamW of their own. ``implementation``: the AdamW kernel (``ADAMW_IMPLS``).
    """
    param_groups = list(params)
    if param_groups and not isinstance(param_groups[0], dict):
        param_groups = [{"params": param_groups}]

    def split(expert: bool) -> list[dict]:
        selected = []
        for group in param_groups:
            chosen = [p for p in group["params"] if getattr(p, "expert_parallel", False) == expert]
            if chosen:
                selected.append({**group, "params": chosen})
        return selected

    replicated, experts = split(False), split(True)
    kwargs = dict(lr=lr, betas=betas, weight_decay=weight_decay, **adamw_kernel(param_groups, implementation))
    if shard_state and torch.distributed.get_world_size(groups.data_and_context) > 1:
        # torch.distributed.optim: 0.2-0.6 s of CPU to import, paid only where the state is sharded.
        from torch.distributed.optim import ZeroRedundancyOptimizer

        main = ZeroRedundancyOptimizer(
            replicated[0]["params"], optimizer_class=torch.optim.AdamW, process_group=groups.data_and_context, **kwargs
        )
        for group in replicated[0:1]:  # ZeRO takes the first group at construction, the rest added
            main.param_groups[0].update({k: v for k, v in group.items() if k != "params"})
        for group in replicated[1:]:
            main.add_param_group(group)
    else:
        main = torch.optim.AdamW(replicated, **kwargs)
    if not experts:
        return main
    return OptimizerGroup([main, torch.optim.AdamW(experts, **kwargs)])


class GradientReducer:
    """Averages the gradients of replicated parameters over ``group`` for drivers that DDP cannot
    wrap (the pipeline schedule, the context/sequence-parallel runners call the layers themselves),
    overlapped with the last backward pass as DDP and Megatron's DDP do.

    Parameters are bucketed (about ``bucket_mb`` each, one dtype, in reverse order: roughly the order
    backward produces them). ``arm(params)`` before the last backward that touches ``params`` (the
    last micro-batch's; per model chunk under pipelining): from then on, each bucket whose parameters
    have all received their gradient is all-reduced asynchronously while backward goes on. Buckets
    start strictly in bucket order, so every rank issues the same collectives in the same order even
    when ranks use different parameters (packs differ in their DM streams). ``finish`` starts the
    buckets that never completed (parameters the last micro-batch did not use, or ``late`` ones),
    waits for all, and writes the averages back.

    ``grad=None`` keeps one-process semantics: a parameter that no rank of the group used keeps
    ``None`` (so AdamW skips it); one used on some ranks only counts as zero on the others. ``late``
    parameters are reduced at ``finish`` only, from their gradients at that time (e.g. the pipeline's
    first/last-stage parameters, whose gradients are summed over the embedding group after the
    schedule). Expert-parallel parameters are not replicated and are left alone.
    """

    def __init__(self, parameters, group, bucket_mb: float = 25.0, late=()):
        self.group = group
        self.size = torch.distributed.get_world_size(group)
        late_ids = {id(p) for p in late}
        params = [p for p in parameters if p.requires_grad and not getattr(p, "expert_parallel", False)]
        self.params = list(dict.fromkeys(params))
        self.buckets: list[list[nn.Parameter]] = []
        limit = bucket_mb * 2**20
        for late_bucket in (False, True):
            current, size, dtype = [], 0, None
            for p in reversed(self.params):
                if (id(p) in late_ids) != late_bucket:
                    continue
                if current and (size + p.numel() * p.element_size() > limit or p.dtype != dtype):
                    self.buckets.append(current)
                    current, size = [], 0
                current.append(p)
                size += p.numel() * p.element_size()
                dtype = p.dtype
            if current:
                self.buckets.append(current)
        self.late = {i for i, bucket in enumerate(self.buckets) if id(bucket[0]) in late_ids}
        self._bucket_of = {id(p): i for i, bucket in enumerate(self.buckets) for p in bucket}
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_gradient) for p in self.params]
        self._reset()

    def _reset(self) -> None:
        self._armed: set[int] = set()
        self._pending = [len(bucket) for bucket in self.buckets]
        self._next = 0  # the first bucket not started yet
        self._in_flight: list[tuple[torch.Tensor, object]] = []

    def arm(self, parameters=None) -> None:
        """The next backward is the last one for ``parameters`` (default: all of them) this step."""
        params = self.params if parameters is None else parameters
        self._armed.update(id(p) for p in params if id(p) in self._bucket_of)

    def _on_gradient(self, param: nn.Parameter) -> None:
        key = id(param)
        if key not in self._armed:
            return
        self._armed.discard(key)  # a later accumulation in the same step would be a misuse of arm
        self._pending[self._bucket_of[key]] -= 1
        while self._next < len(self.buckets) and self._pending[self._next] == 0 and self._next not in self.late:
            self._start_next()

    def _start_next(self) -> None:
        bucket = self.buckets[self._next]
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in bucket])
        self._in_flight.append((flat, torch.distributed.all_reduce(flat, group=self.group, async_op=True)))
        self._next += 1

    def finish(self) -> None:
        """Completes the step's reduction (collective on ``group``: every rank calls it)."""
        while self._next < len(self.buckets):
            self._start_next()
        # After the buckets: the same order of collectives on every rank.
        used = torch.tensor([p.grad is not None for p in self.params], dtype=torch.int32, device=self._device())
        torch.distributed.all_reduce(used, op=torch.distributed.ReduceOp.MAX, group=self.group)
        used_anywhere = {id(p) for p, flag in zip(self.params, used.tolist()) if flag}
        for bucket, (flat, work) in zip(self.buckets, self._in_flight, strict=True):
            work.wait()
            flat /= self.size
            for p, grad in zip(bucket, flat.split([p.numel() for p in bucket])):
                p.grad = grad.view_as(p) if id(p) in used_anywhere else None
        self._reset()

    def _device(self) -> torch.device:
        return self.params[0].device if self.params else torch.device("cpu")

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()


def reduce_replicated_gradients(parameters, group) -> None:
    """Averages the gradients of parameters replicated over ``group`` after backward, as DDP would
    (``GradientReducer`` without overlap): e.g. over the CP group, or ``data_and_context`` in a
    CP x DP job (the CP loss carries the factor cp, so the average is a sum over CP and a mean over
    DP micro-batches)."""
    reducer = GradientReducer(parameters, group)
    try:
        reducer.finish()
    finally:
        reducer.close()
