"""Every GPU path imports, with the versions the Dockerfile promises; exits non-zero otherwise.

Run at image build time (no GPU needed) and by ``launch/gpu_smoke.sh`` (docs/DESIGN.md, "GPU fast
paths"): NVIDIA apex, Transformer Engine in megatron-core 0.16's range (>=2.9,<2.12), megatron-core's
TE linears, and this package's modules that use them; then the arguments this package passes to TE's
and megatron-core's TE classes bind to their installed signatures (``check_call_arguments``), so a
renamed or missing keyword fails the build, not the first training step. flash-attention is
reported, not required (the ``flash`` backend falls back to ``sdpa``)."""

from __future__ import annotations

import importlib
import inspect
from importlib.metadata import PackageNotFoundError, version

TE_RANGE = ((2, 9), (2, 12))


def check_call_arguments() -> None:
    """TypeError where a call this package makes into TE or megatron-core's TE classes does not bind
    (no GPU needed: signatures only, and the fp8 recipe, a dataclass, built)."""
    import torch
    import transformer_engine.pytorch as te
    from megatron.core.extensions.transformer_engine import TEColumnParallelLinear, TERowParallelLinear

    from megatron_cosmos3.model.attention import PackLayout, TEFusedAttention, VarlenCall
    from megatron_cosmos3.parallel.tensor_parallel import parallel_linear_keywords
    from megatron_cosmos3.training.precision import fp8_recipe

    for kind, layer in (("column", TEColumnParallelLinear), ("row", TERowParallelLinear)):
        keywords = parallel_linear_keywords(kind, "te")
        inspect.signature(layer.__init__).bind(None, 1, 1, config=None, init_method=None, tp_group=None, **keywords)
    inspect.signature(te.Linear.__init__).bind(None, 1, 1, bias=False, params_dtype=torch.float32, device="cpu")
    layout = PackLayout.from_cu_seqlens(torch.tensor([0, 2]), torch.tensor([0, 3]))
    for call in (VarlenCall.ar_half(layout), VarlenCall.dm_half(layout)):
        module_keywords = TEFusedAttention.module_keywords(4, 2, 32, call.mask_type)
        inspect.signature(te.DotProductAttention.__init__).bind(None, **module_keywords)
        inspect.signature(te.DotProductAttention.forward).bind(None, None, None, None, **call.te_keywords())
    inspect.signature(te.autocast).bind(enabled=True, recipe=None)
    inspect.signature(te.is_fp8_available).bind(return_reason=True)
    fp8_recipe()


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
    check_call_arguments()
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
