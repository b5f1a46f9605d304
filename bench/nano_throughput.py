"""Training-step throughput of the MoT at Nano widths on one device: tokens/s, TF/s and MFU.

Nano's towers (configs/model/nano.yaml: hidden 4096, 32 / 8 heads of 128, FFN 12288, vocab 151936)
with fewer layers, so that weights, gradients and AdamW state (fp32: 16 bytes a parameter) fit one
GPU. One pack of ``--tokens`` mixed samples (each ``--ar-fraction`` AR text, the rest a video-latent
DM section), flow-matching noise as the trainer adds it, the trainer's loss (``mot_losses``), and a
full step: forward, backward, grad-norm clip, AdamW. bf16 autocast over fp32 weights on CUDA (the
trainer's ``precision=bf16``), fp32 on CPU. Median of ``--steps`` after ``--warmup`` steps.

Printed per layer count: parameters, step time (forward + backward, optimizer), tokens/s, peak
memory, model TF/s counted by ``training/flops.py`` (6·N of the tower each token uses + 12·L·H·d·P,
P the pairs the mask allows), TF/s under Megatron-LM's own formula for the same tokens (the pack as
one causal sequence through one tower, ``megatron_lm_flops``), and MFU against the device's dense
bf16 peak (also under ``--precision fp8``: the same peak, so fp8's gain shows as MFU above bf16's).
``--layers 4 6 8`` measures each count in turn and stops at the first that does not fit.
``--linear-impl te --backend te`` runs Transformer Engine's linears and fused attention where TE is
installed (``--precision fp8`` needs them).

On one H100 (80 GB):
    python bench/nano_throughput.py --layers 4 5 6
Tiny, on a CPU (seconds; the flags shrink every dimension):
    python bench/nano_throughput.py --hidden 64 --heads 4 --kv-heads 2 --head-dim 16 --ffn 128 \\
        --vocab 512 --layers 2 --tokens 512 --samples 4 --warmup 1 --steps 2
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import statistics

import torch
from harness import (
    add_pack_and_head_arguments,
    device_description,
    peak_memory_gib,
    reset_peak_memory,
    sample_lengths,
    scaled_mrope_section,
    synchronize,
    timed,
)

from megatron_cosmos3.data.synthetic_packs import pack_from_lengths
from megatron_cosmos3.model.attention import PackLayout, attention_backend
from megatron_cosmos3.model.config import MoTConfig, load_model_config
from megatron_cosmos3.model.mot import MoTModel
from megatron_cosmos3.model.packed_batch import IGNORE_INDEX
from megatron_cosmos3.model.transformer_engine import select_linear_impl
from megatron_cosmos3.objectives.flow_matching import FlowMatchingConfig, add_flow_matching_noise
from megatron_cosmos3.objectives.losses import mot_losses
from megatron_cosmos3.parallel.grad_norm import clip_grad_norm
from megatron_cosmos3.parallel.tensor_parallel import apply_tensor_parallel
from megatron_cosmos3.training.flops import FlopCounter, StepFlops
from megatron_cosmos3.training.precision import autocast
from megatron_cosmos3.training.train import known_peak_flops

GOAL_TFLOPS = 530.0  # the parallelism issue's goal for Nano on one H100 (bf16)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_pack_and_head_arguments(parser)
    parser.add_argument("--layers", type=int, nargs="+", default=[4], help="layer counts to measure, ascending")
    parser.add_argument("--hidden", type=int, help="override hidden_size")
    parser.add_argument("--ffn", type=int, help="override ffn_hidden_size")
    parser.add_argument("--vocab", type=int, help="override vocab_size")
    parser.add_argument(
        "--backend", help="attention backend (default: the config's; flash falls back to sdpa; flex needs no package)"
    )
    parser.add_argument("--recompute", default="none", choices=["none", "selective", "full"])
    parser.add_argument("--compile", action="store_true", help="torch.compile the model's forward")
    parser.add_argument("--precision", choices=["bf16", "fp32", "fp8"], help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument(
        "--linear-impl", choices=["torch", "te"], help="the towers' linears (default: the config's; te needs TE)"
    )
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    return parser.parse_args(argv)


def model_config(args: argparse.Namespace, num_layers: int) -> MoTConfig:
    """The config file's model with the command line's overrides; no ViT (the pack has no images)."""
    overrides = {
        "num_layers": num_layers,
        "hidden_size": args.hidden,
        "num_attention_heads": args.heads,
        "num_kv_heads": args.kv_heads,
        "head_dim": args.head_dim,
        "ffn_hidden_size": args.ffn,
        "vocab_size": args.vocab,
        "attention_backend": args.backend,
        "linear_impl": args.linear_impl,
    }
    changes = {name: value for name, value in overrides.items() if value is not None}
    if args.head_dim is not None:
        changes["mrope_section"] = scaled_mrope_section(args.head_dim)
    return dataclasses.replace(load_model_config(args.config), vision=None, **changes)


def noised_pack(config: MoTConfig, args: argparse.Namespace, device: torch.device):
    """(batch, velocity targets) of one pack of equal samples, noised as the trainer does it."""
    generator = torch.Generator().manual_seed(0)
    batch = pack_from_lengths(config, sample_lengths(args), generator)
    batch, targets = add_flow_matching_noise(batch, FlowMatchingConfig(), generator)
    return batch.to(device), {key: value.to(device) for key, value in targets.items()}


def flops_of(counter: FlopCounter, batch) -> StepFlops:
    layout = PackLayout.from_cu_seqlens(batch.ar_cu_seqlens, batch.dm_cu_seqlens)
    labelled = int((batch.ar_labels != IGNORE_INDEX).sum())
    return counter.step(layout, labelled, {key: tuple(v.shape) for key, v in batch.dm_tokens.items()})


def measure(config: MoTConfig, args: argparse.Namespace, device: torch.device, precision: str) -> dict:
    """Median seconds of forward + backward and of the optimizer step, peak memory, FLOPs."""
    with torch.device(device):  # initialise on the device: Nano's weights take long to init on a CPU
        model = MoTModel(config)
    linear_impl = select_linear_impl(config.linear_impl, device)
    apply_tensor_parallel(model, None, linear_impl)  # one tensor rank: only the linears' kind changes
    for layer in model.layers:
        layer.set_recompute(args.recompute)
    # fused AdamW: one kernel over all parameters on CUDA, as a tuned trainer would run it.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    forward = torch.compile(model) if args.compile else model
    batch, targets = noised_pack(config, args, device)

    def forward_backward():
        with autocast(precision, device):
            losses = mot_losses(forward, batch, targets)
        losses.total.backward()

    def optimizer_step():
        clip_grad_norm(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    reset_peak_memory(device)
    for _ in range(args.warmup):
        forward_backward(), optimizer_step()
    synchronize(device)
    fwd_bwd, opt = [], []
    for _ in range(args.steps):
        fwd_bwd.append(timed(forward_backward, device))
        opt.append(timed(optimizer_step, device))
    counter = FlopCounter(config)
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "tower_parameters": counter.towers,
        "tokens": batch.num_ar_tokens + batch.num_dm_tokens,
        "ar_tokens": batch.num_ar_tokens,
        "backend": attention_backend(config.attention_backend, device, config.head_dim).name,
        "linear_impl": linear_impl,
        "fwd_bwd_s": statistics.median(fwd_bwd),
        "optimizer_s": statistics.median(opt),
        "peak_gib": peak_memory_gib(device),
        "flops": flops_of(counter, batch),
    }


def report(config: MoTConfig, result: dict, peak_flops: float) -> None:
    step = result["fwd_bwd_s"] + result["optimizer_s"]
    flops, tokens = result["flops"], result["tokens"]
    towers = result["tower_parameters"]
    print(
        f"layers {config.num_layers}: {result['parameters']:,} parameters "
        f"(per tower {towers['reasoner']:,}); backend {result['backend']}; linears {result['linear_impl']}; "
        f"pack {tokens} tokens ({result['ar_tokens']} AR)"
    )
    print(
        f"  step {step * 1e3:.1f} ms (fwd+bwd {result['fwd_bwd_s'] * 1e3:.1f}, optimizer "
        f"{result['optimizer_s'] * 1e3:.1f}); {tokens / step:,.0f} tokens/s; peak memory {result['peak_gib']:.2f} GiB"
    )
    model_tflops, megatron_tflops = flops.total / step / 1e12, flops.megatron_convention / step / 1e12
    mfu = f"MFU {flops.total / step / peak_flops:.1%}" if peak_flops else "MFU n/a (no known peak for this device)"
    print(
        f"  model TF/s {model_tflops:.4g} (6N + 12LHdP, goal >= {GOAL_TFLOPS:.0f} on an H100); "
        f"Megatron-LM convention {megatron_tflops:.4g} TF/s; {mfu}; "
        f"fwd+bwd alone {flops.total / result['fwd_bwd_s'] / 1e12:.4g} TF/s",
        flush=True,
    )


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    peak_flops = known_peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else 0.0
    print(f"device: {device_description(device)}; precision {precision}; recompute {args.recompute}", flush=True)
    for num_layers in sorted(args.layers):
        config = model_config(args, num_layers)
        try:
            result = measure(config, args, device, precision)
        except torch.OutOfMemoryError:
            print(f"layers {num_layers}: out of memory; the largest count that fits is below it", flush=True)
            break
        report(config, result, peak_flops)
        free(device)


if __name__ == "__main__":
    main()
