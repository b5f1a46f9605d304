#!/usr/bin/env python
"""Inspect a shard set: what its index says, and (``--verify``) what the loader would make of it.

    python data_pipelines/inspect_shards.py DIR            # per-shard sample counts and modalities
    python data_pipelines/inspect_shards.py DIR --verify   # stream every shard: usable / skipped per reason

``--verify`` reads each shard as the loader does (``read_shard`` + ``decode_sample``, without a
model, so embodiment names and latent widths are checked against the pseudo-action layouts only)
and prints skip counts per shard and reason; it exits with status 1 if any sample is bad.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from megatron_cosmos3.data.schema import decode_sample
from megatron_cosmos3.data.shards import ShardIndex, ShardInfo, read_samples


def verify_shard(shard: ShardInfo) -> tuple[int, Counter]:
    """(usable samples, skips per reason) of one shard, as the loader counts them (``read_samples``)."""
    read = read_samples(shard, lambda index, raw: decode_sample(raw))
    skipped = Counter()
    for skip in read.skips:
        skipped[skip.reason] += skip.count
    return len(read.results), skipped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", type=Path, help="a folder with index.json (or the index file)")
    parser.add_argument("--verify", action="store_true", help="read every shard and count usable/bad samples")
    args = parser.parse_args(argv)
    try:
        index = ShardIndex.load(args.directory)
    except (OSError, ValueError) as error:  # no index there, or a crafted one: named, one line
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    total_bad = 0
    for shard in index.shards:
        line = f"{shard.url}: {shard.samples} samples, {shard.bytes} bytes, {shard.modalities}"
        if args.verify:
            usable, skipped = verify_shard(shard)
            total_bad += sum(skipped.values())
            line += f" | usable {usable}" + (f", skipped {dict(skipped)}" if skipped else "")
        print(line)
    print(f"{len(index.shards)} shards, {index.total_samples} samples" + (f", {total_bad} bad" if args.verify else ""))
    return 1 if total_bad else 0


if __name__ == "__main__":
    sys.exit(main())
