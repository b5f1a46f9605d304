"""One trainer per run folder: a lock file in ``checkpoint.directory`` held by rank 0 for the run.

``run.lock`` is created atomically (``O_CREAT | O_EXCL``) and names its owner: host, pid, the
process's start time (so a recycled pid is not mistaken for the owner), job id and when it started.
A second trainer finds it and refuses to start, naming the owner. A lock whose owner is gone is
stale: on the same host, a pid that no longer runs (or runs another process) is taken over with a
warning. A lock that names no owner this code could have written (not JSON, not an object, a pid
that is no int >= 1: 'abc', -1, 0, '') is damaged or hand-made: it is refused, naming the file and
its content, rather than taken over — whether a trainer uses the folder cannot be told, and a
wrong take-over lets two trainers overwrite each other's checkpoints. A lock from another host
cannot be checked from here; the message says which file to delete once that trainer is known to
be gone. One exception: a lock of an earlier attempt of the same
SLURM job (same job id, lower restart count) is stale wherever it was taken — SLURM runs one attempt
of a job at a time, and a requeued job that was hard-killed often restarts on another node.
Take-overs are serialised by ``flock`` on a guard file, so two trainers that find the same stale
lock cannot both take it.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

import torch.distributed as dist

from megatron_cosmos3.json_files import loads, unique_keys
from megatron_cosmos3.training.refusals import StartupRefusal

log = logging.getLogger(__name__)

LOCK_FILE = "run.lock"


class RunFolderLocked(StartupRefusal):
    """Another trainer holds the run folder: a start-up refusal, raised on every rank alike
    (``lock_run_folder`` broadcasts rank 0's outcome) before anything is written."""


class RunFolderUnwritable(StartupRefusal):
    """Rank 0 could not make the run folder or write its lock file (a regular file where a folder
    belongs, a name longer than the file system takes, a full or read-only file system): a start-up
    refusal naming the path and the system's reason, raised on every rank alike."""


def _process_stat(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks since boot) of ``pid`` as the kernel gives them, or None
    where /proc has none."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # counted after the command name, which may hold spaces
    return fields[0], fields[19]  # fields 3 and 22


def _process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), or None where /proc has none."""
    stat = _process_stat(pid)
    return None if stat is None else stat[1]


def _alive(owner: dict, job_id: str = "", slurm_attempt: int | None = None) -> bool:
    """Whether the lock's owner still runs; True when it cannot be told (another host), unless the
    owner was an earlier attempt of this SLURM job (``job_id``, ``slurm_attempt``)."""
    if owner.get("host") != socket.gethostname():
        earlier = owner.get("slurm_attempt")
        same_job = slurm_attempt is not None and job_id and owner.get("job_id") == job_id
        return not (same_job and type(earlier) is int and earlier < slurm_attempt)
    pid = owner["pid"]  # an int >= 1: ``_damaged``
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # OverflowError: a pid past the C range is no process
        return False
    except PermissionError:
        pass  # another user's process: it runs
    stat = _process_stat(pid)
    if stat is not None and stat[0] in ("Z", "X"):  # ended, not yet reaped by its parent: it holds nothing
        return False
    started = owner.get("process_start")
    return started is None or stat is None or stat[1] == started


def _damaged(owner: dict) -> bool:
    """Whether a lock names no owner that ``RunFolderLock`` could have written: unreadable, or on
    this host a pid that is no int >= 1 (it writes its own ``os.getpid()``)."""
    if owner.get("unreadable"):
        return True
    pid = owner.get("pid")
    return owner.get("host") == socket.gethostname() and (type(pid) is not int or pid < 1)


# How much of a damaged lock file a refusal quotes.
_QUOTED_CHARS = 200


class RunFolderLock:
    """The lock of one run folder (not re-entrant; ``acquire`` once, ``release`` at exit)."""

    def __init__(self, folder: str | Path, job_id: str = "", slurm_attempt: int | None = None) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.job_id = job_id
        self.slurm_attempt = slurm_attempt
        self.owner = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "process_start": _process_start(os.getpid()),
            "job_id": job_id,
            "slurm_attempt": slurm_attempt,
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        self.held = False

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self.owner, f)
            f.flush()
            os.fsync(f.fileno())
        return True

    def _read(self) -> dict | None:
        for _ in range(20):  # a lock being written this instant: its owner is mid-write
            try:
                owner = loads(self.path.read_text(), object_pairs_hook=unique_keys)
            except FileNotFoundError:
                return None
            except (OSError, ValueError, RecursionError):  # RecursionError: nested past the parser
                time.sleep(0.05)
                continue
            return owner if isinstance(owner, dict) else {"unreadable": True}  # JSON, but no owner record
        return {"unreadable": True}

    def _quoted(self) -> str:
        """The lock file's content, as a refusal quotes it."""
        try:
            text = self.path.read_text(errors="replace")
        except OSError as error:
            return f"unreadable: {error}"
        cut = "..." if len(text) > _QUOTED_CHARS else ""
        return f"it holds {text[:_QUOTED_CHARS]!r}{cut}"

    def acquire(self) -> None:
        """Takes the lock, taking over a stale one with a warning; RunFolderLocked if it is held."""
        self.folder.mkdir(parents=True, exist_ok=True)
        while not self._create():
            owner = self._read()
            if owner is None:
                continue  # released meanwhile: try again
            if _damaged(owner) or _alive(owner, self.job_id, self.slurm_attempt):
                who = (
                    f"a damaged lock file, which names no trainer ({self._quoted()})"
                    if _damaged(owner)
                    else f"pid {owner.get('pid')} on host {owner.get('host')} (job {owner.get('job_id') or '-'}, "
                    f"since {owner.get('since')})"
                )
                raise RunFolderLocked(
                    f"checkpoint.directory={self.folder} is in use by another trainer: {who}. Two trainers on one "
                    f"run folder would overwrite each other's checkpoints. If that trainer is gone, delete {self.path}."
                )
            self._take_over(owner)
        self.held = True

    def _take_over(self, stale: dict) -> None:
        with open(self.folder / f".{LOCK_FILE}.guard", "w") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)
            if self._read() == stale:  # nobody took it over before us
                log.warning(
                    "taking over the stale lock %s of pid %s on %s (job %s, attempt %s, since %s): %s",
                    self.path,
                    stale.get("pid"),
                    stale.get("host"),
                    stale.get("job_id") or "-",
                    stale.get("slurm_attempt"),
                    stale.get("since"),
                    "an earlier attempt of this SLURM job"
                    if stale.get("host") != socket.gethostname()
                    else "that process is gone",
                )
                self.path.unlink()

    def release(self) -> None:
        if self.held and self._read() == self.owner:
            self.path.unlink()
        self.held = False


