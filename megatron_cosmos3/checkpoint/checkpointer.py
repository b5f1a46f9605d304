"""Sharded, reshardable checkpoints: saved asynchronously, committed atomically, keep-last-N.

A checkpoint is the folder ``step_<N>``: torch.distributed.checkpoint shards of the global state
described in ``sharded_state.py`` (model, AdamW state, and per-rank entries such as RNG and data
loader state), plus ``meta.json`` (step, MLflow run, resolved config, action statistics). It is written under
``.step_<N>.partial`` and renamed only once every rank's data and the index are on disk; only then
does ``latest`` name it. A crash or a kill mid-save therefore leaves the previous checkpoint as the
one resumed, and the half-written folder is swept away on the next start.

Every checkpoint carries ``checksums.json`` (sha256 of each file, see ``safe_reader.py``), checked
on load. A resume never starts over silently: ``inventory`` finds what ``latest`` names, and a
missing, damaged or unverifiable latest checkpoint is an error listing the committed ones (or, with
``checkpoint.fallback_to_verified``, a loud fallback to the newest that verifies). Pruning after a
commit removes only checkpoints older than the one just committed, which is whole by construction.

Saving is asynchronous: tensors are copied to host memory before ``save`` returns, training goes on,
and a background thread writes them; ``poll`` (each step) or ``wait`` commits the finished save.
Checkpoint traffic runs on a process group of its own so it never interleaves with training
collectives. Loading never unpickles code (``SafeFileSystemReader``).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import shutil
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

from megatron_cosmos3.atomic_files import PARTIAL_SUFFIX, sync_folder, sync_tree, write_atomically
from megatron_cosmos3.checkpoint.engine_layout import check_engine
from megatron_cosmos3.checkpoint.safe_reader import (
    MANIFEST,
    CheckpointCorruptError,
    ChecksummedFileSystemWriter,
    SafeFileSystemReader,
    UnsafeCheckpointError,
    check_file,
    check_sizes,
    read_manifest,
    write_manifest,
)
from megatron_cosmos3.checkpoint.sharded_state import ShardingMeshes, model_entries, optimizer_entries
from megatron_cosmos3.json_files import read_json

log = logging.getLogger(__name__)
# torch.distributed.checkpoint warns at every save and load without a process group that it assumes
# one process: a one-process run, cosmos3-generate and export are one by design. The filter is
# global (an async save warns from its own thread) and matches that message alone.
warnings.filterwarnings(
    "ignore", message="torch.distributed is disabled, unavailable or uninitialized", category=UserWarning
)

LATEST = "latest"
# meta.json's "format_version": what this code writes and reads. A checkpoint without one predates
# it (read as 1); a newer one is refused by name rather than half-understood.
FORMAT_VERSION = 1
SUPERSEDED = ".superseded"  # step folders a later save of the same step would have replaced
_REMOVING = ".removing"  # suffix of a pruned checkpoint while it is being removed


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


def latest_checkpoint(root: str | Path) -> Path | None:
    """The committed checkpoint ``latest`` names, or None (also where it names anything but a
    ``step_<N>`` folder of ``root``: ``inventory``)."""
    return inventory(root).latest


def read_meta(path: str | Path) -> dict:
    """The checkpoint's meta.json, checked against its manifest and ``check_meta``;
    CheckpointCorruptError otherwise."""
    path = Path(path)
    check_file(path, "meta.json", read_manifest(path), "step, MLflow run, config")
    meta = read_json(path / "meta.json", CheckpointCorruptError)
    check_meta(meta, path)
    return meta


# meta.json fields besides "step": their JSON types (None: may be null).
_JSON_NAMES = {str: "a string", dict: "an object", type(None): "null"}
_META_TYPES = {"mlflow_run_id": (str, type(None)), "stage": (str,), "config": (str,), "action_stats": (dict,)}


def check_meta(meta, path: Path) -> None:
    """CheckpointCorruptError naming the file, the field and its value unless ``meta`` is what
    ``Checkpointer`` writes: a JSON object of a known ``format_version`` whose ``step`` is an int
    >= 0 equal to the N of a ``step_<N>`` folder, and whose other fields have their types."""
    where = f"checkpoint {path}: meta.json"
    if not isinstance(meta, dict):
        raise CheckpointCorruptError(f"{where} holds a JSON {type(meta).__name__}, not an object")
    version = meta.get("format_version", 1)
    if type(version) is not int or not 1 <= version <= FORMAT_VERSION:
        raise CheckpointCorruptError(
            f"{where} format_version={version!r}: this code reads format versions 1..{FORMAT_VERSION} "
            "(a checkpoint written by a newer version of the framework, or a damaged one)"
        )
    step = meta.get("step")
    if type(step) is not int or step < 0:
        raise CheckpointCorruptError(f"{where} step={step!r}: must be an int >= 0")
    named = step_of(path)
    if named is not None and named != step:
        raise CheckpointCorruptError(f"{where} step={step} does not match its folder {path.name} (step {named})")
    for field, types in _META_TYPES.items():
        if field in meta and not isinstance(meta[field], types):
            raise CheckpointCorruptError(
                f"{where} {field}={meta[field]!r}: must be {' or '.join(_JSON_NAMES[t] for t in types)}"
            )


def _meta_step(path: Path) -> int | None:
    """The step a checkpoint folder's meta.json records, or None when it has no readable one."""
    try:
        meta = read_json(path / "meta.json")
    except ValueError:
        return None
    step = meta.get("step") if isinstance(meta, dict) else None
    return step if type(step) is int else None


