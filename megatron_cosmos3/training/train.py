"""The training entry point: ``python -m megatron_cosmos3.training.train [--config FILE] [key=value ...]``.

Run under ``torchrun`` (or ``srun``), one process per device. Read top to bottom: config -> parallel
plan (``parallel/plan.py``: layout, driver, gradients) -> model and optimizer -> resume -> loop ->
checkpoint. Nothing here branches on the parallel layout; the plan does.
"""

from __future__ import annotations

import argparse
import copy
import fnmatch
import logging
import math
import os
import sys
import time
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.profiler import record_function

from megatron_cosmos3.checkpoint.checkpointer import (
    Checkpointer,
    CheckpointSaveError,
    ResumeError,
    inventory,
    read_meta,
)
from megatron_cosmos3.checkpoint.engine_layout import is_deepspeed_checkpoint
from megatron_cosmos3.checkpoint.finite import NonFiniteWeightsError, require_finite_weights
from megatron_cosmos3.checkpoint.resume import resume_from
from megatron_cosmos3.checkpoint.safe_reader import CheckpointCorruptError
from megatron_cosmos3.checkpoint.weights_folder import (
    check_same_architecture,
    is_weights_folder,
    load_weights_folder,
    verify_weights_folder,
)
from megatron_cosmos3.data.errors import DataExhaustedError
from megatron_cosmos3.data.latent_encoders import latent_encoder_from_config
from megatron_cosmos3.data.loader import datasets_action_stats
from megatron_cosmos3.data.tokenizer import build_tokenizer
from megatron_cosmos3.encoders.action_normalization import ActionStats, merge_action_stats
from megatron_cosmos3.evaluation.report import EvalReport
from megatron_cosmos3.model.attention import PackLayout
from megatron_cosmos3.model.moe import set_aux_loss_scale
from megatron_cosmos3.model.mot import MoTModel
from megatron_cosmos3.model.packed_batch import IGNORE_INDEX
from megatron_cosmos3.objectives.losses import LossBreakdown, loss_breakdown
from megatron_cosmos3.parallel.failures import fail_together
from megatron_cosmos3.parallel.plan import ParallelPlan
from megatron_cosmos3.parallel.state import destroy_parallel
from megatron_cosmos3.training.batches import MicroBatches, held_out_batches, held_out_share
from megatron_cosmos3.training.config import (
    TrainConfig,
    config_from_yaml,
    flatten,
    load_config,
    task_table,
    to_yaml,
    with_absolute_paths,
)
from megatron_cosmos3.training.distributed import (
    DistributedContext,
    init_distributed,
    launched_rank,
    launched_world_size,
    launcher_run_id,
    preflight,
)
from megatron_cosmos3.training.flops import FlopCounter
from megatron_cosmos3.training.host_memory import check_host_memory
from megatron_cosmos3.training.metrics import PHASES, MetricsWindow
from megatron_cosmos3.training.precision import autocast, check_precision
from megatron_cosmos3.training.preemption import (
    FINISHED,
    PREEMPTED,
    PreemptionWatcher,
    status_file_problem,
    write_status,
)
from megatron_cosmos3.training.profiling import StepProfiler, check_profiling
from megatron_cosmos3.training.refusals import StartupRefusal
from megatron_cosmos3.training.run_lock import lock_run_folder
from megatron_cosmos3.training.samples import (
    HeldOutSet,
    choose_held_out_samples,
    generate_held_out,
    has_held_out_data,
    held_out_action_stats,
    held_out_sample_packs,
    trained_dm_tasks,
    write_held_out,
)
from megatron_cosmos3.training.schedule import learning_rate
from megatron_cosmos3.training.tracking import MLflowTracker
from megatron_cosmos3.training.unused_parameters import possibly_unused

if TYPE_CHECKING:  # imported where a run evaluates its suite: a quarter of every trainer's start-up
    from megatron_cosmos3.eval_suite.suite import EvalSuite

log = logging.getLogger("megatron_cosmos3.train")


# Dense bf16 peak FLOP/s per device (no sparsity), for MFU when the config leaves it at 0.
PEAK_BF16_FLOPS = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12, "B200": 2250e12}


def known_peak_flops(device_name: str) -> float:
    return next((peak for name, peak in PEAK_BF16_FLOPS.items() if name in device_name), 0.0)


class NonFiniteLossError(RuntimeError):
    pass


class Preempted(SystemExit):
    """Raised once the preemption checkpoint of ``step`` is committed (or, signalled before the first
    step, with ``step == start_step`` and nothing new to save); the process exits with code 0
    (``training/preemption.py``)."""

    def __init__(self, step: int, start_step: int):
        super().__init__(0)
        self.step, self.start_step = step, start_step


def _value(metrics: dict[str, float], name: str) -> str:
    return f"{metrics[name]:.4f}" if name in metrics else "-"


def eval_line(step: int, steps: int, held_out: dict[str, float]) -> str:
    """The console line of a held-out evaluation; "-" for a loss the held-out packs have no tokens of
    (the metrics window leaves it out, as the training line's)."""
    ce, fm = _value(held_out, "eval/loss/ce"), _value(held_out, "eval/loss/fm")
    return f"step {step}/{steps}  eval loss {held_out['eval/loss']:.4f}  ce {ce}  fm {fm}"


