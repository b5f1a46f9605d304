"""Mixed precision: bf16 (or fp8) compute with fp32 main weights and fp32 optimizer state.

Parameters stay fp32 (they are the main weights the optimizer updates); ``torch.autocast`` runs the
matmuls and attention in bf16 and keeps precision-sensitive ops (norm statistics, softmax, losses)
in fp32. The same context works on CPU and CUDA.

``fp8`` adds Transformer Engine's fp8 autocast around the bf16 one: the TE linears of the towers
(``model.linear_impl: te``) run their matmuls in fp8 with TE's delayed-scaling recipe; everything
else, attention included, stays as under bf16. It needs CUDA, TE and an fp8-capable GPU, and is an
error elsewhere, never a silent bf16 run (docs/DESIGN.md, "GPU fast paths").
"""

from __future__ import annotations

import contextlib
import functools

import torch

from megatron_cosmos3.model.transformer_engine import import_transformer_engine, transformer_engine_missing
from megatron_cosmos3.training.refusals import StartupRefusal

PRECISIONS = ("fp32", "bf16", "fp8")
# TE's fp8 GEMMs take features in multiples of 16 (Transformer Engine 2.9's assert_dim_for_fp8_exec;
# the backward's GEMMs run on the transposed weight, so its output width too). Rows are padded by
# the TE linears themselves (parallel/tensor_parallel.py); the widths must be so already.
FP8_WIDTH_MULTIPLE = 16


def fp8_unaligned_widths(model, tensor: int) -> dict[str, int]:
    """The widths of the towers' TE linears on one of ``tensor`` ranks (``model``: a ``MoTConfig``)
    that are no multiple of ``FP8_WIDTH_MULTIPLE``, by name; empty when fp8 can run them all."""
    widths = {
        "hidden_size": model.hidden_size,
        "num_attention_heads * head_dim / tensor": model.num_attention_heads * model.head_dim // tensor,
        "num_kv_heads * head_dim / tensor": model.num_kv_heads * model.head_dim // tensor,
    }
    if not model.num_experts or {"reasoner", "generator"} - set(model.moe_towers):  # a dense SwiGLU: TE linears
        widths["ffn_hidden_size / tensor"] = model.ffn_hidden_size // tensor
    return {name: width for name, width in widths.items() if width % FP8_WIDTH_MULTIPLE}


def fp8_unavailable(device: torch.device) -> str | None:
    """Why fp8 cannot run on ``device`` (a phrase), or None when it can."""
    missing = transformer_engine_missing(device)
    if missing is not None:
        return missing
    available, reason = import_transformer_engine().is_fp8_available(return_reason=True)
    return None if available else f"this GPU has no fp8 ({reason})"


def check_precision(precision: str, device: torch.device) -> None:
    """ValueError naming ``precision`` where it is none; StartupRefusal where it cannot run on
    ``device``. Called before the first step."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not one of {PRECISIONS}")
    if precision == "fp8":
        missing = fp8_unavailable(device)
        if missing is not None:
            raise StartupRefusal(
                f"precision='fp8' runs Transformer Engine's fp8 matmuls, but {missing}; use precision=bf16"
            )


@functools.cache
def fp8_recipe():
    """TE's delayed scaling: E4M3 forward, E5M2 gradients (HYBRID), scales from the largest |x| of
    the last 1024 steps. ``reduce_amax=False``: each rank scales its own tensors, so no collective
    runs at the end of a forward (pipeline stages call it unevenly; a collective there could hang)."""
    from transformer_engine.common.recipe import DelayedScaling, Format  # type: ignore[import-not-found]

    return DelayedScaling(fp8_format=Format.HYBRID, amax_history_len=1024, amax_compute_algo="max", reduce_amax=False)


def autocast(precision: str, device: torch.device):
    """The forward-pass context for ``precision`` ("fp32": no-op; "bf16": bf16 autocast; "fp8": bf16
    autocast and TE's fp8 autocast)."""
    check_precision(precision, device)
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return _fp8_autocast(device)


@contextlib.contextmanager
def _fp8_autocast(device: torch.device):
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
        with import_transformer_engine().autocast(enabled=True, recipe=fp8_recipe()):
            yield
