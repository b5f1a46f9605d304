#!/usr/bin/env python
"""Pack loose files into WebDataset shards with an index, validated against the sample schema.

    python data_pipelines/write_shards.py MANIFEST.jsonl OUT_DIR [--shard-size 64] [--prefix data]

One JSON object per manifest line: ``key`` (no '.' or '/'), the ``meta.json`` keys of the schema
(``caption``, ``fps``, ``embodiment``, ``action_rate_hz``, ``timing``, ...) and file paths (relative
to the manifest) for the media fields: ``image`` / ``observation`` (.png, .jpg, .webp), ``video``
(.npy, .mp4, .webm, .mkv), ``audio`` (.wav, .flac, .mp3, .m4a, .aac, .opus), ``actions`` (.npy),
``video_latents`` / ``image_latents`` / ``audio_latents`` (.npy); the file's suffix names the field
(``video: a.mp4`` -> ``video.mp4``). Files are stored as they are; each sample is checked with the loader's own decoder
(``megatron_cosmos3/data/schema.py``), and a bad one is skipped, counted and logged, not written.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter
from pathlib import Path

from megatron_cosmos3.config_files import refuse_irregular_file
from megatron_cosmos3.data.errors import SampleError
from megatron_cosmos3.data.media import encode_json
from megatron_cosmos3.data.schema import FIELDS, SCHEMA_VERSION, decode_sample
from megatron_cosmos3.data.shard_writer import ShardWriter, check_split_output, empty_output_status
from megatron_cosmos3.data.shards import ShardIndex
from megatron_cosmos3.json_files import loads, unique_keys

log = logging.getLogger("write_shards")
_MEDIA = sorted({name.split(".")[0] for name in FIELDS if name != "meta.json"})


def manifest_sample(entry: dict, root: Path) -> dict:
    """The WebDataset dict of one manifest entry (files read as bytes, the rest into meta.json);
    ValueError naming the field for an entry that is not an object with a string key and file paths."""
    if not isinstance(entry, dict):
        raise ValueError(f"an entry is a JSON object, got {type(entry).__name__}")
    entry = dict(entry)
    sample = {"__key__": entry.pop("key")}  # ShardWriter checks it: it becomes the tar members' names
    for name in _MEDIA:
        if name in entry:
            if not isinstance(entry[name], str):
                raise ValueError(f"{name}={entry[name]!r} must be a file path (a string)")
            path = refuse_irregular_file(name, root / entry.pop(name))  # a FIFO, /dev/zero: read without end
            suffix = path.suffix.lower().lstrip(".").replace("jpeg", "jpg")
            sample[f"{name}.{suffix}"] = path.read_bytes()  # a suffix the schema lacks is its extra_field
    sample["meta.json"] = encode_json({"schema": SCHEMA_VERSION, **entry})
    return sample


def write_shards(
    manifest: str | Path, out_dir: str | Path, shard_size: int = 64, prefix: str = "data"
) -> tuple[ShardIndex, Counter]:
    """Writes the manifest's valid samples; returns the index and skip counts per reason."""
    manifest = refuse_irregular_file("manifest", manifest)  # a FIFO would be read without end
    try:
        text = manifest.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(
            f"manifest {str(manifest)!r}: not a readable UTF-8 file ({type(error).__name__}: {error})"
        ) from None
    skipped: Counter = Counter()
    with ShardWriter(out_dir, prefix, shard_size) as writer:
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                # strict: a key given twice (which file is the video?) or NaN is the entry's skip
                entry = loads(line, object_pairs_hook=unique_keys)
                sample = manifest_sample(entry, manifest.parent)
                writer.write_raw(sample, decode_sample(sample).modalities)
            except SampleError as error:
                skipped[error.reason] += 1
                log.warning("%s line %d: skipped: %s", manifest, number, error)
            except (OSError, ValueError, KeyError, RecursionError) as error:  # Recursion: nested past the parser
                skipped["unreadable_entry"] += 1
                log.warning("%s line %d: skipped: %s: %s", manifest, number, type(error).__name__, error)
    return writer.index, skipped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("manifest", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--shard-size", type=int, default=64)
    parser.add_argument("--prefix", default="data")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        refuse_irregular_file("manifest", args.manifest)
        # The manifest's folder is the input: shards are not mixed among its files, nor a finished dataset rewritten.
        check_split_output(args.out_dir, args.manifest.parent, args.shard_size, 0, 1)
        index, skipped = write_shards(args.manifest, args.out_dir, args.shard_size, args.prefix)
    except ValueError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    log.info(
        "wrote %d samples in %d shards to %s; skipped %s",
        index.total_samples,
        len(index.shards),
        args.out_dir,
        dict(skipped) or "none",
    )
    return empty_output_status(args.out_dir, skipped)


if __name__ == "__main__":
    sys.exit(main())