def _matches(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def _multiplier_matches(name: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, f"*{pattern}*")


def check_stage_patterns(names: list[str], config: TrainConfig) -> None:
    """ValueError naming each ``stage.freeze`` / ``stage.lr_multipliers`` pattern that matches no
    parameter of ``names`` (the whole model's): a typo ('layer.*' for 'layers.*') froze or slowed
    nothing, without a word, and the stage trained what it meant to keep."""
    unmatched = [
        f"stage.freeze pattern {pattern!r}"
        for pattern in config.stage.freeze
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names)
    ]
    unmatched += [
        f"stage.lr_multipliers pattern {pattern!r}"
        for pattern in config.stage.lr_multipliers
        if not any(_multiplier_matches(name, pattern) for name in names)
    ]
    if unmatched:
        tops = sorted({name.split(".")[0] for name in names})
        raise ValueError(f"{', '.join(unmatched)} matches no parameter of the model (its parameters start with {tops})")


def stage_param_groups(model: nn.Module, config: TrainConfig) -> list[dict]:
    """Freezes what the stage freezes; one optimizer group per learning-rate multiplier. The model's
    parameters are all named here, a pipeline rank's others on the meta device, so a pattern that
    matches none of them is refused alike on every rank (``check_stage_patterns``)."""
    # every name of each parameter, a tied weight's second one too (lm_head.weight is embed_tokens.weight):
    # a pattern naming either freezes or scales that one tensor
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    check_stage_patterns([name for aliases in names.values() for name in aliases], config)
    by_multiplier: dict[float, list[nn.Parameter]] = {}
    for _, param in model.named_parameters():
        aliases = names[id(param)]
        if any(_matches(name, config.stage.freeze) for name in aliases):
            param.requires_grad_(False)
            continue
        multiplier = next(
            (
                m
                for pattern, m in config.stage.lr_multipliers.items()
                if any(_multiplier_matches(name, pattern) for name in aliases)
            ),
            1.0,
        )
        by_multiplier.setdefault(multiplier, []).append(param)
    if not by_multiplier:
        raise ValueError(f"stage.freeze={list(config.stage.freeze)} freezes every parameter: nothing to train")
    return [{"params": params, "lr_multiplier": m} for m, params in by_multiplier.items()]


@dataclass
class Run:
    """Everything the loop touches, built once."""

    config: TrainConfig
    ctx: DistributedContext
    plan: ParallelPlan  # this rank's layout and driver (or the DeepSpeedPlan): the only owner of parallel state
    model: MoTModel
    optimizer: object
    checkpointer: Checkpointer
    batches: MicroBatches
    flops: FlopCounter
    held_out_samples: HeldOutSet | None = None  # the fixed generation samples, chosen at the first save
    held_out: list | None = None  # the held-out packs, read at the first evaluation
    suite: EvalSuite | None = None  # the evaluation suite (eval.suite), built at its first run
    # dataset name -> the action statistics its actions are normalised with (saved in each checkpoint)
    action_stats: dict[str, ActionStats] = field(default_factory=dict)


def build_model(config: TrainConfig, plan: ParallelPlan, device: torch.device) -> MoTModel:
    """The model with this rank's part allocated and initialised: built on the meta device, then
    ``plan.allocate`` materialises only this rank's part, so no rank ever holds the whole model. Every
    parameter's initial values depend only on the seed and its name (``MoTModel.reset_parameters``):
    the same on every rank and for every layout."""
    torch.manual_seed(config.seed)
    with torch.device("meta"):
        model = MoTModel(copy.deepcopy(config.model))  # the model's config grows with embodiments
        for name, embodiment in config.stage.new_embodiments.items():
            model.add_embodiment(name, embodiment)
        if config.trains_vision:
            model.add_vision_encoder()
    plan.allocate(model, device)
    return model


def build_plan(config: TrainConfig, ctx: DistributedContext):
    """The engine's plan: ``ParallelPlan`` (Megatron-style layouts) or, with ``engine=deepspeed``,
    ``DeepSpeedPlan`` (ZeRO; ``training/deepspeed_engine.py``), which answers the same calls."""
    if config.engine == "deepspeed":
        from megatron_cosmos3.training.deepspeed_engine import DeepSpeedPlan

        return DeepSpeedPlan.create(config, ctx.world_size)
    return ParallelPlan.create(config.parallel, config.model, ctx.world_size, config.distributed.init_timeout_s)


def build_checkpointer(config: TrainConfig, ctx: DistributedContext, plan) -> Checkpointer:
    if config.engine == "deepspeed":
        from megatron_cosmos3.training.deepspeed_engine import DeepSpeedCheckpointer

        return DeepSpeedCheckpointer(config.checkpoint.directory, config.checkpoint.keep_last, plan)
    return Checkpointer(
        config.checkpoint.directory,
        config.checkpoint.keep_last,
        plan.groups,
        config.checkpoint.async_save,
        ctx.device.type,
        config.distributed.init_timeout_s,
    )


