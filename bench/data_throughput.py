#!/usr/bin/env python
"""Loader + packer throughput: samples/s and tokens/s with 0, 1 and 2 dataloader workers, from raw
media (``.npy`` frames + WAV, or mp4 with its AAC audio muxed in; encoded online: the weight-free
pooled encoder, and tiny frozen VAEs) and from pre-encoded latents, set against what one training
step consumes; and the shard bytes per clip of each.

    python bench/data_throughput.py [--samples 96] [--packs 40] [--vae-packs 4] [--tokens-per-pack 4096]

It writes a generated world (64x64, 2 s clips) to a temporary folder, builds tiny random VAEs with
the real structure for the VAE path, then for each source and worker count times ``--packs`` packs
after a warm-up pack (worker start and buffer fill, reported apart); the world is read endlessly,
so a run longer than the world re-reads shards (decoding and encoding them again). One DP rank's loader is
measured; every rank runs its own. A training step consumes one pack (``tokens_per_pack`` tokens)
per DP rank per micro-batch: the loader keeps up when its packs/s exceeds the steps/s.

What one training step consumes, in clips/s and tokens/s, on packs of this world (pre-encoded):
the tiny MoT on this CPU, forward + backward + AdamW, measured in the same run; and Nano
(``configs/model/nano.yaml``, its ViT left out: the packs carry the weight-free stand-in) on one
H100 at the project's goal of 530 TF/s, COMPUTED, not measured: ``training/flops.py``'s count of
Nano over the same packs' layouts, divided into 530 TF/s. Token counts are those of this data path
(byte-level text, so AR text runs ~4x longer than Qwen's tokens would; the DM tokens of a clip are
what Nano's VAE grid and 2x2 patches give).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

from megatron_cosmos3.data.clips import MediaConfig  # noqa: E402
from megatron_cosmos3.data.config import DataConfig, DatasetConfig, MixtureConfig, PackingConfig  # noqa: E402
from megatron_cosmos3.data.latent_encoders import PooledLatentEncoder  # noqa: E402
from megatron_cosmos3.data.loader import PackedLoader  # noqa: E402
from megatron_cosmos3.data.schema import decode_sample  # noqa: E402
from megatron_cosmos3.data.shards import ShardIndex, read_shard  # noqa: E402
from megatron_cosmos3.encoders.latent_config import LatentEncoderConfig  # noqa: E402
from megatron_cosmos3.model.config import MoTConfig, load_model_config  # noqa: E402
from megatron_cosmos3.tasks.registry import TASK_REGISTRY  # noqa: E402
from megatron_cosmos3.testing.tiny_vaes import tiny_oobleck_vae, tiny_wan_vae  # noqa: E402
from megatron_cosmos3.training.flops import FlopCounter  # noqa: E402

sys.path.insert(0, str(REPO / "bench"))
from harness import NANO_CONFIG  # noqa: E402
from nano_throughput import GOAL_TFLOPS, flops_of  # noqa: E402


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "data_pipelines" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its functions must pickle by name into the generation processes
    spec.loader.exec_module(module)
    return module


def _tiny_vaes(root: Path, config: MoTConfig) -> LatentEncoderConfig:
    """Random VAEs with Wan2.2's / Oobleck's structure and the model's latent widths."""
    import warnings

    warnings.filterwarnings("ignore", message=".*weight_norm.*")
    tiny_wan_vae(config.video_latent_channels).save_pretrained(root / "video_vae")
    tiny_oobleck_vae(config.audio_latent_dim).save_pretrained(root / "audio_vae")
    return LatentEncoderConfig(True, str(root / "video_vae"), str(root / "audio_vae"), "float32")


def _config(
    shards: Path, workers: int, tokens_per_pack: int, encoders: LatentEncoderConfig | None = None
) -> DataConfig:
    return DataConfig(
        datasets=[DatasetConfig("world", [str(shards)])],
        stages={"all": MixtureConfig({"world": 1.0}, {name: 1.0 for name in TASK_REGISTRY})},
        stage="all",
        packing=PackingConfig(tokens_per_pack=tokens_per_pack, pool_size=64),
        shuffle_buffer=64,
        num_workers=workers,
        encoders=encoders or LatentEncoderConfig(),
    )


