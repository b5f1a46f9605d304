"""Transformer Engine: where it can run, and what each switch falls back to where it cannot.

TE is an optional GPU library (``.[gpu]``, the Dockerfile's base image): it is imported only here,
on first use, and only where CUDA is present (docs/DESIGN.md, "GPU fast paths"). Three switches use
it — ``model.linear_impl: te``, ``model.attention_backend: te`` and ``precision: fp8`` — and each
asks ``transformer_engine_missing(device)`` why TE cannot run, if it cannot:

* ``linear_impl`` and ``attention_backend`` fall back (``torch`` linears, ``sdpa``) with one warning
  line: the math is the same, so a cluster's config still runs on a laptop or in CI (the attention
  also where its kernels cannot take ``model.head_dim``: ``attention.head_dim_problem``);
* ``precision: fp8`` is an error (``training/precision.py``): it changes the numerics, and a run that
  asked for fp8 must not report bf16 results as fp8 ones.
"""

from __future__ import annotations

import functools
import logging

import torch

log = logging.getLogger(__name__)

LINEAR_IMPLS = ("torch", "te")


def import_transformer_engine():
    """``transformer_engine.pytorch``, imported on first use (ImportError where it is not installed)."""
    import transformer_engine.pytorch as te  # type: ignore[import-not-found]

    return te


def transformer_engine_missing(device: torch.device | str) -> str | None:
    """Why Transformer Engine cannot run on ``device`` (a phrase), or None when it can."""
    if torch.device(device).type != "cuda":
        return f"it needs CUDA (device is {device})"
    try:
        import_transformer_engine()
    except (ImportError, OSError, RuntimeError) as error:  # not installed, or built for another CUDA/torch
        return f"transformer_engine does not import ({type(error).__name__}: {error})"
    return None


@functools.cache
def warn_once(message: str) -> None:
    log.warning(message)


def select_linear_impl(requested: str, device: torch.device | str) -> str:
    """The linear implementation the towers get on ``device``: ``requested``, or ``torch`` with one
    warning line where TE cannot run (same math, same parameter names, so checkpoints interchange)."""
    if requested not in LINEAR_IMPLS:
        raise ValueError(f"model.linear_impl={requested!r} is not one of {LINEAR_IMPLS}")
    if requested == "te":
        missing = transformer_engine_missing(device)
        if missing is not None:
            warn_once(f"model.linear_impl='te': {missing}; using 'torch' linears")
            return "torch"
    return requested