def build_run(config: TrainConfig, ctx: DistributedContext) -> Run:
    """This rank's part of the run. Its checks before any group fail alike on every rank; from the
    plan's groups on, a rank raising (a layer it cannot build, a file it cannot read) ends every
    rank, each naming it: every rank runs the same collectives there (``fail_together``)."""
    check_precision(config.precision, ctx.device)  # fp8 without CUDA and TE: an error before any group
    check_profiling(config.profiling, ctx.world_size, ctx.device)
    if ctx.device.type == "cpu":  # refused by name, not found out by the OOM killer mid-set-up
        check_host_memory(config, ctx.world_size)
    with fail_together("the start-up", agreed=STARTED_TOGETHER):
        plan = build_plan(config, ctx)
        model = build_model(config, plan, ctx.device)
        for layer in model.layers:
            layer.set_recompute(config.recompute)
        if model.vision is not None:
            model.vision.set_recompute(config.recompute)
        # Each micro-batch backpropagates loss / micro_batches: the MoE balancing gradient follows.
        set_aux_loss_scale(model, 1.0 / config.optimizer.micro_batches_per_step)
        unused = partial(possibly_unused, tasks=task_table(config))  # DDP's find_unused_parameters only if some may be
        param_groups = plan.apply(model, partial(stage_param_groups, config=config), unused)
        opt = config.optimizer
        optimizer = plan.build_optimizer(
            param_groups, opt.lr, tuple(opt.betas), opt.weight_decay, opt.shard_optimizer_state, opt.implementation
        )
        checkpointer = build_checkpointer(config, ctx, plan)
        if config.eval.every:
            held_out_share(config, plan.data_size)  # before any step, not at the first evaluation
        wants_samples = config.tracking.enabled and config.tracking.generation_samples
        if wants_samples and not has_held_out_data(config) and ctx.is_main:
            log.warning("no generation samples: data_source=shards and no held-out shards (eval.datasets)")
        batches = MicroBatches(config, plan.data_rank, plan.data_size, ctx.device, plan.data_share)
        flops = FlopCounter(model.config, vision=model.vision)
        stats = datasets_action_stats(config.data.datasets)
        return Run(config, ctx, plan, model, optimizer, checkpointer, batches, flops, action_stats=stats)


# Why a stage does not start from weights holding NaN or inf (instead of skipping steps until
# optimizer.max_consecutive_nonfinite_steps stops it), nor a run resume from them.
NAN_START = "a stage started from them computes only NaN losses"
NAN_RESUME = "a run resumed from it computes only NaN updates (it diverged before this save, or was damaged)"


def _load_full_state(run: Run, path: Path) -> dict:
    """Loads everything a resume restores (weights, optimizer, RNG, loader position); returns meta.
    Weights or AdamW moments holding NaN or inf are a NonFiniteWeightsError naming the tensor, an
    RNG state torch refuses, or a loader position that is no loader state, a CheckpointCorruptError
    naming the entry (``resume_from`` then falls back as for any unusable checkpoint, where allowed)."""
    per_rank, data_state = {"rng": torch.get_rng_state()}, run.batches.state()
    meta = run.checkpointer.load(path, run.plan.state_owner, run.optimizer, per_rank, named=data_state)
    check_saved_architecture(run, meta, path, "checkpoint.directory")
    require_finite_weights(run.plan.state_owner, path, "checkpoint", NAN_RESUME, run.optimizer)
    if "rng" in per_rank:
        restore_rng_state(per_rank["rng"], path, f"rank{run.ctx.rank}/rng")
    run.batches.load_state(data_state, f"checkpoint {path}")
    return meta


def restore_rng_state(state: torch.Tensor, path: Path, entry: str) -> None:
    """Sets torch's CPU generator to ``state``, the checkpoint entry ``entry`` of ``path``; one torch
    refuses (another size or dtype, an invalid mt19937 state: a crafted or damaged entry whose
    checksums match) is a CheckpointCorruptError naming the entry, not a bare RuntimeError."""
    try:
        torch.set_rng_state(state)
    except (RuntimeError, TypeError, ValueError) as error:
        raise CheckpointCorruptError(
            f"checkpoint {path}: RNG state entry {entry!r} ({state.dtype}, shape {tuple(state.shape)}) is not one "
            f"torch can restore: {error}"
        ) from None


def saved_config(meta: dict, path: Path) -> TrainConfig | None:
    """The config a checkpoint's run was trained with (its meta.json's), or None where the
    checkpoint predates checkpoints recording it."""
    return config_from_yaml(meta["config"], f"{path / 'meta.json'} 'config'") if "config" in meta else None


def check_saved_architecture(run: Run, meta: dict, path: Path, field: str) -> None:
    """ValueError naming the field where the model a checkpoint was trained as (its meta's config)
    differs from this run's beyond the shapes its tensors show (rotary, norm epsilon, tying, top-k,
    the ViT): a resume or a stage would go on silently with another model. The weights folder's
    check (``check_same_architecture``), for checkpoint folders."""
    trained = saved_config(meta, path)
    if trained is None:
        return
    saved = trained.model
    vision = run.config.model.vision is not None and saved.vision is not None
    check_same_architecture(run.config.model, saved, f"{field}={path}", str(path / "meta.json"), vision)


