#!/usr/bin/env python
"""Pre-encode shards: pixels and waveforms -> DM latents, offline, so training reads latents.

    python data_pipelines/encode_shards.py IN_DIR OUT_DIR --video-vae VAE_DIR --audio-vae VAE_DIR
    python data_pipelines/encode_shards.py IN_DIR OUT_DIR --encoder pooled     # weight-free stand-in
    python data_pipelines/encode_shards.py IN_DIR OUT_DIR ... --clip-seconds 2 [--clip-start random
        --clips-per-sample 4 --seed 0] [--fps 16 --resolution-buckets 256x256,256x448]

Reads every shard of ``IN_DIR`` (its ``index.json``; or IN_DIR is an index file, WebDataset's
``wids`` ones too), replaces video, image and audio by their
latents (``megatron_cosmos3.data.latent_encoders.latent_sample``: the frozen VAEs from local
diffusers folders, or the pooled stand-in), keeps text, actions (of any embodiment: raw actions of a
LeRobot dataset's robot too), timing and the ViT picture, and
writes ``OUT_DIR`` shards with their index; ``action_stats.json`` is copied. Samples that fail the
schema are skipped, counted per reason and logged, exactly as the loader would.

Clipping (``--clip-seconds S``): long samples are cut into clips before encoding, by the loader's own
cutting (``data/clips.py``, ``schema.decode_sample`` with a ``data.media`` config and a draw): with
``--clip-start grid`` every clip of the grid of S-second clips (``clips.grid_draws``), with
``random`` ``--clips-per-sample`` clips whose draws come from (``--seed``, input shard, sample, k).
A clip keeps the caption segments, audio and actions of its window (``timing.clip_start_s`` and
``timing.source_duration_s`` say where it was cut) and is keyed ``<key>-<k>``; a pre-encoded clip
is the latents of the clip the loader cuts on the fly with the same window. ``--fps`` and
``--resolution-buckets`` are ``data.media``'s frame rate and buckets (the video VAE then sees what
training would have seen); a sample shorter than S stays whole.

Split over processes (``--task I --tasks N``, e.g. a SLURM array: ``slurm/preprocess.sbatch``): task
I encodes input shards I, I+N, ...; input shard n becomes ``latent-<n>-<k>.tar`` (k counting its
``--shard-size`` pieces) with a part index in ``OUT_DIR/.parts/``, and whichever task finishes last
writes ``index.json`` over all parts in input order. So the output does not depend on N: any split
writes the files one process writes, byte for byte.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter
from pathlib import Path

import torch

from megatron_cosmos3.data.clips import MediaConfig, grid_draws
from megatron_cosmos3.data.determinism import seed_problem, uniform
from megatron_cosmos3.data.errors import printable
from megatron_cosmos3.data.latent_encoders import PooledLatentEncoder, VAELatentEncoder, latent_sample
from megatron_cosmos3.data.schema import SchemaContext, decode_sample
from megatron_cosmos3.data.shard_writer import PARTS, ShardWriter, check_split_output, empty_output_status, write_parts
from megatron_cosmos3.data.shards import ShardIndex, read_samples
from megatron_cosmos3.encoders.action_normalization import ACTION_STATS_FILENAME
from megatron_cosmos3.encoders.latent_config import LatentEncoderConfig

log = logging.getLogger("encode_shards")

# The flags that set ``data.media``'s fields: MediaConfig's refusals name the training config's field
# (media.clip_seconds=...), which the user of this script did not type.
MEDIA_FLAGS = {
    "media.fps": "--fps",
    "media.resolution_buckets": "--resolution-buckets",
    "media.clip_seconds": "--clip-seconds",
    "media.clip_start": "--clip-start",
}


def check_media_flags(media: MediaConfig) -> None:
    """``media.validate()``, its ValueError naming this script's flags in place of the fields."""
    try:
        media.validate()
    except ValueError as error:
        message = str(error)
        for field_name, flag in MEDIA_FLAGS.items():
            message = message.replace(field_name, flag)
        raise ValueError(message) from None


def clips_of(raw: dict, context: SchemaContext, media: MediaConfig, clips_per_sample: int, seed: int, where: tuple):
    """Yields the clips pre-encoding cuts from one WebDataset sample (module doc), as decoded
    ``Sample``s, one at a time (a long video's clips are never all in memory): the whole sample
    without ``media.clip_seconds``; every grid clip; or ``clips_per_sample`` random ones drawn from
    (seed, *where, k). SampleError as ``decode_sample`` raises it."""
    if media.clip_seconds <= 0:
        yield decode_sample(raw, context, media)
    elif media.clip_start == "random":
        for k in range(clips_per_sample):
            yield decode_sample(raw, context, media, uniform(seed, "clip", *where, k))
    else:
        first = decode_sample(raw, context, media, 0.0)
        yield first
        source_s = first.timing.get("source_duration_s")
        for draw in grid_draws(source_s, media)[1:] if source_s else []:
            yield decode_sample(raw, context, media, draw)


