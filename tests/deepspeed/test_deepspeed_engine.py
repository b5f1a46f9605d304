"""engine=deepspeed: ZeRO-1/2/3 on 2 gloo ranks trains like one process of the Megatron-style engine,
stops and resumes exactly, and never compiles a DeepSpeed op (docs/DESIGN.md, "The DeepSpeed engine").

DeepSpeed's import is slow, so one ``run_on_ranks`` call runs every multi-process check in the same
two ranks: the three ZeRO stages on packs whose streams differ between the ranks (ZeRO-2 preempted
and resumed, ZeRO-3 writing generation samples), a ZeRO-3 stage from a weights folder,
DeepSpeed-Ulysses, bf16 (ZeRO-2, writing generation samples), the engine switch through ZeRO-1
and ZeRO-3, and last one rank failing inside DeepSpeed's collectives (which ends the process
groups); then one rank continues the switched checkpoint (another world size) and resumes ZeRO-2's
2-rank checkpoint directly, resharded, under ZeRO-1 and ZeRO-3. Before the two ranks start, one rank
saves the checkpoints that they continue (1 -> 2 ranks: ZeRO-1 and ZeRO-3, and a bf16 run with its
ViT frozen)."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import signal
import sys
import time
from functools import partial
from pathlib import Path
from unittest import mock

import pytest
import torch

from megatron_cosmos3.checkpoint.checkpointer import load_state
from megatron_cosmos3.checkpoint.sharded_state import ShardingMeshes
from megatron_cosmos3.model.mot import MoTModel
from megatron_cosmos3.testing.distributed import failing_call, raised_by, restart_world, run_on_ranks
from megatron_cosmos3.testing.training import TINY_MODEL, TINY_SYNTHETIC, TINY_VIT, loss_history, tracking_store
from megatron_cosmos3.training import train as train_module
from megatron_cosmos3.training.config import load_config
from megatron_cosmos3.training.distributed import DistributedContext

# Not imported here (seconds): the ranks import it.
pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed"),
    pytest.mark.slow,  # the shared runs take over 20 s
]

EXPERIMENT = "deepspeed"
# Every task: the two ranks' packs hold different DM streams in every step (one video and audio,
# the other video and actions, ...: test_the_ranks_packs_hold_different_streams), which ZeRO-3 must
# handle. Together a step's two packs reach every trainable parameter; the single arm's projections,
# which the second step's packs miss, are frozen. (Where no pack of a step reaches a parameter, torch's AdamW
# skips it but DeepSpeed's flat partitions step it with a zero gradient: docs/DESIGN.md, "The
# DeepSpeed engine".)
TASKS = ("understanding", "text_to_video", "image_to_video", "video_to_audio", "forward_dynamics", "policy")
COMMON = [
    *TINY_MODEL,
    *TINY_SYNTHETIC,
    f"synthetic.tasks=[{','.join(TASKS)}]",
    "stage.freeze=[dm_streams.action_*.single_arm.*]",
    "log_every=1",
    "tracking.sample_steps=2",  # where a run writes samples: two Euler steps are enough to compare
    "optimizer.warmup_steps=1",
    "steps=3",
    "checkpoint.async_save=false",
    "tracking.generation_samples=false",
    "eval.every=3",  # the held-out loss at the last step, through the engine's forward-only driver
    f"tracking.experiment={EXPERIMENT}",
]
STAGES = (1, 2, 3)
TIMEOUT_S = 10  # distributed.init_timeout_s of the runs in which one rank fails
BF16 = ("precision=bf16", "steps=2")
# Where rank 1 fails inside DeepSpeed's collectives: the fail_together region that names it.
FAILING_IN = {"forward": "forward and backward", "step": "optimizer step", "save": "save_checkpoint"}
SAMPLES = ("tracking.generation_samples=true",)
FROZEN = ("dm_streams.action_in.single_arm.", "dm_streams.action_out.single_arm.")
ADAM_KEYS = ("exp_avg", "exp_avg_sq")


def overrides(root: Path, name: str, *extra: str) -> list[str]:
    return [
        *COMMON,
        f"checkpoint.directory={root / name}",
        f"tracking.tracking_uri={tracking_store(root)}",
        f"tracking.run_name={name}",
        *extra,
    ]


def history(root: Path, name: str, metric: str = "loss") -> list[float]:
    return [value for _, value in loss_history(root / "mlflow.db", name, EXPERIMENT, metric)]


def _context() -> DistributedContext:
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    return DistributedContext(rank, world, rank, torch.device("cpu"))


def _train(root: Path, name: str, *extra: str, status_file: str | None = None) -> dict[str, float]:
    return train_module.train(load_config(None, overrides(root, name, *extra)), _context(), status_file)


def _preempted_then_resumed(root: Path, name: str, *extra: str) -> list[str]:
    """The run signalled (SIGUSR1, on rank 1 only) during step 2, then started again; the outcome
    lines rank 0 wrote after each attempt."""
    from megatron_cosmos3.training.batches import MicroBatches

    status, outcomes = root / f"{name}.status", []
    real = MicroBatches.get

    def signalled_during_step_2(self, step, micro):
        if step == 1 and torch.distributed.get_rank() == 1:
            os.kill(os.getpid(), signal.SIGUSR1)
        return real(self, step, micro)

    MicroBatches.get = signalled_during_step_2
    try:
        _train(root, name, *extra, status_file=str(status))
    except train_module.Preempted:
        outcomes.append(status.read_text() if torch.distributed.get_rank() == 0 else "")
    finally:
        MicroBatches.get = real
    _train(root, name, *extra, status_file=str(status))
    outcomes.append(status.read_text() if torch.distributed.get_rank() == 0 else "")
    return outcomes


def _switch_engines(root: Path) -> float:
    """The one-process run's step-2 checkpoint converted to DeepSpeed ZeRO-1 and back, that one to
    ZeRO-3 and back; then a ZeRO-3 run continues from the converted one. Returns its step-3 loss."""
    from megatron_cosmos3.training.deepspeed_engine import convert_checkpoint

    def convert(source: Path, target: str, zero_stage: int) -> Path:
        settings = ("engine=deepspeed", f"deepspeed.zero_stage={zero_stage}", "tracking.enabled=false")
        config = load_config(None, overrides(root, target, *settings))
        return convert_checkpoint(config, _context(), source, root / target)

    back = convert(convert(root / "single" / "step_00000002", "switched", 1), "switched-back", 1)
    convert(convert(back, "switched3", 3), "switched3-back", 3)
    return _train(root, "switched3", "engine=deepspeed", "deepspeed.zero_stage=3", "tracking.enabled=false")["loss"]


QUICK = ("tracking.enabled=false", "eval.every=0")


def _copy_checkpoint(step: Path, root: Path) -> None:
    """A run folder ``root`` whose only (latest) checkpoint is a copy of the step folder ``step``."""
    shutil.copytree(step, root / step.name)
    (root / "latest").write_text(step.name)


def _started_weights(root: Path, name: str, *extra: str) -> dict[str, torch.Tensor]:
    """The weights a run starts from (its resume, or stage.init_from's), read back right after:
    under engine=deepspeed the engine's fp32 masters (``replica_of_engine``), else the model's.
    Collective under engine=deepspeed."""
    return _started_state(root, name, *extra)[0]


def _started_state(root: Path, name: str, *extra: str) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """``_started_weights``, and under engine=deepspeed the engine's AdamW state (moments and step)
    by parameter name, read back the same way."""
    config = load_config(None, overrides(root, name, *QUICK, *extra))
    context = _context() if torch.distributed.is_initialized() else DistributedContext(0, 1, 0, torch.device("cpu"))
    run = train_module.build_run(config, context)
    try:
        train_module.resume_or_initialise(run)
        model, adam = run.plan.replica_of_engine() if config.engine == "deepspeed" else (run.model, None)
        names = {param: name for name, param in model.named_parameters()}
        state = {names[param]: dict(values) for param, values in adam.state.items()} if adam is not None else {}
        return {name: param.detach().clone() for name, param in model.named_parameters()}, state
    finally:
        run.batches.close()
        run.plan.close()


def _uneven_steps_loaded(root: Path) -> list[float]:
    """The one-process run's step-2 checkpoint read into a ZeRO-1 engine's replica with one
    parameter's AdamW step count lowered to 1 (torch's AdamW skips a parameter no pack of a step
    reached), handed to the engine (``load_replica``): the step count of each of its flat partitions."""
    config = load_config(None, overrides(root, "uneven-steps", "engine=deepspeed", "deepspeed.zero_stage=1", *QUICK))
    run = train_module.build_run(config, _context())
    try:
        model, adam = run.plan.replica()
        load_state(root / "single" / "step_00000002", model, ShardingMeshes(), run.checkpointer.group, adam)
        adam.state[model.get_parameter("embed_tokens.weight")]["step"] = torch.tensor(1.0)
        run.plan.load_replica(model, adam)
        return [float(run.optimizer.optimizer.state[flat]["step"]) for flat in run.plan._flat_partitions()]
    finally:
        run.batches.close()
        run.plan.close()


def _failing_saves_first(outcomes: list) -> object:
    """Patches ``DeepSpeedCheckpointer.save`` so that its first call first tries the save twice with
    a full disk on rank 1 only: once in DeepSpeed's own file, once in the trainer state. Every rank
    records what it raised (CheckpointSaveError's message, or a wrong error) and what rank 0 finds
    in the run folder after it; then the real save goes on. Returns the stock ``save``."""
    from megatron_cosmos3.checkpoint.checkpointer import CheckpointSaveError
    from megatron_cosmos3.training.deepspeed_engine import DeepSpeedCheckpointer

    stock, real_torch_save = DeepSpeedCheckpointer.save, torch.save

    def save(self, step, *args, **kwargs):
        DeepSpeedCheckpointer.save = stock
        for failing in ("optim_states", "trainer_state"):

            def full_disk(obj, path, *a, failing=failing, **k):
                if torch.distributed.get_rank() == 1 and failing in str(path):
                    raise OSError(28, "No space left on device", str(path))
                return real_torch_save(obj, path, *a, **k)

            torch.save = full_disk
            try:
                stock(self, step, *args, **kwargs)
                raised = "nothing"
            except CheckpointSaveError as error:
                raised = str(error)
            except Exception as error:  # the wrong error: the test names it
                raised = f"{type(error).__name__}: {error}"
            finally:
                torch.save = real_torch_save
            left = sorted(p.name for p in self.root.iterdir()) if torch.distributed.get_rank() == 0 else None
            outcomes.append((failing, raised, left))
        return stock(self, step, *args, **kwargs)

    DeepSpeedCheckpointer.save = save
    return stock


def _one_rank_fails(rank: int, world_size: int, root: Path, where: str) -> tuple[str, str, float]:
    """A 2-rank run in which rank 1 alone raises inside DeepSpeed's collectives: in its second
    forward under ZeRO-2 (the others wait in the gradient reduction of their backward, on ZeRO's
    data-parallel group: DeepSpeed's clone of the world), in ZeRO-3's first optimizer step, or
    inside DeepSpeed's ``save_checkpoint`` of ZeRO-1 before its closing barrier (not a file write,
    which is held). Returns what this rank
    raised (type, message) and after how many seconds. Every group waits ``TIMEOUT_S``
    (``distributed.init_timeout_s``; the launcher's world is replaced by one of that timeout)."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    restart_world(rank, world_size, root / f"store-{where}", TIMEOUT_S)
    if where == "forward":
        failing = failing_call(MoTModel, "forward", rank == 1, 2, "rank 1's forward failed")
        settings = ("deepspeed.zero_stage=2", "steps=2")
    elif where == "step":  # ZeRO-3's step: the others wait in its gradient-norm reduction
        failing = failing_call(DeepSpeedEngine, "step", rank == 1, 1, "rank 1's step failed")
        settings = ("deepspeed.zero_stage=3", "steps=1")
    else:
        failing = failing_call(DeepSpeedEngine, "_save_zero_checkpoint", rank == 1, 1, "rank 1's save failed")
        settings = ("deepspeed.zero_stage=1", "steps=1")
    quick = ("tracking.enabled=false", "eval.every=0", f"distributed.init_timeout_s={TIMEOUT_S}")
    with failing:
        return raised_by(partial(_train, root, f"fails-in-{where}", "engine=deepspeed", *settings, *quick))


def _one_rank_fails_converting(rank: int, world_size: int, root: Path) -> tuple[str, str, float]:
    """``convert_checkpoint`` of the one-process step-2 checkpoint to ZeRO-1 on 2 ranks, rank 1 alone
    failing to read it (the others go on to the load's and the save's collectives). What this rank
    raised (type, message) and after how many seconds; every group waits ``TIMEOUT_S``."""
    from megatron_cosmos3.training.deepspeed_engine import DeepSpeedCheckpointer, convert_checkpoint

    restart_world(rank, world_size, root / "store-convert", TIMEOUT_S)
    settings = ("engine=deepspeed", "deepspeed.zero_stage=1", "tracking.enabled=false")
    config = load_config(
        None, overrides(root, "fails-converting", *settings, f"distributed.init_timeout_s={TIMEOUT_S}")
    )
    source, target = root / "single" / "step_00000002", root / "fails-converting"
    with failing_call(DeepSpeedCheckpointer, "load", rank == 1, 1, "rank 1 cannot read the checkpoint"):
        return raised_by(partial(convert_checkpoint, config, _context(), source, target))


# Saved by one rank (both micro-batches of a step) at step 1, continued by two to step 3 (resharded):
# run name -> (the saving ZeRO stage, the resuming one's settings). ZeRO-2 (its AdamW state offloaded
# to host memory) from ZeRO-1 reads its own slices of the one rank's flat partition; ZeRO-3 from
# ZeRO-3 its own slice of each parameter.
ONE_TO_TWO = {
    "one-to-two-zero1": (1, ("deepspeed.zero_stage=2", "deepspeed.offload_optimizer=true")),
    "one-to-two-zero3": (3, ("deepspeed.zero_stage=3",)),
}
# A frozen encoder under bf16: the ViT's weights (no fp32 master, the bf16 working copy saved) with
# the towers, saved by one rank under ZeRO-2 and continued by two under ZeRO-3.
FROZEN_VIT = (
    *TINY_VIT,
    "stage.freeze=[dm_streams.action_*.single_arm.*,vision.*]",
    "precision=bf16",
    "engine=deepspeed",
)


def _saved_on_one_rank(rank: int, world_size: int, root: Path) -> None:
    """The one-rank halves of ``ONE_TO_TWO`` and of the frozen-ViT run, and the frozen-ViT run's
    uninterrupted reference (one rank, three steps)."""
    both = ("engine=deepspeed", "optimizer.micro_batches_per_step=2", "eval.every=0")
    for name, (saved, _) in ONE_TO_TWO.items():
        _train(root, name, *both, f"deepspeed.zero_stage={saved}", "steps=1")
    _train(root, "frozen-vit", *both, *FROZEN_VIT, "deepspeed.zero_stage=2", "steps=1")
    _train(root, "frozen-vit-uninterrupted", *both, *FROZEN_VIT, "deepspeed.zero_stage=2")


def _continued_on_two_ranks(root: Path) -> dict[str, list[str]]:
    """The two-rank halves of ``ONE_TO_TWO`` and of the frozen-ViT run. Returns the files of the
    checkpoint it continues that this rank hashed in each of the ``ONE_TO_TWO`` resumes."""
    from megatron_cosmos3.checkpoint import safe_reader

    stock, hashed = safe_reader.file_record, {}

    def recorded(path):
        if path.is_relative_to(root / name / "step_00000001"):
            hashed[name].append(path.relative_to(root / name / "step_00000001").as_posix())
        return stock(path)

    safe_reader.file_record = recorded
    try:
        for name, (_, resumed) in ONE_TO_TWO.items():
            hashed[name] = []
            _train(root, name, "engine=deepspeed", *resumed, "eval.every=0")
    finally:
        safe_reader.file_record = stock
    _train(root, "frozen-vit", *FROZEN_VIT, "deepspeed.zero_stage=3", "eval.every=0")
    return hashed


def _damaged_on_two_ranks(root: Path) -> tuple[str, tuple[str, str], tuple[str, str]]:
    """A copy of the 1-rank ZeRO-1 checkpoint with one of DeepSpeed's files damaged, which rank 1
    alone hashes: the file's name, and what this rank raised (type, message) verifying it with the
    other rank (``verify_together``), then resuming it on two ranks (which ends the process group)."""
    from megatron_cosmos3.training.deepspeed_engine import verify_together

    step = root / "damaged-on-two" / "step_00000001"
    names = sorted(json.loads((root / "one-to-two-zero1" / "step_00000001" / "checksums.json").read_text())["files"])
    damaged = next(name for i, name in enumerate(names) if i % 2 == 1 and name.startswith("deepspeed/"))
    if torch.distributed.get_rank() == 0:
        _copy_checkpoint(root / "one-to-two-zero1" / "step_00000001", step.parent)
        data = bytearray((step / damaged).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (step / damaged).write_bytes(bytes(data))
    torch.distributed.barrier()
    resume = partial(_train, root, "damaged-on-two", "engine=deepspeed", "deepspeed.zero_stage=2", *QUICK)
    return damaged, raised_by(partial(verify_together, step))[:2], raised_by(resume)[:2]


def _deepspeed_runs(rank: int, world_size: int, root: Path) -> dict:
    """Every ZeRO stage for 3 steps (ZeRO-2 preempted during step 2 and resumed), DeepSpeed-Ulysses
    and the engine switch; rank 0 returns each stage's final weights read back from its DeepSpeed
    checkpoint and the outcome lines of the preempted run."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    weights, outcomes, save_failures = {}, [], []
    for stage in STAGES:
        settings = ("engine=deepspeed", f"deepspeed.zero_stage={stage}")
        if stage == 1:  # its one save (step 3) first fails twice on rank 1: a full disk
            _failing_saves_first(save_failures)
        if stage == 3:  # with the optimizer state offloaded to host memory (torch's AdamW there too),
            # and the generation samples at its save (every rank denoises under ZeRO-3)
            settings += ("deepspeed.offload_optimizer=true", *SAMPLES)
        if stage == 2:
            outcomes = _preempted_then_resumed(root, "zero2", *settings)
        else:
            _train(root, f"zero{stage}", *settings)
        if rank == 0:
            step = root / f"zero{stage}" / "step_00000003"
            weights[stage] = get_fp32_state_dict_from_zero_checkpoint(str(step), tag="deepspeed")
    # A stage started from a weights folder (ZeRO-3's partitions and fp32 masters follow the loaded weights).
    _train(root, "zero3-from-weights", "engine=deepspeed", "deepspeed.zero_stage=3", *from_weights(root))
    # DeepSpeed-Ulysses: both ranks split each pack's rows (one data rank with two micro-batches).
    ulysses = ("engine=deepspeed", "deepspeed.zero_stage=2", "parallel.context=2", "optimizer.micro_batches_per_step=2")
    _train(root, "ulysses", *ulysses)
    # bf16 under ZeRO-2, with the generation samples at its save (rank 0 denoises alone).
    _train(root, "zero2-bf16", "engine=deepspeed", "deepspeed.zero_stage=2", *BF16, *SAMPLES)
    bf16 = {}
    if rank == 0:
        step = root / "zero2-bf16" / "step_00000002"
        bf16["masters"] = get_fp32_state_dict_from_zero_checkpoint(str(step), tag="deepspeed")
        saved = torch.load(step / "deepspeed" / "mp_rank_00_model_states.pt", weights_only=False)
        bf16["working"] = saved["module"]
    switched_loss = _switch_engines(root)
    continued = _continued_on_two_ranks(root)
    # ZeRO-2's step-2 checkpoint resumed under ZeRO-1, and the switched one of ZeRO-1 under ZeRO-2
    # (ZeRO-1 and ZeRO-2 read each other's files): their step 3.
    if rank == 0:
        _copy_checkpoint(root / "zero2" / "step_00000002", root / "zero2-as-zero1")
        _copy_checkpoint(root / "switched" / "step_00000002", root / "zero1-as-zero2")
    torch.distributed.barrier()
    zero1_from_zero2 = _train(root, "zero2-as-zero1", "engine=deepspeed", "deepspeed.zero_stage=1", *QUICK)["loss"]
    zero2_from_zero1 = _train(root, "zero1-as-zero2", "engine=deepspeed", "deepspeed.zero_stage=2", *QUICK)["loss"]
    # A bf16 ZeRO-1 stage from the bf16 ZeRO-2 checkpoint: the engine's masters are the saved fp32 masters.
    from_bf16 = (
        "engine=deepspeed",
        "deepspeed.zero_stage=1",
        "precision=bf16",
        f"stage.init_from={root / 'zero2-bf16'}",
    )
    started_from_bf16 = _started_weights(root, "from-bf16", *from_bf16)
    uneven_steps = _uneven_steps_loaded(root)
    # A ZeRO-3 stage from weights holding NaN: refused when they are loaded (each rank checks its partition).
    from megatron_cosmos3.checkpoint.finite import NonFiniteWeightsError

    refused = None
    try:
        _train(root, "zero3-from-nan", "engine=deepspeed", "deepspeed.zero_stage=3", f"stage.init_from={root / 'nan'}")
    except NonFiniteWeightsError as error:
        refused = str(error)
    # Last: a failed resume and a rank failing inside DeepSpeed's collectives end the process groups
    # (each of the latter starts a world).
    damaged = _damaged_on_two_ranks(root)
    stopped = {where: _one_rank_fails(rank, world_size, root, where) for where in FAILING_IN}
    stopped["convert"] = _one_rank_fails_converting(rank, world_size, root)
    return {
        "stopped": stopped,
        "weights": weights,
        "switched_loss": switched_loss,
        "outcomes": outcomes,
        "bf16": bf16,
        "refused": refused,
        "save_failures": save_failures,
        "zero1_from_zero2": zero1_from_zero2,
        "zero2_from_zero1": zero2_from_zero1,
        "started_from_bf16": started_from_bf16,
        "uneven_steps": uneven_steps,
        "continued": {"hashed": continued, "damaged": damaged},
    }


# Resumes refused before DeepSpeed loads anything: (the run folder copied, the resuming run's settings).
REFUSED = {
    "weight_decay": ("one-rank", ("deepspeed.zero_stage=3", "optimizer.weight_decay=0.05")),
    "frozen": (
        "one-rank",
        ("deepspeed.zero_stage=3", "stage.freeze=[dm_streams.action_*.single_arm.*,layers.*.reasoner.*]"),
    ),
}


# ZeRO-2's step-2 checkpoint of 2 ranks, copied to run folders that 1 rank resumes (resharded).
RESHARDED = "zero2/step_00000002"
RESHARDED_ZERO3 = "zero3/step_00000003"  # and ZeRO-3's, saved with its optimizer state offloaded


def _resharded(root: Path) -> dict:
    """ZeRO-2's 2-rank step-2 checkpoint resumed on 1 rank with both micro-batches: under ZeRO-1
    the engine's fp32 masters and AdamW state right after the load, and under ZeRO-3 (another
    stage too) the loss of the step it then trains."""
    for name in ("resharded-zero1", "resharded-zero3"):
        _copy_checkpoint(root / RESHARDED, root / name)
    both = ("engine=deepspeed", "optimizer.micro_batches_per_step=2")
    weights, adam = _started_state(root, "resharded-zero1", *both, "deepspeed.zero_stage=1")
    loss = _train(root, "resharded-zero3", *both, "deepspeed.zero_stage=3", *QUICK)["loss"]
    # The bf16 ZeRO-2 checkpoint of 2 ranks under a bf16 ZeRO-1 engine on 1 rank.
    _copy_checkpoint(root / "zero2-bf16" / "step_00000002", root / "resharded-bf16")
    bf16 = _started_state(root, "resharded-bf16", *both, "deepspeed.zero_stage=1", "precision=bf16")
    # ZeRO-3's step-3 checkpoint of 2 ranks (its optimizer state offloaded) under ZeRO-1 on 1 rank.
    _copy_checkpoint(root / RESHARDED_ZERO3, root / "resharded-from-zero3")
    from_zero3 = _started_state(root, "resharded-from-zero3", *both, "deepspeed.zero_stage=1")
    # The frozen-ViT run's bf16 ZeRO-3 checkpoint of 2 ranks under bf16 ZeRO-1 on 1 rank: its weights.
    _copy_checkpoint(root / "frozen-vit" / "step_00000003", root / "frozen-vit-on-one")
    frozen_vit = _started_weights(root, "frozen-vit-on-one", *both, *FROZEN_VIT, "deepspeed.zero_stage=1")
    return {
        "weights": weights,
        "adam": adam,
        "loss": loss,
        "bf16": bf16,
        "from_zero3": from_zero3,
        "vit": frozen_vit,
    }


def _on_one_rank(rank: int, world_size: int, root: Path) -> tuple[float, dict, dict]:
    """The Megatron-style step-2 checkpoint converted back from 2-rank ZeRO-3 (a copy of
    switched3-back), continued by a 1-rank ZeRO-3 run with both micro-batches; its step-3 loss.
    Then ``_resharded``, and the resumes of ``REFUSED``, each in a copy of its run folder: what
    each raised."""
    settings = ("engine=deepspeed", "deepspeed.zero_stage=3", "optimizer.micro_batches_per_step=2")
    loss = _train(root, "one-rank", *settings, *QUICK)["loss"]
    resharded = _resharded(root)
    refused = {}
    for case, (source, extra) in REFUSED.items():
        shutil.copytree(root / source, root / f"refused-{case}")
        resume = partial(
            _train, root, f"refused-{case}", "engine=deepspeed", "optimizer.micro_batches_per_step=2", *extra, *QUICK
        )
        refused[case] = raised_by(resume)[:2]
    return loss, resharded, refused


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The one-process Megatron-style reference (two micro-batches per step: the global batch of
    two data ranks with one each) and the DeepSpeed runs, with an empty torch extensions folder that
    holds a stale build lock of every op: a build attempted anywhere would wait on it forever."""
    root = tmp_path_factory.mktemp("deepspeed")
    # Saved at step 2 too: the engine switch starts there.
    single = overrides(root, "single", "optimizer.micro_batches_per_step=2", "checkpoint.save_every=2")
    config = load_config(None, single)
    train_module.train(config, DistributedContext(0, 1, 0, torch.device("cpu")))
    _write_weights_folder(root / "weights")
    _write_nan_checkpoint(root / "single" / "step_00000002", root / "nan")
    reference = overrides(root, "single-from-weights", "optimizer.micro_batches_per_step=2", *from_weights(root))
    train_module.train(load_config(None, reference), DistributedContext(0, 1, 0, torch.device("cpu")))
    bf16 = overrides(root, "single-bf16", "optimizer.micro_batches_per_step=2", *BF16)
    train_module.train(load_config(None, bf16), DistributedContext(0, 1, 0, torch.device("cpu")))
    extensions = root / "torch_extensions"
    for op in ("deepspeed_shm_comm", "cpu_adam", "fused_adam"):
        (extensions / op).mkdir(parents=True)
        (extensions / op / "lock").touch()
    before = sorted(str(p.relative_to(extensions)) for p in extensions.rglob("*"))
    old = os.environ.get("TORCH_EXTENSIONS_DIR")
    os.environ["TORCH_EXTENSIONS_DIR"] = str(extensions)
    try:
        run_on_ranks(_saved_on_one_rank, 1, root, timeout_s=200)
        ranks = run_on_ranks(_deepspeed_runs, 2, root, timeout_s=400)
        results = {**ranks[0], **{key: [r[key] for r in ranks] for key in ("save_failures", "stopped", "continued")}}
        shutil.copytree(root / "switched3-back", root / "one-rank")
        one_rank = run_on_ranks(_on_one_rank, 1, root, timeout_s=200)[0]
        results["one_rank_loss"], results["resharded"], results["layout_refused"] = one_rank
    finally:
        if old is None:
            del os.environ["TORCH_EXTENSIONS_DIR"]
        else:
            os.environ["TORCH_EXTENSIONS_DIR"] = old
    after = sorted(str(p.relative_to(extensions)) for p in extensions.rglob("*"))
    return root, results, before, after


def from_weights(root: Path) -> tuple[str, ...]:
    """The overrides of a 2-step stage started from the weights folder."""
    return (f"stage.init_from={root / 'weights'}", "steps=2")


def _write_weights_folder(folder: Path) -> None:
    """The tiny model with weights other than the seed's, as a weights folder (what an import writes)."""
    from megatron_cosmos3.conversion.mot_folder import save_mot_folder

    with torch.device("meta"):
        model = MoTModel(load_config(None, COMMON).model)
    model.materialize(torch.device("cpu"))
    model.reset_parameters()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=g), alpha=0.05)
    save_mot_folder(model, None, folder)


