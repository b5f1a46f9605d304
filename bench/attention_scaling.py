"""Attention backend vs the dense-mask reference as the pack grows: time and peak memory.

Each (backend, length) runs fwd+bwd of the shared attention alone in a fresh subprocess, so its
peak resident memory (CPU) or peak allocated memory (GPU) is its own. Samples have a fixed length,
so a backend without an N x N tensor grows linearly with the pack; the dense reference grows
quadratically and is stopped at --dense-max tokens.

    python bench/attention_scaling.py [--lengths 1024 2048 4096 8192 16384 --backend sdpa]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
from harness import device_description


def measure(
    backend_name: str,
    tokens: int,
    sample_tokens: int,
    ar_fraction: float,
    heads: int,
    kv_heads: int,
    head_dim: int,
    repeats: int,
) -> dict:
    from megatron_cosmos3.model.attention import PackLayout, attention_backend

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n_ar = int(sample_tokens * ar_fraction)
    samples = tokens // sample_tokens
    cu = lambda n: torch.arange(samples + 1, device=device) * n
    layout = PackLayout.from_cu_seqlens(cu(n_ar), cu(sample_tokens - n_ar))
    g = torch.Generator(device=device).manual_seed(0)
    make = lambda n, h: torch.randn(n, h, head_dim, device=device, dtype=dtype, generator=g).requires_grad_()
    n_dm = samples * (sample_tokens - n_ar)
    q_ar, k_ar, v_ar = make(samples * n_ar, heads), make(samples * n_ar, kv_heads), make(samples * n_ar, kv_heads)
    q_dm, k_dm, v_dm = make(n_dm, heads), make(n_dm, kv_heads), make(n_dm, kv_heads)
    backend = attention_backend(backend_name, device, head_dim)
    baseline_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def step():
        out_ar = backend.ar_attention(q_ar, k_ar, v_ar, layout)
        out_dm = backend.dm_attention(q_dm, k_ar, v_ar, k_dm, v_dm, layout)
        (out_ar.float().sum() + out_dm.float().sum()).backward()
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:  # ru_maxrss is in KiB on Linux; the growth over the inputs is the attention's own
        peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline_rss) / 1024
    return {"seconds": sorted(times)[len(times) // 2], "peak_mb": peak_mb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--backend", default="sdpa")
    parser.add_argument("--dense-max", type=int, default=8192)
    parser.add_argument("--sample-tokens", type=int, default=1024)
    parser.add_argument("--ar-fraction", type=float, default=0.25)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is None and any(tokens < args.sample_tokens for tokens in args.lengths):
        parser.error(f"--lengths {args.lengths}: each pack needs at least one sample of {args.sample_tokens} tokens")
    if args.child:
        name, tokens = args.child.split(":")
        print(
            json.dumps(
                measure(
                    name,
                    int(tokens),
                    args.sample_tokens,
                    args.ar_fraction,
                    args.heads,
                    args.kv_heads,
                    args.head_dim,
                    args.repeats,
                )
            )
        )
        return

    device = device_description(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    print(
        f"device: {device}; heads {args.heads}/{args.kv_heads}, head_dim {args.head_dim}; "
        f"samples of {args.sample_tokens} tokens ({args.ar_fraction:.0%} AR); fwd+bwd, median of {args.repeats}"
    )
    backend = args.backend
    header = f"{'tokens':>8} {backend + ' ms':>10} {backend + ' MB':>10} {'dense ms':>10} {'dense MB':>10}"
    print(f"{header} {'time ratio':>11}")
    for tokens in args.lengths:
        row = {}
        for name in (args.backend, "dense"):
            if name == "dense" and tokens > args.dense_max:
                continue
            child = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    f"{name}:{tokens}",
                    "--sample-tokens",
                    str(args.sample_tokens),
                    "--ar-fraction",
                    str(args.ar_fraction),
                    "--heads",
                    str(args.heads),
                    "--kv-heads",
                    str(args.kv_heads),
                    "--head-dim",
                    str(args.head_dim),
                    "--repeats",
                    str(args.repeats),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            row[name] = json.loads(child.stdout.strip().splitlines()[-1])
        fast, dense = row[args.backend], row.get("dense")
        cells = [f"{tokens:>8}", f"{fast['seconds'] * 1e3:>10.1f}", f"{fast['peak_mb']:>10.1f}"]
        if dense:
            cells += [
                f"{dense['seconds'] * 1e3:>10.1f}",
                f"{dense['peak_mb']:>10.1f}",
                f"{dense['seconds'] / fast['seconds']:>10.1f}x",
            ]
        else:
            cells += [f"{'-':>10}", f"{'-':>10}", f"{'-':>11}"]
        print(" ".join(cells), flush=True)


if __name__ == "__main__":
    main()