def resume_or_initialise(run: Run) -> tuple[int, str | None]:
    """Loads this stage's latest checkpoint (full state), else the previous stage's weights."""
    config = run.config
    resumed = resume_from(inventory(config.checkpoint.directory), config.checkpoint, partial(_load_full_state, run))
    if resumed is not None:
        path, meta = resumed
        if run.ctx.is_main:
            log.info("resumed from %s at step %d", path, meta["step"])
            if meta["step"] >= config.steps:  # the loop has no step left: said, not finished silently
                log.warning(
                    "checkpoint %s is at step %d, %s steps=%d: nothing left to train; raise steps to train on",
                    path,
                    meta["step"],
                    "already at" if meta["step"] == config.steps else "past",
                    config.steps,
                )
            warn_of_schedule_changes(saved_config(meta, path), config, meta["step"])
        return meta["step"], meta.get("mlflow_run_id")
    if config.stage.init_from:
        source = Path(config.stage.init_from)
        new = tuple(f"dm_streams.action_{d}.{name}." for name in config.stage.new_embodiments for d in ("in", "out"))
        if is_weights_folder(source):  # e.g. Qwen3-VL imported by `python -m megatron_cosmos3.conversion import`
            verify_weights_folder(source)  # a release folder's checksums, as cosmos3-generate checks them
            with run.plan.writing_weights() as owner:
                load_weights_folder(source, owner, config.model, run.plan.groups, allow_missing=new)
                require_finite_weights(owner, source, "stage.init_from", NAN_START)
        else:
            found = inventory(source)  # a checkpoint directory: its latest; a step folder: itself
            if found.problem is not None:
                raise ResumeError(f"stage.init_from={source}: {found.problem}. {found.describe()}")
            source = found.latest or source
            if is_deepspeed_checkpoint(source):  # under either engine: its fp32 masters, not the bf16 copies
                from megatron_cosmos3.training.deepspeed_engine import load_deepspeed_weights

                check_saved_architecture(run, read_meta(source), source, "stage.init_from")
                with run.plan.writing_weights() as owner:
                    load_deepspeed_weights(source, owner, run.plan.groups, allow_missing=new)
                    require_finite_weights(owner, source, "stage.init_from", NAN_START)
            else:
                meta = run.checkpointer.load(source, run.plan.state_owner, optimizer=None, allow_missing=new)
                check_saved_architecture(run, meta, source, "stage.init_from")
                require_finite_weights(run.plan.state_owner, source, "stage.init_from", NAN_START)
        if run.ctx.is_main:
            log.info("stage %s starts from the weights of %s", config.stage.name, source)
    return 0, None


# The settings the learning rate of a step is a function of (``training/schedule.py``).
SCHEDULE_FIELDS = ("lr", "min_lr", "warmup_steps", "schedule", "decay_fraction")


def schedule_changes(saved: TrainConfig, config: TrainConfig) -> list[str]:
    """'<field>: <old> -> <new>' for each learning-rate setting ``config`` changes from ``saved``:
    the schedule's, ``steps`` where a schedule decays over it (not ``constant``), and the stage's
    ``lr_multipliers``."""
    pairs = [
        (f"optimizer.{name}", getattr(saved.optimizer, name), getattr(config.optimizer, name))
        for name in SCHEDULE_FIELDS
    ]
    if not saved.optimizer.schedule == config.optimizer.schedule == "constant":
        pairs.append(("steps", saved.steps, config.steps))
    pairs.append(("stage.lr_multipliers", dict(saved.stage.lr_multipliers), dict(config.stage.lr_multipliers)))
    return [f"{name}: {old!r} -> {new!r}" for name, old, new in pairs if old != new]


def warn_of_schedule_changes(saved: TrainConfig | None, config: TrainConfig, step: int) -> None:
    """One warning line naming each learning-rate setting changed since the checkpoint of ``step``
    (``schedule_changes``) and the learning rate the resumed run takes: the schedule is a function of
    the step and this run's config alone, so the resumed run follows the new schedule from ``step``
    on, as a run started with it would be there (no warm-up again, no blend of the two)."""
    changes = schedule_changes(saved, config) if saved is not None and step < config.steps else []
    if changes:
        opt = config.optimizer
        lr = learning_rate(step, config.steps, opt.lr, opt.min_lr, opt.warmup_steps, opt.schedule, opt.decay_fraction)
        log.warning(
            "learning-rate schedule changed since the checkpoint of step %d: %s; the resumed run follows the new "
            "schedule from there (lr %.3e at step %d)",
            step,
            "; ".join(changes),
            lr,
            step + 1,
        )


def log_generation_samples(run: Run, tracker: MLflowTracker, step: int) -> None:
    """Generates the fixed held-out samples (``training/samples.py``: one per task with DM targets)
    with the current weights; rank 0 writes them as media under ``<checkpoint.directory>/samples/
    step_<N>/<task>/`` and logs each folder as the MLflow artifacts ``samples/step_<N>/<task>``.
    The plan says which ranks take part (``ParallelPlan.samples_here``) and, where the model is split
    by layers or rows, gives each denoising step's velocities through its driver
    (``ParallelPlan.velocity``); elsewhere the sampler keeps the AR cache."""
    config = run.config
    tracking = config.tracking
    if not (tracking.enabled and tracking.generation_samples and has_held_out_data(config)):
        return
    if not run.plan.samples_here(run.ctx.is_main, has_targets=True):
        return
    if run.held_out_samples is None:
        tokenizer = None
        if config.data_source == "shards":
            tokenizer = build_tokenizer(config.data.tokenizer, run.model.config.vocab_size)
        stats = held_out_action_stats(config)
        with closing(held_out_sample_packs(config, run.ctx.device, run.plan.data_share)) as packs:
            wanted = trained_dm_tasks(config)
            run.held_out_samples = choose_held_out_samples(
                packs, run.model.config, config.seed, wanted, tokenizer, stats
            )
    held_out = run.held_out_samples
    if not held_out.samples:  # the same packs on every rank: all skip together
        return
    with autocast(config.precision, run.ctx.device):
        generated = generate_held_out(run.model, held_out, config.tracking.sample_steps, run.plan)
    if not run.ctx.is_main:
        return
    name = f"step_{step:08d}"
    out = Path(config.checkpoint.directory) / "samples" / name
    model_config = run.model.config
    decoder = latent_encoder_from_config(
        config.data.encoders,
        model_config.video_latent_channels,
        model_config.audio_latent_dim,
        model_config.video_patch_size,
    )
    checkpoint = str(Path(config.checkpoint.directory) / name)
    folders = write_held_out(out, held_out, generated, decoder, checkpoint, step, config.tracking.sample_steps)
    for task, folder in folders.items():
        tracker.log_artifacts(str(folder), f"samples/{name}/{task}")
    log.info("step %d: generation samples (%s) in %s", step, ", ".join(folders), out)


