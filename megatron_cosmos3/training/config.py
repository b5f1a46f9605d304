"""The training config tree: typed dataclasses (OmegaConf structured configs), YAML, CLI overrides.

Everything is validated here, before any process group starts: a bad value is a clear error on
every rank at once, not a hang inside a collective.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import OmegaConf

from megatron_cosmos3.model.config import MoTConfig
from megatron_cosmos3.training.flow_matching import FlowMatchingConfig


@dataclass
class OptimizerConfig:
    lr: float = 3e-3
    min_lr: float = 3e-4
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    warmup_steps: int = 10
    grad_clip: float = 1.0
    flow_matching_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"optimizer: need 0 <= min_lr <= lr and lr > 0, got lr={self.lr}, min_lr={self.min_lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optimizer.betas must be two values in [0, 1), got {list(self.betas)}")
        if self.warmup_steps < 0 or self.grad_clip <= 0:
            raise ValueError(f"optimizer: warmup_steps={self.warmup_steps} must be >= 0 and grad_clip={self.grad_clip} > 0")


@dataclass
class SyntheticDataConfig:
    """Random packs with the real layout (the backbone milestone's data; shards replace it)."""

    samples_per_pack: int = 8
    tasks: list[str] = field(default_factory=lambda: ["understanding", "text_to_video", "image_to_video",
                                                      "video_to_audio", "forward_dynamics", "policy"])
    scale: int = 2

    def __post_init__(self) -> None:
        from megatron_cosmos3.data.synthetic_packs import TASKS

        unknown = sorted(set(self.tasks) - set(TASKS))
        if unknown or not self.tasks:
            raise ValueError(f"data.tasks: unknown tasks {unknown} (known: {list(TASKS)})")
        if self.samples_per_pack < 1 or self.scale < 1:
            raise ValueError(f"data: samples_per_pack={self.samples_per_pack} and scale={self.scale} must be >= 1")


@dataclass
class CheckpointConfig:
    directory: str = "outputs/checkpoints"
    save_every: int = 100  # steps; the last step is always saved
    keep_last: int = 2
    resume: bool = True  # continue from the latest committed checkpoint in ``directory`` if any

    def __post_init__(self) -> None:
        if self.save_every < 1 or self.keep_last < 1:
            raise ValueError(f"checkpoint: save_every={self.save_every} and keep_last={self.keep_last} must be >= 1")


@dataclass
class TrackingConfig:
    # Any MLflow tracking URI (http://host:5000, sqlite:///...); a bare path is a local SQLite
    # store, the default, which needs no server.
    tracking_uri: str = "outputs/mlflow.db"
    experiment: str = "megatron_cosmos3"
    run_name: str = "tiny-mot"
    enabled: bool = True


@dataclass
class TrainConfig:
    model: MoTConfig = field(default_factory=MoTConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    flow_matching: FlowMatchingConfig = field(default_factory=FlowMatchingConfig)
    data: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    steps: int = 200
    log_every: int = 10
    seed: int = 1234
    # Peak dense bf16 FLOP/s of one device, for MFU; 0 = unknown (CPU), MFU not reported.
    peak_flops_per_device: float = 0.0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.log_every < 1:
            raise ValueError(f"steps={self.steps} and log_every={self.log_every} must be >= 1")


def load_config(yaml_path: str | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Schema defaults <- YAML file <- ``key=value`` overrides, validated into a TrainConfig."""
    merged = OmegaConf.structured(TrainConfig)
    if yaml_path:
        merged = OmegaConf.merge(merged, OmegaConf.load(yaml_path))
    if overrides:
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
    return OmegaConf.to_object(merged)


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
