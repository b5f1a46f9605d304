"""What a checkpoint holds, described as *global* tensors so any parallel layout can load it.

Every entry is keyed by the parameter's fully qualified name, never by rank. A tensor-parallel shard
is a DTensor over the tensor group (``Shard(partition_dim)``), an expert-parallel block a DTensor over
the expert group (``Shard(0)``), an expert block split over FFN units both (a 2-D mesh), anything
else a plain tensor that every holder writes identically. A parameter whose FFN dim stacks blocks
(``MoEMLP.FFN_LAYOUT``: gate_up_proj is [gate; up]) is described with the blocks apart, as
(E, 2, ffn, hidden) in every layout, since a tensor-parallel rank holds a slice of each block.
torch.distributed.checkpoint then reshards on load: a run saved with TP=2 loads with TP=1, DP=2 or
TP=2 again, and ZeRO-sharded optimizer state follows the parameters to whichever rank now owns them.

    model/<fqn>                      parameter
    optimizer/<fqn>/<exp_avg|exp_avg_sq|step>   AdamW state of the parameter
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Shard

ADAM_STATE = ("exp_avg", "exp_avg_sq", "step")


@dataclass
class ShardingMeshes:
    """Device meshes over the groups that shard parameters (None where that dimension is 1)."""

    tensor: object = None
    expert: object = None
    expert_tensor: object = None  # (expert, tensor): expert blocks split over FFN units

    @classmethod
    def from_groups(cls, groups, device_type: str) -> ShardingMeshes:
        if groups is None:
            return cls()
        from torch.distributed.device_mesh import DeviceMesh

        def mesh(group):
            return DeviceMesh.from_group(group, device_type) if dist.get_world_size(group) > 1 else None

        meshes = cls(tensor=mesh(groups.tensor), expert=mesh(groups.expert))
        if meshes.tensor is not None and meshes.expert is not None:
            # Row e: the tensor group of expert rank e (global ranks), gathered over the expert group.
            rows = [None] * dist.get_world_size(groups.expert)
            dist.all_gather_object(rows, dist.get_process_group_ranks(groups.tensor), group=groups.expert)
            meshes.expert_tensor = DeviceMesh.from_group(
                [groups.expert, groups.tensor], device_type, torch.tensor(rows), mesh_dim_names=("expert", "tensor")
            )
        return meshes


def stacked_blocks(model: nn.Module) -> dict[nn.Parameter, tuple[int, int]]:
    """{parameter: (dim, blocks)} for parameters whose FFN dim stacks several blocks."""
    return {
        getattr(module, name): (dim, blocks)
        for module in model.modules()
        for name, (dim, blocks) in getattr(module, "FFN_LAYOUT", {}).items()
        if blocks > 1
    }


def as_global(local: torch.Tensor, param: nn.Parameter, meshes: ShardingMeshes, stacked: tuple[int, int] | None = None):
    """Wraps this rank's piece of a parameter-shaped tensor so that it describes the global tensor.
    ``stacked``: (dim, blocks) when ``dim`` stacks blocks (see the module docstring)."""
    tensor_dim = getattr(param, "partition_dim", None)
    if stacked is not None:
        dim, blocks = stacked
        local = local.unflatten(dim, (blocks, -1))  # a view: loading into it fills the parameter
        tensor_dim = dim + 1
    tensor = getattr(param, "tensor_model_parallel", False) and meshes.tensor is not None
    expert = getattr(param, "expert_parallel", False) and meshes.expert is not None
    if tensor and expert:
        return DTensor.from_local(local, meshes.expert_tensor, [Shard(0), Shard(tensor_dim)], run_check=False)
    if tensor:
        return DTensor.from_local(local, meshes.tensor, [Shard(tensor_dim)], run_check=False)
    if expert:
        return DTensor.from_local(local, meshes.expert, [Shard(0)], run_check=False)
    return local


def local_optimizers(optimizer) -> list[torch.optim.Optimizer]:
    """The torch optimizers that hold state on this rank (unwrapping ZeRO and optimizer groups)."""
    if optimizer is None:
        return []
    if hasattr(optimizer, "optimizers"):  # OptimizerGroup
        return [inner for o in optimizer.optimizers for inner in local_optimizers(o)]
    if hasattr(optimizer, "optim"):  # ZeroRedundancyOptimizer: only this rank's partition
        return [optimizer.optim]
    return [optimizer]


def model_entries(model: nn.Module, meshes: ShardingMeshes) -> dict:
    stacked = stacked_blocks(model)
    return {f"model/{name}": as_global(p.data, p, meshes, stacked.get(p)) for name, p in model.named_parameters()}


def optimizer_entries(optimizer, model: nn.Module, meshes: ShardingMeshes, create_for: set[str] | None = None) -> dict:
    """AdamW state of the parameters this rank's optimizers own. Before loading into a fresh
    optimizer (whose state is created lazily), ``create_for`` names the checkpoint keys to allocate
    empty state for: parameters that had state when saved."""
    names = {p: name for name, p in model.named_parameters()}
    stacked = stacked_blocks(model)
    entries = {}
    for inner in local_optimizers(optimizer):
        for group in inner.param_groups:
            for param in group["params"]:
                state = inner.state[param]
                if create_for is not None and not state and f"optimizer/{names[param]}/exp_avg" in create_for:
                    state.update(
                        exp_avg=torch.zeros_like(param),
                        exp_avg_sq=torch.zeros_like(param),
                        step=torch.zeros((), dtype=torch.float32),
                    )
                for key in ADAM_STATE:
                    if key in state:
                        value = state[key]
                        entries[f"optimizer/{names[param]}/{key}"] = (
                            value if key == "step" else as_global(value, param, meshes, stacked.get(param))
                        )
    return entries
