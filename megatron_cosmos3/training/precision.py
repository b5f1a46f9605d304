"""Mixed precision: bf16 compute with fp32 main weights and fp32 optimizer state.

Parameters stay fp32 (they are the main weights the optimizer updates); ``torch.autocast`` runs the
matmuls and attention in bf16 and keeps precision-sensitive ops (norm statistics, softmax, losses)
in fp32. The same context works on CPU and CUDA.
"""

from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("fp32", "bf16")


def autocast(precision: str, device: torch.device):
    """The forward-pass context for ``precision`` ("fp32": no-op; "bf16": bf16 autocast)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not one of {PRECISIONS}")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
