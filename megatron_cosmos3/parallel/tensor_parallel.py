"""Tensor parallelism for a built MoT: megatron-core's column/row-parallel linears in both towers.

Per tower and layer: q, k, v, gate and up projections are column-parallel (each rank computes a
slice of the heads / FFN units), o and down projections row-parallel (partial sums all-reduced).
Both towers split their heads the same way, so rank r holds query heads ``[r*H/tp, (r+1)*H/tp)`` and
the matching KV heads of *both* towers, and the shared attention needs no communication at all.

Applied after building (torchtitan style): the full model is built identically on every rank,
then each linear is swapped for a megatron layer holding this rank's shard. Parameter names are
unchanged (``...self_attn.q_proj.weight``), and each sharded parameter carries megatron's
``tensor_model_parallel`` / ``partition_dim`` attributes, which checkpointing uses to describe the
global tensor.

Mixture-of-experts MLPs follow Megatron's expert tensor parallelism (expert TP size = TP size): each
rank holds 1/tp of every local expert's FFN units (a slice of the gate half and of the up half of
``gate_up_proj``, and the matching columns of ``down_proj``), the replicated router routes the same
whole token set on every rank (the sequence-parallel shards all-gathered first), and the partial
expert outputs are all-reduced (reduce-scattered under sequence parallelism). Expert parallelism
then spreads the experts over the data/context ranks with the same tensor rank.

Parameters that stay replicated get partial gradients in three cases, which
``finalize_tensor_parallel_grads`` sums over the tensor group: the per-head q/k norms (each rank
only sees its own heads), the MoE routers (each rank weights only its partial expert outputs), and —
with sequence parallelism — every replicated parameter, since each rank then only sees its own
slice of the tokens.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from megatron_cosmos3.model.moe import MoEMLP
from megatron_cosmos3.model.mot import MoTModel
from megatron_cosmos3.model.tower import SwiGLU
from megatron_cosmos3.parallel.state import ParallelGroups

COLUMN_PARALLEL = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
ROW_PARALLEL = ("self_attn.o_proj", "mlp.down_proj")
PARTIAL_UNDER_TENSOR_PARALLEL = ("self_attn.q_norm.weight", "self_attn.k_norm.weight", "mlp.router.weight")
# The ViT: each tensor rank encodes its share of a pack's pictures (parallel/vision_parallel.py).
SHARED_OUT_PICTURES = ("vision.",)


def _megatron_layers():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        from megatron.core.model_parallel_config import ModelParallelConfig
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
        from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
    return ModelParallelConfig, ColumnParallelLinear, RowParallelLinear, set_tensor_model_parallel_attributes


def tensor_shard(full: torch.Tensor, dim: int, rank: int, size: int, stride: int = 1) -> torch.Tensor:
    """Rank ``rank``'s shard of ``full`` along ``dim`` among ``size`` ranks. With ``stride`` s, ``dim``
    holds s stacked blocks (e.g. [gate; up]) and the shard is the rank's slice of each, in order
    (megatron's ``partition_stride``)."""
    return torch.cat([block.chunk(size, dim=dim)[rank] for block in full.chunk(stride, dim=dim)], dim=dim)


def _on_rows(layer_class):
    """Megatron's linears take [sequence, batch, features]; ours carry [tokens, features]."""

    class RowsAdapter(layer_class):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out, _ = super().forward(x.unsqueeze(1))
            return out.squeeze(1)

    RowsAdapter.__name__ = RowsAdapter.__qualname__ = f"{layer_class.__name__}OnRows"
    return RowsAdapter


def _parallel_linear(full: nn.Linear, kind: str, groups: ParallelGroups, sequence_parallel: bool) -> nn.Module:
    ModelParallelConfig, ColumnParallelLinear, RowParallelLinear, mark_sharded = _megatron_layers()
    tp, rank = groups.sizes.tensor, groups.tensor_rank
    on_gpu = full.weight.device.type == "cuda"
    config = ModelParallelConfig(
        tensor_model_parallel_size=tp,
        sequence_parallel=sequence_parallel,
        use_cpu_initialization=not on_gpu,
        perform_initialization=False,
        params_dtype=full.weight.dtype,
    )
    keep = lambda weight: None  # noqa: E731 — weights are copied from the built model below
    if kind == "column":
        layer = _on_rows(ColumnParallelLinear)(
            full.in_features,
            full.out_features,
            config=config,
            init_method=keep,
            bias=False,
            gather_output=False,
            tp_group=groups.tensor,
        )
        shard = full.weight.detach().chunk(tp, dim=0)[rank]
    else:
        layer = _on_rows(RowParallelLinear)(
            full.in_features,
            full.out_features,
            config=config,
            init_method=keep,
            bias=False,
            input_is_parallel=True,
            skip_bias_add=False,
            tp_group=groups.tensor,
        )
        shard = full.weight.detach().chunk(tp, dim=1)[rank]
    with torch.no_grad():
        layer.weight.copy_(shard)
    # Megatron marks shards only when it initialises them itself; ours come from the built model.
    mark_sharded(layer.weight, is_parallel=True, dim=0 if kind == "column" else 1, stride=1)
    return layer.to(full.weight.device)


class ExpertTensorParallel:
    """The tensor-parallel region of a MoE MLP whose experts hold 1/tp of their FFN units.

    ``enter``: the MLP input of every rank of the group (an identity whose backward sums the partial
    input gradients; under sequence parallelism an all-gather of the shards whose backward
    reduce-scatters), so every rank routes the same tokens the same way. ``leave``: the sum of the
    ranks' partial outputs (under sequence parallelism reduce-scattered back to this rank's shard).
    Every rank computes the whole balancing loss, whose input and router gradients are then summed
    over the group: each injects 1/tp of it.
    """

    def __init__(self, group: dist.ProcessGroup, sequence_parallel: bool):
        self.group, self.sequence_parallel = group, sequence_parallel
        self.aux_gradient_share = 1.0 / dist.get_world_size(group)

    def enter(self, x: torch.Tensor) -> torch.Tensor:
        mappings = _megatron_mappings()
        if self.sequence_parallel:
            return mappings.gather_from_sequence_parallel_region(x, group=self.group)
        return mappings.copy_to_tensor_model_parallel_region(x, group=self.group)

    def leave(self, out: torch.Tensor) -> torch.Tensor:
        mappings = _megatron_mappings()
        if self.sequence_parallel:
            return mappings.reduce_scatter_to_sequence_parallel_region(out, group=self.group)
        return mappings.reduce_from_tensor_model_parallel_region(out, group=self.group)


def _megatron_mappings():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        from megatron.core.tensor_parallel import mappings
    return mappings


def _split_experts(moe: MoEMLP, groups: ParallelGroups, sequence_parallel: bool) -> None:
    """Keeps this rank's slice of every expert's FFN units and installs the tensor-parallel region."""
    from megatron_cosmos3.parallel.expert_parallel import replace_parameter

    mark_sharded = _megatron_layers()[3]
    for name, (dim, stride) in MoEMLP.FFN_LAYOUT.items():
        full = getattr(moe, name)
        local = replace_parameter(
            moe, name, tensor_shard(full.detach(), dim, groups.tensor_rank, groups.sizes.tensor, stride)
        )
        mark_sharded(local, is_parallel=True, dim=dim, stride=stride)
    moe.tensor_parallel = ExpertTensorParallel(groups.tensor, sequence_parallel)


def apply_tensor_parallel(model: MoTModel, groups: ParallelGroups) -> MoTModel:
    """Shards both towers of every layer in place over ``groups.tensor``; returns the model."""
    if groups.sizes.tensor == 1:
        return model
    sequence_parallel = groups.sizes.sequence_parallel
    if sequence_parallel:
        from megatron_cosmos3.parallel.megatron_on_cpu import install_cpu_memory_buffer

        install_cpu_memory_buffer()
    for layer in model.layers:
        if next(layer.parameters()).is_meta:
            continue  # another pipeline rank's layer: never allocated here (train.build_model)
        for tower in (layer.reasoner, layer.generator):
            if isinstance(tower.mlp, MoEMLP):
                _split_experts(tower.mlp, groups, sequence_parallel)
            for path, kind in [(p, "column") for p in COLUMN_PARALLEL] + [(p, "row") for p in ROW_PARALLEL]:
                if path.startswith("mlp.") and not isinstance(tower.mlp, SwiGLU):
                    continue  # the experts are split above
                parent_name, child_name = path.split(".")
                parent = tower.get_submodule(parent_name)
                setattr(
                    parent, child_name, _parallel_linear(getattr(parent, child_name), kind, groups, sequence_parallel)
                )
    return model


def is_tensor_parallel(param: nn.Parameter) -> bool:
    return bool(getattr(param, "tensor_model_parallel", False))


def finalize_tensor_parallel_grads(model: nn.Module, groups: ParallelGroups) -> None:
    """Sums the partial gradients of replicated parameters over the tensor group (after backward)."""
    if groups.sizes.tensor == 1:
        return
    everything = groups.sizes.sequence_parallel
    partial = [
        p.grad
        for name, p in model.named_parameters()
        if p.grad is not None
        and not is_tensor_parallel(p)
        and (everything or name.endswith(PARTIAL_UNDER_TENSOR_PARALLEL) or name.startswith(SHARED_OUT_PICTURES))
    ]
    if partial:
        flat = torch.cat([g.reshape(-1) for g in partial])
        dist.all_reduce(flat, group=groups.tensor)
        offset = 0
        for grad in partial:
            grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
            offset += grad.numel()
