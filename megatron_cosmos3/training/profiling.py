"""torch.profiler traces of a window of training steps (docs/DESIGN.md, "Profiling").

Each rank named in ``profiling.ranks`` writes one Chrome trace of steps ``start_step`` ..
``start_step + steps - 1`` (numbered as the logs number them) to ``<folder>/rank<r>_step<a>-<b>.json.gz``,
whole or not at all, and with ``memory_snapshot`` CUDA's allocator history of the same steps beside
it. A window the run left early is named by the steps it holds and marked:
``rank<r>_step<a>-<c>_partial.json.gz``, step c the one running when it stopped. The trainer marks
its phases with ``torch.profiler.record_function`` (data, forward, backward, finish_gradients,
optimizer, checkpoint): outside a traced window they cost a dispatcher call each.
A profiler failure is a warning: a diagnostic never stops a training run nor hides its error.
With ``log_to_mlflow``, rank 0 (the one with the MLflow run) logs every rank's files of a window
traced whole: the ranks meet once at the window's end and tell rank 0 what they wrote, which it
reads from the (shared) folder.
"""

from __future__ import annotations

import gzip
import logging
import shutil
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity

from megatron_cosmos3.atomic_files import staged_file
from megatron_cosmos3.training.config import ProfilingConfig
from megatron_cosmos3.training.refusals import StartupRefusal

log = logging.getLogger(__name__)

# Entries of CUDA's allocator history kept (a ring): torchtitan's figure, enough for a few steps.
MEMORY_HISTORY_ENTRIES = 100_000
# Fast, and still a tenth of the JSON's size: the trace is written inside the step that follows the window.
GZIP_LEVEL = 1


def check_profiling(config: ProfilingConfig, world_size: int, device: torch.device) -> None:
    """StartupRefusal naming the field for a profiling setting this run cannot honour: a rank outside
    the world, a memory snapshot without CUDA. Called before any process group, alike on every rank."""
    if not config.enabled:
        return
    outside = [rank for rank in config.ranks if rank >= world_size]
    if outside:
        raise StartupRefusal(f"profiling.ranks={list(config.ranks)}: {outside} not among this run's {world_size} ranks")
    if config.memory_snapshot and device.type != "cuda":
        # Refused, not skipped: a researcher who asked for a snapshot finds out now, not after the run.
        raise StartupRefusal(
            f"profiling.memory_snapshot=true records CUDA's allocator, but this run's device is {device.type!r}; "
            "set profiling.memory_snapshot=false"
        )


def trace_name(rank: int, first: int, last: int, partial: bool = False) -> str:
    """The trace file of steps ``first`` .. ``last``; ``partial``: a window cut short at ``last``."""
    return f"rank{rank}_step{first}-{last}{'_partial' if partial else ''}.json.gz"


