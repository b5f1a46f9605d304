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

With ``model.linear_impl: te`` (where CUDA and Transformer Engine are present) the same projections
become TE linears: megatron-core's ``TEColumnParallelLinear`` / ``TERowParallelLinear`` under TP
(TE does the sequence-parallel all-gather / reduce-scatter itself), ``te.pytorch.Linear`` in one
tensor rank; same shapes and parameter names, so checkpoints interchange with ``torch``
(docs/DESIGN.md, "GPU fast paths").

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
from megatron_cosmos3.model.transformer_engine import import_transformer_engine
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


def _megatron_te_layers():
    from megatron.core.extensions.transformer_engine import TEColumnParallelLinear, TERowParallelLinear

    return TEColumnParallelLinear, TERowParallelLinear


def te_layer_config(full: nn.Linear, tp: int, sequence_parallel: bool, model_config):
    """The megatron-core ``TransformerConfig`` its TE linears read (they need more than
    ``ModelParallelConfig``). ``disable_parameter_transpose_cache``: megatron's schedules tell a TE
    linear which micro-batch is the first of a step (to cache its fp8 weight copy); ours do not, and
    a cached copy would outlive the optimizer step, so TE casts the weight on every call."""
    import warnings

    from megatron.core.transformer.transformer_config import TransformerConfig

    with warnings.catch_warnings():  # megatron-core's deprecation notes about settings we leave alone
        warnings.simplefilter("ignore", UserWarning)
        return TransformerConfig(
            num_layers=1,
            hidden_size=model_config.hidden_size,
            num_attention_heads=model_config.num_attention_heads,
            num_query_groups=model_config.num_kv_heads,
            kv_channels=model_config.head_dim,
            ffn_hidden_size=model_config.ffn_hidden_size,
            tensor_model_parallel_size=tp,
            sequence_parallel=sequence_parallel,
            use_cpu_initialization=full.weight.device.type != "cuda",
            perform_initialization=False,
            params_dtype=full.weight.dtype,
            disable_parameter_transpose_cache=True,
        )


def tensor_shard(full: torch.Tensor, dim: int, rank: int, size: int, stride: int = 1) -> torch.Tensor:
    """Rank ``rank``'s shard of ``full`` along ``dim`` among ``size`` ranks. With ``stride`` s, ``dim``
    holds s stacked blocks (e.g. [gate; up]) and the shard is the rank's slice of each, in order
    (megatron's ``partition_stride``)."""
    return torch.cat([block.chunk(size, dim=dim)[rank] for block in full.chunk(stride, dim=dim)], dim=dim)


def _on_rows(layer_class):
    """Megatron's linears take [sequence, batch, features]; ours carry [tokens, features]."""

    class RowsAdapter(layer_class):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = super().forward(x.unsqueeze(1))
            return (out[0] if isinstance(out, tuple) else out).squeeze(1)  # megatron's: (out, bias)

    RowsAdapter.__name__ = RowsAdapter.__qualname__ = f"{layer_class.__name__}OnRows"
    return RowsAdapter


# TE's fp8 GEMMs take rows in multiples of 16: its forward asserts 8, but the weight gradient's GEMM
# reduces over the rows, and Hopper's fp8 GEMMs (TN only) need that dimension in 16s. Packs have any.
FP8_ROW_MULTIPLE = 16


def _fp8_enabled() -> bool:
    from transformer_engine.pytorch.quantization import FP8GlobalStateManager  # type: ignore[import-not-found]

    return FP8GlobalStateManager.is_fp8_enabled()


def te_on_rows(layer_class, kind: str, tp: int, sequence_parallel: bool, padding_on=_fp8_enabled):
    """A TE linear on [tokens, features] rows. While ``padding_on()`` (fp8 autocast) the rows are
    padded with zeros to a multiple of ``FP8_ROW_MULTIPLE`` and the padding cut from the output.
    Under sequence parallelism the row-parallel input holds ``tp`` blocks (one per rank, gathered)
    and the column-parallel output too, so each block is padded and cut alike: every rank's block
    keeps its place. An empty stream (a pack without DM rows) goes through ``F.linear``: zero rows
    need no kernel, nor any collective."""
    blocks_in = tp if sequence_parallel and kind == "row" else 1
    blocks_out = tp if sequence_parallel and kind == "column" else 1

    class TERows(_on_rows(layer_class)):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.shape[0] == 0:
                return torch.nn.functional.linear(x, self.weight)
            n = x.shape[0] // blocks_in
            pad = -n % FP8_ROW_MULTIPLE if padding_on() else 0
            if not pad:
                return super().forward(x)
            padded = torch.nn.functional.pad(x.view(blocks_in, n, x.shape[1]), (0, 0, 0, pad)).flatten(0, 1)
            out = super().forward(padded)
            return out.view(blocks_out, n + pad, out.shape[-1])[:, :n].flatten(0, 1)

    TERows.__name__ = TERows.__qualname__ = f"{layer_class.__name__}OnRows"
    return TERows


