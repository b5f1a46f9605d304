"""The DeepSpeed engine's settings and their translation from the one training config (docs/DESIGN.md,
"The DeepSpeed engine"). Pure: nothing here imports DeepSpeed or starts a process group.

There is no hand-written DeepSpeed JSON: ``deepspeed_config`` derives every entry from the
``TrainConfig`` the Megatron-style engine reads too (micro-batches, clipping, AdamW, precision), and
the trainer saves the result beside the resolved config. The learning-rate schedule is not
translated into a DeepSpeed scheduler: the loop sets every group's rate from
``training/schedule.py`` before each step under both engines, so there is one schedule, not two
that could drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from megatron_cosmos3.parallel.sizes import ParallelSizes

if TYPE_CHECKING:
    from megatron_cosmos3.training.config import TrainConfig

ENGINES = ("megatron", "deepspeed")
ZERO_STAGES = (1, 2, 3)
ADAM_EPS = 1e-8  # torch.optim.AdamW's default, which the Megatron-style engine uses


@dataclass
class DeepSpeedConfig:
    """Read when ``engine=deepspeed``. ZeRO shards over the data-parallel ranks: stage 1 the
    optimizer state, 2 also the gradients, 3 also the parameters."""

    zero_stage: int = 1
    offload_optimizer: bool = False  # optimizer state and step in host memory (ZeRO-Offload)

    def __post_init__(self) -> None:
        if self.zero_stage not in ZERO_STAGES:
            raise ValueError(f"deepspeed.zero_stage={self.zero_stage!r} is not one of {ZERO_STAGES}")


# (what, why): option pairs DeepSpeed itself cannot run, checked first so the error names the stage.
def _deepspeed_refuses(sizes: ParallelSizes, zero_stage: int) -> str | None:
    if sizes.tensor > 1 and zero_stage == 3:
        return (
            f"parallel.tensor={sizes.tensor} with deepspeed.zero_stage=3: ZeRO-3 partitions whole parameters "
            "over the data ranks and cannot hold megatron-core's tensor-parallel slices"
        )
    if sizes.pipeline > 1 and zero_stage >= 2:
        return (
            f"parallel.pipeline={sizes.pipeline} with deepspeed.zero_stage={zero_stage}: DeepSpeed's pipeline "
            "engine supports ZeRO stage 1 only (gradients must stay whole across micro-batches)"
        )
    return None


def check_engine_mix(engine: str, sizes: ParallelSizes, settings: DeepSpeedConfig) -> None:
    """ValueError naming the pair for an engine / layout mix that cannot run; called while the config
    is validated, before any process group starts."""
    if engine not in ENGINES:
        raise ValueError(f"engine={engine!r} is not one of {ENGINES}")
    if engine != "deepspeed":
        return
    refused = _deepspeed_refuses(sizes, settings.zero_stage)
    if refused:
        raise ValueError(f"engine=deepspeed: {refused}; use engine=megatron for this layout")
    if sizes.context > 1 and settings.zero_stage == 3:
        raise ValueError(
            f"engine=deepspeed: parallel.context={sizes.context} with deepspeed.zero_stage=3: the Ulysses row split "
            "runs the model's layers itself, outside the engine's ZeRO-3 parameter gathering; use zero_stage 1 or 2"
        )
    for name in ("tensor", "pipeline", "expert"):
        value = getattr(sizes, name)
        if value > 1:
            raise ValueError(
                f"engine=deepspeed with parallel.{name}={value}: the DeepSpeed engine shards over the data ranks "
                "(ZeRO) and splits rows over the context ranks (Ulysses) only; use engine=megatron for tensor, "
                "pipeline or expert parallelism"
            )


def deepspeed_config(config: TrainConfig, zero_ranks: int) -> dict:
    """The DeepSpeed config dict of ``config`` with ZeRO over ``zero_ranks`` ranks (every rank: the
    data ranks, times the context ranks that share each one's packs).

    One micro-batch is one pack; the trainer feeds ``optimizer.micro_batches_per_step`` of them per
    rank and step, and calls ``engine.step()`` once per step (``managed_gradient_accumulation``
    off: the step is the accumulation boundary, as in the Megatron-style engine)."""
    opt, settings = config.optimizer, config.deepspeed
    zero: dict = {"stage": settings.zero_stage}
    if settings.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if settings.zero_stage != 2:  # DeepSpeed overlaps reduction with backward only at stage 2 here
        zero["overlap_comm"] = False
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": opt.micro_batches_per_step,
        "train_batch_size": opt.micro_batches_per_step * zero_ranks,  # DeepSpeed's count: micro x gas x ranks
        "managed_gradient_accumulation": False,
        "gradient_clipping": opt.grad_clip,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": opt.lr,
                "betas": list(opt.betas),
                "eps": ADAM_EPS,
                "weight_decay": opt.weight_decay,
                "torch_adam": True,  # torch.optim.AdamW, the other engine's optimizer; no op to compile
            },
        },
        # torch's AdamW also where the state is offloaded (DeepSpeed's CPU Adam is a compiled op).
        "zero_force_ds_cpu_optimizer": False,
        "zero_optimization": zero,
        "bf16": {"enabled": config.precision == "bf16"},
        "steps_per_print": config.steps + 1,  # the trainer logs; DeepSpeed stays quiet
        "wall_clock_breakdown": False,
    }
