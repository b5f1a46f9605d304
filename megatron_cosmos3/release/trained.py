"""A trained model, loaded for generation or export (docs/DESIGN.md, "Release").

``load_trained_model(path)`` takes what training or export wrote — a ``step_<N>`` checkpoint folder,
a checkpoint directory (its ``latest``), or a release folder (``model.yaml`` + safetensors,
``export.write_release_folder`` or ``conversion import``) — and returns the model as it was trained
(ViT and every embodiment's action projections included) with the run's resolved config, its step
and where it came from.

The model is built the way training built it (``training.train.build_model`` through a
``ParallelPlan``): in one process without torch.distributed, or inside an initialised process group
with the given ``ParallelSizes``, each rank holding its part (tensor-parallel slices, its pipeline
stages). A checkpoint is read through ``checkpoint.checkpointer.load_state`` — torch.distributed.
checkpoint reshards the saved global tensors to this layout, never unpickles code, and checks each
file against ``checksums.json`` before reading it — a release folder through
``checkpoint.weights_folder``, after its own ``checksums.json`` is verified. Nothing is written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from megatron_cosmos3.checkpoint.checkpointer import CheckpointMismatchError, inventory, load_state, read_meta
from megatron_cosmos3.checkpoint.engine_layout import CheckpointLayoutError, refuse_foreign
from megatron_cosmos3.checkpoint.finite import NonFiniteWeightsError, require_finite_weights
from megatron_cosmos3.checkpoint.safe_reader import (
    MANIFEST,
    CheckpointCorruptError,
    UnsafeCheckpointError,
    name_inside,
)
from megatron_cosmos3.checkpoint.sharded_state import ShardingMeshes
from megatron_cosmos3.checkpoint.weights_folder import (
    is_weights_folder,
    load_weights_folder,
    verify_weights_folder,
)
from megatron_cosmos3.conversion.mot_folder import CONFIG_FILE
from megatron_cosmos3.conversion.safetensors_io import ConversionError
from megatron_cosmos3.data.loader import datasets_action_stats
from megatron_cosmos3.data.tokenizer import TOKENIZER_FILE, Tokenizer, build_tokenizer
from megatron_cosmos3.encoders.action_normalization import ActionStats
from megatron_cosmos3.json_files import read_json
from megatron_cosmos3.model.config import load_model_config
from megatron_cosmos3.model.mot import MoTModel
from megatron_cosmos3.parallel.plan import ParallelPlan
from megatron_cosmos3.parallel.sizes import ParallelSizes
from megatron_cosmos3.training.config import TrainConfig, config_from_yaml, task_table
from megatron_cosmos3.training.deepspeed_engine import is_deepspeed_checkpoint, load_deepspeed_weights
from megatron_cosmos3.training.train import build_model

# What a release folder holds besides the weights folder of ``conversion`` (model.yaml + safetensors).
RELEASE_CONFIG = "config.yaml"  # the run's resolved training config, the model as trained
RELEASE_INFO = "release.json"  # {"step": N, "source": the checkpoint it was exported from}
ACTION_STATS_DIR = "action_stats"  # <dataset name>.json per dataset with action statistics


class CheckpointLoadError(ValueError):
    """A path that cannot be loaded as a trained model; the message names the path and the field."""


class IncompleteCheckpointError(CheckpointLoadError):
    """A checkpoint whose save never committed (``.step_<N>.partial``, or no meta.json)."""


# What loading a trained model raises for a path or file it cannot use, each naming the file: the
# commands print it as one error line (exit code 2) instead of a traceback.
LOAD_ERRORS = (
    CheckpointLoadError,
    CheckpointLayoutError,
    CheckpointMismatchError,
    CheckpointCorruptError,
    UnsafeCheckpointError,
    ConversionError,
    NonFiniteWeightsError,
)


@dataclass
class TrainedModel:
    """A trained model and what generation needs to lay out its inputs as training did.

    ``model``: eval mode, gradients off; this rank's part under ``plan`` (the whole model in one
    process); its ViT is ``model.vision`` (None if the run trained none), its embodiments
    ``model.config.embodiments`` (those a stage added included). ``config``: the run's resolved
    training config (``data``: tokenizer, latent encoders, packing; ``flow_matching``; ``seed``;
    ``parallel``: the layout it was loaded under).
    ``action_stats``: dataset name -> the action statistics its actions were normalised with.
    ``step``: the training step (None for a weights folder that records none). ``source``: the
    folder read (the step folder a checkpoint directory's ``latest`` names, or the release folder).
    """

    model: MoTModel
    config: TrainConfig
    step: int | None
    source: Path
    plan: ParallelPlan
    action_stats: dict[str, ActionStats] = field(default_factory=dict)

    @property
    def is_release(self) -> bool:
        return is_weights_folder(self.source)

    @property
    def tasks(self) -> list[str]:
        """The tasks the run trained on (``training.config.task_table``)."""
        return task_table(self.config)

    def tokenizer(self) -> Tokenizer:
        """The tokenizer training used (``data.tokenizer``; bytes for the tiny models). CheckpointLoadError
        naming the folder where it does not fit the model's vocabulary (e.g. bytes under a vocab_size
        below 256: a run on synthetic packs never read text)."""
        try:
            return build_tokenizer(self.config.data.tokenizer, self.model.config.vocab_size)
        except ValueError as error:  # its message names model.vocab_size and the tokenizer
            raise CheckpointLoadError(f"{self.source}: {error}") from None


def find_checkpoint(path: str | Path) -> Path:
    """The folder to read for ``path``: ``path`` itself for a committed ``step_<N>`` folder or a
    release folder, the checkpoint ``latest`` names for a checkpoint directory. CheckpointLoadError
    (IncompleteCheckpointError for a save that never committed; CheckpointLayoutError for DeepSpeed's
    universal checkpoint or its files without their step folder) naming the path otherwise."""
    path = Path(path)
    expected = "expected a step_<N> checkpoint folder, a checkpoint directory (with 'latest') or a release folder"
    if not path.exists():
        raise CheckpointLoadError(f"checkpoint path {path} does not exist ({expected})")
    if path.name.endswith(".partial"):
        raise IncompleteCheckpointError(
            f"{path} is an incomplete save (a .partial folder: its save never committed); load a committed "
            "step_<N> folder or the checkpoint directory"
        )
    if not path.is_dir():
        raise CheckpointLoadError(f"{path} is a file, not a checkpoint ({expected})")
    refuse_foreign(path)  # DeepSpeed's universal checkpoint, or its files without their step folder
    if is_weights_folder(path):
        return path
    if (path / ".metadata").is_file() or (path / "meta.json").is_file():  # the loader names a missing index
        if not (path / "meta.json").is_file():
            raise IncompleteCheckpointError(f"checkpoint {path} has no meta.json: its save never committed")
        return path
    found = inventory(path)
    if found.latest is not None and found.problem is None:
        return found.latest
    if found.problem is not None:
        raise CheckpointLoadError(f"checkpoint directory {path}: {found.problem}. {found.describe()}")
    partial = sorted(path.glob(".step_*.partial"))
    if partial:
        raise IncompleteCheckpointError(
            f"checkpoint directory {path} holds only an incomplete save ({partial[-1].name}): no save committed"
        )
    raise CheckpointLoadError(f"{path} is not a checkpoint: it has no .metadata, latest or {CONFIG_FILE} ({expected})")


def _checkpoint_config(folder: Path) -> tuple[TrainConfig, int, dict[str, ActionStats]]:
    """The run's config, step and action statistics: those saved in meta.json (what the run
    normalised with, wherever the checkpoint is read from), else — a checkpoint saved before they
    were — the datasets' files the config names."""
    meta = read_meta(folder)  # checked against checksums.json
    if "config" not in meta:
        raise CheckpointLoadError(
            f"checkpoint {folder}: meta.json has no 'config' (the run's resolved training config), which loading "
            "needs to rebuild the model as trained"
        )
    config = _parse_config(meta["config"], f"{folder / 'meta.json'} 'config'")
    if "action_stats" not in meta:
        return config, int(meta["step"]), _action_stats(config)
    try:
        stats = {
            name: ActionStats.from_document(document, f"{folder / 'meta.json'} action_stats[{name}]")
            for name, document in meta["action_stats"].items()
        }
    except (AttributeError, ValueError) as error:
        raise CheckpointLoadError(f"checkpoint {folder}: {error}") from None
    return config, int(meta["step"]), stats


