"""What the checkpoint checksums cost: save and load time of one process's state with and without
the sha256 manifest (``training/safe_reader.py``).

    python bench/checkpoint_checksums.py [--megabytes 256] [--repeats 3]

"without" saves with the stock FileSystemWriter (no manifest) and loads through the same safe
reader, which then verifies nothing; "with" is what ``Checkpointer`` does (hash in the write
thread, merge at commit, verify each file before it is read). Median wall seconds of the repeats.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter

from megatron_cosmos3.checkpoint.safe_reader import ChecksummedFileSystemWriter, SafeFileSystemReader, write_manifest


def state_of(megabytes: int) -> dict[str, torch.Tensor]:
    """Tensors of 16 MiB each, ``megabytes`` in all (fp32)."""
    count = max(1, megabytes // 16)
    return {f"model/w{i}": torch.randn(2048, 2048) for i in range(count)}


def save(state: dict, folder: Path, checksums: bool) -> float:
    start = time.perf_counter()
    writer = (ChecksummedFileSystemWriter if checksums else FileSystemWriter)(str(folder))
    dcp.save(state, storage_writer=writer)
    if checksums:
        write_manifest(folder)
    return time.perf_counter() - start


def load(state: dict, folder: Path) -> float:
    target = {k: torch.empty_like(v) for k, v in state.items()}
    start = time.perf_counter()
    dcp.load(target, storage_reader=SafeFileSystemReader(str(folder)))
    elapsed = time.perf_counter() - start
    assert all(torch.equal(target[k], state[k]) for k in state)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megabytes", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import logging
    import warnings

    logging.getLogger("megatron_cosmos3.checkpoint.safe_reader").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    state = state_of(args.megabytes)
    root = Path(tempfile.mkdtemp(prefix="ckpt_bench_"))
    times = {(kind, checksums): [] for kind in ("save", "load") for checksums in (False, True)}
    try:
        for r in range(args.repeats):
            for checksums in (False, True):
                folder = root / f"{r}_{checksums}"
                times["save", checksums].append(save(state, folder, checksums))
                times["load", checksums].append(load(state, folder))
                shutil.rmtree(folder)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    size = sum(v.numel() * v.element_size() for v in state.values()) / 2**20
    print(f"state: {size:.0f} MiB in {len(state)} tensors, one process, median of {args.repeats}")
    print("| step | without checksums s | with checksums s | with / without |")
    print("|---|---|---|---|")
    for kind in ("save", "load"):
        plain, checked = statistics.median(times[kind, False]), statistics.median(times[kind, True])
        print(f"| {kind} | {plain:.3f} | {checked:.3f} | {checked / plain:.2f}x |")


if __name__ == "__main__":
    main()