NAN_PARAMETER = "layers.1.generator.mlp.down_proj.weight"


def _write_nan_checkpoint(source: Path, target: Path) -> None:
    """The weights of the checkpoint ``source`` with one NaN in NAN_PARAMETER, committed under ``target``."""
    from megatron_cosmos3.checkpoint.checkpointer import Checkpointer

    config = load_config(None, COMMON).model
    with torch.device("meta"):
        model = MoTModel(config)
    model.materialize(torch.device("cpu"))
    load_state(source, model, ShardingMeshes())
    with torch.no_grad():
        model.get_parameter(NAN_PARAMETER)[0, 1] = float("nan")
    Checkpointer(target, async_save=False).save(2, model, None, {}, {})


def _weights(root: Path, checkpoint: str | None = None, *extra: str) -> dict[str, torch.Tensor]:
    """The tiny model's initial weights (with the ``extra`` overrides), or those of the Megatron-style
    ``checkpoint``."""
    config = load_config(None, overrides(root, "single", *extra))
    with torch.device("meta"):
        model = MoTModel(config.model)
    model.materialize(torch.device("cpu"))
    model.reset_parameters()
    if checkpoint is not None:
        load_state(root / checkpoint, model, ShardingMeshes())
    return {name: p.detach() for name, p in model.named_parameters()}