def run_micro_batches(run: Run, micro_batches: list, forward_only: bool = False) -> dict[int, LossBreakdown]:
    """This rank's losses of ``micro_batches`` through the plan's driver (``ParallelPlan.run``), and
    their backward unless ``forward_only``."""
    config = run.config
    return run.plan.run(
        micro_batches,
        partial(loss_breakdown, flow_matching_weight=config.optimizer.flow_matching_weight),
        forward_only=forward_only,
        forward_context=partial(_forward_context, config.precision, run.ctx.device),
    )


@contextmanager
def _forward_context(precision: str, device: torch.device):
    """What wraps each forward and loss in every driver: the precision's autocast, and the profiler's
    "forward" region (the drivers mark their backwards themselves)."""
    with record_function("forward"), autocast(precision, device):
        yield


def step_micro_batches(run: Run, step: int) -> list:
    """This rank's micro-batches of ``step``; DataExhaustedError, on every rank together, where a
    finite stream ran out on any."""
    try:
        micro_batches = [run.batches.get(step, m) for m in range(run.config.optimizer.micro_batches_per_step)]
        ran_out = None
    except DataExhaustedError as error:
        ran_out = error
    # A finite stream's end is agreed (one flag all-reduced a step, not paid by endless streams): every
    # rank stops at the same step, so the steps done can be saved.
    if run.batches.finite and not run.plan.everywhere(ran_out is None):
        raise ran_out or DataExhaustedError(f"another data rank's stream ran out at step {step + 1} (it names it)")
    if ran_out is not None:
        raise ran_out
    return micro_batches


def forward_backward_step(run: Run, step: int, window: MetricsWindow) -> bool:
    """Forward and backward of this step's micro-batches; returns whether every loss was finite
    (on every rank)."""
    started = time.perf_counter()
    with record_function("data"):
        micro_batches = step_micro_batches(run, step)
    window.timed("data_wait", time.perf_counter() - started)
    started = time.perf_counter()
    losses_of = run_micro_batches(run, micro_batches)
    window.timed("forward_backward", time.perf_counter() - started)
    finite = all(bool(torch.isfinite(losses.total.detach())) for losses in losses_of.values())
    for m, (batch, _) in enumerate(micro_batches):
        layout = PackLayout.from_cu_seqlens(batch.ar_cu_seqlens, batch.dm_cu_seqlens)
        labelled = int((batch.ar_labels != IGNORE_INDEX).sum())
        widths = {k: tuple(v.shape) for k, v in batch.dm_tokens.items()}
        flops = run.flops.step(layout, labelled, widths, batch.vision_grid_thw)
        # Per device: model-parallel ranks share one micro-batch's FLOPs.
        window.add(
            losses_of.get(m), batch.num_ar_tokens + batch.num_dm_tokens, flops.total / run.plan.model_parallel_size
        )
    return run.plan.everywhere(finite)  # only the last pipeline stage sees losses


def evaluate(run: Run) -> dict[str, float]:
    """Collective: the held-out losses (``EvalConfig``) of the current weights, as ``eval/*`` metrics.
    The held-out packs are read at the first call and kept."""
    if run.held_out is None:
        plan = run.plan
        run.held_out = held_out_batches(run.config, plan.data_rank, plan.data_size, run.ctx.device, plan.data_share)
    config = run.config
    window = MetricsWindow(task_table(config), run.plan.data_size, config.optimizer.flow_matching_weight, 0.0)
    run.plan.state_owner.eval()
    try:
        losses_of = run_micro_batches(run, run.held_out, forward_only=True)
    finally:
        run.plan.state_owner.train()
    for m, (batch, _) in enumerate(run.held_out):
        window.add(losses_of.get(m), batch.num_ar_tokens + batch.num_dm_tokens, 0.0)
    metrics = window.reduce({})
    return {f"eval/{name}": value for name, value in metrics.items() if name == "loss" or name.startswith("loss/")}


def evaluate_suite(run: Run, tracker: MLflowTracker, step: int) -> EvalReport | None:
    """The evaluation suite (``eval.suite``) on the current weights, beside the held-out losses:
    rank 0 logs its metrics as ``eval/<task>/<metric>/<model|oracle|chance>`` and its report as
    the artifact ``eval_suite/step_<N>/report.json`` (also under ``<checkpoint.directory>/eval_suite/``).
    The ranks the plan names take part (``ParallelPlan.samples_here``, as for generation samples);
    the cases, the truth and the untrained model's chance predictions are made once per run."""
    config = run.config
    if config.eval.suite is None or not run.plan.samples_here(run.ctx.is_main, has_targets=True):
        return None
    if run.suite is None:
        from megatron_cosmos3.eval_suite.suite import EvalSuite

        stats = merge_action_stats(run.action_stats.values()) if config.data_source == "shards" else None
        tokenizer = build_tokenizer(config.data.tokenizer, run.model.config.vocab_size)
        run.suite = EvalSuite.for_run(
            config.eval.suite,
            run.model,
            tokenizer,
            config.data.encoders,
            task_table(config),
            stats,
            config.data.packing.max_text_tokens,
        )
    with autocast(config.precision, run.ctx.device):
        result = run.suite.evaluate(run.model, run.plan, {"step": step, "run": config.tracking.run_name})
    if run.ctx.is_main:
        tracker.log_metrics(result.report.mlflow_metrics("eval"), step)
        path = Path(config.checkpoint.directory) / "eval_suite" / f"step_{step:08d}" / "report.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(result.report.to_json())
        tracker.log_artifact(str(path), f"eval_suite/step_{step:08d}")
    return result.report


