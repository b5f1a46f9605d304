"""The shared asymmetric attention vs the best plain causal kernel: fwd+bwd TF/s on one pack.

The asymmetric attention is what every MoT layer runs: ``ar_attention`` (AR queries, causal over
their sample's AR keys) and ``dm_attention`` (DM queries over their sample's [AR, DM] keys), called
as the model calls them, through the model's backend (``--backend``, default the config's: ``flash``
varlen on CUDA when flash-attention is installed, else ``sdpa``), and on CUDA also through ``flex``
(FlexAttention block masks, no extra package), ``sdpa`` and, where Transformer Engine is installed,
``te`` (its fused THD attention). The baseline is what a plain decoder runs on the same tokens and
sample boundaries: each sample one causal sequence. Its candidates, all timed in the same run, the
fastest taken: flash-attention's varlen kernel with causal=True (FA3 and/or FA2, whichever are
installed), Transformer Engine's THD attention (``padding_causal``), FlexAttention with a
block-causal mask, and torch SDPA with is_causal per sample under its flash and cuDNN backends (on
CPU: SDPA's own choice). Each kernel's FLOPs are counted with its own mask: 12·H·d per allowed
(q, k) pair for fwd+bwd (4·H·d forward, twice that backward), the attention term of
``training/flops.py``. Goal (parallelism issue):
asymmetric TF/s >= 0.90 x causal TF/s.

Nano head shapes (configs/model/nano.yaml: 32 query / 8 KV heads of 128) on a 16k pack, on a GPU
(``--backend flex`` where flash-attention is not installed):
    python bench/attention_vs_causal.py
Tiny, on a CPU (seconds):
    python bench/attention_vs_causal.py --heads 4 --kv-heads 2 --head-dim 32 --tokens 1024 --repeats 3
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from harness import add_pack_and_head_arguments, device_description, median_seconds, sample_lengths

from megatron_cosmos3.model.attention import (
    FlashVarlenAttention,
    FlexPackAttention,
    PackLayout,
    SdpaVarlenAttention,
    attention_backend,
)
from megatron_cosmos3.model.config import load_model_config
from megatron_cosmos3.model.transformer_engine import transformer_engine_missing
from megatron_cosmos3.training.flops import attention_pairs

GOAL_RATIO = 0.90
# flash-attention 3 (Hopper) and 2: the varlen entry point of each, where installed.
FLASH_VARLEN_MODULES = {"flash-attention 3": "flash_attn_interface", "flash-attention 2": "flash_attn"}


@dataclass
class Kernel:
    """One way of computing an attention: ``attend(*inputs)`` -> outputs, over ``pairs`` (q, k) pairs."""

    name: str
    attend: Callable[..., tuple[torch.Tensor, ...]]
    inputs: tuple[torch.Tensor, ...]
    pairs: int


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_pack_and_head_arguments(parser)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--backend", help="the model's attention backend (default: the config's)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    return parser.parse_args(argv)


def pack_layouts(args: argparse.Namespace, device: torch.device) -> tuple[PackLayout, PackLayout]:
    """(asymmetric layout, causal layout): the same samples, the latter all AR (one causal run each)."""
    lengths = torch.tensor([[0, 0]] + sample_lengths(args), device=device).cumsum(0)
    ar_cu, dm_cu = lengths[:, 0], lengths[:, 1]
    return PackLayout.from_cu_seqlens(ar_cu, dm_cu), PackLayout.from_cu_seqlens(ar_cu + dm_cu, torch.zeros_like(ar_cu))


def leaf(n: int, heads: int, head_dim: int, like: dict) -> torch.Tensor:
    return torch.randn(n, heads, head_dim, **like).requires_grad_()


def asymmetric_kernel(name, backend, layout: PackLayout, heads, kv_heads, head_dim, like) -> Kernel:
    n_ar, n_dm = sum(layout.ar_lengths), sum(layout.dm_lengths)
    inputs = (
        leaf(n_ar, heads, head_dim, like),
        leaf(n_ar, kv_heads, head_dim, like),
        leaf(n_ar, kv_heads, head_dim, like),
        leaf(n_dm, heads, head_dim, like),
        leaf(n_dm, kv_heads, head_dim, like),
        leaf(n_dm, kv_heads, head_dim, like),
    )

    def attend(q_ar, k_ar, v_ar, q_dm, k_dm, v_dm):
        return (
            backend.ar_attention(q_ar, k_ar, v_ar, layout),
            backend.dm_attention(q_dm, k_ar, v_ar, k_dm, v_dm, layout),
        )

    return Kernel(name, attend, inputs, attention_pairs(layout))


def causal_kernel(name, ar_attention, layout: PackLayout, heads, kv_heads, head_dim, like, context=None) -> Kernel:
    """``ar_attention`` of a backend on a layout whose samples are all AR: plain causal attention."""
    n = sum(layout.ar_lengths)
    inputs = (leaf(n, heads, head_dim, like), leaf(n, kv_heads, head_dim, like), leaf(n, kv_heads, head_dim, like))

    def attend(q, k, v):
        with context() if context else contextlib.nullcontext():
            return (ar_attention(q, k, v, layout),)

    return Kernel(name, attend, inputs, attention_pairs(layout))


def causal_candidates(layout: PackLayout, heads, kv_heads, head_dim, like, device) -> list[Kernel]:
    """Every plain causal kernel this machine has for the pack (GQA heads; cuDNN also with K/V
    expanded to all heads, in case its SDPA path refuses grouped heads)."""
    shapes = (layout, heads, kv_heads, head_dim, like)
    if device.type != "cuda":
        return [causal_kernel("sdpa is_causal per sample", SdpaVarlenAttention().ar_attention, *shapes)]
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kernels = []
    for label, module in FLASH_VARLEN_MODULES.items():
        try:
            varlen = importlib.import_module(module).flash_attn_varlen_func
        except ImportError:
            continue
        kernels.append(causal_kernel(f"{label} varlen causal", FlashVarlenAttention(varlen).ar_attention, *shapes))
    kernels.append(causal_kernel("flex block-causal", FlexPackAttention(device).ar_attention, *shapes))
    if transformer_engine_missing(device) is None:
        te_causal = attention_backend("te", device, head_dim).ar_attention
        kernels.append(causal_kernel("Transformer Engine THD padding_causal", te_causal, *shapes))
    sdpa = SdpaVarlenAttention().ar_attention
    for label, kernel in (("flash", SDPBackend.FLASH_ATTENTION), ("cuDNN", SDPBackend.CUDNN_ATTENTION)):
        context = lambda kernel=kernel: sdpa_kernel(kernel)
        kernels.append(causal_kernel(f"sdpa[{label}] is_causal per sample", sdpa, *shapes, context=context))
    expanded = (layout, heads, heads, head_dim, like)
    only_cudnn = lambda: sdpa_kernel(SDPBackend.CUDNN_ATTENTION)
    kernels.append(causal_kernel("sdpa[cuDNN] is_causal per sample, K/V expanded", sdpa, *expanded, context=only_cudnn))
    return kernels


def asymmetric_candidates(layout: PackLayout, heads, kv_heads, head_dim, like, device, model_backend) -> list[Kernel]:
    """The model's backend first (the one the goal is about), then ``te`` (where Transformer Engine
    runs), ``flex`` and ``sdpa`` on CUDA."""
    others = [] if transformer_engine_missing(device) else ["te"]
    others += ["flex", "sdpa"] if device.type == "cuda" else []
    names = [model_backend.name] + [name for name in others if name != model_backend.name]
    return [
        asymmetric_kernel(
            f"asymmetric ({name})", attention_backend(name, device, head_dim), layout, heads, kv_heads, head_dim, like
        )
        for name in names
    ]


def fwd_bwd_seconds(kernel: Kernel, device: torch.device, warmup: int, repeats: int) -> float:
    """Median seconds of forward + backward (gradients of every input, none accumulated)."""
    outputs = kernel.attend(*kernel.inputs)
    grad_outputs = tuple(torch.randn_like(out) for out in outputs)

    def step():
        torch.autograd.grad(kernel.attend(*kernel.inputs), kernel.inputs, grad_outputs)

    return median_seconds(step, device, warmup, repeats)


def measure_and_print(groups: dict[str, list[Kernel]], heads_times_dim: int, device, args) -> dict:
    """{group: [(kernel, TF/s)]} of the kernels that ran, each printed as it finishes."""
    print(f"{'kernel':<52} {'pairs':>14} {'ms':>9} {'TF/s':>9}")
    measured = {group: [] for group in groups}
    for group, kernels in groups.items():
        for kernel in kernels:
            try:
                seconds = fwd_bwd_seconds(kernel, device, args.warmup, args.repeats)
            except (RuntimeError, AssertionError, ValueError) as error:  # this GPU, dtype or head layout: not supported
                print(f"{kernel.name:<52} unavailable: {str(error).splitlines()[0][:100]}")
                continue
            tflops = 12.0 * heads_times_dim * kernel.pairs / seconds / 1e12
            print(f"{kernel.name:<52} {kernel.pairs:>14,} {seconds * 1e3:>9.2f} {tflops:>9.4g}", flush=True)
            measured[group].append((kernel, tflops))
    return measured


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    config = load_model_config(args.config)
    heads, kv_heads = args.heads or config.num_attention_heads, args.kv_heads or config.num_kv_heads
    head_dim = args.head_dim or config.head_dim
    like = {"device": device, "dtype": dtype}
    asymmetric_layout, causal_layout = pack_layouts(args, device)
    model_backend = attention_backend(args.backend or config.attention_backend, device, head_dim)
    shapes = (heads, kv_heads, head_dim, like, device)
    print(f"device: {device_description(device)}; dtype {dtype}; heads {heads}/{kv_heads} of {head_dim}")
    print(
        f"pack: {args.tokens} tokens in {args.samples} samples of "
        f"{asymmetric_layout.ar_lengths[0]} AR + {asymmetric_layout.dm_lengths[0]} DM; "
        f"fwd+bwd, median of {args.repeats}"
    )
    groups = {
        "asymmetric": asymmetric_candidates(asymmetric_layout, *shapes, model_backend),
        "causal": causal_candidates(causal_layout, *shapes),
    }
    measured = measure_and_print(groups, heads * head_dim, device, args)
    best_causal, causal_tflops = max(measured["causal"], key=lambda entry: entry[1])
    for asymmetric, asymmetric_tflops in measured["asymmetric"]:  # the model's backend first
        print(
            f"ratio {asymmetric.name} / best causal ({best_causal.name}): TF/s "
            f"{asymmetric_tflops / causal_tflops:.3f} (goal >= {GOAL_RATIO})"
        )


if __name__ == "__main__":
    main()