@pytest.mark.multiprocess
@pytest.mark.parametrize("stage", STAGES)
def test_zero_stage_trains_like_one_process(runs, stage):
    root, results, _, _ = runs
    weights = results["weights"]
    assert history(root, f"zero{stage}") == pytest.approx(history(root, "single"), rel=1e-5)
    assert history(root, f"zero{stage}", "grad_norm") == pytest.approx(history(root, "single", "grad_norm"), rel=1e-5)
    # The held-out loss after the last step (ZeRO-2 also logged one when it stopped at step 2).
    (want_eval,) = history(root, "single", "eval/loss")
    assert history(root, f"zero{stage}", "eval/loss")[-1] == pytest.approx(want_eval, rel=1e-5)
    want, initial, got = _weights(root, "single/step_00000003"), _weights(root), weights[stage]
    frozen = {name for name in want if name.startswith(FROZEN)}
    # DeepSpeed's fp32 weights: every trained one (ZeRO-3 also keeps the frozen ones).
    assert set(want) - frozen <= set(got) <= set(want)
    # Adam divides by sqrt(v): a gradient component near zero carries its last-bit rounding (ZeRO-3
    # reduce-scatters in another order) into a weight change of a few 1e-6, far below lr = 3e-3.
    for name, tensor in got.items():
        torch.testing.assert_close(tensor, want[name], rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    q = "layers.0.generator.self_attn.q_proj.weight"  # the comparison is of trained weights
    assert not torch.allclose(want[q], initial[q], rtol=1e-3, atol=1e-4)


@pytest.mark.multiprocess
@pytest.mark.parametrize("attempt, failing", [(0, "DeepSpeed's own file"), (1, "the trainer state")])
def test_a_save_failing_on_one_rank_raises_the_same_error_on_every_rank(runs, attempt, failing):
    """A full disk on rank 1 only, in DeepSpeed's own file or in the trainer state: both ranks raise
    a CheckpointSaveError naming rank 1 and its error (no rank waits at a barrier for it), the
    staging folder is gone and nothing was committed; the run then saved and trained on (the ZeRO-1
    run's weights: test_zero_stage_trains_like_one_process)."""
    root, results, _, _ = runs
    (_, on_rank0, left), (_, on_rank1, _) = (r[attempt] for r in results["save_failures"])
    expected = f"checkpoint of step 3 not saved to {root / 'zero1' / '.step_00000003.partial'}: rank 1: OSError"
    assert on_rank1.startswith(expected) and "No space left on device" in on_rank1, (failing, on_rank1)
    assert on_rank0 == f"{on_rank1} (on rank 1)", failing
    assert "no checkpoint was committed before" in on_rank1
    assert not [name for name in left if name.startswith((".step_", "step_", "latest"))], left


@pytest.mark.multiprocess
@pytest.mark.parametrize("where", FAILING_IN)
def test_a_rank_failing_inside_deepspeeds_collectives_ends_every_rank_naming_its_error(runs, where):
    """Rank 1 raises inside DeepSpeed's collectives (its ZeRO-2 forward, rank 0 then waiting in its
    backward's reduction; ZeRO-3's optimizer step; DeepSpeed's save before its closing barrier): it
    raises its own error, rank 0 one naming rank 1 and that error (not gloo's "timed out"), both
    within the configured timeout (ZeRO's group waited torch's 30 minutes for a new group: the
    fixture's 400 s first)."""
    root, results, _, _ = runs
    (type0, message0, seconds0), (type1, message1, seconds1) = (r[where] for r in results["stopped"])
    failed = f"rank 1 failed in DeepSpeed's {FAILING_IN[where]}"
    assert f"{failed}: RuntimeError: rank 1's {where} failed" in message0, (type0, message0)
    if where != "save":
        assert (type0, type1, message1) == ("RankFailedError", "RuntimeError", f"rank 1's {where} failed")
    else:  # the save's own error on both, naming the folder; nothing committed
        staging = root / "fails-in-save" / ".step_00000001.partial"
        assert type0 == type1 == "CheckpointSaveError", (type0, message0, type1, message1)
        assert message1.startswith(f"checkpoint of step 1 not saved to {staging}: rank 1: RuntimeError: rank 1's")
        assert message0.startswith(f"checkpoint of step 1 not saved to {staging}: ")
        assert not [p.name for p in (root / "fails-in-save").iterdir() if p.name.startswith((".step_", "step_"))]
    assert max(seconds0, seconds1) < 3 * TIMEOUT_S, (seconds0, seconds1)


@pytest.mark.multiprocess
def test_a_rank_failing_to_convert_a_checkpoint_ends_every_rank_naming_it(runs):
    """``convert_checkpoint`` under torchrun (the module's ``main``) with one rank unable to read the
    checkpoint: the others waited in the load's or the save's collectives until the groups' timeout
    and failed with gloo's "timed out", naming no rank. Now rank 0 names rank 1 and its error at once,
    and nothing is committed."""
    root, results, _, _ = runs
    (type0, message0, seconds0), (type1, message1, seconds1) = (r["convert"] for r in results["stopped"])
    assert (type1, message1) == ("RuntimeError", "rank 1 cannot read the checkpoint")
    assert (type0, message0) == (
        "RankFailedError",
        "converting the checkpoint stopped on rank 0: rank 1 failed in converting the checkpoint: "
        "RuntimeError: rank 1 cannot read the checkpoint",
    )
    assert max(seconds0, seconds1) < 3 * TIMEOUT_S, (seconds0, seconds1)
    target = root / "fails-converting"
    committed = [p.name for p in target.iterdir() if p.name.startswith("step_")] if target.exists() else []
    assert not committed, committed


def test_preempted_and_resumed_equals_an_uninterrupted_run(runs):
    """ZeRO-2 signalled on one rank during step 2 checkpoints step 2 on every rank and stops (the
    outcome file says so); started again, it continues bit for bit as the uninterrupted ZeRO-1 run
    (the two stages sum the same two gradients: their runs are identical), in one MLflow run."""
    root, results, *_ = runs
    assert results["outcomes"] == ["preempted 2 0\n", "finished 3 2\n"]
    resumed = loss_history(root / "mlflow.db", "zero2", EXPERIMENT)
    assert [step for step, _ in resumed] == [1, 2, 3]
    for metric in ("loss", "grad_norm"):
        assert history(root, "zero2", metric) == history(root, "zero1", metric)
    saved = sorted(p.name for p in (root / "zero2").glob("step_*"))
    assert saved == ["step_00000002", "step_00000003"]


@pytest.mark.multiprocess
def test_no_op_is_compiled(runs):
    """The shared-memory op (and every other) stays unbuilt: the stale locks were never waited on
    (the runs finished) and nothing was added to the extensions folder."""
    _, _, before, after = runs
    assert after == before


@pytest.mark.multiprocess
def test_the_translated_config_is_saved_with_the_run(runs):
    root, *_ = runs
    saved = json.loads((root / "zero3" / "deepspeed_config.json").read_text())
    assert saved["zero_optimization"]["stage"] == 3
    assert saved["zero_optimization"]["offload_optimizer"] == {"device": "cpu"}
    assert saved["train_batch_size"] == 2 and saved["gradient_accumulation_steps"] == 1


def _megatron_state(root: Path, checkpoint: str) -> tuple[dict, dict]:
    """(weights, AdamW state by parameter name) of a Megatron-style checkpoint."""
    config = load_config(None, overrides(root, "single"))
    with torch.device("meta"):
        model = MoTModel(config.model)
    model.materialize(torch.device("cpu"))
    optimizer = torch.optim.AdamW(train_module.stage_param_groups(model, config))
    load_state(root / checkpoint, model, ShardingMeshes(), optimizer=optimizer)
    names = {p: name for name, p in model.named_parameters()}
    return dict(model.named_parameters()), {names[p]: state for p, state in optimizer.state.items()}


@pytest.mark.multiprocess
@pytest.mark.parametrize("back", ["switched-back", "switched3-back"])
def test_megatron_to_deepspeed_and_back_is_bit_identical(runs, back):
    """Through ZeRO-1, and through ZeRO-3 (whose partitions of odd-sized tensors are padded)."""
    root, *_ = runs
    (weights, adam), (back_weights, back_adam) = (
        _megatron_state(root, name) for name in ("single/step_00000002", f"{back}/step_00000002")
    )
    assert sorted(back_weights) == sorted(weights) and sorted(back_adam) == sorted(adam) and adam
    for name, tensor in weights.items():
        assert torch.equal(back_weights[name], tensor), name
    for name, state in adam.items():
        assert sorted(back_adam[name]) == ["exp_avg", "exp_avg_sq", "step"]
        for key, value in state.items():
            assert torch.equal(back_adam[name][key], value), (name, key)
    assert float(adam["embed_tokens.weight"]["step"]) == 2


@pytest.mark.multiprocess
def test_a_run_switched_to_deepspeed_continues_like_the_unswitched_one(runs):
    root, results, *_ = runs
    assert results["switched_loss"] == pytest.approx(history(root, "single")[2], rel=1e-5)
    assert results["switched_loss"] != pytest.approx(history(root, "single")[1], rel=1e-3)  # step 3, not 2


@pytest.mark.multiprocess
def test_a_deepspeed_checkpoint_continues_on_another_world_size_through_the_converter(runs):
    """2-rank ZeRO-3 -> Megatron-style (convert_checkpoint) -> resumed by 1 rank: the unswitched
    run's step 3 (the global batch is the same two packs)."""
    root, results, *_ = runs
    assert results["one_rank_loss"] == pytest.approx(history(root, "single")[2], rel=1e-5)
    assert results["one_rank_loss"] != pytest.approx(history(root, "single")[1], rel=1e-3)  # step 3, not 2


@pytest.mark.multiprocess
def test_deepspeed_ulysses_trains_like_one_process(runs):
    """parallel.context=2 under engine=deepspeed: DistributedAttention exchanges each pack's rows."""
    root, *_ = runs
    for metric in ("loss", "grad_norm", "eval/loss"):
        assert history(root, "ulysses", metric) == pytest.approx(history(root, "single", metric), rel=1e-5), metric


def test_the_ranks_packs_hold_different_streams():
    """The control of the ZeRO-3 comparison: in every step the two data ranks' packs hold different
    DM streams (so their forwards would reach different stream projections), and the two together
    reach every trained one."""
    from megatron_cosmos3.training.batches import MicroBatches

    config = load_config(None, COMMON)
    for step in range(config.steps):
        streams = []
        for data_rank in range(2):
            batch, _ = MicroBatches(config, data_rank, 2, torch.device("cpu")).get(step, 0)
            streams.append({key for key, values in batch.dm_tokens.items() if values.shape[0]})
        assert streams[0] != streams[1], step
        assert streams[0] | streams[1] >= {"video", "audio", "action/humanoid"}, step


@pytest.mark.multiprocess
def test_a_zero3_stage_refuses_a_checkpoint_holding_nan_naming_the_parameter(runs):
    """Under ZeRO-3 a loaded parameter is empty outside the forward: the check reads each rank's partition."""
    root, results, _, _ = runs
    want = f"stage.init_from={root / 'nan' / 'step_00000002'}: parameter '{NAN_PARAMETER}' holds NaN or inf"
    assert results["refused"] is not None and results["refused"].startswith(want), results["refused"]


@pytest.mark.multiprocess
def test_a_stage_starts_from_a_weights_folder_like_one_process(runs):
    root, *_ = runs
    want = history(root, "single-from-weights")
    assert history(root, "zero3-from-weights") == pytest.approx(want, rel=1e-5)
    assert want[0] != pytest.approx(history(root, "single")[0], rel=1e-3)  # the folder's weights, not the seed's


@pytest.mark.multiprocess
def test_bf16_computes_in_bf16_on_fp32_masters_and_follows_the_megatron_style_bf16_run(runs):
    """precision=bf16 under ZeRO-2: the engine's working weights are bf16 (what the forward runs
    on), its masters fp32 (holding what bf16 cannot), and its losses follow the Megatron-style
    engine's bf16 run (fp32 weights under bf16 autocast)."""
    root, results, *_ = runs
    masters, working = results["bf16"]["masters"], results["bf16"]["working"]
    q = "layers.0.generator.self_attn.q_proj.weight"
    assert working[q].dtype == torch.bfloat16 and masters[q].dtype == torch.float32
    for name, master in masters.items():  # the working copy is the master rounded to bf16
        assert torch.equal(working[name], master.to(torch.bfloat16)), name
    assert not torch.equal(masters[q], masters[q].to(torch.bfloat16).float())  # more than bf16 holds
    # bf16 keeps 8 significant bits (relative rounding 2^-9 = 2e-3 per value). The loss, a mean
    # over every token, averages the roundings out: here the two engines' bf16 losses differed by
    # 2e-6 (step 1) and 1.1e-4 (step 2, after one update on weights DeepSpeed rounds to bf16 and the
    # other engine does not), their gradient norms by 1e-3. Ten times that is the bound.
    assert history(root, "zero2-bf16") == pytest.approx(history(root, "single-bf16"), rel=1e-3)
    want_norms = history(root, "single-bf16", "grad_norm")
    assert history(root, "zero2-bf16", "grad_norm") == pytest.approx(want_norms, rel=1e-2)


@pytest.mark.multiprocess
@pytest.mark.parametrize("name", ["zero3", "zero2-bf16"])
def test_generation_samples_are_written_at_the_save(runs, name):
    """Under ZeRO-3 (every rank denoises) and ZeRO-1/2 (rank 0 alone): one folder per task the run
    trains with DM targets, each with its generated latents, finite."""
    import numpy as np

    from megatron_cosmos3.training.samples import trained_dm_tasks

    root, *_ = runs
    steps = 2 if name.endswith("bf16") else 3
    folder = root / name / "samples" / f"step_{steps:08d}"
    assert sorted(p.name for p in folder.iterdir()) == sorted(trained_dm_tasks(load_config(None, COMMON)))
    for task in folder.iterdir():
        with np.load(task / "latents.npz") as latents:
            assert latents.files and all(np.isfinite(latents[key]).all() for key in latents.files), task


@pytest.mark.multiprocess
def test_deepspeeds_own_files_load_without_unpickling_code(runs, tmp_path):
    """DeepSpeed's loader would torch.load its files with weights_only=False: resumes read them
    through WeightsOnlyCheckpointEngine instead (the resumed runs above do), which loads every file
    of ZeRO-1/2/3 and bf16 as the stock loader does and refuses one that would run code."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    from megatron_cosmos3.checkpoint.safe_reader import UnsafeCheckpointError
    from megatron_cosmos3.training.deepspeed_engine import WeightsOnlyCheckpointEngine

    root, *_ = runs
    stock, safe = TorchCheckpointEngine(), WeightsOnlyCheckpointEngine(TorchCheckpointEngine())
    files = sorted(root.glob("*/step_*/deepspeed/*.pt"))
    assert {p.parts[-4] for p in files} >= {"zero1", "zero2", "zero3", "zero2-bf16"}, files

    def same(a, b) -> bool:
        if isinstance(a, torch.Tensor):
            return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
        if isinstance(a, dict):
            return type(a) is type(b) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        if isinstance(a, (list, tuple)):
            return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
        if hasattr(a, "__dict__") and not isinstance(a, type):
            return type(a) is type(b) and same(vars(a), vars(b))
        return a == b

    for path in files:
        assert same(safe.load(str(path)), stock.load(str(path))), path

    class RunsCode:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    crafted = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": RunsCode()}, crafted)
    with pytest.raises(UnsafeCheckpointError, match=rf"{crafted} refers to code, .*GLOBAL posix.system"):
        safe.load(str(crafted))
    assert not (tmp_path / "pwned").exists()
    stock.load(str(crafted))  # control: DeepSpeed's own loader runs it
    assert (tmp_path / "pwned").exists()


def _generation_samples(trained, batch) -> dict[str, torch.Tensor]:
    """The DM tokens ``trained`` samples for ``batch`` (2 Euler steps, fixed seeds)."""
    from megatron_cosmos3.inference.denoising import sample_dm_tokens
    from megatron_cosmos3.inference.solvers import SamplerConfig

    return sample_dm_tokens(trained.model, batch, SamplerConfig("euler", 2), seeds=[5, 6])


@pytest.fixture(scope="module")
def one_process_generation(runs) -> tuple[object, object, dict[str, torch.Tensor]]:
    """The one-process run's step-3 checkpoint loaded for generation, a pack of two tasks and its
    samples of it: what each ZeRO stage's checkpoint is compared with (loaded once, not per stage)."""
    from megatron_cosmos3.data.synthetic_packs import random_pack
    from megatron_cosmos3.release.trained import load_trained_model

    root, *_ = runs
    one = load_trained_model(root / "single" / "step_00000003")
    batch = random_pack(one.config.model, torch.Generator().manual_seed(3), 2, ("policy", "text_to_video"))
    return one, batch, _generation_samples(one, batch)


@pytest.mark.multiprocess
@pytest.mark.parametrize("stage", STAGES)
def test_a_deepspeed_checkpoint_loads_for_generation_in_one_process(runs, one_process_generation, stage):
    """``load_trained_model`` (cosmos3-generate, cosmos3-eval, export) reads a 2-rank ZeRO
    checkpoint in one process (it was a 'missing .metadata' corruption error): the weights DeepSpeed's
    own zero_to_fp32 merges (bit for bit; the untrained ones the saved module's), which are the
    one-process run's; its samples are the one-process checkpoint's."""
    from megatron_cosmos3.release.trained import load_trained_model

    root, results, *_ = runs
    loaded = load_trained_model(root / f"zero{stage}")  # the checkpoint directory: its latest, step 3
    one, batch, expected = one_process_generation
    assert loaded.step == 3
    weights, want = dict(loaded.model.named_parameters()), dict(one.model.named_parameters())
    assert weights.keys() == want.keys()
    for name, tensor in results["weights"][stage].items():
        assert torch.equal(weights[name], tensor), name
    for name, tensor in want.items():
        torch.testing.assert_close(weights[name], tensor, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    q = "layers.0.generator.self_attn.q_proj.weight"  # control: trained weights, not the seed's
    assert not torch.allclose(weights[q], _weights(root)[q], rtol=1e-3, atol=1e-4)
    got = _generation_samples(loaded, batch)
    assert got.keys() == expected.keys()
    for key, tokens in expected.items():
        torch.testing.assert_close(got[key], tokens, rtol=1e-4, atol=1e-4, msg=lambda m, k=key: f"{k}: {m}")


@pytest.mark.multiprocess
def test_loading_a_deepspeed_checkpoint_for_generation_unpickles_no_code(runs, tmp_path):
    """A crafted DeepSpeed file with resealed checksums: ``load_trained_model`` refuses it as an
    UnsafeCheckpointError naming the file (one of the commands' LOAD_ERRORS); nothing runs."""
    from megatron_cosmos3.checkpoint.safe_reader import MANIFEST, UnsafeCheckpointError, file_record
    from megatron_cosmos3.release.trained import LOAD_ERRORS, load_trained_model

    root, *_ = runs
    step = shutil.copytree(root / "zero2" / "step_00000003", tmp_path / "step_00000003")
    marker = tmp_path / "pwned"

    class RunsCode:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    crafted = step / "deepspeed" / "mp_rank_00_model_states.pt"
    torch.save({"module": RunsCode()}, crafted)
    manifest = json.loads((step / MANIFEST).read_text())
    manifest["files"]["deepspeed/mp_rank_00_model_states.pt"] = file_record(crafted)
    (step / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(UnsafeCheckpointError, match=rf"{crafted} refers to code") as refused:
        load_trained_model(step)
    assert isinstance(refused.value, LOAD_ERRORS) and not marker.exists()


@pytest.mark.multiprocess
def test_zero1_and_zero2_resume_each_others_checkpoints(runs):
    """ZeRO-1 and ZeRO-2 write the same optimizer files: ZeRO-2's step-2 checkpoint resumed under
    ZeRO-1 takes the uninterrupted ZeRO-1 run's step 3 (the two stages' runs are identical), and
    the one-process run's step 2 switched to ZeRO-1, resumed under ZeRO-2, the one-process run's."""
    root, results, *_ = runs
    assert results["zero1_from_zero2"] == pytest.approx(history(root, "zero1")[2], rel=1e-6)
    assert results["zero1_from_zero2"] != pytest.approx(history(root, "zero1")[1], rel=1e-3)  # step 3, not 2
    assert results["zero2_from_zero1"] == pytest.approx(history(root, "single")[2], rel=1e-5)
    assert results["zero2_from_zero1"] != pytest.approx(history(root, "single")[1], rel=1e-3)


@pytest.mark.multiprocess
def test_a_deepspeed_checkpoint_resumes_on_another_world_size_and_zero_stage_exactly(runs, universal):
    """ZeRO-2's step-2 checkpoint of 2 ranks resumed on 1 rank (it was a CheckpointLayoutError naming
    the converter): under ZeRO-1 the engine's fp32 masters, AdamW moments and step are DeepSpeed's
    own reassembly of the saved partitions (ds_to_universal's per-parameter files) bit for bit;
    under ZeRO-3 the step it trains has the uninterrupted run's loss."""
    root, results, *_ = runs
    resharded, zero = results["resharded"], universal / "zero"
    trained = {p.name for p in zero.iterdir() if (p / "exp_avg.pt").is_file()}
    assert trained and set(resharded["adam"]) == trained
    for name, state in resharded["adam"].items():
        for key in ADAM_KEYS:
            want = torch.load(zero / name / f"{key}.pt", weights_only=True)["param"]
            assert torch.equal(state[key], want.view_as(state[key])), (name, key)
        assert float(state["step"]) == 2, name
    for folder in (p for p in zero.iterdir() if p.is_dir()):  # the frozen parameters too
        want = torch.load(folder / "fp32.pt", weights_only=True)["param"]
        assert torch.equal(resharded["weights"][folder.name], want.view_as(resharded["weights"][folder.name]))
    q = "layers.0.generator.self_attn.q_proj.weight"  # control: moments of two steps, not a fresh optimizer's
    assert resharded["adam"][q]["exp_avg_sq"].abs().sum() > 0
    assert resharded["loss"] == pytest.approx(history(root, "zero2")[2], rel=1e-5)
    assert resharded["loss"] != pytest.approx(history(root, "zero2")[1], rel=1e-3)  # step 3, not 2


@pytest.mark.multiprocess
@pytest.mark.parametrize("name", ONE_TO_TWO)
def test_a_checkpoint_of_one_rank_continues_on_two_like_an_uninterrupted_run(runs, name):
    """Saved by one rank at step 1 (ZeRO-1, ZeRO-3), continued by two (ZeRO-2 offloaded, ZeRO-3), each reading
    its own slices of the one rank's partitions: steps 2 and 3 have the losses and gradient norms of
    the one-process Megatron-style run, computed independently. In one MLflow run, each step once
    (a resume that started over would log step 1 again)."""
    root, *_ = runs
    assert [step for step, _ in loss_history(root / "mlflow.db", name, EXPERIMENT)] == [1, 2, 3]
    assert sorted(p.name for p in (root / name).glob("step_*")) == ["step_00000001", "step_00000003"]
    for metric in ("loss", "grad_norm"):
        assert history(root, name, metric) == pytest.approx(history(root, "single", metric), rel=1e-5), metric
    assert history(root, name)[1] != pytest.approx(history(root, "single")[0], rel=1e-3)  # control: step 2, not 1


# Three learning-rate groups (DeepSpeed: three flat partitions per rank), tied embeddings (one
# parameter under two names) and the ViT; the global batch of 6 micro-batches splits over 1, 2 or 3 ranks.
GROUPS = (
    *TINY_VIT,
    "stage.lr_multipliers={'vision.*': 0.5, 'layers.1.*': 2.0}",
    "model.tie_word_embeddings=true",
    "eval.every=0",
    "tracking.enabled=false",
)


def _two_then_three(rank: int, world_size: int, root: Path) -> dict[int, float]:
    """On 2 ranks: ZeRO-2 for 2 steps of ``GROUPS``, saved. On 3 ranks: that checkpoint resumed
    under ZeRO-1 and ZeRO-3 (resharded: partitions that 3 does not divide evenly); their step-3 loss."""
    if world_size == 2:
        settings = ("engine=deepspeed", "deepspeed.zero_stage=2", "optimizer.micro_batches_per_step=3", "steps=2")
        _train(root, "groups", *GROUPS, *settings)
        return {}
    losses = {}
    for stage in (1, 3):
        if rank == 0:
            _copy_checkpoint(root / "groups" / "step_00000002", root / f"groups-on-three-{stage}")
        torch.distributed.barrier()
        settings = ("engine=deepspeed", f"deepspeed.zero_stage={stage}", "optimizer.micro_batches_per_step=2")
        losses[stage] = _train(root, f"groups-on-three-{stage}", *GROUPS, *settings)["loss"]
    return losses


@pytest.mark.multiprocess
def test_a_checkpoint_of_two_ranks_continues_on_three_with_several_groups_and_tied_weights(tmp_path):
    """Saved by 2 ranks under ZeRO-2 at step 2 with three parameter groups, tied embeddings and the
    ViT, continued by 3 ranks under ZeRO-1 and ZeRO-3 (each rank reading its own, uneven, share of
    every group): step 3 has the loss of the one-process Megatron-style run (6 micro-batches a step)."""
    single = load_config(None, overrides(tmp_path, "single", *GROUPS, "optimizer.micro_batches_per_step=6"))
    single.tracking.enabled = True
    train_module.train(single, DistributedContext(0, 1, 0, torch.device("cpu")))
    want = history(tmp_path, "single")
    run_on_ranks(_two_then_three, 2, tmp_path, timeout_s=300)
    losses = run_on_ranks(_two_then_three, 3, tmp_path, timeout_s=300)[0]
    for stage, loss in losses.items():
        assert loss == pytest.approx(want[2], rel=1e-6), stage
        assert loss != pytest.approx(want[1], rel=1e-3), stage  # control: step 3, not 2


@pytest.mark.multiprocess
def test_the_ranks_of_a_resharded_resume_hash_each_file_once_and_agree_on_a_damaged_one(runs):
    """Two ranks continuing a checkpoint of one rank check its files against the checksums
    together: each hashes its share of DeepSpeed's files, every one once (each hashed every file;
    the small records a rank reads itself, meta.json and deepspeed_layout.json, it checks when it
    reads them). A file damaged that rank 1 alone hashes is the same CheckpointCorruptError naming
    it on both ranks (so that both take the same way, fallback_to_verified), and stops both ranks'
    resume naming it."""
    root, results, *_ = runs
    for name in ONE_TO_TWO:
        listed = json.loads((root / name / "step_00000001" / "checksums.json").read_text())["files"]
        first, second = (
            [file for file in continued["hashed"][name] if file.startswith("deepspeed/")]
            for continued in results["continued"]
        )
        assert first and second, (first, second)
        assert sorted(first + second) == sorted(file for file in listed if file.startswith("deepspeed/"))
    (damaged, verified0, resumed0), (_, verified1, resumed1) = (c["damaged"] for c in results["continued"])
    want = f"file {damaged} does not match its sha256"
    assert verified0 == verified1 and verified0[0] == "CheckpointCorruptError" and want in verified0[1], verified0
    for raised in (resumed0, resumed1):  # one rank's own ResumeError, the other's naming it (start-up)
        assert raised[0] in ("ResumeError", "RankFailedError") and want in raised[1], raised


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    "checkpoint",
    [
        "zero1/step_00000003",  # ZeRO-1 of 2 ranks: frozen weights in the module only
        "zero3/step_00000003",  # ZeRO-3 of 2 ranks, AdamW state offloaded
        "one-to-two-zero1/step_00000001",  # one rank
        "one-to-two-zero3/step_00000001",
        "frozen-vit/step_00000001",  # bf16 ZeRO-2 of one rank, the ViT frozen
        "frozen-vit/step_00000003",  # bf16 ZeRO-3 of 2 ranks, the ViT frozen
    ],
)
def test_the_saved_partitions_give_any_range_as_zero_to_fp32_reassembles_it(runs, checkpoint):
    """``SavedPartitions.read`` of every saved parameter, whole and in pieces of 7 elements (which
    cross the saving ranks' slices), is DeepSpeed's own ``zero_to_fp32`` reassembly bit for bit
    (the fp32 master, or for a frozen weight the saved working copy in its dtype); past the
    parameter's end it reads zeros (ZeRO-3's padding), and a moment of a frozen weight is zero. A
    parameter of this run's model with another shape is a CheckpointMismatchError naming both."""
    from megatron_cosmos3.checkpoint.checkpointer import CheckpointMismatchError
    from megatron_cosmos3.training.deepspeed_engine import deepspeed_weights
    from megatron_cosmos3.training.deepspeed_partitions import MASTER

    root, *_ = runs
    step = root / checkpoint
    saved, want = _saved_partitions(step), deepspeed_weights(step)
    model_file = next((step / "deepspeed").glob("*model_states.pt"))
    buffers = set(torch.load(model_file, weights_only=False)["buffer_names"])
    assert set(saved.shapes) == set(want) - buffers  # every parameter, trained or frozen
    for name, shape in saved.shapes.items():
        numel = shape.numel()
        whole = saved.read(name, MASTER, 0, numel)
        assert whole.dtype == want[name].dtype and torch.equal(whole.view(shape), want[name]), name
        pieces = [saved.read(name, MASTER, start, min(7, numel - start)) for start in range(0, numel, 7)]
        assert torch.equal(torch.cat(pieces), whole), name
        assert torch.equal(saved.read(name, MASTER, numel - 1, 3)[1:], torch.zeros(2, dtype=whole.dtype)), name
        if not saved.trained(name):
            assert not saved.read(name, ADAM_KEYS[0], 0, numel).any(), name
    assert any(saved.trained(name) for name in saved.shapes) and any(not saved.trained(n) for n in saved.shapes)
    q = "layers.0.generator.mlp.down_proj.weight"
    saved.check_shape(q, saved.shapes[q], "here")  # control: its own shape
    want = rf"here: parameter '{q}' has shape \(32, 64\); this run's model has \(32, 48\)"
    with pytest.raises(CheckpointMismatchError, match=want):
        saved.check_shape(q, torch.Size([32, 48]), "here")


@pytest.mark.multiprocess
def test_a_frozen_bf16_encoder_resumes_on_another_world_size_with_its_saved_weights(runs):
    """A bf16 run with the ViT frozen, saved by one rank under ZeRO-2 at step 1 and continued by two
    under ZeRO-3: DeepSpeed keeps no fp32 master of a frozen weight, and its checkpoint holds the
    bf16 working copy (ZeRO-2's frozen fragments, and the saved module); the continued run's frozen
    ViT is that copy bit for bit at step 3 (both ranks' ZeRO-3 slices), its trained weights moved,
    and its steps 2 and 3 have the losses of the uninterrupted one-rank run. Its step-3 checkpoint
    (2 ranks, ZeRO-3) loaded by one rank under ZeRO-1: the ViT is still that copy, the trained
    weights the saved fp32 masters."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    root, results, *_ = runs
    saved = torch.load(root / "frozen-vit" / "step_00000001" / "deepspeed" / "mp_rank_00_model_states.pt")
    frozen = saved["frozen_param_fragments"]
    vit = {name for name in frozen if name.startswith("vision.")}
    assert vit and vit == {name for name in saved["module"] if name.startswith("vision.")}
    assert all(
        frozen[name].dtype == torch.bfloat16 and torch.equal(frozen[name], saved["module"][name]) for name in vit
    )
    final = get_fp32_state_dict_from_zero_checkpoint(str(root / "frozen-vit" / "step_00000003"), tag="deepspeed")
    for name in vit:
        assert torch.equal(final[name], frozen[name]), name
    q = "layers.0.generator.self_attn.q_proj.weight"  # control: the trained weights moved
    assert not torch.equal(final[q], saved["module"][q].float())
    assert [step for step, _ in loss_history(root / "mlflow.db", "frozen-vit", EXPERIMENT)] == [1, 2, 3]
    want = history(root, "frozen-vit-uninterrupted")
    assert history(root, "frozen-vit") == pytest.approx(want, rel=1e-3)
    on_one = results["resharded"]["vit"]
    assert set(on_one) == set(final)
    for name, tensor in on_one.items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, final[name].float()), name


@pytest.mark.multiprocess
def test_a_zero3_checkpoint_with_offloaded_optimizer_state_resumes_on_another_world_size_exactly(runs):
    """ZeRO-3's step-3 checkpoint of 2 ranks (its AdamW state offloaded to host memory, ZeRO-3's own
    flat partitions and padding) resumed under ZeRO-1 on 1 rank: the engine's fp32 masters, AdamW
    moments and step are DeepSpeed's own reassembly of the saved partitions (ds_to_universal's
    per-parameter files) bit for bit."""
    root, results, *_ = runs
    weights, adam = results["resharded"]["from_zero3"]
    zero = _to_universal(root / RESHARDED_ZERO3, root / "universal3" / "step_00000003_universal") / "zero"
    trained = {p.name for p in zero.iterdir() if (p / "exp_avg.pt").is_file()}
    assert trained and set(adam) == trained
    for name, state in adam.items():
        for key in ADAM_KEYS:
            want = _universal_tensor(zero / name / f"{key}.pt")
            assert torch.equal(state[key], want.view_as(state[key])), (name, key)
        assert float(state["step"]) == 3, name
    for folder in (p for p in zero.iterdir() if p.is_dir()):
        want = _universal_tensor(folder / "fp32.pt")
        assert torch.equal(weights[folder.name], want.view_as(weights[folder.name])), folder.name
    q = "layers.0.generator.self_attn.q_proj.weight"  # control: moments of three steps, not a fresh optimizer's
    assert adam[q]["exp_avg_sq"].abs().sum() > 0


@pytest.mark.multiprocess
def test_a_bf16_deepspeed_checkpoint_resumes_on_another_world_size_from_its_fp32_masters(runs):
    """The bf16 ZeRO-2 checkpoint of 2 ranks resumed by a bf16 ZeRO-1 engine on 1 rank (resharded):
    its fp32 masters are the saved masters bit for bit, not the bf16 working copy rounded back
    (the frozen parameters, of which DeepSpeed keeps no master, the saved module's), and its AdamW
    state holds both steps' moments."""
    _, results, *_ = runs
    masters, working = results["bf16"]["masters"], results["bf16"]["working"]
    weights, adam = results["resharded"]["bf16"]
    q = "layers.0.generator.self_attn.q_proj.weight"
    assert not torch.equal(masters[q], working[q].float())  # control: the copies differ
    assert set(adam) == {name for name in masters if not name.startswith(FROZEN)}
    for name, tensor in weights.items():
        want = masters[name] if name in masters else working[name].float()
        assert tensor.dtype == torch.float32 and torch.equal(tensor, want), name
    assert float(adam[q]["step"]) == 2 and adam[q]["exp_avg_sq"].abs().sum() > 0


@pytest.mark.multiprocess
def test_deepspeeds_elastic_optimizer_files_are_refused_naming_the_file(runs, tmp_path):
    """Optimizer files of DeepSpeed's elastic layout (zero_optimization.elastic_checkpoint, which this
    project never sets: a list of per-group states) are a CheckpointLayoutError naming the file when
    the partitions are reassembled, not a TypeError halfway; the saved files themselves read."""
    from deepspeed.checkpoint.constants import BASE_OPTIMIZER_STATE, OPTIMIZER_STATE_DICT

    from megatron_cosmos3.checkpoint.engine_layout import CheckpointLayoutError

    root, *_ = runs
    step = shutil.copytree(root / RESHARDED, tmp_path / "step_00000002")
    assert _saved_partitions(step).step == 2  # control: as saved
    optim = step / "deepspeed" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    saved = torch.load(optim, weights_only=False)
    inner = saved[OPTIMIZER_STATE_DICT]
    inner[BASE_OPTIMIZER_STATE] = list(inner[BASE_OPTIMIZER_STATE]["state"].values())
    torch.save(saved, optim)
    with pytest.raises(CheckpointLayoutError, match=re.escape(f"{optim} holds DeepSpeed's elastic optimizer state")):
        _saved_partitions(step)


def _saved_partitions(step: Path):
    """The saved partitions of the DeepSpeed checkpoint folder ``step``, read weights-only."""
    from megatron_cosmos3.training.deepspeed_engine import WeightsOnlyCheckpointEngine
    from megatron_cosmos3.training.deepspeed_partitions import SavedPartitions

    return SavedPartitions(step / "deepspeed", WeightsOnlyCheckpointEngine(None).load)


def _resident_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _status_bytes(field: str) -> int:
    """A memory figure of this process from /proc/self/status (``RssAnon``, ``VmHWM``, ...), in bytes."""
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(f"{field}:"))
    return int(line.split()[1]) * 1024