def step_of(path: Path) -> int | None:
    """N of a ``step_<N>`` folder name (ASCII digits), else None."""
    name = path.name
    digits = name[5:]
    return int(digits) if name.startswith("step_") and digits.isascii() and digits.isdigit() else None


class CheckpointMismatchError(ValueError):
    """A whole checkpoint that does not fit this model: a parameter of another shape or kind of
    dtype (a checkpoint of another model config), named with both shapes."""


class MissingParametersError(CheckpointMismatchError, KeyError):
    """The checkpoint lacks parameters this model has."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class CheckpointSaveError(RuntimeError):
    """A save that could not be written (a full disk, a read-only folder): names the folder, the rank
    and its error; the checkpoint ``latest`` named before stays the one a resume takes."""


def _named(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def _save_error(message: str, cause: BaseException) -> CheckpointSaveError:
    error = CheckpointSaveError(message)
    error.__cause__ = cause
    return error


class ResumeError(RuntimeError):
    """The run folder holds checkpoints but none that this run may resume from as configured."""


@dataclass
class Inventory:
    """What a run folder holds. ``latest``: the committed checkpoint ``latest`` names; ``problem``:
    why there is none although the folder holds step folders (None when all is well or empty)."""

    root: Path
    latest: Path | None
    committed: list[Path]  # step folders with meta.json, oldest first
    damaged: list[Path]  # step folders without meta.json
    problem: str | None

    @property
    def empty(self) -> bool:
        return not self.committed and not self.damaged

    def describe(self) -> str:
        found = ", ".join(p.name for p in self.committed) or "none"
        damaged = f"; without meta.json: {', '.join(p.name for p in self.damaged)}" if self.damaged else ""
        return f"committed checkpoints in {self.root}: {found}{damaged}"


def inventory(root: str | Path) -> Inventory:
    root = Path(root)
    folders = sorted((p for p in root.glob("step_*") if p.is_dir() and step_of(p) is not None), key=step_of)
    committed = [p for p in folders if (p / "meta.json").is_file()]
    damaged = [p for p in folders if p not in committed]
    pointer, latest, problem = root / LATEST, None, None
    if pointer.is_file():
        try:
            name = pointer.read_text().strip()
        except (OSError, UnicodeDecodeError) as error:
            name, problem = "", f"{pointer} is unreadable ({error})"
        target = root / name if name else None
        if problem is None and (target is None or step_of(target) is None or "/" in name):
            problem = f"{pointer} names {name!r}, which is not a checkpoint folder"
        elif problem is None and not target.is_dir():
            problem = f"{pointer} names {name}, which does not exist"
        elif problem is None and not (target / "meta.json").is_file():
            problem = f"{pointer} names {name}, which has no meta.json (damaged)"
        elif problem is None:
            latest = target
    elif folders:
        problem = f"the folder holds checkpoint folders but no {LATEST} file"
    return Inventory(root, latest, committed, damaged, problem)


@dataclass
class _PendingSave:
    future: object
    step: int
    staging: Path
    meta: dict


class Checkpointer:
    """Saves and loads the training state of every rank (collective calls: all ranks call them)."""

    def __init__(
        self,
        root: str | Path,
        keep_last: int = 2,
        groups=None,
        async_save: bool = True,
        device_type: str = "cpu",
        timeout_s: float | None = None,
    ):
        """``timeout_s``: how long its groups' collectives wait for a rank (the configured
        ``distributed.init_timeout_s``; None: torch's default for a new group, 30 minutes)."""
        self.root = Path(root)
        self.keep_last = keep_last
        self.async_save = async_save
        self.distributed = dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        timeout = None if timeout_s is None else datetime.timedelta(seconds=timeout_s)
        # A gloo group of its own: background writes must not share a queue with training collectives.
        self.group = dist.new_group(backend="gloo", timeout=timeout) if self.distributed else None
        # And a second one for the ranks to agree (is the save written everywhere? did rank 0 commit
        # it?) while a background write may still use the first: two threads must not share a group.
        self._agreement = dist.new_group(backend="gloo", timeout=timeout) if self.distributed else None
        self.meshes = ShardingMeshes.from_groups(groups, device_type)
        self._pending: _PendingSave | None = None
        self._foreign_warned: set[str] = set()  # step folders pruning leaves alone, said once a run each
        failed = None
        if self.rank == 0:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
            except OSError as error:  # a file holds its name or a parent's, a read-only file system
                failed = _save_error(f"checkpoint directory {self.root} cannot be made: {_named(error)}", error)
            for stale in self.root.glob(".step_*.partial") if failed is None else ():  # a save that never committed
                log.warning("removing %s: a checkpoint save that never committed (a killed or failed run)", stale)
                shutil.rmtree(stale, ignore_errors=True)
            for stale in self.root.glob(f".step_*{_REMOVING}") if failed is None else ():  # a pruning cut short
                shutil.rmtree(stale, ignore_errors=True)
            for stale in self.root.glob(f".{LATEST}.*{PARTIAL_SUFFIX}") if failed is None else ():  # a pointer's
                stale.unlink(missing_ok=True)  # temporary file (write_atomically), left by a killed commit
        self._raise_together(failed)  # in place of a barrier: no rank waits for a rank 0 that stopped

    def _barrier(self) -> None:
        if self.distributed:
            dist.barrier(group=self.group)

    # ------------------------------------------------------------------ save
    def save(
        self,
        step: int,
        model: nn.Module,
        optimizer,
        per_rank: dict[str, torch.Tensor],
        meta: dict,
        named: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Starts saving; returns once the state is staged in host memory (async) or written (sync).

        ``per_rank`` entries are stored under this rank's number (RNG state); ``named`` ones under
        the caller's own keys, which must be unique across ranks (a data rank's loader position,
        written by the one rank that reads for it), so another layout can find them."""
        staging = self._new_staging(step)
        state = {
            **model_entries(model, self.meshes),
            **optimizer_entries(optimizer, model, self.meshes),
            **{f"rank{self.rank}/{k}": v for k, v in per_rank.items()},
            **(named or {}),
        }
        writer = ChecksummedFileSystemWriter(str(staging))
        if self.async_save:
            future = dcp.async_save(state, storage_writer=writer, process_group=self.group)
            self._pending = _PendingSave(future, step, staging, meta)
        else:
            with self._failed_save(step, staging):
                dcp.save(state, storage_writer=writer, process_group=self.group)
            self._commit(_PendingSave(None, step, staging, meta))

    @contextmanager
    def _failed_save(self, step: int, staging: Path):
        """Turns a failed write (every rank gets it) into a CheckpointSaveError naming the folder and
        the first failing rank's error; the half-written folder is removed (a full disk gets its space back)."""
        try:
            yield
        except CheckpointException as error:
            rank, failure = next(iter(error.failures.items()))
            cause = failure[0] if isinstance(failure, tuple) else failure
            if self.rank == 0:
                shutil.rmtree(staging, ignore_errors=True)
            raise CheckpointSaveError(
                f"checkpoint of step {step} not saved to {staging}: rank {rank}: {_named(cause)}; {self._kept()}"
            ) from error

    def _kept(self) -> str:
        kept = latest_checkpoint(self.root)
        return f"the last committed one, {kept}, is kept" if kept else "no checkpoint was committed before"

    def _new_staging(self, step: int) -> Path:
        """Collective: waits for the save in flight, then an empty ``.step_<N>.partial`` folder."""
        self.wait()
        staging = self.root / f".step_{step:08d}.partial"
        failed = None
        if self.rank == 0:
            try:
                shutil.rmtree(staging, ignore_errors=True)
                staging.mkdir(parents=True)
            except OSError as error:  # e.g. a read-only or full file system
                message = f"checkpoint of step {step} not saved: {staging} could not be made ({_named(error)})"
                failed = _save_error(message, error)
        self._raise_together(failed)
        return staging

    def _raise_together(self, error: CheckpointSaveError | None) -> None:
        """Collective, in place of a barrier: raises on every rank when any rank passes an error (the
        first such rank's message), so that no rank goes on into the next collective alone."""
        if not self.distributed:
            if error is not None:
                raise error
            return
        flag = torch.tensor([error is not None], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._agreement)
        if not flag.item():
            return
        messages = [None] * dist.get_world_size()
        dist.all_gather_object(messages, None if error is None else str(error), group=self._agreement)
        if error is not None:
            raise error
        rank, message = next((r, m) for r, m in enumerate(messages) if m is not None)
        raise CheckpointSaveError(f"{message} (on rank {rank})")

    def poll(self) -> Path | None:
        """Commits a finished background save; returns its folder, or None if none finished."""
        if self._pending is None:
            return None
        done = self._pending.future.done()
        if self.distributed:  # all ranks commit at the same step (the commit is agreed on, collectively)
            flag = torch.tensor([done], dtype=torch.int32)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self._agreement)
            done = bool(flag.item())
        return self.wait() if done else None

    def wait(self) -> Path | None:
        """Blocks until the save in flight (if any) is written, and commits it."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        with self._failed_save(pending.step, pending.staging):
            pending.future.result()
        return self._commit(pending)

    def _commit(self, pending: _PendingSave) -> Path:
        """Collective: rank 0 writes meta.json and the checksums, renames the staging folder and points
        ``latest`` at it; a failure there (a full disk, a read-only file, a ``.superseded`` that is not a
        folder) is a CheckpointSaveError on every rank, and ``latest`` keeps naming the last committed one."""
        final = step_dir(self.root, pending.step)
        # The coordinator's save finishes last (it writes the index after every rank's data and
        # checksums), so rank 0 alone commits; the others wait for its outcome only.
        failed = None
        if self.rank == 0:
            try:
                self._commit_files(pending, final)
            except (OSError, CheckpointSaveError, CheckpointCorruptError) as error:  # a rank's damaged checksums
                failed = _save_error(
                    f"checkpoint of step {pending.step} not committed in {pending.staging}: {_named(error)}; "
                    f"{self._kept()}",
                    error,
                )
        self._raise_together(failed)
        return final

    def _commit_files(self, pending: _PendingSave, final: Path) -> None:
        """Rank 0's part of ``_commit``. Until the rename, a failure removes the staging folder (a
        full disk gets its space back); after it, the folder is whole but ``latest`` may still name
        the previous one, which a resume then takes."""
        try:
            meta = {**pending.meta, "step": pending.step, "format_version": FORMAT_VERSION}
            (pending.staging / "meta.json").write_text(json.dumps(meta, indent=2))
            write_manifest(pending.staging)
            # On disk before either rename publishes it: after a power loss or a node crash, a folder
            # under its step_<N> name (or named by latest) with files short or missing would be taken
            # for a whole checkpoint. DCP syncs its shards; meta.json, the checksums and the names not.
            sync_tree(pending.staging)
            if os.path.lexists(final):
                self._set_aside(final)
            os.replace(pending.staging, final)
            sync_folder(self.root)
            write_atomically(self.root / LATEST, final.name, durable=True)
        except BaseException:
            shutil.rmtree(pending.staging, ignore_errors=True)
            raise
        self._prune(pending.step)
        log.info("checkpoint committed: %s", final)

    def _set_aside(self, folder: Path) -> None:
        """Moves a step folder this save would replace (another timeline's: a fallback resume, a
        fresh start, a ``latest`` naming an older step) under ``.superseded/``: nothing is deleted
        but by keep-last pruning. A ``.superseded`` that is not a folder (a user's file) is left as
        it is: CheckpointSaveError naming it."""
        holder = self.root / SUPERSEDED
        if os.path.lexists(holder) and not holder.is_dir():
            raise CheckpointSaveError(
                f"{holder} is not a folder, but {folder.name} already exists (another timeline) and is "
                f"kept under it instead of being overwritten; move {holder} away"
            )
        aside = holder / f"{folder.name}.{time.time_ns()}"
        holder.mkdir(exist_ok=True)
        os.replace(folder, aside)
        # Its new name on disk before the commit's rename takes the old one: after a power loss the
        # other timeline's checkpoint is under one name or the other, never lost with both entries.
        sync_folder(holder)
        log.warning("checkpoint %s already existed (another timeline): moved to %s, not overwritten", folder, aside)

    def _prune(self, committed: int) -> None:
        """Keeps the checkpoint just committed and the keep_last - 1 before it; never touches a newer
        one (left by another timeline: a fallback resume or a fresh start).

        Only this code's own complete checkpoints are removed or counted: real folders (not links)
        named as ``step_dir`` names them, whose meta.json says their step. A commit renames a staging
        folder that already holds meta.json, so any other step folder (without one, a link, another
        spelling of the number) was put there by someone else (a user's folder, another tool's
        half-written save) and is left alone, said in a warning once a run (not at every save). This
        run's own incomplete saves never carry a ``step_<N>`` name: they are ``.step_<N>.partial``,
        removed when the save fails or the next attempt starts. A folder is renamed before it is
        removed, so a removal cut short never leaves a checkpoint-looking folder with files missing
        (the next start removes it)."""
        older = []
        for path in sorted((p for p in self.root.glob("step_*") if step_of(p) is not None), key=step_of):
            step = step_of(path)
            if step >= committed:
                continue
            ours = path.name == step_dir(self.root, step).name and path.is_dir() and not path.is_symlink()
            if not ours or _meta_step(path) != step:
                if path.name not in self._foreign_warned:
                    self._foreign_warned.add(path.name)
                    log.warning("keep-last pruning leaves %s alone: not a checkpoint this code committed", path)
                continue
            older.append(path)
        for old in older[: max(0, len(older) - (self.keep_last - 1))]:
            doomed = old.with_name(f".{old.name}{_REMOVING}")
            try:
                os.replace(old, doomed)
            except OSError as error:
                log.warning("keep-last pruning could not remove %s: %s", old, error)
                continue
            shutil.rmtree(doomed, ignore_errors=True)

    # ------------------------------------------------------------------ load
    def load(
        self,
        path: str | Path,
        model: nn.Module,
        optimizer=None,
        per_rank: dict[str, torch.Tensor] | None = None,
        allow_missing: tuple[str, ...] = (),
        named: dict[str, torch.Tensor] | None = None,
    ) -> dict:
        """Loads in place whatever of model/optimizer/per-rank state this rank holds; returns meta
        (``load_state`` over this checkpointer's sharding meshes and process group)."""
        return load_state(path, model, self.meshes, self.group, optimizer, per_rank, self.rank, allow_missing, named)


def check_fits(path: Path, index: dict, state: dict) -> None:
    """CheckpointMismatchError naming the first entry of ``state`` whose saved global shape differs
    from this model's, or that was saved as integers or booleans where this model holds floats
    (float widths convert on load: bf16 weights load into an fp32 model)."""
    for key, tensor in state.items():
        saved = index[key]
        if tuple(saved.size) != tuple(tensor.shape):
            raise CheckpointMismatchError(
                f"checkpoint {path}: {key} has shape {tuple(saved.size)} there, but this model's config gives it "
                f"{tuple(tensor.shape)} (a checkpoint of another model shape)"
            )
        stored = saved.properties.dtype
        if tensor.is_floating_point() and not (stored.is_floating_point or stored.is_complex):
            raise CheckpointMismatchError(
                f"checkpoint {path}: {key} is stored as {stored}, but this model holds {tensor.dtype} there"
            )


def _check_per_rank_entries(path: Path, available: set[str], rank: int, names: list[str]) -> None:
    """CheckpointCorruptError naming the entry where this rank's ``rank<r>/<name>`` is absent although
    a higher rank's is saved: every rank of the saving run wrote one, so the run was at least that
    large and this rank's entry was lost (a damaged or crafted index), not left by a smaller world."""
    for name in names:
        if f"rank{rank}/{name}" in available:
            continue
        higher = sorted(
            k for k in available if (m := re.fullmatch(rf"rank(\d+)/{re.escape(name)}", k)) and int(m[1]) > rank
        )
        if higher:
            raise CheckpointCorruptError(
                f"checkpoint {path}: entry 'rank{rank}/{name}' is missing although {higher[0]!r} is saved (every "
                "rank of the saving run writes its own, so this one was lost)"
            )


def load_state(
    path: str | Path,
    model: nn.Module,
    meshes: ShardingMeshes,
    group=None,
    optimizer=None,
    per_rank: dict[str, torch.Tensor] | None = None,
    rank: int = 0,
    allow_missing: tuple[str, ...] = (),
    named: dict[str, torch.Tensor] | None = None,
) -> dict:
    """Loads the checkpoint folder ``path`` into what this rank holds, reading only (nothing in or
    beside the folder is written): collective over ``group`` when torch.distributed is initialised,
    a plain read in one process. Returns its meta.json (empty if it has none).

    ``optimizer=None`` loads weights only (a new stage's fresh optimizer, or inference). Model
    parameters absent from the checkpoint are an error naming them, unless their name starts with
    one of ``allow_missing`` (e.g. the projections of an embodiment added since). Per-rank entries
    (stored under rank ``rank``) that are absent (a smaller saving world) are dropped from
    ``per_rank``, while one absent beside a higher rank's is CheckpointCorruptError; ``named``
    entries (keys as saved) are filled in place of their values, or dropped when absent. Every file
    read is checked against the checkpoint's checksums first; a committed folder (one with
    meta.json) without its checksums is CheckpointCorruptError, not read unverified.
    """
    path = Path(path)
    check_engine(path, "megatron")  # DeepSpeed's files (or its universal layout) are refused by name
    check_sizes(path)  # a missing or truncated file fails here, before any weight is touched
    if not (path / ".metadata").is_file():
        if (path / "meta.json").is_file():  # committed, so the index was there once
            raise CheckpointCorruptError(f"checkpoint {path}: file .metadata (the index of every item) is missing")
        raise FileNotFoundError(f"{path} is not a checkpoint folder (no .metadata index)")
    meta = {}
    if (path / "meta.json").is_file():  # committed: the commit wrote checksums.json before the rename
        if read_manifest(path) is None:
            raise CheckpointCorruptError(
                f"checkpoint {path}: {MANIFEST} is missing, so none of its files can be verified (lost or "
                "deleted after the commit, which writes it before the folder gets its name)"
            )
        meta = read_meta(path)
    reader = SafeFileSystemReader(str(path))
    index = reader.read_metadata().state_dict_metadata
    available = set(index)
    model_state = model_entries(model, meshes)
    missing = [k[len("model/") :] for k in model_state if k not in available]
    unexpected = [m for m in missing if not m.startswith(tuple(allow_missing))]
    if unexpected:
        raise MissingParametersError(
            f"checkpoint {path} lacks model parameters {unexpected[:8]}"
            f"{' ...' if len(unexpected) > 8 else ''} ({len(unexpected)} in all)"
        )
    state = {k: v for k, v in model_state.items() if k in available}
    if optimizer is not None:
        state.update(
            {
                k: v
                for k, v in optimizer_entries(optimizer, model, meshes, create_for=available).items()
                if k in available
            }
        )
    check_fits(path, index, state)
    if per_rank:
        _check_per_rank_entries(path, available, rank, list(per_rank))
    # Per-rank entries (RNG, loader state) vary in size: allocate them as the index describes.
    for entries, key_of in ((per_rank, lambda name: f"rank{rank}/{name}"), (named, lambda name: name)):
        for name in list(entries or {}):
            key = key_of(name)
            if key in available:
                entries[name] = state[key] = torch.empty(tuple(index[key].size), dtype=index[key].properties.dtype)
            else:
                del entries[name]
    try:
        dcp.load(
            state,
            storage_reader=reader,
            planner=DefaultLoadPlanner(allow_partial_load=True),
            process_group=group,
        )
    except CheckpointException as error:  # a rank's own error, not "ranks: dict_keys([0])"
        for failure in error.failures.values():
            cause = failure[0] if isinstance(failure, tuple) else failure
            if isinstance(cause, (CheckpointCorruptError, UnsafeCheckpointError)):
                raise cause from error
        raise CheckpointCorruptError(f"checkpoint {path} could not be read: {error}") from error
    return meta
