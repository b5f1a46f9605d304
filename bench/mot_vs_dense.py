"""MoT backbone vs a single-tower dense transformer of the same per-token FLOPs.

Both models see the same packed tokens in the same process, interleaved run by run (this machine is
noisy). The dense baseline is what Megatron-LM would run on the same pack: one tower, each sample
one causal sequence. Per-token matmul FLOPs are identical (each token goes through exactly one tower
of the same shape); the attention differs only in which (q, k) pairs the masks allow, so the script
prints tokens/s and model TF/s, each counted with its own mask.

    python bench/mot_vs_dense.py [--hidden 256 --layers 4 --tokens 4096 --ar-fraction 0.25]
"""

from __future__ import annotations

import argparse
import statistics

import torch
from harness import add_small_model_arguments, device_description, small_model_config, timed
from torch import nn

from megatron_cosmos3.data.synthetic_packs import pack_from_lengths
from megatron_cosmos3.model.attention import PackLayout, attention_backend
from megatron_cosmos3.model.config import MoTConfig
from megatron_cosmos3.model.layer import StreamRotary
from megatron_cosmos3.model.mot import MoTModel
from megatron_cosmos3.model.tower import RMSNorm, Tower
from megatron_cosmos3.training.flops import attention_pairs, tower_parameter_counts


class DenseBaseline(nn.Module):
    """One tower per layer for every token; each sample is one causal sequence."""

    def __init__(self, config: MoTConfig):
        super().__init__()
        self.towers = nn.ModuleList(Tower(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden, rope: StreamRotary, layout: PackLayout, backend):
        for tower in self.towers:
            q, k, v = tower.attention_inputs(hidden, rope.cos, rope.sin)
            hidden = tower.finish(hidden, backend.ar_attention(q, k, v, layout))
        return self.norm(hidden)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_small_model_arguments(parser)
    parser.add_argument("--tokens", type=int, default=4096, help="packed tokens per step")
    parser.add_argument("--sample-tokens", type=int, default=512, help="tokens per sample")
    parser.add_argument("--ar-fraction", type=float, default=0.25)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--backend", default="sdpa")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    config = small_model_config(args, attention_backend=args.backend)
    n_ar = int(args.sample_tokens * args.ar_fraction)
    lengths = [(n_ar, args.sample_tokens - n_ar)] * (args.tokens // args.sample_tokens)
    batch = pack_from_lengths(config, lengths, torch.Generator().manual_seed(0)).to(device)
    mot = MoTModel(config).to(device, dtype)
    dense = DenseBaseline(config).to(device, dtype)
    backend = attention_backend(args.backend, device, config.head_dim)

    total = batch.num_ar_tokens + batch.num_dm_tokens
    dense_layout = PackLayout.from_cu_seqlens(
        batch.ar_cu_seqlens + batch.dm_cu_seqlens, torch.zeros_like(batch.ar_cu_seqlens)
    )
    dense_input = torch.randn(total, config.hidden_size, device=device, dtype=dtype, requires_grad=True)
    dense_rope = StreamRotary(*mot.rotary(torch.cat([batch.ar_positions, batch.dm_positions], 1), dtype))

    def run_mot():
        with torch.autocast(device.type, dtype, enabled=dtype != torch.float32):
            ar_pass = mot.forward_ar(batch)
            dm_hidden = mot.forward_dm(batch, ar_pass)
        (ar_pass.hidden.float().square().mean() + dm_hidden.float().square().mean()).backward()

    def run_dense():
        dense(dense_input, dense_rope, dense_layout, backend).float().square().mean().backward()

    for _ in range(2):  # warm-up
        run_mot(), run_dense()
    mot_times, dense_times = [], []
    for _ in range(args.repeats):
        mot_times.append(timed(run_mot, device))
        dense_times.append(timed(run_dense, device))
    t_mot, t_dense = statistics.median(mot_times), statistics.median(dense_times)

    towers = tower_parameter_counts(mot)
    matmul = 6.0 * towers["reasoner"] * total  # both towers have the same shape
    per_pair = 12.0 * config.num_layers * config.num_attention_heads * config.head_dim
    mot_layout = PackLayout.from_cu_seqlens(batch.ar_cu_seqlens, batch.dm_cu_seqlens)
    mot_flops = matmul + per_pair * attention_pairs(mot_layout)
    dense_flops = matmul + per_pair * attention_pairs(dense_layout)
    print(f"device: {device_description(device)}; dtype {args.dtype}; backend {backend.name}")
    print(
        f"model: hidden {args.hidden}, layers {args.layers}, heads {args.heads}/{args.kv_heads}; "
        f"pack: {total} tokens in {len(lengths)} samples of {args.sample_tokens} ({n_ar} AR)"
    )
    for name, seconds, flops in (("MoT", t_mot, mot_flops), ("dense", t_dense, dense_flops)):
        print(
            f"{name:<5} fwd+bwd: {seconds * 1e3:8.1f} ms  {total / seconds:10.0f} tokens/s  "
            f"{flops / seconds / 1e12:7.4f} TF/s"
        )
    tflops_ratio = (mot_flops / t_mot) / (dense_flops / t_dense)
    print(f"ratio MoT/dense: tokens/s {t_dense / t_mot:.3f}   model TF/s {tflops_ratio:.3f}   (goal >= 0.97)")


if __name__ == "__main__":
    main()
