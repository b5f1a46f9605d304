"""Writing samples into WebDataset tar shards with an index (``index.json``: counts per shard).

Each shard is written under a temporary name and renamed when complete, and the index is written
last, atomically: a reader never sees half a shard listed. Tar member times are fixed, so the same
samples give byte-identical shards.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from webdataset.writer import TarWriter

from megatron_cosmos3.data.errors import SampleError, Skip
from megatron_cosmos3.data.media import decode_json, decode_npy
from megatron_cosmos3.data.schema import Sample, SchemaContext, check_key, decode_sample, encode_sample
from megatron_cosmos3.data.shards import ShardIndex, ShardInfo, read_shard
from megatron_cosmos3.encoders.action_normalization import ActionStats, EmbodimentActionStats

log = logging.getLogger(__name__)


class ShardWriter:
    """Writes ``Sample``s into ``<directory>/<prefix>-000000.tar, ...`` and ``index.json``.

    A shard is closed after ``max_samples_per_shard`` samples or once it exceeds
    ``max_bytes_per_shard``. With ``validate`` (default) each sample is checked against the schema
    (``context`` gives the model's widths) and a bad one is a ValueError: producers fix their data,
    loaders skip it. ``write_index=False`` leaves ``index.json`` to the caller (``close`` still
    returns the index), for several writers filling one folder.
    """

    def __init__(
        self,
        directory: str | Path,
        prefix: str = "shard",
        max_samples_per_shard: int = 64,
        max_bytes_per_shard: int = 1 << 30,
        context: SchemaContext | None = None,
        validate: bool = True,
        write_index: bool = True,
    ) -> None:
        if max_samples_per_shard < 1 or max_bytes_per_shard < 1:
            raise ValueError("max_samples_per_shard and max_bytes_per_shard must be >= 1")
        # The shards' file names start with it: a '/' (prefix '../x') wrote them outside ``directory``,
        # and a hidden name is what partial and temporary files look like.
        if not prefix or prefix.startswith(".") or any(c in prefix for c in "/\\") or not prefix.isprintable():
            raise ValueError(
                f"prefix={prefix!r} must be a file name part: not empty, no '/' or '\\', not starting with '.'"
            )
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.prefix, self.max_samples, self.max_bytes = prefix, max_samples_per_shard, max_bytes_per_shard
        self.context, self.validate, self.write_index = context or SchemaContext(), validate, write_index
        self._shards: list[ShardInfo] = []
        self._tar: TarWriter | None = None
        self._count = self._bytes = 0
        self._modalities: Counter = Counter()
        self._closed = False

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _path(self, number: int) -> Path:
        return self.directory / f"{self.prefix}-{number:06d}.tar"

    def write(self, sample: Sample) -> None:
        """Adds one sample (validated unless ``validate=False``)."""
        encoded = encode_sample(sample)
        if self.validate:
            try:
                decode_sample(encoded, self.context)
            except SampleError as error:
                raise ValueError(f"sample {sample.key!r} does not follow the schema: {error}") from None
        self.write_raw(encoded, sample.modalities)

    def write_raw(self, encoded: dict, modalities=()) -> None:
        """Adds an already-encoded WebDataset dict as is (no validation: for tools and tests)."""
        if self._closed:
            raise ValueError("ShardWriter is closed")
        check_key(encoded.get("__key__"))  # a key read back otherwise, or a member tar -x writes outside
        if self._tar is None:
            path = self._path(len(self._shards))
            self._tar = TarWriter(str(path.with_suffix(".tar.partial")), mtime=0.0, encoder=False)
        self._bytes += self._tar.write(encoded)
        self._count += 1
        self._modalities.update(m.value if hasattr(m, "value") else str(m) for m in modalities)
        if self._count >= self.max_samples or self._bytes >= self.max_bytes:
            self._finish_shard()

    def _finish_shard(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        path = self._path(len(self._shards))
        os.replace(path.with_suffix(".tar.partial"), path)
        modalities = dict(sorted(self._modalities.items()))
        self._shards.append(ShardInfo(str(path), self._count, path.stat().st_size, modalities))
        self._tar, self._count, self._bytes, self._modalities = None, 0, 0, Counter()

    def close(self) -> ShardIndex:
        """Finishes the last shard and writes the index; returns it."""
        if not self._closed:
            self._finish_shard()
            self._closed = True
            self.index = ShardIndex(tuple(self._shards))
            if self.write_index:  # else the caller indexes these shards with others (one folder, many writers)
                self.index.save(self.directory)
        return self.index


PARTS = ".parts"


def check_split_output(out_dir: str | Path, source: str | Path, shard_size: int, task: int, tasks: int) -> None:
    """ValueError naming the value unless a ``write_parts`` writer may start: ``source`` (its input)
    is an existing folder other than ``out_dir``, ``out_dir`` holds no finished dataset (its
    ``index.json``: a second run would overwrite its shards under the old index, never mix them
    silently), ``shard_size`` >= 1 and 0 <= ``task`` < ``tasks``."""
    out_dir, source = Path(out_dir), Path(source)
    if not source.is_dir():
        raise ValueError(f"input {str(source)!r} is not a folder")
    if out_dir.exists() and not out_dir.is_dir():  # mkdir's FileExistsError was a traceback
        raise ValueError(f"output {str(out_dir)!r} is a file, not a folder; write the shards to a new folder")
    if out_dir.resolve() == source.resolve():
        raise ValueError(f"output {str(out_dir)!r} is the input folder; write the shards to a new folder")
    if (out_dir / "index.json").exists():
        raise ValueError(f"output {str(out_dir)!r} already holds a finished dataset (index.json); use a new folder")
    if shard_size < 1:
        raise ValueError(f"shard size {shard_size} must be >= 1")
    if not 0 <= task < tasks:
        raise ValueError(f"task={task} must be in [0, tasks={tasks})")


def write_parts(
    out_dir: str | Path,
    prefix: str,
    parts: int,
    write_part: Callable[[int, ShardWriter], None],
    task: int = 0,
    tasks: int = 1,
    shard_size: int = 64,
    context: SchemaContext | None = None,
    validate: bool = True,
    copy_from: Path | None = None,
    files: tuple = (),
    finish: Callable[[Path, ShardIndex], None] | None = None,
) -> Path:
    """Writes task ``task`` of ``tasks``'s share of ``parts`` numbered parts, and the index once all
    are there, so the output does not depend on the split (a SLURM array, local processes).

    Task I writes parts I, I+N, ...: part n goes through ``write_part(n, writer)`` into
    ``<prefix>-<n>-<k>.tar`` (k counting its ``shard_size`` pieces) with a part index in
    ``out_dir/.parts/``; whichever task finishes last writes ``index.json`` over all parts in order
    (serialised by a lock), copying ``files`` from ``copy_from`` beside it and first calling
    ``finish(out_dir, index)`` for what is computed over the whole output (e.g.
    ``write_action_stats``). Any split writes the files one process writes, byte for byte."""
    if not 0 <= task < tasks:
        raise ValueError(f"task={task} must be in [0, tasks={tasks})")
    out_dir = Path(out_dir)
    for number in range(task, parts, tasks):
        with ShardWriter(
            out_dir, f"{prefix}-{number:06d}", shard_size, context=context, validate=validate, write_index=False
        ) as writer:
            write_part(number, writer)
        (out_dir / PARTS / f"{number:06d}").mkdir(parents=True, exist_ok=True)
        writer.index.save(out_dir / PARTS / f"{number:06d}")
    index_when_complete(out_dir, parts, copy_from, files, finish)
    return out_dir


def index_when_complete(
    out_dir: str | Path,
    parts: int,
    copy_from: Path | None = None,
    files: tuple = (),
    finish: Callable[[Path, ShardIndex], None] | None = None,
) -> bool:
    """Writes ``index.json`` over the ``parts`` part indexes under ``out_dir/.parts`` once all are
    written (copying ``files`` from ``copy_from``, then ``finish(out_dir, index)``: the index is
    written last, so a reader that sees it sees the rest) and removes them; True if this call did it."""
    out_dir = Path(out_dir)
    (out_dir / PARTS).mkdir(parents=True, exist_ok=True)
    with open(out_dir / PARTS / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        folders = [out_dir / PARTS / f"{n:06d}" for n in range(parts)]
        if (out_dir / "index.json").exists() or not all((f / "index.json").is_file() for f in folders):
            return False
        shards = [info for folder in folders for info in ShardIndex.load(folder).shards]
        for name in files:
            if copy_from is not None and (copy_from / name).is_file():
                shutil.copyfile(copy_from / name, out_dir / name)
        index = ShardIndex(tuple(shards))
        if finish is not None:
            finish(out_dir, index)
        index.save(out_dir)
    shutil.rmtree(out_dir / PARTS)
    return True


def empty_output_status(out_dir: str | Path, skipped: Counter) -> int:
    """A pipeline command's exit status once its writing is done: 1 where ``out_dir`` holds a
    finished dataset of no sample (every input skipped, or none there; logged with the skip counts,
    which stay logged per sample too), so a SLURM array shows the task failed; else 0. Under a
    split only the tasks that see the index know the whole: one whose parts are written before the
    last task's returns 0."""
    out_dir = Path(out_dir)
    if (out_dir / "index.json").is_file() and ShardIndex.load(out_dir).total_samples == 0:
        log.error("%s: no usable sample was written (skipped: %s)", out_dir, dict(skipped) or "none")
        return 1
    return 0


# The most processes a pipeline starts per CPU: its work is CPU-bound (one thread a process), so
# more only add their start-up and memory (--workers 1000 started 1000 interpreters for one sample).
PROCESSES_PER_CPU = 2


def process_count(requested: int, jobs: int | None, flag: str) -> int:
    """The processes to start for ``requested`` (the value of ``flag``): at most one per job (``jobs``,
    None where unknown) and ``PROCESSES_PER_CPU`` per CPU of ``os.cpu_count()``, the latter cap
    logged as a warning naming the flag."""
    count = requested if jobs is None else min(requested, max(1, jobs))
    most = PROCESSES_PER_CPU * (os.cpu_count() or 1)
    if count > most:
        log.warning(
            "%s=%d: starting %d processes (%d per CPU on this machine)", flag, requested, most, PROCESSES_PER_CPU
        )
        count = most
    return count


def run_split(function: Callable[..., Counter], processes: int, task: int, tasks: int, *args) -> Counter:
    """``function(*args, task, tasks)`` — one task of a SLURM array — or, with ``processes`` > 0,
    every task of ``processes`` in that many local processes (a ``write_parts`` writer, e.g.
    ``data_pipelines/ingest_videos.py``); the skip counts, summed."""
    if processes < 0:
        raise ValueError(f"processes={processes} must be >= 0 (0: run task {task} of {tasks} here)")
    if processes > 0 and (task, tasks) != (0, 1):  # every array task wrote every part, ignoring its own
        raise ValueError(
            f"processes={processes} runs every task here; it does not go with task={task}, tasks={tasks} "
            "(a SLURM array's part): give one or the other"
        )
    if processes > 1:  # the parts do not depend on their count: fewer processes write the same files
        processes = process_count(processes, None, "processes")
    if processes <= 1:
        return function(*args, *((task, tasks) if processes == 0 else (0, 1)))
    with Pool(processes) as pool:
        counts = pool.starmap(function, [(*args, index, processes) for index in range(processes)])
    return sum(counts, Counter())


def shard_action_stats(shards: Sequence[ShardInfo], raw: bool, quantiles: bool = True) -> ActionStats | None:
    """Per-embodiment statistics of every ``actions.npy`` in ``shards`` (all rows of every sample,
    in shard order; ``EmbodimentActionStats.from_actions``), None when no sample has actions.
    ``raw``: the actions are a dataset's own columns (a raw layout), not pseudo-actions. The shards
    are the writer's own, so every sample is valid; a ``Skip`` is an error."""
    rows: dict[str, list[np.ndarray]] = defaultdict(list)
    for shard in shards:
        for sample in read_shard(shard.url):
            if isinstance(sample, Skip):
                raise ValueError(f"{shard.url}: {sample.reason}: {sample.detail}")
            if "actions.npy" in sample:
                embodiment = decode_json(sample["meta.json"], "meta.json")["embodiment"]
                rows[embodiment].append(decode_npy(sample["actions.npy"], "actions.npy"))
    if not rows:
        return None
    return ActionStats(
        {
            kind: EmbodimentActionStats.from_actions(kind, np.concatenate(chunks), quantiles=quantiles, raw=raw)
            for kind, chunks in sorted(rows.items())
        }
    )


def write_action_stats(raw: bool) -> Callable[[Path, ShardIndex], None]:
    """A ``write_parts`` ``finish``: ``action_stats.json`` of the written shards beside their index
    (``shard_action_stats``), so it is computed over the whole dataset whatever the split."""

    def finish(out_dir: Path, index: ShardIndex) -> None:
        stats = shard_action_stats(index.shards, raw)
        if stats is not None:
            stats.save(out_dir)

    return finish
