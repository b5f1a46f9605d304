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
"""

from __future__ import annotations

import argparse
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
from megatron_cosmos3.model.config import MoTConfig  # noqa: E402
from megatron_cosmos3.tasks.registry import TASK_REGISTRY  # noqa: E402
from megatron_cosmos3.testing.tiny_vaes import tiny_oobleck_vae, tiny_wan_vae  # noqa: E402

# Published-scale reference: Nano (8B) at 530 TF/s per H100 and 6 N FLOPs per token.
NANO_PARAMS, H100_FLOPS = 8e9, 530e12


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


def training_step_seconds(model_config: MoTConfig, shards: Path, tokens_per_pack: int) -> float | None:
    """Seconds of one forward + backward + optimizer step of the tiny MoT on one pack (this CPU)."""
    try:
        from megatron_cosmos3.model.mot import MoTModel
        from megatron_cosmos3.objectives.flow_matching import FlowMatchingConfig, add_flow_matching_noise
        from megatron_cosmos3.objectives.losses import mot_losses
    except ImportError:
        return None
    with PackedLoader(_config(shards, 0, tokens_per_pack), model_config) as loader:
        batches = [next(loader) for _ in range(4)]
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
                best[name] = max(best.get(name, 0.0), result["tokens_per_s"])
                print(
                    f"{name:30s} {workers:7d} {result['warmup_s']:9.2f} {result['samples_per_s']:10.1f} "
                    f"{result['tokens_per_s']:10.0f} {result['packs_per_s']:8.2f} {result['efficiency']:6.1%}"
                )
        step = training_step_seconds(model, world["latent"], args.tokens_per_pack)
        nano = H100_FLOPS / (6 * NANO_PARAMS)
        print(f"\n# one training step consumes one pack = {args.tokens_per_pack} tokens per DP rank (per micro-batch)")
        if step is not None:
            print(
                f"# tiny MoT step on this CPU: {step:.3f} s -> needs {args.tokens_per_pack / step:,.0f} "
                "tokens/s per rank"
            )
        print(f"# Nano on one H100 at 530 TF/s (6 N FLOPs/token): needs ~{nano:,.0f} tokens/s per GPU")
        for name, tokens in best.items():
            print(
                f"#   {name:30s} best {tokens:10,.0f} tokens/s = {tokens / nano:5.2f}x an H100's Nano appetite"
                + (f", {tokens * step / args.tokens_per_pack:5.1f}x the tiny CPU step" if step else "")
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
