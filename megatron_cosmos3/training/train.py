"""The training entry point: ``python -m megatron_cosmos3.training.train [--config FILE] [key=value ...]``.

Run under ``torchrun`` (or ``srun``); one process per device, data parallel across processes.
Read top to bottom: config -> process group -> model and optimizer -> resume -> loop -> checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from megatron_cosmos3.data.synthetic_packs import random_pack
from megatron_cosmos3.model.attention import PackLayout
from megatron_cosmos3.model.mot import MoTModel
from megatron_cosmos3.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from megatron_cosmos3.training.config import TrainConfig, flatten, load_config, to_yaml
from megatron_cosmos3.training.distributed import DistributedContext, init_distributed
from megatron_cosmos3.training.flops import step_flops
from megatron_cosmos3.training.flow_matching import add_flow_matching_noise
from megatron_cosmos3.training.losses import mot_losses
from megatron_cosmos3.training.metrics import MetricsWindow
from megatron_cosmos3.training.tracking import MLflowTracker

log = logging.getLogger("megatron_cosmos3.train")


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to min_lr at the last step."""
    opt = config.optimizer
    if step < opt.warmup_steps:
        return opt.lr * (step + 1) / opt.warmup_steps
    progress = (step - opt.warmup_steps) / max(1, config.steps - opt.warmup_steps)
    return opt.min_lr + 0.5 * (opt.lr - opt.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def batch_for(step: int, ctx: DistributedContext, config: TrainConfig):
    """The pack of this rank at this step: a pure function of (seed, step, rank), so resumes are exact."""
    g = torch.Generator().manual_seed(hash((config.seed, step, ctx.rank)) % (2**63))
    batch = random_pack(config.model, g, config.data.samples_per_pack, tuple(config.data.tasks), config.data.scale)
    noised, targets = add_flow_matching_noise(batch, config.flow_matching, g)
    return noised.to(ctx.device), {k: v.to(ctx.device) for k, v in targets.items()}


def train(config: TrainConfig, ctx: DistributedContext) -> dict[str, float]:
    torch.manual_seed(config.seed)  # identical initial weights on every rank
    model = MoTModel(config.model).to(ctx.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.optimizer.lr,
                                  betas=tuple(config.optimizer.betas), weight_decay=config.optimizer.weight_decay)
    # Packs differ per rank in which DM streams they hold, so some heads go unused on some ranks.
    ddp = DistributedDataParallel(model, find_unused_parameters=True) if ctx.world_size > 1 else model

    start_step, run_id = 0, None
    resume_from = latest_checkpoint(config.checkpoint.directory) if config.checkpoint.resume else None
    if resume_from is not None:
        meta = load_checkpoint(resume_from, model, optimizer)
        start_step, run_id = meta["step"], meta.get("mlflow_run_id")
        if ctx.is_main:
            log.info("resumed from %s at step %d", resume_from, start_step)
    tracker = MLflowTracker(config.tracking.tracking_uri, config.tracking.experiment, config.tracking.run_name,
                            enabled=config.tracking.enabled and ctx.is_main, run_id=run_id)
    if ctx.is_main and run_id is None:
        tracker.log_params(flatten(config))
        tracker.set_tag("world_size", str(ctx.world_size))

    metrics: dict[str, float] = {}
    window = MetricsWindow(config.data.tasks, ctx.world_size, config.optimizer.flow_matching_weight,
                           config.peak_flops_per_device)
    checkpoint_path = None
    for step in range(start_step, config.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config)
        batch, targets = batch_for(step, ctx, config)
        losses = mot_losses(ddp, batch, targets, config.optimizer.flow_matching_weight)
        optimizer.zero_grad(set_to_none=True)
        losses.total.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.optimizer.grad_clip)
        optimizer.step()

        layout = PackLayout.from_cu_seqlens(batch.ar_cu_seqlens, batch.dm_cu_seqlens)
        flops = step_flops(model, layout, int(losses.ce_count),
                           {k: tuple(v.shape) for k, v in batch.dm_tokens.items()})
        window.add(losses, batch.num_ar_tokens + batch.num_dm_tokens, flops.total)
        if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
            eta = (config.steps - step - 1) * window.seconds_per_step()
            metrics = window.reduce({"grad_norm": float(grad_norm), "lr": optimizer.param_groups[0]["lr"]})
            if ctx.is_main:
                tracker.log_metrics(metrics, step + 1)
                log.info("step %d/%d  loss %.4f  ce %.4f  fm %.4f  grad_norm %.3f  lr %.2e  tokens/s %.0f  eta %.0fs",
                         step + 1, config.steps, metrics["loss"], metrics.get("loss/ce", float("nan")),
                         metrics.get("loss/fm", float("nan")), metrics["grad_norm"], metrics["lr"],
                         metrics["throughput/tokens_per_s"], eta)
            window.reset()
        if (step + 1) % config.checkpoint.save_every == 0 or step + 1 == config.steps:
            checkpoint_path = save_checkpoint(
                config.checkpoint.directory, step + 1, model, optimizer,
                {"mlflow_run_id": tracker.run_id, "config": to_yaml(config)}, ctx.is_main, config.checkpoint.keep_last)
            if ctx.is_main:
                tracker.set_tag("checkpoint", str(checkpoint_path.resolve()))
    if ctx.is_main:
        tracker.finish()
        if checkpoint_path is not None:
            log.info("checkpoint: %s", checkpoint_path.resolve())
        if tracker.run_id:
            log.info("MLflow run %s; browse with: mlflow ui --backend-store-uri %s", tracker.run_id, tracker.uri)
    return metrics



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
    ctx = init_distributed()
    logging.basicConfig(level=logging.INFO if ctx.is_main else logging.WARNING,
                        format=f"%(asctime)s [rank {ctx.rank}] %(message)s", datefmt="%H:%M:%S")
    if ctx.is_main:
        Path(config.checkpoint.directory).mkdir(parents=True, exist_ok=True)
        log.info("resolved config:\n%s", to_yaml(config))
    try:
        train(config, ctx)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