@contextlib.contextmanager
def _peak_memory():
    """Yields a dict that holds, after the block, the peak anonymous resident memory it added
    (``anon``, sampled every millisecond: the process's own allocations) and the peak resident
    memory it added (``resident``, the kernel's high-water mark reset at its start: mapped file
    pages read included)."""
    import threading

    start, peak, done = _status_bytes("RssAnon"), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _status_bytes("RssAnon"))
            done.wait(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    resident = _resident_bytes()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := the current resident size
    sampler.start()
    found = {}
    try:
        yield found
    finally:
        done.set()
        sampler.join()
        found.update(anon=max(peak[0], _status_bytes("RssAnon")) - start, resident=_status_bytes("VmHWM") - resident)


# A model of 4.3M parameters (hidden 256): the replica of the whole fp32 model and both moments
# (52 MB) stands out of the resident memory of a DeepSpeed process.
WIDE = ("model.hidden_size=256", "model.head_dim=64", "model.ffn_hidden_size=1024", "eval.every=0")


def _resharded_load_memory(rank: int, world_size: int, root: Path) -> dict:
    """One rank trains the wide model for a step under ZeRO-1 and saves; two ranks resume it under
    ZeRO-2 (resharded) for a second step. Each resuming rank returns the memory its load added
    (``_peak_memory``), the bytes of the whole fp32 masters and moments, and (the measurement's
    control) what the same measurement sees of a tensor of that many bytes."""
    from megatron_cosmos3.training.deepspeed_engine import DeepSpeedCheckpointer

    name = "wide"
    if world_size == 1:
        _train(root, name, *WIDE, "engine=deepspeed", "deepspeed.zero_stage=1", "optimizer.micro_batches_per_step=2")
        return {}
    stock, loads = DeepSpeedCheckpointer._load_resharded, []

    def measured(self, *args, **kwargs):
        with _peak_memory() as added:
            stock(self, *args, **kwargs)
        loads.append(added)

    DeepSpeedCheckpointer._load_resharded = measured
    try:
        _train(root, name, *WIDE, "engine=deepspeed", "deepspeed.zero_stage=2", "steps=2")
    finally:
        DeepSpeedCheckpointer._load_resharded = stock
    trained = sum(p.numel() for n, p in _weights(root, None, *WIDE).items() if not n.startswith(FROZEN))
    whole = 3 * 4 * trained
    with _peak_memory() as control:
        held = torch.ones(whole // 4)
        time.sleep(0.05)  # held for 50 samples
        del held
    return {"loads": loads, "whole": whole, "control": control}


@pytest.mark.multiprocess
@pytest.mark.skipif(not Path("/proc/self/clear_refs").is_file(), reason="reads the resident set from /proc")
def test_a_resharded_resume_reads_only_each_ranks_own_partitions(tmp_path):
    """Saved by one rank, resumed by two: each resuming rank reads from the mapped files only the
    ranges of its own partitions (half of the fp32 masters and moments) and builds no whole copy.
    Its load adds less than one whole copy of the fp32 masters and moments in allocations (measured
    0.65-0.69x, half of it its own partitions' moments, which its first step would create; it built
    a whole replica and merged every file, 1.9x), and under 1.5x in
    resident memory, the file pages it read included (1.23-1.30x; it read every byte, 2.6x). Control:
    the same measurement sees a tensor of the whole's size."""
    root = tmp_path
    run_on_ranks(_resharded_load_memory, 1, root, timeout_s=200)
    ranks = run_on_ranks(_resharded_load_memory, 2, root, timeout_s=200)
    for found in ranks:
        whole, (load,) = found["whole"], found["loads"]
        assert found["control"]["anon"] > 0.9 * whole and found["control"]["resident"] > 0.9 * whole, found
        assert load["anon"] < whole, (load, whole)
        assert load["resident"] < 1.5 * whole, (load, whole)
    print({rank: found["loads"][0] for rank, found in enumerate(ranks)}, "whole:", ranks[0]["whole"])


@pytest.mark.skipif(not Path("/proc/self/statm").is_file(), reason="reads the resident set from /proc")
def test_the_weights_only_reader_maps_a_file_where_zero_to_fp32_asks(tmp_path):
    """zero_to_fp32 loads every saving rank's optimizer file with ``mmap=True`` (every rank does, in
    a resharded resume and in load_trained_model): the weights-only reader in its place maps it too,
    so tensors it never touches (ZeRO-1/2's AdamW moments there) are not read into memory; it read
    every file whole. Control: the same file read whole takes its size in resident memory."""
    from megatron_cosmos3.training.deepspeed_engine import _WeightsOnlyTorch

    size = 64 << 20
    file = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"moments": torch.ones(size // 4)}, file)
    reader = _WeightsOnlyTorch()
    torch.save({"step": torch.ones(1)}, tmp_path / "small.pt")
    reader.load(tmp_path / "small.pt", map_location="cpu", mmap=True)  # DeepSpeed's classes imported first
    before = _resident_bytes()
    mapped = reader.load(file, map_location="cpu", mmap=True)
    assert _resident_bytes() - before < size // 4
    before = _resident_bytes()
    whole = reader.load(file, map_location="cpu")
    assert _resident_bytes() - before > size * 3 // 4  # control: a whole read holds the file
    assert torch.equal(mapped["moments"], whole["moments"])


@pytest.mark.multiprocess
@pytest.mark.parametrize("damage", ["missing", "damaged", "unlisted"])
def test_a_saving_ranks_missing_or_damaged_file_is_named_before_the_partitions_are_merged(runs, tmp_path, damage):
    """The resharded resume reads every saving rank's files through ``load_deepspeed_weights``: one
    of them missing or damaged, or an optimizer file the checksums do not list (copied into the step
    folder), is a CheckpointCorruptError naming it (a resume may fall back to an older checkpoint),
    not DeepSpeed's count of files ("Expected 2 ... found 3") or an unpickling error."""
    from megatron_cosmos3.checkpoint.safe_reader import CheckpointCorruptError
    from megatron_cosmos3.training.deepspeed_engine import load_deepspeed_weights

    root, *_ = runs
    step = shutil.copytree(root / RESHARDED, tmp_path / "step_00000002")
    name = "deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt"
    if damage == "missing":
        (step / name).unlink()
    elif damage == "damaged":
        data = bytearray((step / name).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (step / name).write_bytes(bytes(data))
    else:
        copied = "deepspeed/zero_pp_rank_2_mp_rank_00_optim_states.pt"
        shutil.copyfile(step / name, step / copied)
        name = copied
    want = {
        "missing": f"file {name} is missing",
        "damaged": f"file {name} does not match its sha256",
        "unlisted": f"file {name} is not in its checksums.json",
    }[damage]
    with pytest.raises(CheckpointCorruptError, match=re.escape(want)):
        load_deepspeed_weights(step, MoTModel(load_config(None, COMMON).model))


@pytest.mark.multiprocess
@pytest.mark.parametrize("case", REFUSED)
def test_a_resume_deepspeed_cannot_load_is_refused_naming_the_saved_and_current_layout(runs, case):
    """On 1 rank: a checkpoint whose parameter groups changed (another weight decay, the reasoner
    tower frozen) is a CheckpointLayoutError naming both sides, raised before DeepSpeed reads a file
    (its own loader would keep the saved weight decay without a word, or put moments on the wrong
    parameters)."""
    root, results, *_ = runs
    raised, message = results["layout_refused"][case]
    folder = root / f"refused-{case}" / "step_00000003"
    assert raised == "CheckpointLayoutError", (raised, message)
    assert message.startswith(f"checkpoint {folder} was saved "), message
    want = {
        "weight_decay": "group 0 has weight_decay=0.01 there and weight_decay=0.05 now",
        "frozen": "parameter 'layers.0.reasoner.",
    }[case]
    assert want in message, message
    if case == "frozen":
        assert "was trained there and is frozen now" in message, message


def test_the_megatron_engine_refuses_to_resume_a_deepspeed_checkpoint_naming_the_engine(runs):
    from megatron_cosmos3.checkpoint.engine_layout import CheckpointLayoutError

    root, *_ = runs
    _copy_checkpoint(root / "zero1" / "step_00000003", root / "megatron-resumes-zero1")
    config = load_config(None, overrides(root, "megatron-resumes-zero1", *QUICK))
    step = root / "megatron-resumes-zero1" / "step_00000003"
    want = f"checkpoint {step} was written by engine=deepspeed (ZeRO-1 on 2 ranks), and this run has engine=megatron"
    with pytest.raises(CheckpointLayoutError, match=re.escape(want)):
        train_module.train(config, DistributedContext(0, 1, 0, torch.device("cpu")))


@pytest.mark.multiprocess
@pytest.mark.parametrize("engine", ["deepspeed", "megatron"])
def test_a_stage_from_a_bf16_deepspeed_checkpoint_starts_from_its_fp32_masters(runs, engine):
    """stage.init_from a bf16 ZeRO-2 checkpoint, under a bf16 ZeRO-1 engine (2 ranks) or the
    Megatron-style engine (one process): every trained weight is the saved fp32 master, bit for bit,
    not the bf16 working copy beside it (the frozen ones, of which DeepSpeed keeps no fp32 master,
    as zero_to_fp32 gives them: the saved module's)."""
    root, results, *_ = runs
    masters, working = results["bf16"]["masters"], results["bf16"]["working"]
    if engine == "deepspeed":
        started = results["started_from_bf16"]
    else:
        started = _started_weights(root, "megatron-from-bf16", f"stage.init_from={root / 'zero2-bf16'}")
    q = "layers.0.generator.self_attn.q_proj.weight"
    assert not torch.equal(masters[q], working[q].float())  # control: the copies differ
    assert set(masters) <= set(started)
    for name, tensor in started.items():
        want = masters[name] if name in masters else working[name].float()
        assert tensor.dtype == torch.float32 and torch.equal(tensor, want), name


@pytest.mark.multiprocess
def test_a_bf16_deepspeed_checkpoint_loads_its_fp32_masters_for_generation(runs):
    """load_trained_model of the bf16 ZeRO-2 checkpoint: fp32 weights, the masters bit for bit."""
    from megatron_cosmos3.release.trained import load_trained_model

    root, results, *_ = runs
    masters, working = results["bf16"]["masters"], results["bf16"]["working"]
    weights = dict(load_trained_model(root / "zero2-bf16").model.named_parameters())
    for name, master in masters.items():
        assert weights[name].dtype == torch.float32 and torch.equal(weights[name], master), name
    q = "layers.0.generator.self_attn.q_proj.weight"
    assert not torch.equal(weights[q], working[q].float())  # control: not the bf16 copy


def _to_universal(step: Path, out: Path) -> Path:
    """The DeepSpeed checkpoint folder ``step`` as DeepSpeed's ds_to_universal converts it into
    ``out`` (its ``zero/`` folder of per-parameter files, ``latest_universal`` beside it), run in
    this process with one worker."""
    from deepspeed.checkpoint import ds_to_universal

    argv = ["ds_to_universal", "--input_folder", str(step / "deepspeed")]
    argv += ["--output_folder", str(out), "--num_extract_workers", "1", "--num_merge_workers", "1"]
    with mock.patch.object(sys, "argv", [*argv, "--inject_missing_state"]):  # our saves lack its client state
        ds_to_universal.main(ds_to_universal.parse_arguments())
    assert (out / "zero" / "embed_tokens.weight" / "fp32.pt").is_file() and (out.parent / "latest_universal").is_file()
    return out


def _universal_tensor(file: Path) -> torch.Tensor:
    """A tensor of ds_to_universal's output: ``{"param": tensor}`` from ZeRO-1/2, the tensor from ZeRO-3."""
    loaded = torch.load(file, weights_only=True)
    return loaded["param"] if isinstance(loaded, dict) else loaded


@pytest.fixture(scope="module")
def universal(runs) -> Path:
    """ZeRO-2's 2-rank step-2 checkpoint (``RESHARDED``) through ds_to_universal (``_to_universal``)."""
    root, *_ = runs
    return _to_universal(root / RESHARDED, root / "universal" / "step_00000002_universal")


@pytest.mark.multiprocess
@pytest.mark.parametrize("given", ["universal", "universal's parent", "deepspeed/ alone"])
def test_a_universal_checkpoint_or_deepspeeds_bare_files_are_refused_by_name(runs, universal, given, capsys):
    """DeepSpeed's universal checkpoint (the folder, or the one holding latest_universal) and
    DeepSpeed's files without their step folder: refused by load_trained_model (one of the commands'
    LOAD_ERRORS), by the Megatron-style engine's stage.init_from, and by the converter, which
    prints one line and exits with status 2."""
    from megatron_cosmos3.checkpoint.engine_layout import CheckpointLayoutError
    from megatron_cosmos3.release.trained import LOAD_ERRORS, load_trained_model
    from megatron_cosmos3.training.deepspeed_engine import main

    root, *_ = runs
    path = {
        "universal": universal,
        "universal's parent": universal.parent,
        "deepspeed/ alone": root / "zero1" / "step_00000003" / "deepspeed",
    }[given]
    bare = given == "deepspeed/ alone"
    want = f"{path} {'holds DeepSpeed' if bare else 'is a DeepSpeed universal checkpoint ('}"
    given = given.replace("'", "").replace("/ ", "-")
    with pytest.raises(CheckpointLayoutError, match=re.escape(want)) as refused:
        load_trained_model(path)
    assert isinstance(refused.value, LOAD_ERRORS)
    with pytest.raises(CheckpointLayoutError, match=re.escape(want)):
        _started_weights(root, f"megatron-from-universal-{given}", f"stage.init_from={path}")
    config = root / "zero1" / "config.yaml"
    assert main(["--config", str(config), str(path), str(root / f"converted-universal-{given}")]) == 2
    out, err = capsys.readouterr()
    assert err.startswith(f"python -m megatron_cosmos3.training.deepspeed_engine: error: {want}"), err
    assert err.count("\n") == 1 and "Traceback" not in err and not (root / f"converted-universal-{given}").exists()


@pytest.mark.multiprocess
def test_a_replica_whose_parameters_took_different_adamw_steps_continues_from_the_most(runs):
    """DeepSpeed keeps one step count per flat partition: a Megatron-style state in which one
    parameter took 1 AdamW step and the others 2 loads with 2 in every partition (it was an error)."""
    _, results, *_ = runs
    assert results["uneven_steps"] and set(results["uneven_steps"]) == {2.0}, results["uneven_steps"]


@pytest.mark.multiprocess
def test_the_layout_record_is_checked_and_names_what_differs(runs, tmp_path):
    """ZeRO-2's record: its stage, 2 ranks and one group of every trained parameter. A record
    damaged after the save is a CheckpointCorruptError (a resume may fall back to an older
    checkpoint), one crafted and resealed a CheckpointLayoutError naming the field; parameters
    moved to a group of their own (another lr multiplier) are named."""
    from megatron_cosmos3.checkpoint.engine_layout import (
        LAYOUT_FILE,
        CheckpointLayoutError,
        check_same_parameter_groups,
        saved_layout,
    )
    from megatron_cosmos3.checkpoint.safe_reader import MANIFEST, CheckpointCorruptError, file_record

    root, *_ = runs
    step = shutil.copytree(root / "zero2" / "step_00000003", tmp_path / "step_00000003")
    saved = saved_layout(step)
    trained = {name for name in _weights(root) if not name.startswith(FROZEN)}
    assert (saved.engine, saved.zero_stage, saved.world_size) == ("deepspeed", 2, 2)
    (group,) = saved.param_groups
    assert set(group["params"]) == trained and group["weight_decay"] == 0.01 and group["lr_multiplier"] == 1.0
    moved = [name for name in group["params"] if ".reasoner." in name]
    split = [dict(group, params=[n for n in group["params"] if n not in moved]), dict(group, params=moved)]
    split[1]["lr_multiplier"] = 0.5
    want = f"parameter {min(moved)!r} was in group 0 (lr_multiplier=1.0) there and is in group 1 (lr_multiplier=0.5)"
    with pytest.raises(CheckpointLayoutError, match=re.escape(want)):
        check_same_parameter_groups(step, saved.param_groups, split)
    check_same_parameter_groups(step, saved.param_groups, saved.param_groups)  # control: the same groups pass
    record = step / LAYOUT_FILE
    record.write_text(record.read_text().replace('"zero_stage": 2', '"zero_stage": 7'))
    with pytest.raises(CheckpointCorruptError, match=re.escape(f"file {LAYOUT_FILE} (ZeRO stage, world size")):
        saved_layout(step)
    manifest = json.loads((step / MANIFEST).read_text())
    manifest["files"][LAYOUT_FILE] = file_record(record)
    (step / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointLayoutError, match=re.escape(f"{record} zero_stage=7: must be 1, 2 or 3")):
        saved_layout(step)
