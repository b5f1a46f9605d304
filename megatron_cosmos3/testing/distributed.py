"""Run a function on N real processes with the gloo backend and collect what each rank returns.

Every multi-process test goes through ``run_on_ranks``: one launcher, one timeout, one way to see a
failing rank's traceback. Nothing hangs: a rank that does not finish in time is killed and the
call raises.

Ranks are forked from a fork server that has imported torch and this package once (the first call
starts it): a fresh interpreter per rank would spend seconds importing them again on every call.
Each rank takes the caller's environment and the tests' numerical settings, not the server's.
"""

from __future__ import annotations

import datetime
import gc
import multiprocessing
import multiprocessing.util
import os
import tempfile
import time
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_cosmos3.testing.numerics import use_test_numerics
from megatron_cosmos3.testing.ports import free_port

# Imported once by the fork server, so that a forked rank starts in milliseconds: the libraries
# every rank needs, including those the trainer imports late (megatron-core at the process-group
# set-up of a layout that splits the model or uses its DDP, which compiles its fused kernels'
# wrappers on import; MLflow's SQLite store on rank 0; matplotlib, which plots the action samples
# rank 0 writes at a save: 1.6 s of imports each time otherwise; transformers' Qwen3-VL modules,
# which a model with its own ViT builds: 7 s of CPU each time otherwise, most of it transformers
# indexing its model packages, 2026-11-30).
_FORK_SERVER_PRELOAD = [
    "torch",
    "torch.distributed",
    "megatron.core.parallel_state",
    "megatron.core.tensor_parallel",
    "mlflow.tracking",
    "mlflow.store.tracking.sqlalchemy_store",
    "matplotlib.pyplot",
    "transformers.models.qwen3_vl.modeling_qwen3_vl",
    "megatron_cosmos3.training.train",
]


def _take_callers_settings(environment: dict) -> None:
    """In a process forked from the fork server: the caller's environment and the tests' numerics."""
    # The fork server's imports (~760k objects) go to the permanent generation: every full collection
    # in the process walked them, DeepSpeed's ZeRO-3 set-up calls gc.collect (0.5 s of CPU each), and
    # they are never garbage.
    gc.freeze()
    # A forked process inherits the fork server's start method: its own children (data-loader
    # workers) must start as they would in a process torchrun started, not through a fork server.
    multiprocessing.set_start_method(None, force=True)
    os.environ.clear()
    os.environ.update(environment)
    use_test_numerics()  # the same settings as the process that compares the results


def _worker(rank: int, world_size: int, port: int, out_dir: str, environment: dict, fn: Callable, args: tuple) -> None:
    _take_callers_settings(environment)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank)
    )
    result_path = Path(out_dir) / f"rank{rank}.pt"
    try:
        try:
            dist.init_process_group("gloo", rank=rank, world_size=world_size)
            # Every rank has connected before any begins fn: a rank whose side of gloo's mesh was
            # done could start fn and end the group at once (restart_world), closing the pairs a
            # peer was still connecting ("Connection closed by peer" there, after this rank's
            # start marker, so the world was not started again).
            dist.barrier()
        except RuntimeError:  # DistNetworkError too: see _START_ATTEMPTS
            torch.save({"ok": False, "error": traceback.format_exc(), "not_started": True}, result_path)
            raise
        (Path(out_dir) / f"rank{rank}.started").touch()  # from here on, fn may have done something
        result = fn(rank, world_size, *args)
        torch.save({"ok": True, "result": result}, result_path)
    except BaseException:  # noqa: BLE001 — report every failure to the parent
        if not result_path.exists():
            torch.save({"ok": False, "error": traceback.format_exc()}, result_path)
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def restart_world(rank: int, world_size: int, store_path: Path, timeout_s: float | None = None) -> None:
    """Inside a rank of ``run_on_ranks``: this rank's process group (if it still has one) replaced
    by one whose collectives wait ``timeout_s`` (torch's default if None), met through a file store
    at ``store_path`` (a path no earlier world used; no port to agree on). For runs that need a
    short timeout, or that end their process groups (``parallel/failures.py``)."""
    if dist.is_initialized():
        dist.destroy_process_group()
    timeout = None if timeout_s is None else datetime.timedelta(seconds=timeout_s)
    store = dist.FileStore(str(store_path), world_size)
    # The ranks may arrive further apart than a short timeout (one still ending a failed run), and
    # gloo's connections wait only that long: they meet in the store first, which waits minutes.
    store.set(f"arrived/{rank}", "1")
    store.wait([f"arrived/{other}" for other in range(world_size)])
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=timeout)


@contextmanager
def failing_call(target: type, name: str, fails: bool, call: int, message: str):
    """Within: the method ``target.name`` raises ``RuntimeError(message)`` at its ``call``-th call
    (counted from 1) where ``fails`` (e.g. on one rank), and runs as before otherwise."""
    real, calls = getattr(target, name), []

    def failing(self, *args, **kwargs):
        calls.append(1)
        if fails and len(calls) == call:
            raise RuntimeError(message)
        return real(self, *args, **kwargs)

    setattr(target, name, failing)
    try:
        yield
    finally:
        setattr(target, name, real)


