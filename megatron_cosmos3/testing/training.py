"""Shared by the trainer tests: the tiny model as config overrides, launching the trainer (under
torchrun, or on ranks forked by ``run_on_ranks``), and reading a run's loss curve."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Mapping
from functools import cache
from pathlib import Path

from megatron_cosmos3.model.config import MoTConfig
from megatron_cosmos3.testing.distributed import run_on_ranks
from megatron_cosmos3.testing.numerics import child_environment
from megatron_cosmos3.testing.shared_cache import shared_folder

# A two-layer MoT small enough for multi-process runs of a few seconds (override num_layers to split).
# No mrope_section: the rotary split follows head_dim (``scaled_mrope_section``: [2, 1, 1] at 8), so
# a test may change head_dim alone.
TINY_MODEL = [
    "model.vocab_size=64",
    "model.hidden_size=32",
    "model.num_layers=2",
    "model.num_attention_heads=4",
    "model.num_kv_heads=2",
    "model.head_dim=8",
    "model.ffn_hidden_size=64",
    "model.video_latent_channels=4",
    "model.audio_latent_dim=6",
    "model.timestep_embedding_dim=16",
]


# A two-block ViT for the tiny model (out_hidden_size = its hidden size; placeholder ids inside its
# vocabulary), one DeepStack set: with model.vision set the trainer trains it with the towers.
TINY_VISION = dict(
    depth=2,
    hidden_size=16,
    intermediate_size=32,
    num_heads=2,
    out_hidden_size=32,
    num_position_embeddings=16,
    deepstack_visual_indexes=[0],
    image_token_id=56,
    video_token_id=57,
    vision_start_token_id=58,
    vision_end_token_id=59,
)
TINY_VIT = [
    *(f"model.vision.{k}={str(v).replace(' ', '')}" for k, v in TINY_VISION.items()),
]


def rewrite_checkpoint(config, change, named: tuple[str, ...] = ()) -> Path:
    """The latest checkpoint of ``config``'s run (a ``TrainConfig``; one process) loaded whole
    (weights, AdamW state, this rank's RNG, the ``named`` entries such as ``data0/loader``, meta),
    changed by ``change(model, optimizer, per_rank, named)`` and committed again as the same step,
    with checksums of the changed files: crafted, not damaged, so only the load's own checks can
    tell. Returns the checkpoint's folder."""
    import copy

    import torch

    from megatron_cosmos3.checkpoint.checkpointer import Checkpointer, latest_checkpoint
    from megatron_cosmos3.model.mot import MoTModel

    root = Path(config.checkpoint.directory)
    path = latest_checkpoint(root)
    model = MoTModel(copy.deepcopy(config.model))
    optimizer, per_rank = torch.optim.AdamW(model.parameters()), {"rng": torch.get_rng_state()}
    entries = {key: torch.empty(0) for key in named}
    checkpointer = Checkpointer(root, async_save=False)
    meta = checkpointer.load(path, model, optimizer, per_rank, named=entries)
    assert optimizer.state and "rng" in per_rank and set(entries) == set(named)  # all there to be changed
    change(model, optimizer, per_rank, entries)
    kept = {key: value for key, value in meta.items() if key not in ("step", "format_version")}
    checkpointer.save(meta["step"], model, optimizer, per_rank, kept, named=entries)
    return path


def tiny_mot_config(**changes) -> MoTConfig:
    """The same tiny model as a MoTConfig (equal to TINY_MODEL), for tests that build it directly."""
    fields = dict(
        vocab_size=64,
        hidden_size=32,
        num_layers=2,
        num_attention_heads=4,
        num_kv_heads=2,
        head_dim=8,
        ffn_hidden_size=64,
        video_latent_channels=4,
        audio_latent_dim=6,
        timestep_embedding_dim=16,
    )
    return MoTConfig(**{**fields, **changes})


TINY_SYNTHETIC = ["synthetic.samples_per_pack=4", "synthetic.scale=1"]


def _create_empty_tracking_store(folder: Path) -> None:
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}").search_experiments()  # creates the schema


@cache
def _empty_tracking_store() -> Path:
    """An MLflow SQLite store with MLflow's schema and nothing else, made once per test session."""
    return shared_folder("mlflow-empty-store", _create_empty_tracking_store) / "mlflow.db"


