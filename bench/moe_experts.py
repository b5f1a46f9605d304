"""Mixture-of-experts experts: the grouped GEMM vs the loop over experts vs a padded batched matmul.

One MoE MLP's experts, fwd+bwd, on rows already routed and sorted by expert (what ``MoEMLP._experts``
receives), skewed loads (expert e gets a share proportional to e + 1; with --empty the last expert
gets none). Implementations:

* ``loop`` — ``looped_experts``: one pair of matmuls per expert, the counts read on the host;
* ``grouped`` — ``grouped_experts``: two ``torch.nn.functional.grouped_mm`` calls, no host read;
* ``padded`` — rows scattered into (experts, capacity, hidden) with capacity = all rows (no drop and
  no host read, as the grouped path), two ``torch.bmm``: the E-fold work a sync-free fixed shape costs.

    python bench/moe_experts.py [--tokens 1024 4096 --experts 8 --hidden 256 --ffn 512 --top-k 2]

Prints one table row per size: milliseconds per implementation and each one's ratio to the loop.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from harness import device_description, median_seconds

from megatron_cosmos3.model.moe import expert_ends, grouped_experts, looped_experts


def padded_experts(features, ends, gate_up_proj, down_proj):
    """Every expert's rows in a zero-padded slot of (E, n, hidden); capacity n needs no host read."""
    num_experts, n = gate_up_proj.shape[0], features.shape[0]
    starts = torch.cat([ends.new_zeros(1), ends[:-1]]).long()
    expert = torch.searchsorted(ends.long(), torch.arange(n, device=features.device), right=True)
    slot = expert * n + torch.arange(n, device=features.device) - starts[expert]
    padded = features.new_zeros(num_experts * n, features.shape[1]).index_copy(0, slot, features)
    gate, up = torch.bmm(padded.view(num_experts, n, -1), gate_up_proj.transpose(1, 2)).chunk(2, dim=-1)
    out = torch.bmm(F.silu(gate) * up, down_proj.transpose(1, 2))
    return out.reshape(num_experts * n, -1).index_select(0, slot)


IMPLEMENTATIONS = {"loop": looped_experts, "grouped": grouped_experts, "padded": padded_experts}


def measure(tokens: int, args, device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    g = torch.Generator(device=device).manual_seed(0)
    rows = tokens * args.top_k
    share = torch.arange(1, args.experts + 1, dtype=torch.float64)
    if args.empty:
        share[-1] = 0
    counts = (share / share.sum() * rows).floor().long()
    counts[0] += rows - counts.sum()
    experts = torch.repeat_interleave(torch.arange(args.experts), counts).to(device)
    ends = expert_ends(experts, args.experts)
    make = lambda *shape: (torch.randn(*shape, device=device, generator=g) * 0.05).to(dtype).requires_grad_()
    features = make(rows, args.hidden)
    gate_up, down = make(args.experts, 2 * args.ffn, args.hidden), make(args.experts, args.hidden, args.ffn)
    grad = torch.randn(rows, args.hidden, device=device, generator=g).to(dtype)
    reference = None
    times = {}
    for name, fn in IMPLEMENTATIONS.items():
        out = fn(features, ends, gate_up, down)
        if reference is None:
            reference = out.detach()
        torch.testing.assert_close(out.detach(), reference, rtol=2e-2, atol=2e-2)  # same numbers

        def step(fn=fn):
            fn(features, ends, gate_up, down).backward(grad)
            for t in (features, gate_up, down):
                t.grad = None

        times[name] = median_seconds(step, device, warmup=1, repeats=args.repeats) * 1e3
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--ffn", type=int, default=512)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--empty", action="store_true", help="the last expert gets no rows")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default: bf16 on CUDA, else fp32")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    print(f"# {device_description(device)}; {dtype}; {args.experts} experts, top-{args.top_k}, hidden {args.hidden}, ")
    print(f"# ffn {args.ffn}, fwd+bwd of the experts, median of {args.repeats}")
    print("| tokens | loop ms | grouped ms | padded ms | grouped / loop time | padded / loop time |")
    print("|---|---|---|---|---|---|")
    for tokens in args.tokens:
        t = measure(tokens, args, device, dtype)
        print(
            f"| {tokens} | {t['loop']:.2f} | {t['grouped']:.2f} | {t['padded']:.2f} "
            f"| {t['grouped'] / t['loop']:.2f} | {t['padded'] / t['loop']:.2f} |"
        )


if __name__ == "__main__":
    main()