def train(config: TrainConfig, ctx: DistributedContext, status_file: str | None = None) -> dict[str, float]:
    """Runs the stage to ``config.steps``; raises ``Preempted`` after checkpointing on a signal.
    With ``status_file``, rank 0 writes the outcome there (``training/preemption.py``)."""
    config.name_run(ctx.job_id)  # where main() has not named the run already
    watcher = PreemptionWatcher()
    try:
        return _train(config, ctx, watcher, status_file)
    finally:
        watcher.close()


def _train(
    config: TrainConfig, ctx: DistributedContext, watcher: PreemptionWatcher, status_file: str | None
) -> dict[str, float]:
    # Before anything is written; agreed by rank 0's broadcast, so its refusal is every rank's at once.
    lock = lock_run_folder(config.checkpoint.directory, ctx.job_id, ctx.is_main, ctx.slurm_attempt)
    try:
        run = build_run(config, ctx)
        try:
            return _loop(run, watcher, status_file)
        finally:
            run.batches.close()
            run.plan.close()
    finally:
        if lock is not None:
            lock.release()


def _stop_for_preemption(run: Run, watcher: PreemptionWatcher, step: int, start_step: int, status_file) -> None:
    """Raises ``Preempted`` on every rank, after rank 0 logged one line and wrote the outcome."""
    if run.ctx.is_main:
        signal_name = watcher.signal_name or "a preemption signal on another rank"
        if step > start_step:
            log.warning("preempted (%s): checkpoint of step %d committed; stopping", signal_name, step)
        else:  # a time limit shorter than the signal lead plus start-up: a requeue would repeat it
            log.warning(
                "preempted (%s) before the first step of this attempt (step %d): no progress", signal_name, step
            )
        if status_file:
            write_status(status_file, PREEMPTED, step, start_step)
    raise Preempted(step, start_step)


# In the run folder: what MLflow did not take before an attempt ended, delivered by the next one.
MLFLOW_SPOOL = "mlflow_undelivered.json"


# Raised on every rank together (agreed collectively), so no rank is left waiting for the others.
RAISED_TOGETHER = (NonFiniteLossError, CheckpointSaveError, DataExhaustedError)
# Raised on every rank together in the start-up: weights with NaN or inf, found by an all-reduce
# (``require_finite_weights``). Not ResumeError: each rank reads the checkpoint folder itself, and a
# rank alone may find it otherwise (a node's own disk), so it ends the others as a failure does.
STARTED_TOGETHER = (NonFiniteWeightsError,)


def _loop(run: Run, watcher: PreemptionWatcher, status_file: str | None = None) -> dict[str, float]:
    """Resumes, then trains: a rank that raises anywhere, in the resume or after it (data, losses,
    metric sums, checkpoint saves, tracking), ends every rank, each naming it (``fail_together``)."""
    with fail_together("the start-up", agreed=STARTED_TOGETHER):
        start_step, run_id = resume_or_initialise(run)
    tracker = None
    try:
        with fail_together("the training loop", agreed=RAISED_TOGETHER):
            if watcher.should_stop():  # signalled during start-up: the resumed checkpoint is the state
                _stop_for_preemption(run, watcher, start_step, start_step, status_file)
            tracker, recorded = _start_tracking(run, run_id)
            with _step_profiler(run, tracker, start_step) as profiler:
                return _steps(run, tracker, watcher, start_step, status_file, recorded, profiler)
    except BaseException as error:  # preempted or failed: a later attempt delivers what MLflow has not taken
        if tracker is not None:  # after the region has told the other ranks: this may take a while
            # The run's status until an attempt continues it (which marks it RUNNING again).
            tracker.suspend("KILLED" if isinstance(error, (Preempted, KeyboardInterrupt)) else "FAILED")
        raise


def _step_profiler(run: Run, tracker: MLflowTracker, start_step: int) -> StepProfiler:
    """This rank's profiler of the steps from ``start_step`` (``profiling``; docs/DESIGN.md, "Profiling")."""
    config = run.config
    folder = Path(config.profiling.folder or Path(config.checkpoint.directory) / "profiles")
    ctx = run.ctx
    return StepProfiler(config.profiling, ctx.rank, ctx.device, folder, start_step, tracker, ctx.world_size)