def tracking_store(folder: Path) -> Path:
    """``folder/mlflow.db``, a trainer's SQLite tracking store. Made, where absent, as a copy of an
    empty store: a new store runs MLflow's ~60 schema migrations (2.6 s of CPU, 2026-11-30), which a
    test suite starting dozens of runs need not repeat. The trainer reads the copy as its own."""
    path = Path(folder) / "mlflow.db"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_empty_tracking_store(), path)
    return path


def tracked_run(tracking_db: Path, run_name: str, experiment: str = "megatron_cosmos3"):
    """The one MLflow run called ``run_name`` in the SQLite store ``tracking_db`` (an mlflow Run), and
    a client of the store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tracking_db}")
    runs = client.search_runs(
        client.get_experiment_by_name(experiment).experiment_id, filter_string=f"attributes.run_name = '{run_name}'"
    )
    assert len(runs) == 1, f"expected one MLflow run named {run_name}, found {len(runs)}"
    return runs[0], client


def loss_history(
    tracking_db: Path, run_name: str, experiment: str = "megatron_cosmos3", metric: str = "loss"
) -> list[tuple[int, float]]:
    """(step, value) of ``metric`` of the one MLflow run called ``run_name`` in the SQLite store
    ``tracking_db``, sorted by step (a step logged twice, by two resumed runs, appears twice)."""
    run, client = tracked_run(tracking_db, run_name, experiment)
    return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, metric))


def trainer_command(nproc: int, *args: str) -> list[str]:
    """The command that runs the training entry point under torchrun on ``nproc`` local processes."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    return [*launcher, *unlaunched_trainer_command(*args)[1:]]


def unlaunched_trainer_command(*args: str) -> list[str]:
    """The command that runs the training entry point as one process, without a launcher (a single
    process: ``init_distributed``): where one rank is all a test needs, no torchrun to start too
    (3 s of CPU: its own imports of torch)."""
    return [sys.executable, "-m", "megatron_cosmos3.training.train", *args]


# The tests' thread count per rank: several gloo ranks share a 2-core CI machine, and the trainers'
# results are compared with the pytest process's.
TRAINER_ENV = child_environment()


def launch_environment(folder: Path, base: Mapping[str, str] | None = None, **extra: str) -> dict[str, str]:
    """``base`` (default: TRAINER_ENV) plus ``extra``, with torchrun's log folder ``folder/torchrun``
    (``PET_LOG_DIR``, its ``--log-dir``, which every torchrun reads: direct, ``launch/torchrun_node.sh``
    and SLURM jobs): its per-run folders (``torchelastic_*`` in the temporary folder otherwise) and
    its workers' error files then lie in the test's own folder, not in /tmp where nothing removes
    them. TMPDIR stays: under a test's deep folder, a worker's AF_UNIX socket paths (multiprocessing's
    ``pymp-*/listener-*``) would pass their 107-character limit."""
    return {**(TRAINER_ENV if base is None else base), **extra, "PET_LOG_DIR": str(Path(folder) / "torchrun")}


def torchrun_trainer(cwd: Path, nproc: int, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Runs the trainer under torchrun in ``cwd`` to the end (stdout/stderr captured; torchrun's log
    folder under ``cwd``: ``launch_environment``); the caller checks it."""
    return subprocess.run(
        trainer_command(nproc, *args),
        cwd=cwd,
        env=launch_environment(cwd),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def child_processes(pid: int) -> list[int]:
    """Live processes whose parent is ``pid`` (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def _train_on_rank(rank: int, world_size: int, argv: list[str]) -> None:
    from megatron_cosmos3.training.train import main

    main(argv)


def train_on_ranks(nproc: int, *args: str, timeout: float = 300) -> None:
    """Runs the trainer's entry point with ``args`` on ``nproc`` gloo ranks, as torchrun would (the
    same environment variables, ``train.main``), but forked by ``run_on_ranks`` instead of started
    as new interpreters: no imports per rank. Raises with every failing rank's traceback."""
    run_on_ranks(_train_on_rank, nproc, list(args), timeout_s=timeout)