class StepProfiler:
    """This rank's profiler of the training loop (a context manager around it): ``step_done()``
    after each optimizer step. Traces only where ``config`` is enabled, names this rank, and this
    attempt starts at or before the window's first step (``done_steps``: the steps a resume had
    done): a resume into or past the window does not trace (a part of a window would be
    another measurement). Any exit from the loop (preemption, the data running out, a non-finite
    stop, an error) stops the profiler and writes the steps recorded so far.

    ``step_done`` is called on every rank of the ``world_size`` (collective): where ranks other than
    0 trace a window and ``log_to_mlflow`` asks for it, all ranks meet after the window's last step,
    and rank 0 queues the files the others wrote to MLflow. A window left early is not met for (a
    failing rank may be gone): the other ranks' files of it stay in the folder."""

    def __init__(
        self,
        config: ProfilingConfig,
        rank: int,
        device: torch.device,
        folder: Path,
        done_steps: int,
        tracker=None,  # rank 0's MLflowTracker (``log_to_mlflow``)
        world_size: int = 1,
    ):
        self.config, self.rank, self.device, self.folder, self.tracker = config, rank, device, folder, tracker
        self.next_step = done_steps + 1  # the training step about to run
        self._profiler: torch.profiler.profile | None = None
        self._recording_memory = False
        self._cut_short = False
        self._written: list[str] = []  # this rank's files of the window
        # Decided alike on every rank (the config and the resumed step), never by a rank's own luck.
        self._meets = (
            config.enabled
            and config.log_to_mlflow
            and world_size > 1
            and any(0 < listed < world_size for listed in config.ranks)
            and self.next_step <= config.start_step
        )
        if not (config.enabled and rank in config.ranks):
            return
        if self.next_step > config.start_step:
            log.info(
                "profiling: this attempt starts at step %d, after profiling.start_step=%d: no trace",
                self.next_step,
                config.start_step,
            )
            return
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        # Profiler step N is training step N: waits until the step before the window, warms up in it
        # (profiling.start_step=1: in the start-up, before step 1), records the window.
        schedule = torch.profiler.schedule(wait=config.start_step - 1, warmup=1, active=config.steps, repeat=1)
        self._profiler = torch.profiler.profile(
            activities=activities,
            schedule=schedule,
            on_trace_ready=self._write_trace,
            record_shapes=config.record_shapes,
            with_stack=config.with_stack,
        )

    def __enter__(self) -> StepProfiler:
        if self._profiler is not None:
            self._profiler.__enter__()
            for _ in range(self.next_step):  # to this attempt's first step (a resume: past the steps done)
                self._profiler.step()
            self._begin_step()
        return self

    def step_done(self) -> None:
        """Called once per optimizer step, after it (and its checkpoint save), on every rank."""
        self.next_step += 1
        if self._profiler is not None:
            self._step_profiler()
        if self._meets and self.next_step == self.config.last_step + 1:
            self._log_other_ranks_files()

    def _step_profiler(self) -> None:
        try:
            self._profiler.step()  # after the window's last step: writes its trace (``_write_trace``)
        except Exception as error:  # noqa: BLE001 - as in _close
            log.warning("profiling: the profiler failed on rank %d, which traces no further: %s", self.rank, error)
            self._cut_short = True
            self._close()
            return
        if self.next_step > self.config.last_step:
            self._close()
        else:
            self._begin_step()

    def _log_other_ranks_files(self) -> None:
        """Every rank's files of the window, gathered by name (collective); rank 0 queues the other
        ranks' to MLflow, from the folder every rank writes to (its own are queued as written)."""
        written: list[list[str]] = [[] for _ in range(dist.get_world_size())]
        dist.all_gather_object(written, self._written)
        if self.rank != 0 or self.tracker is None:
            return
        for rank, files in enumerate(written[1:], start=1):
            for file in files:
                if Path(file).is_file():
                    self.tracker.log_artifact(file, "profiles")
                else:  # profiling.folder on a disk of that rank's node alone
                    log.warning("profiling: rank %d's %s is not in rank 0's folder; not logged to MLflow", rank, file)

    def __exit__(self, error_type, error, traceback) -> None:
        if self._profiler is not None:  # the loop ended inside the window
            self._cut_short = True
            self._close()

    def _begin_step(self) -> None:
        if self.config.memory_snapshot and self.next_step == self.config.start_step:
            torch.cuda.memory._record_memory_history(max_entries=MEMORY_HISTORY_ENTRIES)
            self._recording_memory = True

    def _close(self) -> None:
        profiler, self._profiler = self._profiler, None
        try:
            profiler.__exit__(None, None, None)  # a window cut short: its trace is written here
        except Exception as error:  # noqa: BLE001 - a diagnostic's failure never ends the run nor hides its error
            log.warning("profiling: the profiler did not stop cleanly on rank %d: %s", self.rank, error)
        finally:
            self._stop_memory_history()

    def _stop_memory_history(self) -> None:
        if self._recording_memory:
            self._recording_memory = False
            torch.cuda.memory._record_memory_history(enabled=None)

    def _write_trace(self, profiler: torch.profiler.profile) -> None:
        """torch.profiler's ``on_trace_ready``: the window's Chrome trace, gzipped, written whole or not
        at all, and its memory snapshot; logged to MLflow where asked. Never raises."""
        # step_num: the step the profiler is in; a window cut short ends in that step (an error's
        # part of it, or all of it where preemption stopped after its checkpoint), named as it is.
        last = profiler.step_num if self._cut_short else profiler.step_num - 1
        path = self.folder / trace_name(self.rank, self.config.start_step, last, partial=self._cut_short)
        written = []
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(prefix=".trace.", dir=self.folder) as scratch:
                plain = Path(scratch) / "trace.json"
                profiler.export_chrome_trace(str(plain))
                with staged_file(path) as staged, open(plain, "rb") as source:
                    with gzip.open(staged, "wb", compresslevel=GZIP_LEVEL) as target:
                        shutil.copyfileobj(source, target)
            written.append(path)
            if self._recording_memory:
                snapshot = path.with_name(path.name.removesuffix(".json.gz") + "_memory.pickle")
                with staged_file(snapshot) as staged:
                    torch.cuda.memory._dump_snapshot(str(staged))
                written.append(snapshot)
        except Exception as error:  # noqa: BLE001 - as in _close
            log.warning("profiling: could not write %s: %s", path, error)
        finally:
            self._stop_memory_history()
        self._written += [str(file) for file in written]
        for file in written:
            log.info("profiling: wrote %s", file)
            if self.config.log_to_mlflow and self.tracker is not None:
                self.tracker.log_artifact(str(file), "profiles")
