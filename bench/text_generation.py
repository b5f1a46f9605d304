"""Text generation from the Reasoner: prefill, and per-token time with the KV cache vs without.

Cached (``generate_text``): the prompts run once, then one token per sequence per step against the
``ReasonerCache``. Uncached: every step runs the whole prompts + tokens so far through the Reasoner
(``forward_ar``) and keeps only the last row's logits — what generation costs without a cache. Both
decode greedily from the same random model; the script checks that they choose the same tokens.

    python bench/text_generation.py [--hidden 256 --layers 4 --prompt-tokens 512 --samples 4 --new-tokens 32]
"""

from __future__ import annotations

import argparse

import torch
from harness import add_small_model_arguments, device_description, small_model_config, timed

from megatron_cosmos3.inference.text_generation import TextPrompt, TextSampling, generate_text, prompt_batch
from megatron_cosmos3.model.config import MoTConfig
from megatron_cosmos3.model.mot import MoTModel


def measure(model: MoTModel, config: MoTConfig, prompts: list[list[int]], new_tokens: int, device: torch.device):
    """(prefill s, cached results, cached s, uncached tokens, uncached s)."""
    batch = prompt_batch(config, [TextPrompt(p) for p in prompts]).to(device)
    with torch.no_grad():
        model.forward_ar(batch)  # warm-up: kernels, allocator
        prefill_s = min(timed(lambda: model.forward_ar(batch), device) for _ in range(3))
    cached = []
    sampling = TextSampling(max_new_tokens=new_tokens)
    cached_s = timed(lambda: cached.extend(generate_text(model, batch, sampling, eos_ids=())), device)

    def uncached_decode() -> list[list[int]]:
        new = [[] for _ in prompts]
        for _ in range(new_tokens):
            grown = prompt_batch(config, [TextPrompt(p + n) for p, n in zip(prompts, new)]).to(device)
            with torch.no_grad():
                hidden = model.forward_ar(grown).hidden[grown.ar_cu_seqlens[1:] - 1]
            for tokens, token in zip(new, model.lm_logits(hidden).argmax(-1).tolist()):
                tokens.append(token)
        return new

    uncached = []
    uncached_s = timed(lambda: uncached.extend(uncached_decode()), device)
    return prefill_s, cached, cached_s, uncached, uncached_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_small_model_arguments(parser)
    parser.add_argument("--prompt-tokens", type=int, default=512, help="tokens of the longest prompt")
    parser.add_argument("--samples", type=int, default=4, help="prompts, of lengths evenly from half to all")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--autocast", action="store_true", help="bf16 autocast (weights stay fp32)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    device = torch.device(args.device)
    config = small_model_config(
        args, attention_backend="flash" if device.type == "cuda" else "sdpa", init_std=0.5 / args.hidden**0.5
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = MoTModel(config).eval()
    g = torch.Generator().manual_seed(0)
    lengths = torch.linspace(args.prompt_tokens // 2, args.prompt_tokens, args.samples).long().tolist()
    prompts = [torch.randint(0, config.vocab_size, (n,), generator=g).tolist() for n in lengths]

    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.autocast):
        prefill_s, cached, cached_s, uncached, uncached_s = measure(model, config, prompts, args.new_tokens, device)
    print(f"device: {device_description(device)}; {'bf16 autocast' if args.autocast else 'fp32'}")
    print(
        f"model: hidden {args.hidden}, {args.layers} layers, {args.heads}/{args.kv_heads} heads x {config.head_dim}, "
        f"FFN {config.ffn_hidden_size}, vocab {config.vocab_size}; prompts {lengths} tokens, "
        f"{args.new_tokens} new tokens each"
    )
    print(f"prefill ms: {prefill_s * 1e3:.1f}")
    # The cached run's first token comes from its prefill; the other steps each decode one token.
    per_token_cached = max(cached_s - prefill_s, 0.0) / max(args.new_tokens - 1, 1)
    per_token_uncached = uncached_s / args.new_tokens
    print(f"cached per-token ms: {per_token_cached * 1e3:.2f}")
    print(f"uncached per-token ms: {per_token_uncached * 1e3:.2f}")
    print(f"speed-up of the cache: {per_token_uncached / max(per_token_cached, 1e-9):.1f}x")
    agree = [g.token_ids for g in cached] == uncached
    print(f"cached and uncached tokens agree: {'yes' if agree else 'no'}")


if __name__ == "__main__":
    main()