def parallel_linear_keywords(kind: str, linear_impl: str) -> dict:
    """The keyword arguments of megatron-core's ``kind`` ("column" | "row") parallel linear besides
    sizes, ``config``, ``init_method`` and ``tp_group``. Its TE classes (``TEColumnParallelLinear``,
    ``TERowParallelLinear``, megatron-core 0.16) take ``skip_bias_add`` and ``is_expert`` as
    keyword-only arguments without defaults, where the torch classes default them."""
    keywords = {"bias": False, "skip_bias_add": False}
    keywords.update({"gather_output": False} if kind == "column" else {"input_is_parallel": True})
    if linear_impl == "te":
        keywords["is_expert"] = False
    return keywords


def _parallel_linear(
    full: nn.Linear, kind: str, groups: ParallelGroups, sequence_parallel: bool, linear_impl: str, model_config
) -> nn.Module:
    ModelParallelConfig, ColumnParallelLinear, RowParallelLinear, mark_sharded = _megatron_layers()
    tp, rank = groups.sizes.tensor, groups.tensor_rank
    if linear_impl == "te":
        te_column, te_row = _megatron_te_layers()
        config = te_layer_config(full, tp, sequence_parallel, model_config)
        on_rows = {"column": te_on_rows(te_column, "column", tp, sequence_parallel)}
        on_rows["row"] = te_on_rows(te_row, "row", tp, sequence_parallel)
    else:
        config = ModelParallelConfig(
            tensor_model_parallel_size=tp,
            sequence_parallel=sequence_parallel,
            use_cpu_initialization=full.weight.device.type != "cuda",
            perform_initialization=False,
            params_dtype=full.weight.dtype,
        )
        on_rows = {"column": _on_rows(ColumnParallelLinear), "row": _on_rows(RowParallelLinear)}
    keep = lambda weight: None  # noqa: E731 — weights are copied from the built model below
    layer = on_rows[kind](
        full.in_features,
        full.out_features,
        config=config,
        init_method=keep,
        tp_group=groups.tensor,
        **parallel_linear_keywords(kind, linear_impl),
    )
    shard = full.weight.detach().chunk(tp, dim=0 if kind == "column" else 1)[rank]
    with torch.no_grad():
        layer.weight.copy_(shard)
    # Megatron marks shards only when it initialises them itself (TE always does); ours come from the built model.
    if not hasattr(layer.weight, "tensor_model_parallel"):
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


def _te_linear(full: nn.Linear, kind: str) -> nn.Module:
    """``full`` as one tensor rank's Transformer Engine linear, its weight copied."""
    te = import_transformer_engine()
    layer = te_on_rows(te.Linear, kind, 1, False)(
        full.in_features, full.out_features, bias=False, params_dtype=full.weight.dtype, device=full.weight.device
    )
    with torch.no_grad():
        layer.weight.copy_(full.weight)
    return layer


def _tower_linears(model: MoTModel):
    """(parent module, child name, "column" | "row") of every tower projection this rank holds;
    mixture-of-experts MLPs keep their experts (split by ``_split_experts``)."""
    for layer in model.layers:
        if next(layer.parameters()).is_meta:
            continue  # another pipeline rank's layer: never allocated here (train.build_model)
        for tower in (layer.reasoner, layer.generator):
            for path, kind in [(p, "column") for p in COLUMN_PARALLEL] + [(p, "row") for p in ROW_PARALLEL]:
                if path.startswith("mlp.") and not isinstance(tower.mlp, SwiGLU):
                    continue
                parent_name, child_name = path.split(".")
                yield tower.get_submodule(parent_name), child_name, kind


def apply_tensor_parallel(model: MoTModel, groups: ParallelGroups | None, linear_impl: str = "torch") -> MoTModel:
    """Shards both towers of every layer in place over ``groups.tensor`` (None: one process), with
    ``linear_impl``'s linears (``select_linear_impl`` chose it for this device); returns the model."""
    if groups is None or groups.sizes.tensor == 1:
        if linear_impl == "te":
            for parent, child_name, kind in _tower_linears(model):
                setattr(parent, child_name, _te_linear(getattr(parent, child_name), kind))
        return model
    sequence_parallel = groups.sizes.sequence_parallel
    if sequence_parallel:
        from megatron_cosmos3.parallel.megatron_on_cpu import install_cpu_memory_buffer

        install_cpu_memory_buffer()
    for layer in model.layers:
        if next(layer.parameters()).is_meta:
            continue
        for tower in (layer.reasoner, layer.generator):
            if isinstance(tower.mlp, MoEMLP):
                _split_experts(tower.mlp, groups, sequence_parallel)
    for parent, child_name, kind in _tower_linears(model):
        full = getattr(parent, child_name)
        setattr(parent, child_name, _parallel_linear(full, kind, groups, sequence_parallel, linear_impl, model.config))
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
