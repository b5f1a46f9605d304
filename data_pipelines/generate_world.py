#!/usr/bin/env python
"""Write the generated world: WebDataset shards of physically consistent samples (see
``megatron_cosmos3/world/world.py``), deterministic given the seed.

    python data_pipelines/generate_world.py OUT [--samples 256] [--seed 0] [--latents pooled]
        [--demonstrations 0.2] [--embodiments single_arm humanoid] [--video-format mp4]

writes ``OUT/raw/`` — video (.npy frames, or with ``--video-format mp4`` an H.264 mp4 with the
stereo 48 kHz audio muxed in as AAC: what real corpora store, about 50x smaller), stereo 48 kHz audio
(.wav, beside .npy video), pseudo-actions, captions — with ``index.json`` and ``action_stats.json``;
with ``--latents pooled`` also ``OUT/latent/``: the same samples with pixels and audio replaced by
the weight-free pooled latents (``megatron_cosmos3/data/latent_encoders.py``) at the tiny model's
widths, the cheap demo input. With mp4 the latents are encoded from the mp4 as the loader decodes
it, so the path real video takes is the one the latents went through. For latents from the real
frozen VAEs, run ``encode_shards.py`` on ``OUT/raw``.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections import defaultdict
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch

from megatron_cosmos3.data.determinism import seed_problem  # noqa: E402
from megatron_cosmos3.data.latent_encoders import PooledLatentEncoder, latent_sample  # noqa: E402
from megatron_cosmos3.data.schema import SchemaContext, decode_sample, encode_sample  # noqa: E402
from megatron_cosmos3.data.shard_writer import ShardWriter, process_count  # noqa: E402
from megatron_cosmos3.encoders.action_normalization import ActionStats, EmbodimentActionStats  # noqa: E402
from megatron_cosmos3.world.world import WorldConfig, generate_sample  # noqa: E402

log = logging.getLogger("generate_world")
# Samples a worker is handed at once (``Pool.imap``'s chunksize): the jobs a worker count is capped at.
CHUNK = 4


def _one_thread() -> None:
    torch.set_num_threads(1)  # tiny tensors: thread hand-offs would cost more than the arithmetic


def _generate(job):
    """One sample, its raw shard fields and the sample its latents are encoded from: the mp4 as
    the loader decodes it, or the generated sample itself."""
    config, seed, index, video_format = job
    sample = generate_sample(config, seed, index)
    raw = encode_sample(sample, video_format)
    decoded = decode_sample(raw) if video_format == "mp4" else sample  # also validates the mp4
    return sample, raw, decoded


def write_world(
    out: str | Path,
    samples: int,
    seed: int = 0,
    config: WorldConfig | None = None,
    shard_size: int = 32,
    latents: str = "none",
    video_latent_channels: int = 8,
    audio_latent_dim: int = 16,
    workers: int = 1,
    video_format: str = "npy",
    video_patch_size: int = 2,
) -> dict[str, Path]:
    """Writes the world under ``out`` (module doc); returns {"raw": dir, "latent": dir (if asked)}.
    ``video_format``: "npy" (raw frames + WAV) or "mp4" (H.264 + AAC). ``video_patch_size``: the
    pooled latents' token patch (the model's ``video_patch_size``; recorded in each sample)."""
    if video_format not in ("npy", "mp4"):
        raise ValueError(f"video_format must be 'npy' or 'mp4', got {video_format!r}")
    if latents not in ("none", "pooled"):
        raise ValueError(f"latents must be 'none' or 'pooled', got {latents!r}")
    if samples < 1 or shard_size < 1 or workers < 1:
        raise ValueError(f"samples={samples}, shard_size={shard_size} and workers={workers} must be >= 1")
    problem = seed_problem("seed", seed)
    if problem:
        raise ValueError(problem)
    out, config = Path(out), config or WorldConfig()
    if out.exists() and not out.is_dir():  # mkdir's NotADirectoryError was a traceback
        raise ValueError(f"output {str(out)!r} is a file, not a folder")
    dirs = {"raw": out / "raw"} | ({"latent": out / "latent"} if latents == "pooled" else {})
    for folder in dirs.values():  # its shards would be overwritten, and extra old ones left beside the new index
        if (folder / "index.json").exists():
            raise ValueError(f"output {str(folder)!r} already holds a finished dataset (index.json); use a new folder")
    # Before any folder is made: widths it refuses left an empty raw/ behind.
    encoder = (
        PooledLatentEncoder(video_latent_channels, audio_latent_dim, 0, video_patch_size)
        if latents == "pooled"
        else None
    )
    writers = {"raw": ShardWriter(dirs["raw"], "world", shard_size)}
    if encoder is not None:
        writers["latent"] = ShardWriter(
            dirs["latent"],
            "world",
            shard_size,
            context=SchemaContext(None, encoder.video_token_dim, audio_latent_dim, video_patch_size=video_patch_size),
        )
    actions = defaultdict(list)
    # lazily: a list of every job was built before the first sample (--samples 10**13 hung there)
    jobs = ((config, seed, index, video_format) for index in range(samples))
    workers = process_count(workers, math.ceil(samples / CHUNK), "workers")  # 1000 for one sample started 1000
    _one_thread()
    with Pool(workers, initializer=_one_thread) if workers > 1 else _InProcess() as pool:
        for sample, raw, decoded in pool.imap(_generate, jobs, chunksize=CHUNK):
            if video_format == "npy":
                writers["raw"].write(sample)
            else:  # validated by its decode in the worker
                writers["raw"].write_raw(raw, decoded.modalities)
            if encoder is not None:
                writers["latent"].write(latent_sample(decoded, encoder))
            if sample.actions is not None:
                actions[sample.embodiment].append(sample.actions)
    stats = ActionStats(
        {
            kind: EmbodimentActionStats.from_actions(kind, np.concatenate(chunks))
            for kind, chunks in sorted(actions.items())
        }
    )
    for name, writer in writers.items():
        index = writer.close()
        if stats.embodiments:
            stats.save(dirs[name])
        log.info("%s: %d samples in %d shards under %s", name, index.total_samples, len(index.shards), dirs[name])
    return dirs


class _InProcess:
    """``Pool``'s imap without processes (workers=1)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    @staticmethod
    def imap(function, jobs, chunksize=1):
        return map(function, jobs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="output folder (raw/ and latent/ are created in it)")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-size", type=int, default=32, help="samples per shard")
    parser.add_argument("--resolution", type=int, default=64, help="frame side in pixels (multiple of 32)")
    parser.add_argument("--duration", type=float, default=2.0, help="clip length in seconds")
    parser.add_argument("--latents", choices=["none", "pooled"], default="none")
    parser.add_argument(
        "--video-latent-channels",
        type=int,
        default=8,
        help="pooled video latent channels (a token has video_patch_size**2 x as many features)",
    )
    parser.add_argument(
        "--video-patch-size",
        type=int,
        default=2,
        help="latent cells per video token, each side (model.video_patch_size)",
    )
    parser.add_argument("--audio-latent-dim", type=int, default=16)
    parser.add_argument(
        "--workers", type=int, default=1, help="processes generating samples (at most one per 4 samples, 2 per CPU)"
    )
    parser.add_argument(
        "--video-format",
        choices=["npy", "mp4"],
        default="npy",
        help="raw video as .npy frames + .wav, or mp4 (H.264 with the AAC audio muxed in)",
    )
    parser.add_argument(
        "--demonstrations", type=float, default=0.0, help="fraction of samples that are expert demonstrations"
    )
    parser.add_argument(
        "--embodiments",
        nargs="+",
        default=list(WorldConfig.embodiments),
        help="embodiments acting in the clips (planar_pusher is held out by default)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        write_world(
            args.out,
            args.samples,
            args.seed,
            WorldConfig(
                resolution=args.resolution,
                duration_s=args.duration,
                embodiments=tuple(args.embodiments),
                demonstration_fraction=args.demonstrations,
            ),
            args.shard_size,
            args.latents,
            args.video_latent_channels,
            args.audio_latent_dim,
            args.workers,
            args.video_format,
            args.video_patch_size,
        )
    except ValueError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
