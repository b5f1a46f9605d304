"""The training config tree: typed dataclasses (OmegaConf structured configs), YAML, CLI overrides.

Everything is validated here, before any process group starts: a bad value is a clear error on
every rank at once, not a hang inside a collective.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, OmegaConfBaseException

from megatron_cosmos3.atomic_files import unwritable_reason
from megatron_cosmos3.config_files import refuse_irregular_file
from megatron_cosmos3.data.config import DataConfig, DatasetConfig, MixtureConfig
from megatron_cosmos3.data.determinism import seed_problem
from megatron_cosmos3.data.tokenizer import BYTE_VOCAB_SIZE, HFTokenizer
from megatron_cosmos3.eval_suite.config import SUITE_PREFIX, SuiteConfig, check_model_embodiments
from megatron_cosmos3.inference.solvers import MAX_STEPS
from megatron_cosmos3.model.config import EmbodimentConfig, MoTConfig, merge_config_layer, refuse_below
from megatron_cosmos3.objectives.flow_matching import FlowMatchingConfig
from megatron_cosmos3.parallel.data_parallel import ADAMW_IMPLS
from megatron_cosmos3.parallel.sizes import ParallelSizes
from megatron_cosmos3.tasks.registry import Modality, get_task
from megatron_cosmos3.training.deepspeed_config import DeepSpeedConfig, check_engine_mix
from megatron_cosmos3.training.precision import FP8_WIDTH_MULTIPLE, PRECISIONS, fp8_unaligned_widths
from megatron_cosmos3.training.tracking import address_without_scheme, is_local_path
from megatron_cosmos3.yaml_integers import refuse_long_integers

SCHEDULES = ("cosine", "wsd", "constant")


@dataclass
class OptimizerConfig:
    lr: float = 3e-3
    min_lr: float = 3e-4
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    warmup_steps: int = 10
    # "cosine": warm-up then cosine to min_lr; "wsd": warm-up, stable at lr, then linear decay to
    # min_lr over the last decay_fraction of the steps; "constant": warm-up then lr.
    schedule: str = "cosine"
    decay_fraction: float = 0.2
    grad_clip: float = 1.0
    flow_matching_weight: float = 1.0
    micro_batches_per_step: int = 1  # gradient accumulation
    shard_optimizer_state: bool = True  # ZeRO-1 over the data-parallel ranks
    # AdamW's kernel: auto (torch's fused AdamW where the device has it, else foreach), fused,
    # foreach, loop. docs/DESIGN.md, "Fused kernels".
    implementation: str = "auto"
    # Stop after this many steps in a row skipped for a non-finite loss or gradient.
    max_consecutive_nonfinite_steps: int = 5

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optimizer.schedule={self.schedule!r} is not one of {SCHEDULES}")
        if self.implementation not in ADAMW_IMPLS:
            raise ValueError(f"optimizer.implementation={self.implementation!r} is not one of {ADAMW_IMPLS}")
        if not 0 < self.decay_fraction <= 1:
            raise ValueError(f"optimizer.decay_fraction={self.decay_fraction} must be in (0, 1]")
        refuse_below("optimizer", self, {"micro_batches_per_step": 1, "max_consecutive_nonfinite_steps": 1})
        if not self.lr > 0:
            raise ValueError(f"optimizer.lr={self.lr!r} must be > 0")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"optimizer.min_lr={self.min_lr!r} must be in [0, optimizer.lr={self.lr!r}]")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optimizer.betas must be two values in [0, 1), got {list(self.betas)}")
        for name in ("weight_decay", "flow_matching_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"optimizer.{name}={getattr(self, name)} must be >= 0")
        refuse_below("optimizer", self, {"warmup_steps": 0})
        if not self.grad_clip > 0:
            raise ValueError(f"optimizer.grad_clip={self.grad_clip!r} must be > 0")


@dataclass
class SyntheticDataConfig:
    """Random packs with the real layout (the backbone milestone's data; shards replace it)."""

    samples_per_pack: int = 8
    tasks: list[str] = field(
        default_factory=lambda: [
            "understanding",
            "text_to_video",
            "image_to_video",
            "video_to_audio",
            "forward_dynamics",
            "policy",
        ]
    )
    scale: int = 2

    def __post_init__(self) -> None:
        from megatron_cosmos3.data.synthetic_packs import SUPPORTED_TASKS

        if not self.tasks:  # it was named as 'unknown tasks []'
            raise ValueError(f"synthetic.tasks is empty; name one or more of {list(SUPPORTED_TASKS)}")
        unknown = sorted(set(self.tasks) - set(SUPPORTED_TASKS))
        if unknown:
            raise ValueError(f"synthetic.tasks: unknown tasks {unknown} (known: {list(SUPPORTED_TASKS)})")
        refuse_below("synthetic", self, {"samples_per_pack": 1, "scale": 1})


@dataclass
class CheckpointConfig:
    """Where checkpoints go and how a run resumes (``checkpoint/checkpointer.py``, ``checkpoint/resume.py``).

    A resume never starts over silently: when ``directory`` holds checkpoints but the one ``latest``
    names is missing, damaged or fails its checksums, the run stops with the list of committed
    checkpoints, unless ``fallback_to_verified`` lets it resume from the newest one that verifies.
    Starting at step 0 in a folder that holds checkpoints (``resume=false``) needs
    ``allow_fresh_start=true``. Data settings changed since the checkpoint are an error naming each,
    unless ``restart_changed_data`` restarts the data stream. ``directory`` is locked for the run
    (``run.lock``): a second trainer on the same folder refuses to start. Left empty, it is the run's own folder
    (``TrainConfig.name_run``): a run resumes another run's checkpoints only when told to by an
    explicit ``directory``.
    """

    directory: str = ""  # empty: <runs_root>/<tracking.run_name>/checkpoints
    save_every: int = 100  # steps; the last step is always saved
    keep_last: int = 2
    resume: bool = True  # continue from the latest committed checkpoint in ``directory`` if any
    async_save: bool = True  # write in the background while training goes on
    # If the latest checkpoint is unusable, resume from the newest older one that verifies (logged
    # as a warning) instead of stopping.
    fallback_to_verified: bool = False
    # With resume=false, start at step 0 even though ``directory`` holds checkpoints (newer ones are
    # kept; older ones are pruned as this run commits its own).
    allow_fresh_start: bool = False
    # Resume although the data settings changed since the checkpoint (shards, mixture, packing,
    # shuffle, seed, epochs, data-parallel ranks): the data stream restarts from the start of the
    # new settings, in a warning naming each change. Off: such a resume is an error naming them.
    restart_changed_data: bool = False

    def __post_init__(self) -> None:
        refuse_below("checkpoint", self, {"save_every": 1, "keep_last": 1})


# The longest a rendezvous or a collective waits for a rank: one silent for a day is gone; 1e300 s
# was an OverflowError (datetime.timedelta's range) once the process group started.
MAX_TIMEOUT_S = 86400.0


@dataclass
class DistributedConfig:
    """Process-group set-up (``training/distributed.py``); each timeout in (0, ``MAX_TIMEOUT_S``]."""

    init_timeout_s: float = 600.0  # how long the rendezvous and every collective wait
    preflight_timeout_s: float = 60.0  # how long the launch check waits for every rank to answer

    def __post_init__(self) -> None:
        for name in ("init_timeout_s", "preflight_timeout_s"):
            value = getattr(self, name)
            if not 0 < value <= MAX_TIMEOUT_S:  # NaN too
                raise ValueError(f"distributed.{name}={value} must be in (0, {MAX_TIMEOUT_S:g}] seconds")


@dataclass
class TrackingConfig:
    # Any MLflow tracking URI (http://host:5000, sqlite:///...); a bare path is a local SQLite
    # store, the default, which needs no server (one that reads as host:port is refused).
    tracking_uri: str = "outputs/mlflow.db"
    experiment: str = "megatron_cosmos3"
    run_name: str = ""  # the run's name (and folder); empty: from the launcher's job id (TrainConfig.name_run)
    enabled: bool = True
    # At each checkpoint save, generate the fixed held-out samples and log them as media
    # (training/samples.py); false skips them (e.g. tests of other things).
    generation_samples: bool = True
    # Euler steps of those samples: 8 show what the model learnt at little cost beside a save; fewer
    # are cheaper (tests), more are closer to what cosmos3-generate's defaults give.
    sample_steps: int = 8
    # At the end of an attempt (finished, preempted, failed): the longest the last delivery to the
    # server may take; what it does not deliver stays in the run folder's spool for the next attempt.
    flush_timeout_s: float = 30.0


@dataclass
class ProfilingConfig:
    """torch.profiler traces of a window of training steps (``training/profiling.py``;
    docs/DESIGN.md, "Profiling"). Steps are numbered as the logs number them (the first is 1)."""

    enabled: bool = False
    start_step: int = 10  # the first traced step
    steps: int = 3  # how many steps are traced: start_step .. start_step + steps - 1
    ranks: list[int] = field(default_factory=lambda: [0])  # the global ranks that trace
    record_shapes: bool = False  # each operator's input shapes (larger traces)
    with_stack: bool = False  # each operator's Python stack (much larger traces, slower steps)
    # CUDA's allocator history over the window, dumped beside the trace (torch.cuda.memory's
    # snapshot, for pytorch.org/memory_viz); refused at start-up on a rank without CUDA.
    memory_snapshot: bool = False
    folder: str = ""  # empty: <checkpoint.directory>/profiles
    log_to_mlflow: bool = True  # rank 0's trace (and snapshot) as MLflow artifacts under profiles/

    def __post_init__(self) -> None:
        refuse_below("profiling", self, {"start_step": 1, "steps": 1})  # steps count from 1
        if not self.ranks:
            raise ValueError("profiling.ranks=[] names no rank; name one (e.g. [0]) or set profiling.enabled=false")
        if any(isinstance(r, bool) or r < 0 for r in self.ranks) or len(set(self.ranks)) != len(self.ranks):
            raise ValueError(f"profiling.ranks={list(self.ranks)} must be distinct global ranks >= 0")

    @property
    def last_step(self) -> int:
        return self.start_step + self.steps - 1


@dataclass
class StageConfig:
    """One training stage (pre-, mid- or post-training) on top of the model and data config.

    ``init_from`` starts the stage from another stage's checkpoint (a checkpoint folder, or a
    checkpoint directory whose latest is taken) or from a weights folder (``python -m
    megatron_cosmos3.conversion import`` of a Qwen3-VL model): weights only, fresh optimizer and
    step 0. It is ignored once this stage has checkpoints of its own (a resume). Parameter patterns are
    fnmatch-style on parameter names, e.g. ``layers.*.reasoner.*``.
    """

    name: str = "pretrain"
    init_from: str = ""
    freeze: list[str] = field(default_factory=list)
    # pattern -> learning-rate multiplier; the first matching pattern wins, unmatched ones get 1.
    lr_multipliers: dict[str, float] = field(default_factory=dict)
    # Embodiments this stage adds to the model (their projections are new, the backbone is not).
    new_embodiments: dict[str, EmbodimentConfig] = field(default_factory=dict)


@dataclass
class EvalConfig:
    """Held-out loss every ``every`` steps (0 = never) and at the last step, logged as ``eval/*``.

    ``micro_batches`` packs in all, split over the data-parallel ranks, read once and evaluated again
    each time, so the numbers are comparable over the run (and, with synthetic data, across layouts:
    the same packs, the same flow-matching noise).
    With data_source=shards they come from ``datasets`` — held-out shard sets, packed with the
    training data's settings and the stage's task mixture, weighted equally; with synthetic data,
    from their own seed.
    """

    every: int = 0
    micro_batches: int = 2
    datasets: list[DatasetConfig] = field(default_factory=list)
    # The evaluation suite (``eval_suite``), run beside the held-out losses when set: the model in
    # the held-out generated world, logged as eval/<task>/<metric>/<model|oracle|chance>
    # (docs/DESIGN.md, "Evaluation"). Off (null) by default; ``eval.suite={}`` takes its defaults.
    suite: SuiteConfig | None = None

    def __post_init__(self) -> None:
        refuse_below("eval", self, {"every": 0, "micro_batches": 1})


@dataclass
class TrainConfig:
    model: MoTConfig = field(default_factory=MoTConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    flow_matching: FlowMatchingConfig = field(default_factory=FlowMatchingConfig)
    # Where micro-batches come from: "shards" (the streaming loader over WebDataset shards,
    # configured by ``data``) or "synthetic" (random packs with the real layout, ``synthetic``).
    data_source: str = "synthetic"
    data: DataConfig = field(default_factory=DataConfig)
    synthetic: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    parallel: ParallelSizes = field(default_factory=ParallelSizes)
    # Who shards and steps the model: "megatron" (parallel/plan.py: TP/PP/CP/EP/DP, ZeRO-1) or
    # "deepspeed" (training/deepspeed_engine.py: ZeRO-1/2/3 over the data ranks, ``deepspeed``).
    engine: str = "megatron"
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    profiling: ProfilingConfig = field(default_factory=ProfilingConfig)
    stage: StageConfig = field(default_factory=StageConfig)
    # "fp32", "bf16" (bf16 compute, fp32 main weights) or "fp8" (bf16, and Transformer Engine's fp8
    # matmuls in the TE linears: model.linear_impl=te; CUDA only, an error elsewhere).
    precision: str = "fp32"
    recompute: str = "none"  # activation recomputation: "none", "selective" or "full"
    steps: int = 200
    log_every: int = 10
    # Runs without an explicit checkpoint.directory write under <runs_root>/<tracking.run_name>/.
    runs_root: str = "outputs/runs"
    seed: int = 1234
    # Peak dense bf16 FLOP/s of one device, for MFU; 0 = unknown (CPU), MFU not reported.
    peak_flops_per_device: float = 0.0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.log_every < 1:
            raise ValueError(f"steps={self.steps} and log_every={self.log_every} must be >= 1")
        for name, value in (
            ("seed", self.seed),
            ("data.seed", self.data.seed),
            ("data.encoders.pooled_seed", self.data.encoders.pooled_seed),
        ):
            problem = seed_problem(name, value)
            if problem:
                raise ValueError(problem)
        if self.data_source not in ("synthetic", "shards"):
            raise ValueError(f"data_source={self.data_source!r} is not one of ('synthetic', 'shards')")
        if self.data_source == "shards":
            if not self.data.stage:  # the data mixture follows the training stage unless set
                self.data.stage = self.stage.name
            self.data.validate()
        else:
            self._check_synthetic_packs()
        self._check_gpu_paths()
        if self.recompute not in ("none", "selective", "full"):
            raise ValueError(f"recompute={self.recompute!r} is not one of ('none', 'selective', 'full')")
        check_engine_mix(self.engine, self.parallel, self.deepspeed)
        # Sizes the model can never be split by (heads, KV heads, FFN units, layers, experts) are
        # refused here by name; the world size is checked at launch (train.main), before any group.
        self.parallel.validate_for_model(self.model, self.model.num_experts)
        unaligned = fp8_unaligned_widths(self.model, self.parallel.tensor) if self.precision == "fp8" else {}
        if unaligned:  # after the sizes are checked: TE would refuse these in the first step's first GEMM
            raise ValueError(
                f"precision='fp8': Transformer Engine's fp8 GEMMs take widths that are multiples of "
                f"{FP8_WIDTH_MULTIPLE}, but with parallel.tensor={self.parallel.tensor} the TE linears have "
                + ", ".join(f"{name} = {width}" for name, width in unaligned.items())
            )
        # Interleaved 1F1B cycles its chunks in groups of `pipeline` micro-batches (as Megatron's): a
        # step of another count failed in its first schedule, after the model was built.
        sizes = self.parallel
        if sizes.virtual_pipeline > 1 and self.optimizer.micro_batches_per_step % sizes.pipeline:
            raise ValueError(
                f"optimizer.micro_batches_per_step={self.optimizer.micro_batches_per_step} (per data-parallel rank) "
                f"is not a multiple of parallel.pipeline={sizes.pipeline}, which the interleaved schedule "
                f"(parallel.virtual_pipeline={sizes.virtual_pipeline}) needs"
            )
        if self.engine != "megatron" and self.parallel.ddp_impl != "torch":
            raise ValueError(
                f"parallel.ddp_impl={self.parallel.ddp_impl!r} is engine=megatron's; engine={self.engine!r}"
            )
        if self.profiling.enabled and self.profiling.last_step > self.steps:
            raise ValueError(
                f"profiling: start_step={self.profiling.start_step} and steps={self.profiling.steps} trace up to "
                f"step {self.profiling.last_step}, past the run's steps={self.steps}"
            )
        negative = {pattern: m for pattern, m in self.stage.lr_multipliers.items() if m < 0}
        if negative:
            raise ValueError(f"stage.lr_multipliers {negative}: a learning-rate multiplier must be >= 0")
        if self.peak_flops_per_device < 0:
            raise ValueError(f"peak_flops_per_device={self.peak_flops_per_device} must be >= 0 (0: unknown)")
        if self.tracking.enabled and not self.tracking.tracking_uri:
            raise ValueError("tracking.tracking_uri is empty; name an MLflow URI or a path, or tracking.enabled=false")
        address = address_without_scheme(self.tracking.tracking_uri) if self.tracking.enabled else None
        if address:  # the run would write a local file of that name and the server would see nothing
            raise ValueError(
                f"tracking.tracking_uri={self.tracking.tracking_uri!r} {address}: a server takes http://host:port "
                "(or https://); a local SQLite store a path (./name for one that holds ':') or sqlite:///path"
            )
        if self.tracking.flush_timeout_s < 0:
            raise ValueError(f"tracking.flush_timeout_s={self.tracking.flush_timeout_s} must be >= 0")
        if isinstance(self.tracking.sample_steps, bool) or not 1 <= self.tracking.sample_steps <= MAX_STEPS:
            raise ValueError(
                f"tracking.sample_steps={self.tracking.sample_steps} must be in [1, {MAX_STEPS}] (solvers.MAX_STEPS)"
            )
        if self.tracking.enabled and not self.tracking.experiment.strip():  # MLflow refuses it, at every retry
            raise ValueError("tracking.experiment is empty; name an MLflow experiment, or tracking.enabled=false")
        clash = sorted(set(self.stage.new_embodiments) & set(self.model.embodiments))
        if clash:
            raise ValueError(f"stage.new_embodiments {clash} are already model.embodiments")
        if self.stage.new_embodiments:  # checked as the model's own are (a width of 0 was found at build)
            try:
                _ = self.stage_model  # MoTConfig checks every embodiment
            except ValueError as error:
                raise ValueError(f"stage.new_embodiments: {error}") from None
        self._check_action_tasks()
        if self.eval.every and self.data_source == "shards":
            self.held_out_data().validate()
        if self.trains_vision:
            self._check_vision()
        self._check_tokenizer_vocabulary()
        if self.eval.suite is not None:
            check_model_embodiments(self.stage_model)

    def _check_synthetic_packs(self) -> None:
        """The data settings both sources read (``DataConfig.validate_shared``), and a synthetic pack
        keeps the packing limits a pack of shards keeps: at most ``max_samples_per_pack``
        samples, and no more than fit ``tokens_per_pack`` at their fewest tokens (the prompt's,
        ``fewest_sample_tokens``). samples_per_pack=10**8 ran out of memory building the first pack."""
        from megatron_cosmos3.data.synthetic_packs import fewest_sample_tokens

        self.data.validate_shared()
        if self.model.vocab_size < 3:  # the packs' text ids were drawn from an empty range inside the first step
            raise ValueError(
                f"model.vocab_size={self.model.vocab_size}: synthetic packs take EOS and BOG as the last two ids "
                "and text from the ids below them, so need vocab_size >= 3"
            )
        s, p = self.synthetic, self.data.packing
        if p.max_samples_per_pack and s.samples_per_pack > p.max_samples_per_pack:
            raise ValueError(
                f"synthetic.samples_per_pack={s.samples_per_pack} is above "
                f"data.packing.max_samples_per_pack={p.max_samples_per_pack}"
            )
        fewest = fewest_sample_tokens(s.scale)
        if s.samples_per_pack * fewest > p.tokens_per_pack:
            raise ValueError(
                f"synthetic.samples_per_pack={s.samples_per_pack} samples of at least {fewest} tokens each "
                f"(synthetic.scale={s.scale}) do not fit data.packing.tokens_per_pack={p.tokens_per_pack}"
            )

    def _check_tokenizer_vocabulary(self) -> None:
        """Shards and the eval suite read text with the tokenizer, whose ids must all be rows of the
        embedding: the byte tokenizer's 256 where ``data.tokenizer.path`` is empty, else every id of
        the folder's ``tokenizer.json`` (added and special tokens included) and the BOG id. Either was
        a ValueError from every rank once the run had started (the suite's, after the first steps)."""
        if not self.reads_media:
            return
        vocab = self.model.vocab_size
        if self.data.tokenizer.path:
            HFTokenizer(self.data.tokenizer, vocab)  # its errors name model.vocab_size, the path and the ids
        elif vocab < BYTE_VOCAB_SIZE:
            readers = "data_source=shards" if self.data_source == "shards" else "eval.suite"
            raise ValueError(
                f"model.vocab_size={vocab} is below the byte tokenizer's {BYTE_VOCAB_SIZE} ids, which {readers} "
                "reads text with (data.tokenizer.path is empty): give vocab_size >= 256 or a tokenizer folder"
            )

    def _check_action_tasks(self) -> None:
        """A task with an action stream needs an embodiment to give it a head (a model of video and
        audio alone: ``model.embodiments={}``); its packs failed inside the first step."""
        if self.stage_model.embodiments:
            return
        acting = [task for task in task_table(self) if Modality.ACTIONS in get_task(task).requires]
        if acting:
            where = f"data.stages.{self.data.stage}.tasks" if self.data_source == "shards" else "synthetic.tasks"
            raise ValueError(
                f"{where} lists {acting}, which need an action stream, but model.embodiments is empty "
                "(and so is stage.new_embodiments): give the model an embodiment or leave those tasks out"
            )

    def _check_gpu_paths(self) -> None:
        """The precision and GPU-path switches that cannot work together, on any machine (whether
        CUDA and Transformer Engine are present is checked when the run starts: ``check_precision``)."""
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r} is not one of {PRECISIONS}")
        if self.model.attention_backend == "te" and self.precision == "fp32":
            raise ValueError(
                "model.attention_backend='te' runs bf16 (TE's THD attention has no fp32 kernel), but "
                "precision='fp32'; use precision=bf16 or fp8"
            )
        if self.model.linear_impl == "te" and self.engine != "megatron":
            raise ValueError(
                f"model.linear_impl='te' is applied by engine=megatron's parallel plan, got engine={self.engine!r}"
            )
        if self.precision != "fp8":
            return
        if self.model.linear_impl != "te":
            raise ValueError(
                f"precision='fp8' quantizes Transformer Engine linears only, but model.linear_impl="
                f"{self.model.linear_impl!r}; set model.linear_impl=te"
            )
        if self.recompute == "full":  # "selective" recomputes only the attention, which is not fp8
            raise ValueError(
                "precision='fp8' with recompute='full': torch's activation checkpointing recomputes the TE linears "
                "outside TE's fp8 autocast, so backward would see other numerics; use recompute=selective or none"
            )

    def name_run(self, launcher_run_id: str) -> None:
        """Names the run where the config leaves it open: ``tracking.run_name`` from the launcher's
        id (SLURM's job id: a requeued job keeps its name and resumes; torchrun's run id), and
        ``checkpoint.directory`` as the run's own folder ``<runs_root>/<run name>/checkpoints``, so a
        run with no overrides never resumes nor overwrites another run's checkpoints."""
        if not self.tracking.run_name:  # one process launched by hand: named by its start time
            self.tracking.run_name = f"job-{launcher_run_id}" if launcher_run_id else time.strftime("run-%Y%m%d-%H%M%S")
        if not self.checkpoint.directory:
            name = self.tracking.run_name
            # The name is a folder under runs_root: '../x' or '/x' would write outside it.
            if name in (".", "..") or "/" in name or "\0" in name or len(name.encode()) > 255:
                raise ValueError(
                    f"tracking.run_name={name[:80]!r}{'...' if len(name) > 80 else ''} ({len(name)} characters) names "
                    f"the run's folder under runs_root: one folder name (no '/', not '.' or '..', at most 255 "
                    "bytes), or set checkpoint.directory"
                )
            self.checkpoint.directory = os.path.join(self.runs_root, name, "checkpoints")

    def check_paths(self) -> None:
        """ValueError naming the field for a path this run cannot use. Called by ``main`` before
        any process group starts (not at load: a config may be written before its data exists)."""
        directory = self.checkpoint.directory
        if os.path.exists(directory) and not os.path.isdir(directory):
            raise ValueError(f"checkpoint.directory={directory!r} exists and is not a directory")
        # The run's folder is made under runs_root (``name_run``): a file there is named as itself,
        # before the checkpoint folder below it is found unwritable for that reason.
        root = self.runs_root
        if os.path.exists(root) and not os.path.isdir(root):
            raise ValueError(f"runs_root={root!r} exists and is not a directory")
        # Read-only, no permission, under /proc: the run lock's OSError was a traceback from every rank.
        reason = unwritable_reason(directory) if directory else None
        if reason is not None:
            raise ValueError(f"checkpoint.directory={directory!r} is not a folder this run can write to ({reason})")
        store = self.tracking.tracking_uri  # a bare path is an SQLite file (training/tracking.py)
        file_store_allowed = os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").strip().lower() in ("true", "1")
        if self.tracking.enabled and store.startswith("file:") and not file_store_allowed:
            # MLflow refuses its file store unless told otherwise: the run would train untracked.
            raise ValueError(
                f"tracking.tracking_uri={store!r} is MLflow's file store, which MLflow refuses unless "
                "MLFLOW_ALLOW_FILE_STORE=true; name an SQLite file (a path) or a server (http://...)"
            )
        if self.tracking.enabled and is_local_path(store):
            if os.path.isdir(store):
                raise ValueError(f"tracking.tracking_uri={store!r} is a folder, not an SQLite file")
            if os.path.isfile(store):
                with open(store, "rb") as f:
                    head = f.read(16)
                if head and head != b"SQLite format 3\x00":  # MLflow would only warn, and track nothing
                    raise ValueError(f"tracking.tracking_uri={store!r} is a file that is not an SQLite database")
        if self.stage.init_from and not os.path.exists(self.stage.init_from):
            raise ValueError(f"stage.init_from={self.stage.init_from!r} does not exist")
        if self.data_source == "shards":
            self.data.check_paths()
            if self.eval.every:
                self.held_out_data().check_paths("eval")
            self._check_action_stats()

    def _check_action_stats(self) -> None:
        """ValueError naming the dataset, its statistics file and the embodiment where the file's
        width differs from the embodiment's ``action_dim`` in this stage's model (every action of
        that dataset would otherwise fail to normalise, one skipped sample at a time)."""
        from megatron_cosmos3.data.loader import datasets_action_stats

        embodiments = self.stage_model.embodiments
        found = datasets_action_stats(self.data.datasets)  # a malformed file: ValueError naming it
        for dataset in self.data.datasets:
            stats = found.get(dataset.name)
            for kind, entry in (stats.embodiments if stats is not None else {}).items():
                if kind in embodiments and entry.dim != embodiments[kind].action_dim:
                    raise ValueError(
                        f"data.datasets[{dataset.name}].action_stats={dataset.action_stats!r}: '{kind}' has "
                        f"{entry.dim} dims, but model.embodiments.{kind}.action_dim={embodiments[kind].action_dim}"
                    )

    def held_out_data(self) -> DataConfig:
        """The loader config of the held-out packs (``EvalConfig``): the training data's settings
        over ``eval.datasets``, in one pass of the stage's task mixture."""
        if not self.eval.datasets:
            raise ValueError("eval.every > 0 with data_source=shards needs eval.datasets (held-out shard sets)")
        names = [d.name for d in self.eval.datasets]
        mixture = MixtureConfig({name: 1.0 for name in names}, dict(self.data.active_stage.tasks))
        return dataclasses.replace(
            self.data, datasets=list(self.eval.datasets), stages={self.data.stage: mixture}, epochs=0
        )

    @property
    def stage_model(self) -> MoTConfig:
        """The model this stage trains, as its data sees it: ``model`` with the embodiments the stage
        adds (``stage.new_embodiments``: a post-training stage's new robot), the action streams its
        shards may hold. ``train.build_model`` grows the model itself the same way."""
        return dataclasses.replace(self.model, embodiments={**self.model.embodiments, **self.stage.new_embodiments})

    @property
    def reads_media(self) -> bool:
        """Shards or the eval suite's world turn media into tokens (synthetic packs are made at the
        model's own widths): their pictures follow the ViT's fixed grid."""
        return self.data_source == "shards" or self.eval.suite is not None

    @property
    def trains_vision(self) -> bool:
        """The model holds its own ViT, which encodes the packs' pictures in the step and trains:
        exactly when ``model.vision`` (the ViT's config) is set. Without it the loader puts the
        weight-free stand-in features into the ViT rows (``data/vision_features.py``)."""
        return self.model.vision is not None

    def _check_vision(self) -> None:
        from megatron_cosmos3.data.vision_features import check_vit_token_size

        if self.reads_media:  # pictures cut on the data's grid
            check_vit_token_size(self.model.vision)
        # The ViT's DeepStack layers on the first pipeline chunk: ParallelSizes.validate_for_model.


def task_table(config: TrainConfig) -> list[str]:
    """The tasks this run can train on, in a fixed order (the per-task metric slots)."""
    if config.data_source == "shards":
        return sorted(config.data.active_stage.tasks)
    return list(config.synthetic.tasks)


# Keys that no longer exist, and what says the same now: a clear error instead of OmegaConf's.
REMOVED_KEYS = {
    "data.vision": "the model trains its own ViT exactly when model.vision (the ViT's config) is set; "
    "model.vision=null keeps the weight-free stand-in features",
}


def _refuse_removed_keys(node, source: str) -> None:
    if not isinstance(node, DictConfig):  # a YAML list: merge_config_layer names it
        return
    for key, instead in REMOVED_KEYS.items():
        if OmegaConf.select(node, key, default=None) is not None:
            raise ValueError(f"{key} (in {source}) is no longer a setting: {instead}")


def _refuse_non_finite(node, source: str) -> None:
    """ValueError naming the key of the first NaN or infinite number in ``node`` (an OmegaConf tree):
    no setting of this tree means anything at NaN or infinity, and the dataclasses' range checks
    (``lr > 0``, ``grad_clip > 0``) let NaN through, since every comparison with it is false."""

    def walk(key: str, value) -> None:
        if isinstance(value, dict):
            for name, item in value.items():
                walk(f"{key}.{name}" if key else str(name), item)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                walk(f"{key}[{i}]", item)
        elif isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{key}={value} (in {source}) must be a finite number")

    try:
        resolved = OmegaConf.to_container(node, resolve=True)
    except InterpolationResolutionError as error:  # found after the layer that wrote it: name that layer
        raise ValueError(f"{source}: {error}") from None
    walk("", resolved)


def _one_line(error: Exception) -> str:
    """``error``'s text on one line: OmegaConf and the YAML parser add indented 'full_key:' and
    'in "<file>", line N' lines, and the console command prints one line."""
    return " ".join(str(error).split())


@functools.cache
def _schema() -> DictConfig:
    """The training config's schema and defaults, built once: ``OmegaConf.structured`` walks every
    dataclass (most of a load's time), a copy of its result is several times cheaper."""
    return OmegaConf.structured(TrainConfig)


def load_config(yaml_path: str | list[str] | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Schema defaults <- YAML file(s), later ones winning <- ``key=value`` overrides, validated.
    A file's ``model.embodiments``, or the override ``model.embodiments={...}``, lists the model's
    embodiments (``model.config.WHOLE_MAPPINGS``)."""
    merged = copy.deepcopy(_schema())  # a copy: the layers merge into it
    for path in [yaml_path] if isinstance(yaml_path, str) else yaml_path or []:
        refuse_irregular_file("--config", path)
        try:
            refuse_long_integers(Path(path).read_bytes().decode("utf-8", errors="replace"))
            layer = OmegaConf.load(path)
            _refuse_removed_keys(layer, path)
            merged = merge_config_layer(merged, layer, "model.")
        except OSError as error:
            if error.errno is not None:  # unreadable: the system's error names the path
                raise
            raise ValueError(f"{path}: {error}") from None  # OmegaConf's 'Invalid loaded object type' (a YAML scalar)
        except Exception as error:  # YAML syntax, an unknown key, a wrong type: name the file too
            raise ValueError(f"{path}: {type(error).__name__}: {_one_line(error)}") from None
        _refuse_non_finite(merged, path)
    if overrides:
        for override in overrides:
            key, _, value = override.partition("=")
            refuse_long_integers(value, key.strip())  # the value alone: its key names it
            try:  # OmegaConf parses each value as YAML; its YAMLError named no override (a traceback)
                OmegaConf.from_dotlist([override])
            except yaml.YAMLError as error:
                raise ValueError(f"the overrides: {override!r} is not key=<YAML value>: {_one_line(error)}") from None
        try:
            layer = OmegaConf.from_dotlist(list(overrides))
            _refuse_removed_keys(layer, "the overrides")
            given = [item.split("=", 1)[0].strip() for item in overrides]
            merged = merge_config_layer(merged, layer, "model.", given)
        except OmegaConfBaseException as error:
            # An unknown key is a KeyError (ConfigKeyError), which the console command let through as a
            # traceback; a wrong type OmegaConf's ValidationError. One line each, as a file's: OmegaConf's
            # text names the key (and the nearest known one) or the value.
            raise ValueError(f"the overrides: {type(error).__name__}: {_one_line(error)}") from None
        _refuse_non_finite(merged, "the overrides")
    try:
        return OmegaConf.to_object(merged)
    except ValueError as error:
        # The suite's own checks name its fields as its standalone config does ('eval suite: steps=...');
        # here they are eval.suite.<field>.
        message = str(error)
        if message.startswith(SUITE_PREFIX):
            raise ValueError(f"eval.suite.{message.removeprefix(SUITE_PREFIX)}") from None
        raise


def config_from_yaml(text: str, source: str) -> TrainConfig:
    """A config saved with ``to_yaml`` (a checkpoint's meta.json, a release folder), validated;
    ValueError naming ``source`` and the problem otherwise."""
    try:
        refuse_long_integers(text)
        layer = OmegaConf.create(text)
        _refuse_removed_keys(layer, source)
        merged = merge_config_layer(copy.deepcopy(_schema()), layer, "model.")
        _refuse_non_finite(merged, source)
        return OmegaConf.to_object(merged)
    except Exception as error:  # YAML, OmegaConf and validation errors name the key; add where it came from
        raise ValueError(f"{source}: not a valid training config: {error}") from None


def _absolute(path: str) -> str:
    """A local path made absolute against the current directory; "", URLs and pipes unchanged."""
    if not path or "://" in path or path.startswith("pipe:"):
        return path
    if path.startswith("file:"):
        return "file:" + os.path.abspath(path.removeprefix("file:"))
    return os.path.abspath(path)


def with_absolute_paths(config: TrainConfig) -> TrainConfig:
    """A copy whose local file paths (tokenizer, VAEs, shards, action statistics, init_from, the
    run folders, the profiles' folder) are absolute: what a checkpoint records, so that
    ``cosmos3-generate`` or a later stage run from another directory reads the files this run read
    (docs/DESIGN.md, "Checkpoints")."""
    config = copy.deepcopy(config)
    data = config.data
    data.tokenizer.path = _absolute(data.tokenizer.path)
    data.encoders.video_vae_path = _absolute(data.encoders.video_vae_path)
    data.encoders.audio_vae_path = _absolute(data.encoders.audio_vae_path)
    for dataset in [*data.datasets, *config.eval.datasets]:
        dataset.shards = [_absolute(entry) for entry in dataset.shards]
        if dataset.action_stats not in ("", "auto"):
            dataset.action_stats = _absolute(dataset.action_stats)
    config.stage.init_from = _absolute(config.stage.init_from)
    config.checkpoint.directory = _absolute(config.checkpoint.directory)
    config.profiling.folder = _absolute(config.profiling.folder)
    config.runs_root = _absolute(config.runs_root)
    return config


def to_yaml(config: TrainConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def flatten(config: TrainConfig) -> dict[str, str]:
    """The resolved config as flat ``section.key -> value`` strings (MLflow params)."""
    flat: dict[str, str] = {}

    def walk(prefix: str, node) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else str(key), value)
        else:
            flat[prefix] = str(node)

    walk("", OmegaConf.to_container(OmegaConf.structured(config)))
    return flat
