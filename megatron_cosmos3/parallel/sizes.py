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
    # Uneven stages, megatron-core's fields: the layers of the first / last pipeline rank (over all
    # its chunks); the rest split evenly over the other ranks. None: an even split.
    num_layers_in_first_pipeline_stage: int | None = None
    num_layers_in_last_pipeline_stage: int | None = None
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
            _require(isinstance(value, int) and value >= 1, f"parallel.{name}={value!r} must be an int >= 1")
        for name in ("num_layers_in_first_pipeline_stage", "num_layers_in_last_pipeline_stage"):
            value = getattr(self, name)  # None: an even split
            _require(
                value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 1),
                f"parallel.{name}={value!r} must be an int >= 1 (or null: an even split)",
            )
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
        _require(
            self.virtual_pipeline == 1 or self.pipeline > 1,
            f"virtual_pipeline={self.virtual_pipeline} needs pipeline > 1",
        )
        self.virtual_stage_layers(model.num_layers)  # every split the stages cannot take is refused there
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
        # The ViT runs on the first pipeline chunk; its DeepStack features join the Reasoner after
        # layers 0..k-1, so those layers must be there too (no stage sends ViT features on). Checked
        # here, so training and loading a trained model (release/trained.py) refuse the same layouts.
        if model.vision is not None and self.pipeline > 1:
            k = len(model.vision.deepstack_visual_indexes)
            first_chunk = len(self.virtual_stage_layers(model.num_layers)[0])
            _require(
                first_chunk >= k,
                f"model.vision: the ViT's {k} DeepStack feature sets join Reasoner layers 0..{k - 1}, which must "
                f"all be in the first pipeline chunk, but num_layers={model.num_layers} over "
                f"pipeline={self.pipeline}, virtual_pipeline={self.virtual_pipeline}, "
                f"num_layers_in_first_pipeline_stage={self.num_layers_in_first_pipeline_stage} gives it {first_chunk}",
            )

    def virtual_stage_layers(self, num_layers: int) -> list[range]:
        """The layers of each virtual stage ``v = chunk * pipeline + pipeline_rank``, in order of v.

        Megatron-core's split (docs/DESIGN.md, "The parallel plan", pipeline stages): the first and
        last pipeline ranks hold ``num_layers_in_first/last_pipeline_stage`` layers where set, the
        other ranks share the rest equally; each rank's layers are cut in ``virtual_pipeline`` equal
        chunks, and chunk c of every rank comes from the c-th block of ``num_layers / virtual_pipeline``
        consecutive layers. Raises ValueError naming the fields when no such split exists."""
        per_chunk = [n // self.virtual_pipeline for n in self.layers_per_pipeline_rank(num_layers)]
        block = sum(per_chunk)  # = num_layers / virtual_pipeline: one chunk of every rank
        starts = [sum(per_chunk[:rank]) for rank in range(self.pipeline)]
        return [
            range(chunk * block + starts[rank], chunk * block + starts[rank] + per_chunk[rank])
            for chunk in range(self.virtual_pipeline)
            for rank in range(self.pipeline)
        ]

    def layers_per_pipeline_rank(self, num_layers: int) -> list[int]:
        """How many layers each pipeline rank holds over all its chunks (``virtual_stage_layers``);
        ValueError naming the fields when no split exists."""
        first, last = self.num_layers_in_first_pipeline_stage, self.num_layers_in_last_pipeline_stage
        ends = {"num_layers_in_first_pipeline_stage": first, "num_layers_in_last_pipeline_stage": last}
        set_ends = {name: value for name, value in ends.items() if value is not None}
        if not set_ends:
            stages = self.pipeline * self.virtual_pipeline
            _require(
                num_layers % stages == 0,
                f"num_layers={num_layers} is not divisible by pipeline*virtual_pipeline="
                f"{self.pipeline}*{self.virtual_pipeline}={stages}",
            )
            return [num_layers // self.pipeline] * self.pipeline
        for name, value in set_ends.items():
            _require(self.pipeline > 1, f"{name}={value} needs pipeline > 1")
            # The first rank holds the embeddings (and the ViT), the last the heads: each needs a layer
            # for every one of its chunks, as megatron-core requires.
            _require(
                isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                f"{name}={value!r} must be an int >= 1",
            )
            _require(
                value % self.virtual_pipeline == 0,
                f"{name}={value} is not divisible by virtual_pipeline={self.virtual_pipeline}",
            )
        middle_ranks = self.pipeline - len(set_ends)
        middle_layers = num_layers - sum(set_ends.values())
        given = ", ".join(f"{name}={value}" for name, value in set_ends.items())
        if not middle_ranks:  # pipeline=2 with both ends set: they must hold every layer
            _require(
                middle_layers == 0,
                f"{given} hold {num_layers - middle_layers} layers, but num_layers={num_layers} "
                f"and pipeline={self.pipeline} has no other rank",
            )
        else:  # as in megatron-core, no middle rank is left without layers
            _require(
                middle_layers >= middle_ranks * self.virtual_pipeline
                and middle_layers % (middle_ranks * self.virtual_pipeline) == 0,
                f"num_layers={num_layers} with {given} leaves {middle_layers} layers for the other "
                f"{middle_ranks} pipeline ranks, not a positive multiple of their "
                f"{middle_ranks}*virtual_pipeline={middle_ranks * self.virtual_pipeline} chunks",
            )
        middle = middle_layers // middle_ranks if middle_ranks else 0
        counts = [middle] * self.pipeline
        if first is not None:
            counts[0] = first
        if last is not None:
            counts[-1] = last
        return counts
