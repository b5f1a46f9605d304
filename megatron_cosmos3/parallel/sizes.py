"""The one place that says how a job's ranks are split: validated before any process group exists.

Rank order is Megatron's default ("tp-cp-ep-dp-pp"): tensor parallel ranks are adjacent (one NVLink
domain), pipeline stages are furthest apart.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_cosmos3.model.config import MoTConfig

# Who averages the replicated gradients over the data ranks: torch's DDP (any device) or
# megatron-core's DistributedDataParallel (contiguous gradient buffers; CUDA only).
DDP_IMPLS = ("torch", "megatron")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(f"parallel sizes: {message}")


@dataclass
class ParallelSizes:
    tensor: int = 1
    pipeline: int = 1
    virtual_pipeline: int = 1  # model chunks per pipeline rank (interleaved 1F1B when > 1)
    context: int = 1
    expert: int = 1
    sequence_parallel: bool = False  # shard norm/residual regions over the tensor-parallel ranks
    ddp_impl: str = "torch"  # DDP_IMPLS; docs/DESIGN.md, "The parallel plan"

    def data(self, world_size: int) -> int:
        """Data-parallel size: what remains of the world after the model-parallel dimensions."""
        return world_size // (self.tensor * self.pipeline * self.context)

    def validate(self, world_size: int, model: MoTConfig, num_experts: int = 0) -> None:
        """Raises ValueError naming the offending pair; never lets a bad layout reach a collective."""
        self.validate_for_model(model, num_experts)
        model_parallel = self.tensor * self.pipeline * self.context
        _require(
            world_size % model_parallel == 0,
            f"world_size={world_size} is not divisible by tensor*pipeline*context="
            f"{self.tensor}*{self.pipeline}*{self.context}={model_parallel}",
        )
        if self.expert > 1:
            data = self.data(world_size)
            _require(
                (data * self.context) % self.expert == 0,
                f"data*context={data}*{self.context} is not divisible by expert={self.expert}",
            )

    def validate_for_model(self, model: MoTConfig, num_experts: int = 0) -> None:
        """The checks that need no world size (heads, KV heads, FFN units, layers and experts against
        the sizes that split them): run when the training config loads, so a layout the model can
        never take is refused by name there, not inside megatron-core's layers."""
        for name in ("tensor", "pipeline", "virtual_pipeline", "context", "expert"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value >= 1, f"{name}={value!r} must be an int >= 1")
        _require(
            model.num_attention_heads % self.tensor == 0,
            f"num_attention_heads={model.num_attention_heads} is not divisible by tensor={self.tensor}",
        )
        _require(
            model.num_kv_heads % self.tensor == 0,
            f"num_kv_heads={model.num_kv_heads} is not divisible by tensor={self.tensor}",
        )
        # The dense SwiGLU MLPs' width: no tower has one where every tower routes through experts.
        dense_towers = {"reasoner", "generator"} - set(model.moe_towers if num_experts > 0 else ())
        _require(
            not dense_towers or model.ffn_hidden_size % self.tensor == 0,
            f"ffn_hidden_size={model.ffn_hidden_size} (the dense MLPs of {sorted(dense_towers)}) is not divisible "
            f"by tensor={self.tensor}",
        )
        stages = self.pipeline * self.virtual_pipeline
        _require(
            model.num_layers % stages == 0,
            f"num_layers={model.num_layers} is not divisible by pipeline*virtual_pipeline="
            f"{self.pipeline}*{self.virtual_pipeline}={stages}",
        )
        _require(
            self.virtual_pipeline == 1 or self.pipeline > 1,
            f"virtual_pipeline={self.virtual_pipeline} needs pipeline > 1",
        )
        # Context parallelism exchanges heads for sequence (all-to-all): local query heads must split
        # again. Fewer local KV heads than context ranks are repeated first (ulysses.spread_kv_heads).
        _require(
            (model.num_attention_heads // self.tensor) % self.context == 0,
            f"num_attention_heads/tensor={model.num_attention_heads // self.tensor} is not divisible by "
            f"context={self.context}",
        )
        if num_experts > 0:  # expert tensor parallelism splits every expert's FFN units like the MLP's
            moe_ffn = model.moe_ffn_hidden_size or model.ffn_hidden_size
            _require(
                moe_ffn % self.tensor == 0,
                f"moe_ffn_hidden_size={moe_ffn} (num_experts={num_experts}) is not divisible by tensor={self.tensor}",
            )
        if self.expert > 1:
            _require(num_experts > 0, f"expert={self.expert} needs a mixture-of-experts model (num_experts > 0)")
            _require(
                num_experts % self.expert == 0, f"num_experts={num_experts} is not divisible by expert={self.expert}"
            )
        _require(not self.sequence_parallel or self.tensor > 1, "sequence_parallel=True needs tensor > 1")
        _require(self.ddp_impl in DDP_IMPLS, f"ddp_impl={self.ddp_impl!r} is not one of {DDP_IMPLS}")
        # Pipeline stages and row splits call the layers themselves: there GradientReducer averages.
        _require(
            self.ddp_impl == "torch" or (self.pipeline == 1 and self.context == 1 and not self.sequence_parallel),
            f"ddp_impl='megatron' wraps one whole forward per micro-batch; pipeline={self.pipeline}, "
            f"context={self.context}, sequence_parallel={self.sequence_parallel} need ddp_impl='torch'",
        )
