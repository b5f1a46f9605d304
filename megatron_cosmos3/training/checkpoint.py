"""Sharded checkpoints with torch.distributed.checkpoint, committed atomically.

A checkpoint is the folder ``step_<N>``: DCP shards of model and optimizer state (each rank writes
its own part; loading reshards to whatever layout reads it) plus ``meta.json`` (step, MLflow run,
resolved config). It is written under a temporary name and renamed when every rank has finished,
and only then does ``latest`` point at it: a crash mid-save leaves the previous checkpoint latest.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from megatron_cosmos3.training.distributed import barrier

LATEST = "latest"


def _step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


def save_checkpoint(root: str | Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    meta: dict, is_main: bool, keep_last: int) -> Path:
    """Collective: every rank calls it. Returns the committed checkpoint folder."""
    root = Path(root)
    final, staging = _step_dir(root, step), root / f".step_{step:08d}.partial"
    if is_main:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    barrier()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(staging))
    barrier()
    if is_main:
        (staging / "meta.json").write_text(json.dumps({"step": step, **meta}, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        pointer = root / f".{LATEST}.tmp"
        pointer.write_text(final.name)
        os.replace(pointer, root / LATEST)
        for old in sorted(root.glob("step_*"))[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def latest_checkpoint(root: str | Path) -> Path | None:
    pointer = Path(root) / LATEST
    if not pointer.is_file():
        return None
    path = Path(root) / pointer.read_text().strip()
    return path if (path / "meta.json").is_file() else None


def load_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Collective: loads model and optimizer state in place; returns the checkpoint's meta."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    return json.loads((Path(path) / "meta.json").read_text())
