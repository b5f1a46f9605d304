"""The training entry point: ``python -m megatron_cosmos3.training.train [--config FILE] [key=value ...]``.

Run under ``torchrun`` (or ``srun``), one process per device. Read top to bottom: config -> process
groups -> model (stage, parallelism) and optimizer -> resume -> loop -> checkpoint.
"""

from __future__ import annotations

import argparse
import copy
import fnmatch
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from megatron_cosmos3.data.synthetic_packs import random_pack
from megatron_cosmos3.model.attention import PackLayout
from megatron_cosmos3.model.moe import set_aux_loss_scale
from megatron_cosmos3.model.mot import MoTModel
from megatron_cosmos3.parallel.data_parallel import build_optimizer, wrap_data_parallel
from megatron_cosmos3.parallel.expert_parallel import apply_expert_parallel, finalize_expert_grads
from megatron_cosmos3.parallel.grad_norm import clip_grad_norm
from megatron_cosmos3.parallel.state import ParallelGroups, destroy_parallel, initialize_parallel
from megatron_cosmos3.parallel.tensor_parallel import apply_tensor_parallel, finalize_tensor_parallel_grads
from megatron_cosmos3.training.checkpoint import Checkpointer, latest_checkpoint
from megatron_cosmos3.training.config import TrainConfig, flatten, load_config, to_yaml
from megatron_cosmos3.training.distributed import DistributedContext, init_distributed
from megatron_cosmos3.training.flops import step_flops
from megatron_cosmos3.training.flow_matching import add_flow_matching_noise
from megatron_cosmos3.training.losses import mot_losses
from megatron_cosmos3.training.metrics import MetricsWindow
from megatron_cosmos3.training.precision import autocast
from megatron_cosmos3.training.preemption import REQUEUE_EXIT_CODE, PreemptionWatcher
from megatron_cosmos3.training.schedule import learning_rate
from megatron_cosmos3.training.tracking import MLflowTracker

log = logging.getLogger("megatron_cosmos3.train")


class NonFiniteLossError(RuntimeError):
    pass


class Preempted(SystemExit):
    """Raised after the preemption checkpoint is committed; exits with REQUEUE_EXIT_CODE."""

    def __init__(self, step: int):
        super().__init__(REQUEUE_EXIT_CODE)
        self.step = step


def micro_batch(config: TrainConfig, step: int, micro: int, data_rank: int, device: torch.device):
    """The pack of one data-parallel rank at (step, micro-batch): a pure function of those numbers
    and the seed, so a resumed run sees exactly what an uninterrupted one would."""
    g = torch.Generator().manual_seed(hash((config.seed, step, micro, data_rank)) % (2**63))
    batch = random_pack(config.model, g, config.data.samples_per_pack, tuple(config.data.tasks), config.data.scale)
    noised, targets = add_flow_matching_noise(batch, config.flow_matching, g)
    return noised.to(device), {k: v.to(device) for k, v in targets.items()}


