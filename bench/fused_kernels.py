"""Fused kernels against what they replace: RMSNorm and the AdamW step (docs/DESIGN.md, "Fused kernels").

* RMSNorm fwd+bwd on (tokens, hidden): the hand-written Qwen3 norm (fp32 statistics, cast back, then
  the weight) vs ``torch.nn.functional.rms_norm`` on the fp32 input with the same casts
  (``model/tower.py``'s ``RMSNorm``); apex's ``FusedRMSNorm`` too where apex is installed.
* AdamW step over a Nano-layer-like set of parameters: torch's per-parameter loop, foreach, fused;
  apex's ``FusedAdam`` where apex is installed (CUDA).

Implementations run interleaved, repeat after repeat, so a loaded machine slows them alike; each
row prints the median milliseconds and the ratio to the first one.

    python bench/fused_kernels.py [--tokens 4096 --hidden 1024 --adam-params 20]
"""

from __future__ import annotations

import argparse
import statistics

import torch
from harness import device_description, timed


def hand_rms_norm(x, weight, eps):
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def rms_norm_candidates(device):
    from megatron_cosmos3.model.tower import RMSNorm

    candidates = {"hand-written": hand_rms_norm, "F.rms_norm": lambda x, w, eps: RMSNorm.normalize(x, w, eps)}
    try:
        from apex.normalization.fused_layer_norm import fused_rms_norm_affine

        if device.type == "cuda":
            candidates["apex"] = lambda x, w, eps: fused_rms_norm_affine(x, w, w.shape, eps)
    except ImportError:
        pass
    return candidates


def adam_candidates(device):
    candidates = {
        "loop": lambda ps: torch.optim.AdamW(ps, foreach=False),
        "foreach": lambda ps: torch.optim.AdamW(ps, foreach=True),
        "fused": lambda ps: torch.optim.AdamW(ps, fused=True),
    }
    try:
        from apex.optimizers import FusedAdam

        if device.type == "cuda":
            candidates["apex"] = lambda ps: FusedAdam(ps, adam_w_mode=True)
    except ImportError:
        pass
    return candidates


def interleaved(steps: dict, device, repeats: int) -> dict[str, float]:
    for step in steps.values():
        step()  # warm-up
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            times[name].append(timed(step, device) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def report(title: str, times: dict[str, float]) -> None:
    first = next(iter(times.values()))
    print(f"| {title} | " + " | ".join(f"{name} {ms:.2f} ms ({ms / first:.2f})" for name, ms in times.items()) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--adam-params", type=int, default=20, help="weights of (hidden, 4*hidden) stepped")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator(device=device).manual_seed(0)
    print(f"# {device_description(device)}; median ms of {args.repeats} (ratio to the first)")
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(args.tokens, args.hidden, device=device, generator=g).to(dtype).requires_grad_()
        weight = torch.ones(args.hidden, device=device).requires_grad_()
        grad = torch.randn(args.tokens, args.hidden, device=device, generator=g)
        steps = {}
        for name, fn in rms_norm_candidates(device).items():

            def step(fn=fn, x=x, weight=weight, grad=grad):
                out = fn(x, weight, 1e-6)
                out.backward(grad.to(out.dtype))
                x.grad = weight.grad = None

            steps[name] = step
        report(f"RMSNorm {args.tokens}x{args.hidden} {dtype}", interleaved(steps, device, args.repeats))
    shapes = [(args.hidden, 4 * args.hidden)] * args.adam_params + [(args.hidden,)] * args.adam_params
    steps = {}
    for name, make in adam_candidates(device).items():
        params = [torch.nn.Parameter(torch.randn(s, device=device, generator=g)) for s in shapes]
        for p in params:
            p.grad = torch.randn(p.shape, device=device, generator=g)
        steps[name] = make(params).step
    numel = sum(torch.Size(s).numel() for s in shapes)
    report(f"AdamW step, {numel / 1e6:.1f} M fp32 parameters", interleaved(steps, device, args.repeats))


if __name__ == "__main__":
    main()
