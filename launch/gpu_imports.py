"""Every GPU path imports, with the versions the Dockerfile promises; exits non-zero otherwise.

Run at image build time (no GPU needed) and by ``launch/gpu_smoke.sh`` (docs/DESIGN.md, "GPU fast
paths"): NVIDIA apex, Transformer Engine in megatron-core 0.16's range (>=2.9,<2.12), megatron-core's
TE linears, and this package's modules that use them. flash-attention is reported, not required
(the ``flash`` backend falls back to ``sdpa``)."""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version

TE_RANGE = ((2, 9), (2, 12))


def main() -> None:
    import apex  # noqa: F401 — NVIDIA's (PyPI's "apex" is another project: it has no apex.optimizers)
    import apex.optimizers  # noqa: F401
    import torch
    import transformer_engine.pytorch  # noqa: F401
    from megatron.core.extensions.transformer_engine import TEColumnParallelLinear, TERowParallelLinear  # noqa: F401

    for module in ("model.attention", "model.transformer_engine", "parallel.tensor_parallel", "training.precision"):
        importlib.import_module(f"megatron_cosmos3.{module}")
    te, core = version("transformer_engine"), version("megatron-core")
    low, high = TE_RANGE
    if not low <= tuple(int(part) for part in te.split(".")[:2]) < high:
        raise SystemExit(f"transformer_engine {te} is outside megatron-core 0.16's range >=2.9,<2.12")
    if not core.startswith("0.16."):
        raise SystemExit(f"megatron-core {core}: this package is pinned to 0.16.x")
    try:
        flash = version("flash_attn")
    except PackageNotFoundError:
        flash = "absent (the flash backend falls back to sdpa)"
    print(
        f"GPU paths import: torch {torch.__version__} | transformer_engine {te} | megatron-core {core} | "
        f"flash_attn {flash} | apex {version('apex')}"
    )


if __name__ == "__main__":
    main()