def _matches(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def stage_param_groups(model: nn.Module, config: TrainConfig) -> list[dict]:
    """Freezes what the stage freezes; one optimizer group per learning-rate multiplier."""
    by_multiplier: dict[float, list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if _matches(name, config.stage.freeze):
            param.requires_grad_(False)
            continue
        multiplier = next((m for pattern, m in config.stage.lr_multipliers.items()
                           if fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, f"*{pattern}*")), 1.0)
        by_multiplier.setdefault(multiplier, []).append(param)
    if not by_multiplier:
        raise ValueError(f"stage.freeze={list(config.stage.freeze)} freezes every parameter: nothing to train")
    return [{"params": params, "lr_multiplier": m} for m, params in by_multiplier.items()]


@dataclass
class Run:
    """Everything the loop touches, built once."""

    config: TrainConfig
    ctx: DistributedContext
    groups: ParallelGroups | None
    model: MoTModel
    trained: nn.Module  # the model as the loss sees it (DDP-wrapped when data parallel)
    optimizer: object
    checkpointer: Checkpointer
    data_rank: int
    data_size: int

    @property
    def model_parallel_size(self) -> int:
        sizes = self.config.parallel
        return sizes.tensor * sizes.pipeline * sizes.context if self.groups is not None else 1


def build_run(config: TrainConfig, ctx: DistributedContext) -> Run:
    groups = initialize_parallel(config.parallel, config.model, config.model.num_experts) if ctx.world_size > 1 else None
    if groups is not None and (config.parallel.pipeline > 1 or config.parallel.context > 1):
        raise NotImplementedError("parallel.pipeline / parallel.context > 1 are not wired into the trainer yet")
    torch.manual_seed(config.seed)  # identical initial weights on every rank
    model = MoTModel(copy.deepcopy(config.model)).to(ctx.device)  # the model's config grows with embodiments
    for name, embodiment in config.stage.new_embodiments.items():
        model.add_embodiment(name, embodiment)
    for layer in model.layers:
        layer.set_recompute(config.recompute)
    # Each micro-batch backpropagates loss / micro_batches: the MoE balancing gradient follows.
    set_aux_loss_scale(model, 1.0 / config.optimizer.micro_batches_per_step)
    if groups is not None:
        apply_tensor_parallel(model, groups)
        apply_expert_parallel(model, groups)
    param_groups = stage_param_groups(model, config)
    trained = wrap_data_parallel(model, groups) if groups is not None else model
    opt = config.optimizer
    optimizer = (build_optimizer(param_groups, groups, opt.lr, tuple(opt.betas), opt.weight_decay,
                                 opt.shard_optimizer_state) if groups is not None else
                 torch.optim.AdamW(param_groups, lr=opt.lr, betas=tuple(opt.betas), weight_decay=opt.weight_decay))
    checkpointer = Checkpointer(config.checkpoint.directory, config.checkpoint.keep_last, groups,
                                config.checkpoint.async_save, ctx.device.type)
    data_rank = groups.data_rank if groups is not None else 0
    data_size = groups.data_size if groups is not None else 1
    return Run(config, ctx, groups, model, trained, optimizer, checkpointer, data_rank, data_size)


def resume_or_initialise(run: Run) -> tuple[int, str | None]:
    """Loads this stage's latest checkpoint (full state), else the previous stage's weights."""
    config = run.config
    latest = latest_checkpoint(config.checkpoint.directory) if config.checkpoint.resume else None
    if latest is not None:
        per_rank = {"rng": torch.get_rng_state()}
        meta = run.checkpointer.load(latest, run.model, run.optimizer, per_rank)
        if "rng" in per_rank:
            torch.set_rng_state(per_rank["rng"])
        if run.ctx.is_main:
            log.info("resumed from %s at step %d", latest, meta["step"])
        return meta["step"], meta.get("mlflow_run_id")
    if config.stage.init_from:
        source = Path(config.stage.init_from)
        source = latest_checkpoint(source) or source
        new = tuple(f"dm_streams.action_{d}.{name}." for name in config.stage.new_embodiments for d in ("in", "out"))
        run.checkpointer.load(source, run.model, optimizer=None, allow_missing=new)
        if run.ctx.is_main:
            log.info("stage %s starts from the weights of %s", config.stage.name, source)
    return 0, None


def finish_gradients(run: Run) -> torch.Tensor:
    """Completes the gradients of sharded parameters and clips; returns the global norm."""
    if run.groups is not None:
        finalize_tensor_parallel_grads(run.model, run.groups)
        finalize_expert_grads(run.model, run.groups)
    return clip_grad_norm(run.model, run.config.optimizer.grad_clip, run.groups)


def train(config: TrainConfig, ctx: DistributedContext) -> dict[str, float]:
    """Runs the stage to ``config.steps``; raises ``Preempted`` after checkpointing on a signal."""
    watcher = PreemptionWatcher()
    try:
        return _train(config, ctx, watcher)
    finally:
        watcher.close()


def _train(config: TrainConfig, ctx: DistributedContext, watcher: PreemptionWatcher) -> dict[str, float]:
    run = build_run(config, ctx)
    start_step, run_id = resume_or_initialise(run)
    tracker = MLflowTracker(config.tracking.tracking_uri, config.tracking.experiment, config.tracking.run_name,
                            enabled=config.tracking.enabled and ctx.is_main, run_id=run_id)
    if ctx.is_main and run_id is None:
        tracker.log_params(flatten(config))
        tracker.set_tag("world_size", str(ctx.world_size))
        tracker.set_tag("stage", config.stage.name)

    opt = config.optimizer
    window = MetricsWindow(config.data.tasks, run.data_size, opt.flow_matching_weight, config.peak_flops_per_device)
    metrics: dict[str, float] = {}
    nonfinite_in_a_row = 0
    for step in range(start_step, config.steps):
        base_lr = learning_rate(step, config.steps, opt.lr, opt.min_lr, opt.warmup_steps, opt.schedule,
                                opt.decay_fraction)
        for group in run.optimizer.param_groups:
            group["lr"] = base_lr * group.get("lr_multiplier", 1.0)
        run.optimizer.zero_grad(set_to_none=True)
        finite = True
        for micro in range(opt.micro_batches_per_step):
            batch, targets = micro_batch(config, step, micro, run.data_rank, ctx.device)
            last = micro == opt.micro_batches_per_step - 1
            # Gradients are reduced across data-parallel ranks once, after the last micro-batch.
            sync = run.trained.no_sync() if (not last and hasattr(run.trained, "no_sync")) else _nullcontext()
            with sync, autocast(config.precision, ctx.device):
                losses = mot_losses(run.trained, batch, targets, opt.flow_matching_weight)
            with sync:
                (losses.total / opt.micro_batches_per_step).backward()
            finite &= bool(torch.isfinite(losses.total.detach()))
            layout = PackLayout.from_cu_seqlens(batch.ar_cu_seqlens, batch.dm_cu_seqlens)
            flops = step_flops(run.model, layout, int(losses.ce_count),
                               {k: tuple(v.shape) for k, v in batch.dm_tokens.items()})
            # Per device: model-parallel ranks share one micro-batch's FLOPs.
            window.add(losses, batch.num_ar_tokens + batch.num_dm_tokens, flops.total / run.model_parallel_size)
        grad_norm = finish_gradients(run)
        if finite and torch.isfinite(grad_norm):
            run.optimizer.step()
            nonfinite_in_a_row = 0
        else:  # every rank sees the same all-reduced norm, so every rank skips together
            nonfinite_in_a_row += 1
            window.skipped_steps += 1
            log.warning("step %d skipped: non-finite %s", step + 1, "loss" if not finite else "gradient norm")
            if nonfinite_in_a_row >= opt.max_consecutive_nonfinite_steps:
                raise NonFiniteLossError(
                    f"{nonfinite_in_a_row} steps in a row had a non-finite loss or gradient (last: step {step + 1}); "
                    f"stopping (optimizer.max_consecutive_nonfinite_steps={opt.max_consecutive_nonfinite_steps})")

        if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
            eta = (config.steps - step - 1) * window.seconds_per_step()
            metrics = window.reduce({"grad_norm": float(grad_norm), "lr": base_lr})
            if ctx.is_main:
                tracker.log_metrics(metrics, step + 1)
                log.info("step %d/%d  loss %.4f  ce %.4f  fm %.4f  grad_norm %.3f  lr %.2e  tokens/s %.0f  eta %.0fs",
                         step + 1, config.steps, metrics["loss"], metrics.get("loss/ce", math.nan),
                         metrics.get("loss/fm", math.nan), metrics.get("grad_norm", math.nan), metrics["lr"],
                         metrics["throughput/tokens_per_s"], eta)
            window.reset()
        committed = run.checkpointer.poll()
        if committed is not None and ctx.is_main:
            tracker.set_tag("checkpoint", str(committed.resolve()))
        preempted = watcher.should_stop()
        if preempted or (step + 1) % config.checkpoint.save_every == 0 or step + 1 == config.steps:
            run.checkpointer.save(step + 1, run.model, run.optimizer, {"rng": torch.get_rng_state()},
                                  {"mlflow_run_id": tracker.run_id, "stage": config.stage.name,
                                   "config": to_yaml(config)})
        if preempted:
            run.checkpointer.wait()
            if ctx.is_main:
                tracker.set_tag("preempted_at_step", str(step + 1))
                log.warning("preempted: checkpoint of step %d committed; exiting with code %d for requeue",
                            step + 1, REQUEUE_EXIT_CODE)
            raise Preempted(step + 1)
    committed = run.checkpointer.wait()
    if ctx.is_main:
        if committed is not None:
            tracker.set_tag("checkpoint", str(committed.resolve()))
            log.info("checkpoint: %s", committed.resolve())
        tracker.finish()
        if tracker.run_id:
            log.info("MLflow run %s; browse with: mlflow ui --backend-store-uri %s", tracker.run_id, tracker.uri)
    return metrics


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train the megatron_cosmos3 MoT (run under torchrun or srun).")
    parser.add_argument("--config", help="YAML config file (e.g. configs/tiny_cpu.yaml)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", help="OmegaConf dotlist overrides, e.g. optimizer.lr=1e-3 steps=50")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    config = load_config(args.config, args.overrides)  # validated before any process group exists
    if args.print_config:
        print(to_yaml(config))
        return
    import os

    config.parallel.validate(int(os.environ.get("WORLD_SIZE", 1)), config.model, config.model.num_experts)
    ctx = init_distributed()
    logging.basicConfig(level=logging.INFO if ctx.is_main else logging.WARNING,
                        format=f"%(asctime)s [rank {ctx.rank}] %(message)s", datefmt="%H:%M:%S")
    if ctx.is_main:
        log.info("resolved config:\n%s", to_yaml(config))
    try:
        train(config, ctx)
    finally:
        if ctx.world_size > 1:
            destroy_parallel()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