def raised_by(work: Callable[[], object]) -> tuple[str, str, float]:
    """What ``work()`` raised (its type's name and message; "nothing" and "" where it returned) and
    after how many seconds."""
    start = time.monotonic()
    try:
        work()
        raised = ("nothing", "")
    except Exception as error:  # noqa: BLE001 - what it raised is the result
        raised = (type(error).__name__, str(error))
    return (*raised, time.monotonic() - start)


# Starting the world can fail before ``fn`` runs anywhere: a port chosen free is taken by another
# process before rank 0's store binds it (EADDRINUSE), or a gloo pair's connection is closed while
# the ranks connect (seen with several test workers on 2 cores). Then the ranks start again.
_START_ATTEMPTS = 3


def run_on_ranks(fn: Callable, world_size: int, *args, timeout_s: float = 240.0) -> list:
    """Runs ``fn(rank, world_size, *args)`` on ``world_size`` gloo processes; returns their results.

    ``fn`` must be importable (a module-level function) and return something ``torch.save`` takes.
    """
    multiprocessing.set_forkserver_preload(_FORK_SERVER_PRELOAD)  # read when the server starts
    for attempt in range(_START_ATTEMPTS):
        reports = _launch(fn, world_size, args, timeout_s)
        if not any(report.get("not_started") for report in reports) or attempt == _START_ATTEMPTS - 1:
            break
    errors = [f"--- rank {rank} ---\n{report['error']}" for rank, report in enumerate(reports) if not report["ok"]]
    if errors:
        raise RuntimeError("run_on_ranks failed:\n" + "\n".join(errors))
    return [report["result"] for report in reports]


def _run_alone(environment: dict, fn: Callable, args: tuple, error_path: str) -> None:
    _take_callers_settings(environment)
    try:
        fn(*args)
    except BaseException:  # noqa: BLE001 — the parent reports it with the exit status
        Path(error_path).write_text(traceback.format_exc())
        raise


def exit_status_of(fn: Callable, *args, timeout_s: float = 120.0) -> tuple[int, str]:
    """Runs ``fn(*args)`` in one process forked from the fork server (no process group; a process
    that a test kills or that kills itself, without a new interpreter importing torch and this
    package): its exit status (-N where signal N ended it) and the traceback of what it raised
    ("" where nothing). ``fn`` must be importable, as ``run_on_ranks``'s."""
    multiprocessing.set_forkserver_preload(_FORK_SERVER_PRELOAD)  # read when the server starts
    with tempfile.TemporaryDirectory() as out_dir:
        error_path = Path(out_dir) / "error.txt"
        process = multiprocessing.get_context("forkserver").Process(
            target=_run_alone, args=(dict(os.environ), fn, args, str(error_path))
        )
        process.start()
        process.join(timeout_s)
        if process.is_alive():
            process.kill()
            process.join()
            raise TimeoutError(f"exit_status_of: {fn.__name__} did not end in {timeout_s}s")
        return process.exitcode, error_path.read_text() if error_path.exists() else ""


@contextmanager
def _temporary_files_in(folder: str):
    """Within: ``tempfile``'s default folder is ``folder``. torch's ``start_processes`` names each
    rank's error file (``pytorch-errorfile-*``, which a rank that raises writes and nothing
    removes) in the default folder and takes no other; in ``_launch``'s own folder it goes with it."""
    multiprocessing.util.get_temp_dir()  # multiprocessing's own (the fork server's socket) stays where it is
    before = tempfile.tempdir
    tempfile.tempdir = folder
    try:
        yield
    finally:
        tempfile.tempdir = before


def _launch(fn: Callable, world_size: int, args: tuple, timeout_s: float) -> list[dict]:
    """One start of the ranks on a fresh port: each rank's report ({"ok", "result" | "error"});
    ``not_started`` where the world failed to start and no rank began ``fn``."""
    with tempfile.TemporaryDirectory() as out_dir:
        with _temporary_files_in(out_dir):
            context = mp.start_processes(
                _worker,
                args=(world_size, free_port(), out_dir, dict(os.environ), fn, args),
                nprocs=world_size,
                join=False,
                start_method="forkserver",
            )
        deadline = time.monotonic() + timeout_s
        try:
            while not context.join(timeout=max(0.1, deadline - time.monotonic()), grace_period=5):
                if time.monotonic() >= deadline:
                    for process in context.processes:
                        if process.is_alive():
                            process.kill()
                    raise TimeoutError(
                        f"run_on_ranks: {fn.__name__} did not finish on {world_size} ranks in {timeout_s}s"
                    )
        except (mp.ProcessRaisedException, mp.ProcessExitedException):
            pass  # torch has stopped the other ranks; the per-rank reports say what happened
        reports = []
        for rank in range(world_size):
            path = Path(out_dir) / f"rank{rank}.pt"
            reports.append(
                torch.load(path, weights_only=False) if path.exists() else {"ok": False, "error": "no report"}
            )
        if any((Path(out_dir) / f"rank{rank}.started").exists() for rank in range(world_size)):
            for report in reports:  # a rank got into fn: running it again could see what it did
                report.pop("not_started", None)
        return reports
