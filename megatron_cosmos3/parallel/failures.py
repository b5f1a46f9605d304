"""Ending every rank when one fails inside collectives (docs/DESIGN.md, "The parallel plan" and
"The DeepSpeed engine").

A rank that raises between collectives (a forward's all-reduces, a backward's gradient reductions,
the barriers of DeepSpeed's ``save_checkpoint``) leaves the other ranks waiting in the next one, and
its own next collective (the checkpointer's agreement) is not theirs: the ranks would wait on each other
until the groups' timeout and then fail with the transport's "timed out" or "connection closed",
the failing rank's error said nowhere but in its own log. Under ``fail_together`` the failing rank
posts its error in the default group's store and destroys its process groups (it enters no other
collective); a peer whose collective then fails (at the latest after the groups' timeout, the
configured ``distributed.init_timeout_s``; at once where the failing process exits) finds the
posted error and raises ``RankFailedError`` naming the rank and its error. A gloo group's
connections close only when the process lets it go, which a library's references (DeepSpeed's)
prevent until the process exits, so the timeout is what bounds the wait of a rank whose peer
failed but lives on.

Regions nest: the training loop is one (``training/train.py``: every collective from one step to
the next is paired by the same code on every rank, so one region around all of them leaves none
unpaired, the loop's metric sums and the checkpointer's agreement included), and the driver's
forward and backward another inside it. The start-up is one too (building the run from the plan's
groups on, the resume), as are the launch check (``training/distributed.py``, ``preflight``), the
load and save of ``convert_checkpoint`` and the whole of ``cosmos3-generate`` and ``cosmos3-eval``
after their world starts (docs/DESIGN.md, "Release"). An error an inner region has handled (the groups are gone)
passes the outer one unchanged. Errors that every rank raises together by agreement (a checkpoint
save that failed somewhere, a run of non-finite steps) are no one rank's failure: the region passes
them on unchanged and keeps the groups, unless another rank posted a failure first.
"""

from __future__ import annotations

import contextlib
import logging
import time

import torch.distributed as dist

log = logging.getLogger(__name__)

_KEY = "megatron_cosmos3/failed/{rank}"


class RankFailedError(RuntimeError):
    """Another rank failed inside collectives this rank was in; its message names that rank and error."""


def _posted_failure(store, world_size: int, rank: int) -> str | None:
    """The first failure another rank posted, or None."""
    for other in range(world_size):
        key = _KEY.format(rank=other)
        if other != rank and store.check([key]):
            return store.get(key).decode()
    return None


def await_posted_failure(timeout_s: float, poll_s: float = 0.05) -> bool:
    """Waits up to ``timeout_s`` for another rank to post a failure (``fail_together``); True when
    one did. For a rank whose collective broke because a peer is failing (the peer's verdict closes
    the connections as it is posted): raising at once, under load it could post this consequence
    before the peer posted the cause, and every rank would name the consequence."""
    if not dist.is_initialized():
        return False
    rank, world_size = dist.get_rank(), dist.get_world_size()
    store = dist.distributed_c10d._get_default_store()
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if _posted_failure(store, world_size, rank) is not None:
                return True
        except Exception:  # noqa: BLE001 - the store went with its host rank: nothing will be posted
            return False
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll_s)


@contextlib.contextmanager
def fail_together(what: str, agreed: tuple[type[Exception], ...] = ()):
    """Within: an exception on this rank ends every rank's collectives at once (module doc). The
    failing rank re-raises its own error, its peers ``RankFailedError`` naming it (``what``: the
    region, e.g. "the forward and backward"); on every rank the process groups are then destroyed
    (``dist.is_initialized()`` is False: no collective may follow). ``agreed``: the error types
    every rank raises together, passed on as they are. Outside a process group of several ranks:
    nothing."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        yield
        return
    rank, world_size = dist.get_rank(), dist.get_world_size()
    store = dist.distributed_c10d._get_default_store()
    try:
        yield
    except Exception as error:
        if not dist.is_initialized():  # an inner region (or this error's own path) ended the groups
            raise
        try:
            posted = _posted_failure(store, world_size, rank)
        except Exception:  # noqa: BLE001 - the store went with its host rank: this rank's error is all there is
            posted = None
        if posted is not None:
            dist.destroy_process_group()  # broken by the failing rank: no collective may use them again
            raise RankFailedError(f"{what} stopped on rank {rank}: {posted}") from error
        if isinstance(error, agreed):  # raised on every rank: no peer waits for this one
            raise
        message = f"rank {rank} failed in {what}: {type(error).__name__}: {error}"
        try:
            store.set(_KEY.format(rank=rank), message)
        except Exception:  # noqa: BLE001 - a peer already gone took the store: the groups still close
            pass
        log.error("%s; closing the process groups so that every rank stops", message)
        dist.destroy_process_group()
        raise
