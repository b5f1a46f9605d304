"""What every benchmark script shares: timing with device syncs, the device's description, peak
memory, and Qwen3-VL's rotary split scaled to a smaller head.

The scripts import it as a sibling module (``python bench/<script>.py`` puts bench/ on the path).
"""

from __future__ import annotations

import argparse
import platform
import resource
import statistics
import time
from pathlib import Path

import torch

from megatron_cosmos3.model.config import MoTConfig, scaled_mrope_section

NANO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "model" / "nano.yaml"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    """Seconds ``fn()`` takes, kernels included (CUDA work is waited for before and after)."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def median_seconds(fn, device: torch.device, warmup: int, repeats: int) -> float:
    """Median of ``repeats`` timed calls after ``warmup`` untimed ones (allocator, autotuning)."""
    for _ in range(warmup):
        fn()
    return statistics.median(timed(fn, device) for _ in range(repeats))


def repeats_parser(doc: str, default: int = 3) -> argparse.ArgumentParser:
    """A script's parser with ``--repeats`` (its docstring's first line is its help)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=default)
    return parser


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}; torch {torch.__version__}, CUDA {torch.version.cuda}"
    cpu = platform.processor() or platform.machine()
    return f"CPU {cpu} x{torch.get_num_threads()} threads; torch {torch.__version__}"


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated GPU memory since the last reset, or the process's peak resident set on CPU
    (which never resets: on CPU it includes everything the process has held)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def add_pack_and_head_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of the GPU scripts' shared setting: a model config's heads (overridable), and one
    pack of equal mixed samples on one device."""
    parser.add_argument("--config", default=str(NANO_CONFIG), help="model YAML (a model: section)")
    parser.add_argument("--heads", type=int, help="override num_attention_heads")
    parser.add_argument("--kv-heads", type=int, help="override num_kv_heads")
    parser.add_argument("--head-dim", type=int, help="override head_dim")
    parser.add_argument("--tokens", type=int, default=16384, help="tokens in the pack")
    parser.add_argument("--samples", type=int, default=4, help="samples in the pack (equal lengths)")
    parser.add_argument("--ar-fraction", type=float, default=0.25, help="AR share of each sample, the rest DM")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def sample_lengths(args: argparse.Namespace) -> list[tuple[int, int]]:
    """(AR tokens, DM tokens) of each sample of the pack the flags describe."""
    sample_tokens = args.tokens // args.samples
    n_ar = int(sample_tokens * args.ar_fraction)
    return [(n_ar, sample_tokens - n_ar)] * args.samples


def add_small_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of the CPU-sized scripts' model: width, depth and heads (``small_model_config``)."""
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)


def small_model_config(args: argparse.Namespace, **fields) -> MoTConfig:
    """The model those flags describe: head_dim = hidden / heads, FFN 4 x hidden, a 1024 vocabulary."""
    head_dim = args.hidden // args.heads
    shape = dict(
        vocab_size=1024,
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_attention_heads=args.heads,
        num_kv_heads=args.kv_heads,
        head_dim=head_dim,
        mrope_section=scaled_mrope_section(head_dim),
        ffn_hidden_size=4 * args.hidden,
    )
    return MoTConfig(**{**shape, **fields})
