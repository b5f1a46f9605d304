#!/usr/bin/env python
"""Generation latency: AR prefill and per-denoising-step time for a 2 s text-to-audio+video clip,
cached (the AR section once, each step only the Generator against its K/V) vs uncached (a whole
forward pass per step), and the whole ``generate`` call both ways.

    python bench/generation_latency.py [--config configs/model/tiny.yaml] [--seconds 2] [--size 256]
        [--prompt-chars 512] [--steps 8] [--solver euler] [--guidance 1] [--threads N] [--device cpu]

The cache saves the Reasoner's share of every step: per step it should win by about the AR share
of the sample's tokens (attention to the AR keys remains). Prints one BENCHMARKS.md row.
"""

from __future__ import annotations

import argparse
import sys
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import device_description, median_seconds, timed  # noqa: E402

from megatron_cosmos3.data.latent_encoders import PooledLatentEncoder  # noqa: E402
from megatron_cosmos3.data.tokenizer import ByteTokenizer  # noqa: E402
from megatron_cosmos3.inference.denoising import full_forward_velocity, prefill, velocity  # noqa: E402
from megatron_cosmos3.inference.generation import generate  # noqa: E402
from megatron_cosmos3.inference.requests import GenerationRequest, generation_builder, prepare_request  # noqa: E402
from megatron_cosmos3.model.config import load_model_config  # noqa: E402
from megatron_cosmos3.model.mot import MoTModel  # noqa: E402
from megatron_cosmos3.model.packed_batch import PackedBatch  # noqa: E402

TINY = Path(__file__).resolve().parents[1] / "configs" / "model" / "tiny.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(TINY), help="model YAML (a model: section)")
    parser.add_argument("--seconds", type=float, default=2.0, help="clip length")
    parser.add_argument("--size", type=int, default=256, help="square frame side in pixels (multiple of 32)")
    parser.add_argument("--prompt-chars", type=int, default=512, help="prompt length (byte tokens)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--solver", default="euler")
    parser.add_argument("--guidance", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's; 1 on a shared machine)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    config = load_model_config(args.config)
    config.vision = None  # text-to-audio+video shows the Reasoner no picture
    config.vocab_size = max(config.vocab_size, 256)
    torch.manual_seed(0)
    model = MoTModel(config).to(device).eval()
    builder = generation_builder(
        config,
        ByteTokenizer(config.vocab_size),
        PooledLatentEncoder(config.video_latent_channels, config.audio_latent_dim, 0, config.video_patch_size),
    )
    request = GenerationRequest(
        "text_to_audio_video",
        prompt=("a red ball bounces off the floor and rolls away " * 64)[: args.prompt_chars],
        duration_s=args.seconds,
        resolution=(args.size, args.size),
        steps=args.steps,
        solver=args.solver,
        guidance=args.guidance,
    )
    batch = PackedBatch.from_samples([prepare_request(request, builder).conditional.sample]).to(device)
    batch = batch.replace(dm_timesteps=batch.dm_noise_mask.float() * 0.5)
    n_ar, n_dm = batch.num_ar_tokens, batch.num_dm_tokens

    with torch.no_grad():
        cache = prefill(model, batch)
        prefill_s = median_seconds(lambda: prefill(model, batch), device, 1, args.repeats)
        cached_s = median_seconds(lambda: velocity(model, batch, cache), device, 1, args.repeats)
        uncached_s = median_seconds(lambda: full_forward_velocity(model)(batch), device, 1, args.repeats)
    whole_cached = timed(lambda: generate(model, [request], builder), device)
    whole_uncached = timed(lambda: generate(model, [request], builder, cached=False), device)

    print(f"{n_ar} AR + {n_dm} DM tokens (AR share {n_ar / (n_ar + n_dm):.1%}); {args.steps} {args.solver} steps")
    print(
        "| date | device | model | AR + DM tokens | prefill ms | step ms cached | step ms uncached | "
        "step ratio uncached/cached | generate s cached | generate s uncached |"
    )
    print(
        f"| {date.today()} | {device_description(device)} | {Path(args.config).stem} | {n_ar} + {n_dm} | "
        f"{prefill_s * 1e3:.1f} | {cached_s * 1e3:.1f} | {uncached_s * 1e3:.1f} | {uncached_s / cached_s:.2f} | "
        f"{whole_cached:.2f} | {whole_uncached:.2f} |"
    )


if __name__ == "__main__":
    main()