def measure(config: DataConfig, model: MoTConfig, packs: int, encoder_factory=None) -> dict[str, float]:
    """Warm-up seconds (first pack), then samples/s, tokens/s and packs/s over ``packs`` packs."""
    start = time.perf_counter()
    with PackedLoader(config, model, latent_encoder_factory=encoder_factory) as loader:
        next(loader)
        warm = time.perf_counter()
        samples = tokens = 0
        for _ in range(packs):
            batch = next(loader)
            samples += batch.num_samples
            tokens += batch.num_ar_tokens + batch.num_dm_tokens
        seconds = time.perf_counter() - warm
        return {
            "warmup_s": warm - start,
            "samples_per_s": samples / seconds,
            "tokens_per_s": tokens / seconds,
            "packs_per_s": packs / seconds,
            "efficiency": loader.efficiency,
        }


def decode_cpu_ms(shards: Path, media: MediaConfig, repeats: int = 3) -> float:
    """CPU milliseconds (this process's, so other jobs on the machine do not count) to read and
    decode one sample of ``shards`` with ``media``'s clip, best of ``repeats`` passes."""
    raws = [raw for shard in ShardIndex.load(shards).shards for raw in read_shard(shard.url)]
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        for index, raw in enumerate(raws):
            decode_sample(raw, media_config=media, draw=(index * 0.618) % 1.0)
        best = min(best, (time.process_time() - start) / len(raws) * 1e3)
    return best


def step_packs(model_config: MoTConfig, shards: Path, tokens_per_pack: int, count: int = 4) -> list:
    """The first ``count`` packs of ``shards``: what the step measurements below consume."""
    with PackedLoader(_config(shards, 0, tokens_per_pack), model_config) as loader:
        return [next(loader) for _ in range(count)]