def encode_shards(
    in_dir: str | Path,
    out_dir: str | Path,
    encoder,
    shard_size: int = 64,
    task: int = 0,
    tasks: int = 1,
    media: MediaConfig | None = None,
    clips_per_sample: int = 1,
    seed: int = 0,
) -> Counter:
    """Writes task ``task`` of ``tasks``'s part of the latent copy of ``in_dir`` into ``out_dir``
    (module doc), each sample cut into clips by ``media`` (``clips_of``), and the index once every
    part is there; returns skip counts per reason."""
    media = media or MediaConfig()
    media.validate()
    if media.clip_start == "first" and media.clip_seconds > 0:
        raise ValueError("--clip-start='first' cuts one clip; use 'grid' (every clip) or 'random'")
    if clips_per_sample < 1:
        raise ValueError(f"--clips-per-sample={clips_per_sample} must be >= 1")
    problem = seed_problem("seed", seed)  # -1 was taken: every other seed of the project refuses it
    if problem:
        raise ValueError(problem)
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    # An index file (this reader's or a wids one) names the shards; its folder holds action_stats.json.
    folder = in_dir.parent if in_dir.suffix == ".json" and in_dir.is_file() else in_dir
    check_split_output(out_dir, folder, shard_size, task, tasks)
    skipped: Counter = Counter()
    # Actions pass through unchanged, so any embodiment is kept (raw actions of a dataset's robot too).
    patch = encoder.video_patch_size
    context = SchemaContext(None, encoder.video_token_dim or None, encoder.audio_latent_dim or None, True, patch)
    inputs = ShardIndex.load(in_dir).shards

    def encode_part(number: int, writer: ShardWriter) -> None:
        shard = inputs[number]

        def encode(index: int, raw: dict) -> list:
            clips = clips_of(
                raw,
                SchemaContext(any_embodiment=True, video_patch_size=patch),
                media,
                clips_per_sample,
                seed,
                (number, index),
            )
            encoded = []
            for k, clip in enumerate(clips):
                clip.key = clip.key if media.clip_seconds <= 0 else f"{clip.key}-{k:04d}"
                encoded.append(latent_sample(clip, encoder))
            return encoded

        # A sample is written once its shard is read to the end: one found split later is not (``read_samples``).
        with torch.inference_mode():
            read = read_samples(shard, encode)
        for skip in read.skips:
            skipped[skip.reason] += skip.count
            log.warning("%s: skipping %s: %s: %s", shard.url, printable(skip.key or "-"), skip.reason, skip.detail)
        for _, encoded in read.results:
            for sample in encoded:
                writer.write(sample)

    stats = (ACTION_STATS_FILENAME,)
    write_parts(out_dir, "latent", len(inputs), encode_part, task, tasks, shard_size, context, True, folder, stats)
    return skipped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("in_dir", type=Path, help="raw shards with an index.json, or an index file (a wids one too)")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--encoder", choices=["vae", "pooled"], default="vae")
    parser.add_argument("--video-vae", default="", help="local diffusers AutoencoderKLWan folder")
    parser.add_argument("--audio-vae", default="", help="local diffusers AutoencoderOobleck folder")
    parser.add_argument("--dtype", default="float32", help="VAE dtype: float32, bfloat16 or float16")
    parser.add_argument("--video-latent-channels", type=int, default=8, help="pooled encoder only")
    parser.add_argument("--audio-latent-dim", type=int, default=16, help="pooled encoder only")
    parser.add_argument(
        "--video-patch-size",
        type=int,
        default=2,
        help="latent cells per video token, each side (model.video_patch_size)",
    )
    parser.add_argument("--shard-size", type=int, default=64, help="samples per output shard, per input shard")
    parser.add_argument("--clip-seconds", type=float, default=0.0, help="cut clips this long (0: whole samples)")
    parser.add_argument("--clip-start", choices=["grid", "random"], default="grid", help="every grid clip, or random")
    parser.add_argument("--clips-per-sample", type=int, default=1, help="random clips per sample")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random clips' draws")
    parser.add_argument("--fps", type=float, default=0.0, help="frame rate clips are sampled at (0: the source's)")
    parser.add_argument("--resolution-buckets", default="", help="comma-separated HxW buckets (data.media's)")
    parser.add_argument("--task", type=int, default=0, help="this process's part (e.g. $SLURM_ARRAY_TASK_ID)")
    parser.add_argument("--tasks", type=int, default=1, help="how many parts (e.g. $SLURM_ARRAY_TASK_COUNT)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    buckets = [b for b in args.resolution_buckets.split(",") if b]
    media = MediaConfig(args.fps, buckets, args.clip_seconds, args.clip_start)
    try:
        check_media_flags(media)  # before any VAE is loaded
        if args.encoder == "vae":  # no VAE folder, or a missing one: one line like every bad argument
            config = LatentEncoderConfig(True, args.video_vae, args.audio_vae, args.dtype)
            encoder = VAELatentEncoder.from_config(config, args.video_patch_size)
        else:
            encoder = PooledLatentEncoder(args.video_latent_channels, args.audio_latent_dim, 0, args.video_patch_size)
        skipped = encode_shards(
            args.in_dir,
            args.out_dir,
            encoder,
            args.shard_size,
            args.task,
            args.tasks,
            media,
            args.clips_per_sample,
            args.seed,
        )
    except (ValueError, OSError) as error:  # OSError: a VAE folder that is not there or not readable
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    log.info(
        "task %d/%d wrote its part of %s; skipped %s", args.task, args.tasks, args.out_dir, dict(skipped) or "none"
    )
    if (args.out_dir / "index.json").is_file() and not (args.out_dir / PARTS).exists():
        index = ShardIndex.load(args.out_dir)
        log.info("%s: %d samples in %d shards", args.out_dir, index.total_samples, len(index.shards))
    return empty_output_status(args.out_dir, skipped)


if __name__ == "__main__":
    sys.exit(main())