def lock_run_folder(
    folder: str | Path, job_id: str, is_main: bool, slurm_attempt: int | None = None
) -> RunFolderLock | None:
    """Collective: rank 0 takes the folder's lock; every rank raises RunFolderLocked if another trainer
    holds it, or RunFolderUnwritable naming the lock file and the system's reason if rank 0 could
    not make the folder or write the file (it was a raw OSError: a traceback from every rank).
    Returns the lock on rank 0 (release it at exit), None elsewhere."""
    lock, refusal = None, None  # refusal: (whether the lock is held by another, the message)
    if is_main:
        lock = RunFolderLock(folder, job_id, slurm_attempt)
        try:
            lock.acquire()
        except RunFolderLocked as error:
            lock, refusal = None, (True, str(error))
        except OSError as error:  # a file holds the folder's name, a read-only or full file system
            reason = error.strerror or str(error)
            where = f" ({error.filename})" if error.filename and str(error.filename) != str(lock.path) else ""
            message = f"checkpoint.directory={folder}: its lock file {lock.path} cannot be written: {reason}{where}"
            lock, refusal = None, (False, message)
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [refusal]
        dist.broadcast_object_list(box, src=0)
        refusal = box[0]
    if refusal is not None:
        held, message = refusal
        raise RunFolderLocked(message) if held else RunFolderUnwritable(message)
    return lock