def _start_tracking(run: Run, run_id: str | None) -> tuple[MLflowTracker, str]:
    """Rank 0's MLflow run of this attempt (``run_id``: the one it continues), with the run's
    params and tags where it is new; and the resolved config as checkpoints record it (written to
    the run folder by rank 0)."""
    config, ctx = run.config, run.ctx
    tracker = MLflowTracker(
        config.tracking.tracking_uri,
        config.tracking.experiment,
        config.tracking.run_name,
        enabled=config.tracking.enabled and ctx.is_main,
        run_id=run_id,
        spool=Path(config.checkpoint.directory) / MLFLOW_SPOOL if ctx.is_main else None,
        flush_timeout_s=config.tracking.flush_timeout_s,
    )
    resolved = Path(config.checkpoint.directory) / "config.yaml"
    recorded = to_yaml(with_absolute_paths(config))  # found again from any directory
    if ctx.is_main:  # saved with the run on every attempt; named in one line, printed by --print-config
        resolved.parent.mkdir(parents=True, exist_ok=True)
        resolved.write_text(recorded)
        log.info("run %s: resolved config in %s", config.tracking.run_name, resolved)
    params, tags = flatten(config), {"world_size": str(ctx.world_size), "stage": config.stage.name}
    if ctx.is_main and not tracker.continued:  # a new MLflow run
        tracker.log_params(params)
        tracker.log_artifact(str(resolved))
        for key, value in tags.items():
            tracker.set_tag(key, value)
    elif ctx.is_main:  # logged by the first attempt; again only to a new run replacing a vanished one
        tracker.continued_run_has(params, tags)
    return tracker, recorded


def _steps(
    run: Run,
    tracker: MLflowTracker,
    watcher: PreemptionWatcher,
    start_step: int,
    status_file: str | None,
    recorded: str,
    profiler: StepProfiler,
) -> dict[str, float]:
    """The training steps of ``_loop`` from ``start_step``; ``recorded``: the config checkpoints record;
    ``profiler``: told of each step's end."""
    config, ctx = run.config, run.ctx
    opt = config.optimizer
    if config.peak_flops_per_device == 0 and ctx.device.type == "cuda":
        config.peak_flops_per_device = known_peak_flops(torch.cuda.get_device_name(ctx.device))
    window = MetricsWindow(
        task_table(config), run.plan.data_size, opt.flow_matching_weight, config.peak_flops_per_device
    )
    metrics: dict[str, float] = {}
    nonfinite_in_a_row = 0
    for step in range(start_step, config.steps):
        base_lr = learning_rate(
            step, config.steps, opt.lr, opt.min_lr, opt.warmup_steps, opt.schedule, opt.decay_fraction
        )
        for group in run.optimizer.param_groups:
            group["lr"] = base_lr * group.get("lr_multiplier", 1.0)
        run.optimizer.zero_grad(set_to_none=True)
        try:
            finite = forward_backward_step(run, step, window)
        except DataExhaustedError:  # raised on every rank together: the steps done so far are kept
            if step > start_step and step % config.checkpoint.save_every != 0:
                _save_checkpoint(run, tracker, step, recorded)
                log.warning("the data ran out: saved step %d before stopping", step)
            run.checkpointer.wait()
            raise
        started = time.perf_counter()
        with record_function("optimizer"):  # with the gradients' completion (the plan's finish_gradients)
            grad_norm, stepped = run.plan.optimizer_step(run.optimizer, opt.grad_clip, finite)
        if stepped:
            nonfinite_in_a_row = 0
        else:  # every rank sees the same all-reduced norm, so every rank skips together
            nonfinite_in_a_row += 1
            window.skipped_steps += 1
            log.warning("step %d skipped: non-finite %s", step + 1, "loss" if not finite else "gradient norm")
            if nonfinite_in_a_row >= opt.max_consecutive_nonfinite_steps:
                raise NonFiniteLossError(
                    f"{nonfinite_in_a_row} steps in a row had a non-finite loss or gradient (last: step {step + 1}); "
                    f"stopping (optimizer.max_consecutive_nonfinite_steps={opt.max_consecutive_nonfinite_steps})"
                )
        window.timed("optimizer", time.perf_counter() - started)

        if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
            seconds_per_step = window.seconds_per_step()
            eta = (config.steps - step - 1) * seconds_per_step
            metrics = window.reduce({"grad_norm": float(grad_norm), "lr": base_lr, **run.batches.skip_counts()})
            if ctx.is_main:
                tracker.log_metrics(metrics, step + 1)
                log.info(
                    "step %d/%d  loss %.4f  ce %s  fm %s  grad_norm %.3f  lr %.2e  tokens/s %.0f  step %.3fs "
                    "(data %.3f  fwd+bwd %.3f  optim %.3f  ckpt %.3f)  peak %.0f MB  eta %.0fs",
                    step + 1,
                    config.steps,
                    metrics["loss"],
                    _value(metrics, "loss/ce"),  # "-": no such tokens in the window's packs
                    _value(metrics, "loss/fm"),
                    metrics.get("grad_norm", math.nan),
                    metrics["lr"],
                    metrics["throughput/tokens_per_s"],
                    seconds_per_step,
                    *(metrics[f"time/{phase}_s"] for phase in PHASES),
                    metrics["memory/peak_mb"],
                    eta,
                )
            window.reset()
        if config.eval.every and ((step + 1) % config.eval.every == 0 or step + 1 == config.steps):
            held_out = evaluate(run)
            if ctx.is_main:
                tracker.log_metrics(held_out, step + 1)
                log.info("%s", eval_line(step + 1, config.steps, held_out))
            evaluate_suite(run, tracker, step + 1)
        committed = run.checkpointer.poll()
        if committed is not None and ctx.is_main:
            tracker.set_tag("checkpoint", str(committed.resolve()))
        started = time.perf_counter()
        preempted = watcher.should_stop()
        if preempted or (step + 1) % config.checkpoint.save_every == 0 or step + 1 == config.steps:
            with record_function("checkpoint"):
                _save_checkpoint(run, tracker, step + 1, recorded)
                log_generation_samples(run, tracker, step + 1)
        window.timed("checkpoint", time.perf_counter() - started)  # what saving blocked of the step
        if preempted:
            run.checkpointer.wait()
            if ctx.is_main:
                tracker.set_tag("preempted_at_step", str(step + 1))
            _stop_for_preemption(run, watcher, step + 1, start_step, status_file)
        profiler.step_done()
    committed = run.checkpointer.wait()
    if ctx.is_main:
        if committed is not None:
            tracker.set_tag("checkpoint", str(committed.resolve()))
            log.info("checkpoint: %s", committed.resolve())
        tracker.finish()
        if tracker.run_id:
            log.info("MLflow run %s; browse with: mlflow ui --backend-store-uri %s", tracker.run_id, tracker.uri)
        if status_file:
            write_status(status_file, FINISHED, config.steps, start_step)
    return metrics