def training_step_seconds(model_config: MoTConfig, batches: list) -> float:
    """Seconds of one forward + backward + optimizer step of the tiny MoT on one pack (this CPU),
    the best over ``batches`` after the first."""
    from megatron_cosmos3.model.mot import MoTModel
    from megatron_cosmos3.objectives.flow_matching import FlowMatchingConfig, add_flow_matching_noise
    from megatron_cosmos3.objectives.losses import mot_losses

    torch.manual_seed(0)
    model = MoTModel(model_config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    times = []
    for batch in batches:
        noised, targets = add_flow_matching_noise(batch, FlowMatchingConfig(), torch.Generator().manual_seed(0))
        start = time.perf_counter()
        losses = mot_losses(model, noised, targets, 1.0)
        optimizer.zero_grad()
        losses.total.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return min(times[1:])


def nano_pack_seconds(batches: list) -> float:
    """Seconds Nano takes per pack of ``batches`` (mean) at GOAL_TFLOPS on one GPU: COMPUTED from
    ``training/flops.py``'s count (module doc), not measured."""
    nano = dataclasses.replace(load_model_config(NANO_CONFIG), vision=None)
    counter = FlopCounter(nano)
    flops = sum(flops_of(counter, batch).total for batch in batches) / len(batches)
    return flops / (GOAL_TFLOPS * 1e12)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=96, help="samples in the generated world")
    parser.add_argument("--packs", type=int, default=40, help="packs timed per configuration")
    parser.add_argument(
        "--vae-packs", type=int, default=4, help="packs timed with online VAE encoding (slow; 0 = skip those rows)"
    )
    parser.add_argument("--tokens-per-pack", type=int, default=4096)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # the training process's other threads belong to the model, not the loader
    model = MoTConfig()  # the tiny MoT: byte vocabulary, 32-wide video tokens, 16-wide audio latents
    with tempfile.TemporaryDirectory(prefix="data_throughput_") as tmp:
        root = Path(tmp)
        world = _script("generate_world").write_world(
            root / "world",
            args.samples,
            seed=0,
            shard_size=16,
            latents="pooled",
            workers=2,
            video_latent_channels=model.video_latent_channels,
            audio_latent_dim=model.audio_latent_dim,
        )
        mp4_world = _script("generate_world").write_world(
            root / "world_mp4",
            args.samples,
            seed=0,
            shard_size=16,
            workers=2,
            video_format="mp4",
        )
        vaes = _tiny_vaes(root, model)
        pooled = functools.partial(PooledLatentEncoder, model.video_latent_channels, model.audio_latent_dim)
        sources = {  # name: (shards, VAE config, encoder factory, packs timed)
            "latents (pre-encoded)": (world["latent"], None, None, args.packs),
            "raw npy+wav, pooled encoder": (world["raw"], None, pooled, args.packs),
            "raw mp4, pooled encoder": (mp4_world["raw"], None, pooled, args.packs),
            "raw npy+wav, tiny frozen VAEs": (world["raw"], vaes, None, args.vae_packs),
            "raw mp4, tiny frozen VAEs": (mp4_world["raw"], vaes, None, args.vae_packs),
        }
        sources = {name: source for name, source in sources.items() if source[3] > 0}
        print(
            f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread in the "
            f"training process, python {platform.python_version()}, torch {torch.__version__}"
        )
        print(f"# world: {args.samples} samples, 64x64 px, 2 s clips; packs of {args.tokens_per_pack} tokens")
        folders = {"raw npy+wav": world["raw"], "raw mp4": mp4_world["raw"], "latents": world["latent"]}
        for name, folder in folders.items():
            index = ShardIndex.load(folder)
            per_clip = sum(shard.bytes for shard in index.shards) / index.total_samples
            print(f"# shard bytes per clip, {name:12s}: {per_clip:12,.0f}")
        clips = {"whole 2 s clip": MediaConfig(), "1 s window at 12 fps": MediaConfig(fps=12, clip_seconds=1.0)}
        for clip, media in clips.items():
            for name in ("raw npy+wav", "raw mp4"):
                print(f"# decode CPU ms per sample, {name:12s}, {clip:20s}: {decode_cpu_ms(folders[name], media):7.2f}")
        print(
            f"{'source':30s} {'workers':>7s} {'warm-up s':>9s} {'samples/s':>10s} {'tokens/s':>10s} "
            f"{'packs/s':>8s} {'fill':>6s}"
        )
        best = {}
        for name, (shards, encoders, factory, packs) in sources.items():
            for workers in args.workers:
                result = measure(_config(shards, workers, args.tokens_per_pack, encoders), model, packs, factory)
                best[name] = max(best.get(name, 0.0), result["samples_per_s"])
                print(
                    f"{name:30s} {workers:7d} {result['warmup_s']:9.2f} {result['samples_per_s']:10.1f} "
                    f"{result['tokens_per_s']:10.0f} {result['packs_per_s']:8.2f} {result['efficiency']:6.1%}"
                )
        batches = step_packs(model, world["latent"], args.tokens_per_pack)
        clips = sum(b.num_samples for b in batches) / len(batches)
        tokens = sum(b.num_ar_tokens + b.num_dm_tokens for b in batches) / len(batches)
        consumers = {
            "tiny MoT, this CPU (measured)": training_step_seconds(model, batches),
            f"Nano, one H100 at {GOAL_TFLOPS:.0f} TF/s (computed)": nano_pack_seconds(batches),
        }
        print(
            f"\n# what one training step consumes: one pack per DP rank per micro-batch; these packs hold "
            f"{clips:.1f} clips, {tokens:,.0f} tokens"
        )
        for consumer, seconds in consumers.items():
            print(
                f"# {consumer:40s} {seconds:8.4f} s per pack -> {clips / seconds:9,.1f} clips/s, "
                f"{tokens / seconds:11,.0f} tokens/s"
            )
        for name, best_clips in best.items():
            ratios = ", ".join(f"{best_clips * s / clips:6.2f}x {c.split(',')[0]}" for c, s in consumers.items())
            print(f"#   {name:30s} best {best_clips:8.1f} clips/s = {ratios}'s need")
    return 0


if __name__ == "__main__":
    sys.exit(main())
