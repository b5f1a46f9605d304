"""The ``data:`` section of the config tree (OmegaConf structured dataclasses).

Datasets are named shard sets; each *stage* (pre-, mid-, post-training) has a mixture: weights over
datasets (shares of samples) and weights over tasks. ``stage`` picks the active one (a training
config can tie it to its own stage: ``data.stage: ${stage.name}``). Everything is validated by
``validate`` before any process group or worker starts.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from megatron_cosmos3.config_files import refuse_irregular_file
from megatron_cosmos3.data.clips import MediaConfig
from megatron_cosmos3.data.determinism import hash64
from megatron_cosmos3.data.shards import local_entry_problem, resolve_shards
from megatron_cosmos3.data.tokenizer import TOKENIZER_FILE, TokenizerConfig
from megatron_cosmos3.encoders.latent_config import LatentEncoderConfig
from megatron_cosmos3.model.config import refuse_below
from megatron_cosmos3.tasks.mixture import TaskMixture


@dataclass
class DatasetConfig:
    """One shard set.

    shards: directories with an index.json, index files, or WebDataset URL patterns (local paths,
        http(s)://, pipe:<command>, brace expansion) — see ``data/shards.py``.
    resample: draw shards with replacement, independently on every rank (endless; for small or
        many-source data) instead of splitting each epoch's shard permutation across ranks.
    action_stats: action_stats.json for normalising actions: "auto" = beside the first index,
        when present; "" = none; else a path.
    """

    name: str = ""
    shards: list[str] = field(default_factory=list)
    resample: bool = False
    action_stats: str = "auto"


@dataclass
class MixtureConfig:
    """One stage's mixture: dataset name -> weight (share of samples), task name -> weight."""

    datasets: dict[str, float] = field(default_factory=dict)
    tasks: dict[str, float] = field(default_factory=dict)


@dataclass
class PackingConfig:
    """tokens_per_pack: AR + DM token budget of one micro-batch. pool_size: samples the packer
    chooses from (larger packs fuller). max_samples_per_pack: 0 = no limit. max_sample_tokens:
    longer samples are cropped in time (0 = tokens_per_pack). max_text_tokens: per text field."""

    tokens_per_pack: int = 4096
    pool_size: int = 64
    max_samples_per_pack: int = 0
    max_sample_tokens: int = 0
    max_text_tokens: int = 256

    @property
    def sample_token_limit(self) -> int:
        return self.max_sample_tokens or self.tokens_per_pack


@dataclass
class ErrorBudgetConfig:
    """Stop when more than max_error_fraction of the samples read are bad (after min_samples)."""

    max_error_fraction: float = 0.05
    min_samples: int = 200


@dataclass
class DataConfig:
    """The loader: datasets, stage mixtures, packing, shuffling, workers, error budget, encoders.

    shuffle_buffer: samples in the cross-shard shuffle buffer (0 = none).
    num_workers: dataloader worker processes (0 = in the training process); the sample stream is
        the same for every value, so it may change between a save and a resume.
    epochs: 0 = endless (training); N = N passes over a single, non-resampled dataset.
    tokenizer: bytes (default) or a local Hugging Face tokenizer (``data/tokenizer.py``).
    media: how clips are cut from media (frame rate, resolution buckets, clip length:
        ``data/clips.py``); the default takes whole samples at their own rate and size.
    prompt_dropout: the probability that a sample of a generation task (one with DM targets) is
        built with an empty prompt, which trains the unconditional model classifier-free guidance
        needs (docs/DESIGN.md, "Generation"); drawn from (seed, slot, index), so a resume is exact.
    """

    datasets: list[DatasetConfig] = field(default_factory=list)
    stages: dict[str, MixtureConfig] = field(default_factory=dict)
    stage: str = ""
    packing: PackingConfig = field(default_factory=PackingConfig)
    shuffle_buffer: int = 256
    num_workers: int = 2
    prefetch_factor: int = 2
    seed: int = 0
    epochs: int = 0
    error_budget: ErrorBudgetConfig = field(default_factory=ErrorBudgetConfig)
    encoders: LatentEncoderConfig = field(default_factory=LatentEncoderConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    prompt_dropout: float = 0.0
    media: MediaConfig = field(default_factory=MediaConfig)

    def validate_shared(self) -> None:
        """ValueError naming the field of the settings a run reads whatever its data source: the
        ``packing`` limits a pack of shards and a synthetic pack (``training.config``) both keep,
        whose text cap, tokenizer and encoders the training samples and the eval suite use too."""
        p = self.packing
        refuse_below("data.packing", p, {"tokens_per_pack": 1, "pool_size": 1, "max_text_tokens": 1})
        if not 0 <= p.max_sample_tokens <= p.tokens_per_pack:
            raise ValueError(
                f"data.packing.max_sample_tokens={p.max_sample_tokens} must be in "
                f"[0, tokens_per_pack={p.tokens_per_pack}]"
            )
        refuse_below("data.packing", p, {"max_samples_per_pack": 0})
        # The loader's scalars, whatever the data source (a synthetic run took -3 workers silently).
        refuse_below("data", self, {"shuffle_buffer": 0, "num_workers": 0, "prefetch_factor": 1, "epochs": 0})
        if not 0.0 <= self.prompt_dropout <= 1.0:
            raise ValueError(f"data.prompt_dropout={self.prompt_dropout!r} must be in [0, 1]")
        budget = self.error_budget
        if not 0 <= budget.max_error_fraction <= 1:
            raise ValueError(f"data.error_budget.max_error_fraction={budget.max_error_fraction!r} must be in [0, 1]")
        refuse_below("data.error_budget", budget, {"min_samples": 0})
        try:
            self.media.validate()
        except ValueError as error:  # its messages name media.<field>
            raise ValueError(f"data.{error}") from None
        tokenizer_file = Path(self.tokenizer.path) / TOKENIZER_FILE
        if self.tokenizer.path and not tokenizer_file.is_file():
            raise ValueError(
                f"data: tokenizer.path={self.tokenizer.path!r} holds no {TOKENIZER_FILE} (a local Hugging Face "
                "tokenizer folder)"
            )
        self.encoders.validate()

    def validate(self) -> None:
        """ValueError naming the field for any inconsistency."""

        def require(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(f"data: {message}")

        names = [d.name for d in self.datasets]
        require(bool(names), "datasets is empty")
        require(
            all(names) and len(set(names)) == len(names), f"dataset names must be non-empty and distinct, got {names}"
        )
        for d in self.datasets:
            require(bool(d.shards), f"datasets[{d.name}].shards is empty")

        require(self.stage in self.stages, f"stage={self.stage!r} is not one of stages {sorted(self.stages)}")
        # Every stage, not only the active one: a later run that switches stage must not find it broken.
        for name, mixture in self.stages.items():
            self._validate_stage(name, mixture, names)
        stage = self.stages[self.stage]
        self.validate_shared()
        active = [d for d in self.datasets if stage.datasets.get(d.name, 0) > 0]
        require(
            self.epochs == 0 or (len(active) == 1 and not active[0].resample),
            "epochs > 0 (a finite stream) needs exactly one active, non-resampled dataset",
        )

    @staticmethod
    def _validate_stage(name: str, stage: MixtureConfig, datasets: list[str]) -> None:
        """ValueError naming ``stages.<name>`` and the value: unknown datasets, weights, tasks."""
        field = f"data: stages.{name}"
        unknown = sorted(set(stage.datasets) - set(datasets))
        if unknown:
            raise ValueError(f"{field}.datasets names unknown datasets {unknown} (known: {datasets})")
        weights = dict(stage.datasets)
        if not (any(w > 0 for w in weights.values()) and all(w >= 0 for w in weights.values())):
            raise ValueError(f"{field}.datasets needs non-negative weights, one positive, got {weights}")
        # 1e308 twice sums to inf, and every share would then be 0: the blend would silently pick one.
        if not math.isfinite(sum(weights.values())):
            raise ValueError(f"{field}.datasets weights must have a finite sum, got {weights}")
        try:
            TaskMixture(dict(stage.tasks))
        except ValueError as error:
            raise ValueError(f"{field}.tasks: {error}") from None

    def check_paths(self, field_prefix: str = "data") -> None:
        """ValueError naming the field for a local shard path or action-stats file that cannot be
        read (called before any process group starts, not at load: a config may predate its data)."""
        for d in self.datasets:
            for j, entry in enumerate(d.shards):
                problem = local_entry_problem(entry)
                if problem is not None:
                    raise ValueError(f"{field_prefix}.datasets[{d.name}].shards[{j}]={entry!r}: {problem}")
            try:
                resolve_shards(list(d.shards))
            except ValueError as error:
                raise ValueError(f"{field_prefix}.datasets[{d.name}].shards: {error}") from None
            if d.action_stats not in ("auto", ""):
                refuse_irregular_file(f"{field_prefix}.datasets[{d.name}].action_stats", d.action_stats)

    @property
    def active_stage(self) -> MixtureConfig:
        return self.stages[self.stage]

    def fingerprint(self) -> int:
        """A hash of everything that decides the sample stream (``stream_settings``): loader state
        saved under one fingerprint only resumes under the same one."""
        return hash64(json.dumps(self.stream_settings(), sort_keys=True))

    def stream_settings(self) -> dict:
        """Everything that decides the sample stream, as JSON-able values (workers and prefetching
        excluded): saved with the loader state, so a resume under other settings names each one."""
        decisive = asdict(self)
        for name in ("num_workers", "prefetch_factor", "error_budget"):
            decisive.pop(name)
        decisive["stages"] = {self.stage: decisive["stages"][self.stage]}  # other stages do not matter
        if not self.prompt_dropout:  # loader states saved before the field existed still resume
            decisive.pop("prompt_dropout")
        if self.media == MediaConfig():  # nor those saved before media clips existed
            decisive.pop("media")
        return decisive
