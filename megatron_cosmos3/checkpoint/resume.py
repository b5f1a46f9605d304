"""Where a run continues from: the resume policy over a run folder's checkpoints (docs/DESIGN.md,
"Checkpoints"). A run never starts over silently: a damaged latest checkpoint is an error listing
what the folder holds, unless ``checkpoint.fallback_to_verified`` allows the newest one that
verifies; starting fresh in a folder with checkpoints needs ``checkpoint.allow_fresh_start``."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from megatron_cosmos3.checkpoint.checkpointer import Inventory, ResumeError
from megatron_cosmos3.checkpoint.finite import NonFiniteWeightsError
from megatron_cosmos3.checkpoint.safe_reader import CheckpointCorruptError

# What makes a checkpoint unusable for a resume, so that the fallback may skip it: damaged files, or
# weights and optimizer moments holding NaN or inf (found on every rank together: finite.py).
UNUSABLE = (CheckpointCorruptError, NonFiniteWeightsError)

log = logging.getLogger(__name__)


def resume_from(found: Inventory, settings, load: Callable[[Path], dict]) -> tuple[Path, dict] | None:
    """Loads (``load(path) -> meta``) the checkpoint of ``found`` this run continues from, as the
    ``CheckpointConfig`` ``settings`` say; None for a fresh start. Raises ResumeError otherwise
    (``load`` raising one of ``UNUSABLE`` for the latest: the error names it)."""
    if not settings.resume:
        if not found.empty and not settings.allow_fresh_start:
            raise ResumeError(
                f"checkpoint.resume=false, but checkpoint.directory={found.root} holds checkpoints "
                f"({found.describe()}); starting over there needs checkpoint.allow_fresh_start=true "
                "(or use another directory)"
            )
        return None
    problem = found.problem
    if problem is None and found.latest is not None:
        try:
            return found.latest, load(found.latest)
        except UNUSABLE as error:
            problem = str(error)
    if problem is None:
        return None  # nothing was ever saved here
    if not settings.fallback_to_verified:
        raise ResumeError(
            f"cannot resume from checkpoint.directory={found.root}: {problem}. {found.describe()}. Set "
            "checkpoint.fallback_to_verified=true to resume from the newest of them that verifies, or "
            "checkpoint.resume=false checkpoint.allow_fresh_start=true to start over."
        )
    for candidate in reversed(found.committed):
        if candidate == found.latest and found.problem is None:
            continue  # the one that just failed
        try:
            meta = load(candidate)
        except UNUSABLE as error:
            log.warning("checkpoint.fallback_to_verified: %s is unusable too: %s", candidate, error)
            continue
        log.warning(
            "checkpoint.fallback_to_verified: the latest checkpoint is unusable (%s); RESUMING FROM %s (step %d), "
            "the newest checkpoint that verifies",
            problem,
            candidate,
            meta["step"],
        )
        return candidate, meta
    raise ResumeError(
        f"cannot resume from checkpoint.directory={found.root}: {problem}, and no older checkpoint verifies. "
        f"{found.describe()}."
    )