def _parse_config(text: str, source: str) -> TrainConfig:
    try:
        return config_from_yaml(text, source)
    except ValueError as error:
        raise CheckpointLoadError(str(error)) from None


def _release_config(folder: Path) -> tuple[TrainConfig, int | None]:
    """The release folder's config (paths it stores relative to itself resolved), or, for a
    weights folder ``conversion import`` wrote, the default config around its ``model.yaml``."""
    verified = verify_weights_folder(folder)
    info = _release_info(folder)
    if info and not verified:  # export always writes checksums: without them nothing can be verified
        raise CheckpointLoadError(
            f"release folder {folder}: {RELEASE_INFO} but no {MANIFEST}: the release's files cannot be verified "
            "(a damaged or altered release; export it again)"
        )
    if info and not (folder / RELEASE_CONFIG).is_file():
        raise CheckpointLoadError(
            f"release folder {folder}: no {RELEASE_CONFIG} (the run's resolved training config), which loading needs "
            "to lay out generation as training did"
        )
    if not (folder / RELEASE_CONFIG).is_file():
        config = TrainConfig()
        config.model = load_model_config(folder / CONFIG_FILE)
        if (folder / TOKENIZER_FILE).is_file():  # import copies the Qwen3-VL tokenizer beside the weights
            config.data.tokenizer.path = str(folder)
        return config, info.get("step")
    try:
        raw = OmegaConf.load(folder / RELEASE_CONFIG)
    except Exception as error:  # a YAML or OmegaConf error: name the file
        raise CheckpointLoadError(f"{folder / RELEASE_CONFIG}: not a valid training config: {error}") from None
    tokenizer = OmegaConf.select(raw, "data.tokenizer.path", default="")
    if tokenizer:
        _refuse_outside(folder, "data.tokenizer.path", tokenizer, folder_itself=True)
        raw.data.tokenizer.path = str(folder / tokenizer)
    for i, dataset in enumerate(OmegaConf.select(raw, "data.datasets", default=None) or []):
        stats = dataset.get("action_stats", "auto")
        if stats not in ("", "auto"):
            _refuse_outside(folder, f"data.datasets[{i}].action_stats", stats)
            dataset.action_stats = str(folder / stats)
    return _parse_config(OmegaConf.to_yaml(raw), str(folder / RELEASE_CONFIG)), info.get("step")