def _save_checkpoint(run: Run, tracker: MLflowTracker, step: int, recorded: str) -> None:
    """Starts saving the run's state after ``step`` steps (collective): weights, optimizer, this
    rank's RNG, the loader positions, and in meta.json the MLflow run, stage, config and action stats."""
    meta = {
        "mlflow_run_id": tracker.run_id,
        "stage": run.config.stage.name,
        "config": recorded,
        "action_stats": {name: stats.to_document() for name, stats in run.action_stats.items()},
    }
    rng = {"rng": torch.get_rng_state()}
    run.checkpointer.save(step, run.plan.state_owner, run.optimizer, rng, meta, named=run.batches.state())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train the megatron_cosmos3 MoT (run under torchrun or srun).")
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        help="YAML config file; repeat to layer files, later ones winning "
        "(e.g. --config configs/tiny_cpu.yaml --config configs/stages/midtrain.yaml)",
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument(
        "--status-file",
        default=None,
        help="rank 0 writes the outcome here, one line '<finished|preempted> <step> <start_step>' "
        "(slurm/train.sbatch requeues a preempted attempt that made progress)",
    )
    parser.add_argument("overrides", nargs="*", help="OmegaConf dotlist overrides, e.g. optimizer.lr=1e-3 steps=50")
    return parser.parse_args(argv)


def checked_config(args: argparse.Namespace) -> TrainConfig | None:
    """The run's config from ``parse_args``, validated with its sizes and paths before any process
    group exists: ValueError naming the field. None with ``--print-config`` (printed instead)."""
    config = load_config(args.config, args.overrides)
    if args.print_config:
        print(to_yaml(config))
        return None
    # The launcher's world: srun's ranks have no WORLD_SIZE (their world was taken for one process,
    # and parallel.tensor=2 over two srun tasks refused as "world_size=1 is not divisible").
    config.parallel.validate(launched_world_size(os.environ), config.model, config.model.num_experts)
    config.name_run(launcher_run_id())
    config.check_paths()
    problem = status_file_problem(args.status_file) if args.status_file else None
    if problem is not None:
        raise ValueError(problem)
    return config


def run_training(config: TrainConfig, args: argparse.Namespace) -> None:
    """Start the process group and train ``config`` (from ``checked_config``) on this rank."""
    import gc

    # The imported libraries live as long as the process: the collector need not walk them again,
    # in any full collection nor at exit (a second of CPU per rank with torch and MLflow loaded).
    gc.freeze()

    ctx = init_distributed(config.distributed.init_timeout_s)
    # Libraries say only warnings; this package's progress lines come from rank 0 alone.
    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s [rank {ctx.rank}] %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("megatron_cosmos3").setLevel(logging.INFO if ctx.is_main else logging.WARNING)
    try:
        layout = preflight(ctx, config.distributed.preflight_timeout_s)
        if ctx.is_main:
            log.info("preflight: %s", layout)
        train(config, ctx, args.status_file)
    finally:
        destroy_parallel()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    """Train from the command line's config; a bad config raises ValueError naming the field
    before any process group starts (library callers; the console command is ``cli``)."""
    args = parse_args(argv)
    config = checked_config(args)
    if config is not None:
        run_training(config, args)


def cli(argv: list[str] | None = None) -> int:
    """``cosmos3-train``: as ``main``, but a config error (or a ``--config`` file that cannot be
    read) and a start-up refusal of this machine (``StartupRefusal``: fp8 without CUDA and TE, a
    profiled rank outside the world, a model larger than the host's memory, a checkpoint folder another
    trainer holds: ``RunFolderLocked``, broadcast from rank 0) are one line on stderr
    (from rank 0, torchrun's or srun's: every rank reads the same config and checks alike) and exit
    status 2 on every rank, as the other commands do; errors while training stay tracebacks."""
    args = parse_args(argv)
    try:
        config = checked_config(args)
    except (ValueError, OSError) as error:  # OSError: a --config file that is missing or unreadable
        return _refused(error)
    if config is not None:
        try:
            run_training(config, args)
        except StartupRefusal as error:  # raised alike on every rank, before any step
            return _refused(error)
    return 0


def _refused(error: Exception) -> int:
    """Exit status 2 for a run refused before it started; the one line is rank 0's alone."""
    if launched_rank(os.environ) == 0:
        print(f"cosmos3-train: error: {error}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(cli())