def _refuse_outside(folder: Path, field: str, value: object, folder_itself: bool = False) -> None:
    """CheckpointLoadError naming ``field`` of the release's config.yaml unless ``value`` is a path
    inside the release folder (``folder_itself``: or "." for the folder), as export writes it: an
    absolute or ``..`` path was read from outside the folder, which its checksums do not cover."""
    inside = isinstance(value, str) and (name_inside(value) or (folder_itself and value == "."))
    if not inside:
        raise CheckpointLoadError(
            f"{folder / RELEASE_CONFIG}: {field}={value!r} is not a path inside the release folder (export "
            "writes one; its checksums cover only the folder's own files)"
        )


def _release_info(folder: Path) -> dict:
    """``release.json`` ({"step": N, "source": ...}), {} where there is none; CheckpointLoadError
    naming the file for one that is not such an object."""
    path = folder / RELEASE_INFO
    if not path.is_file():
        return {}
    info = read_json(path, CheckpointLoadError)
    step = info.get("step") if isinstance(info, dict) else None
    if not isinstance(info, dict) or not (step is None or (type(step) is int and step >= 0)):
        raise CheckpointLoadError(f"{path}: expected an object with an int 'step' >= 0, got {info!r:.200}")
    return info


def _action_stats(config: TrainConfig) -> dict[str, ActionStats]:
    try:
        return datasets_action_stats(config.data.datasets)
    except ValueError as error:
        raise CheckpointLoadError(str(error)) from None


def load_trained_model(
    path: str | Path,
    *,
    device: torch.device | str = "cpu",
    parallel: ParallelSizes | None = None,
    timeout_s: float | None = None,
) -> TrainedModel:
    """Loads the trained model at ``path`` (see ``find_checkpoint``) for generation or export.

    In one process (torch.distributed not initialised) the whole model, whatever layout it was
    saved under. Inside an initialised process group, every rank calls it (collective) and holds
    its part under ``parallel`` (default: no model parallelism, the whole model on every rank);
    the plan is created here, as training creates it, its groups waiting ``timeout_s`` for a rank
    (the commands' ``--timeout-s``; None: the checkpoint's ``distributed.init_timeout_s``). Read-only.
    Raises CheckpointLoadError for a path that is not a checkpoint or lacks its config,
    IncompleteCheckpointError for a save that never committed, ``CheckpointCorruptError`` for a
    file that fails its checksum or is not in the checksums, ``NonFiniteWeightsError`` for weights
    holding NaN or inf, and ValueError naming the fields for a ``parallel`` layout the world cannot
    hold or the model cannot take (``ParallelSizes.validate``: training's config load checks the
    same, the ViT's DeepStack layers on the first pipeline chunk among them). A checkpoint of
    ``engine=deepspeed`` (any ZeRO stage, any number of saving ranks) loads as the others do.
    """
    source = find_checkpoint(path)
    release = is_weights_folder(source)
    if release:
        config, step = _release_config(source)
        action_stats = _action_stats(config)
    else:
        config, step, action_stats = _checkpoint_config(source)
    device = torch.device(device)
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    config.parallel = parallel or ParallelSizes()
    config.parallel.validate(world_size, config.model, config.model.num_experts)
    timeout_s = config.distributed.init_timeout_s if timeout_s is None else timeout_s
    plan = ParallelPlan.create(config.parallel, config.model, world_size, timeout_s)
    model = build_model(config, plan, device)
    plan.apply(model, lambda _: [])  # nothing trains: no optimizer groups
    owner = plan.state_owner
    if release:
        load_weights_folder(source, owner, config.model, plan.groups, field="checkpoint")
    elif is_deepspeed_checkpoint(source):
        load_deepspeed_weights(source, owner, plan.groups)
    else:
        load_state(source, owner, ShardingMeshes.from_groups(plan.groups, device.type))
    require_finite_weights(owner, source)
    model.eval().requires_grad_(False)
    return TrainedModel(model, config, step, source, plan, action_stats)
