"""Frozen pretrained networks: load from a local folder, freeze, keep out of training state.

The generation encoders (video VAE, audio VAE) are pretrained elsewhere and never trained here.
Three promises, kept in this one place for every frozen encoder:

1. **No gradients.** Every parameter has ``requires_grad=False`` and the wrappers run their
   encode/decode under ``torch.no_grad()`` (not ``inference_mode``: inference tensors may not be
   saved for backward, and a training step does save the latents it consumes).
2. **Always eval.** ``freeze_`` replaces ``train`` on the module and on every submodule, so a
   parent's ``model.train()`` (which recurses through ``children()``) cannot switch dropout or
   norm statistics back on. The same lock marks the module as frozen (``is_frozen``).
3. **Outside the trained model's state.** ``FrozenPretrained`` is deliberately *not* an
   ``nn.Module``: a training model that owns one for online encoding (``self.video_vae = ...``)
   does not register it, so its weights never appear in ``parameters()`` (hence never in the
   optimizer, DDP/FSDP buckets or the distributed optimizer), nor in ``state_dict()`` (hence never
   in our checkpoints — they come from the VAE folder), nor are they touched by ``.train()``,
   ``.to()``, ``.half()`` or ``requires_grad_()``. The owner moves it explicitly with
   ``FrozenPretrained.to``. Where a frozen ``nn.Module`` does end up registered under a parent,
   ``trainable_parameters`` still leaves it out of the optimizer.

Loading is shared too: ``load_local_diffusers`` reads a diffusers-format folder from local disk
only (never the Hub), refuses folders of another class, refuses pickled weights, and refuses
checkpoints that do not fill every weight of the model (diffusers would otherwise only log a
warning and leave random weights in place).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from megatron_cosmos3.json_files import read_json

ModuleT = TypeVar("ModuleT", bound=nn.Module)
SelfT = TypeVar("SelfT", bound="FrozenPretrained")


class _StayInEval:
    """Stands in for ``nn.Module.train`` on a frozen module: any ``train(mode)`` keeps it in eval.

    A callable object rather than a bound method so that a frozen module survives ``pickle``
    (data-loader workers) and ``deepcopy`` with its lock intact.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, mode: bool = True) -> nn.Module:
        self.module.training = False
        return self.module


def freeze_(module: ModuleT) -> ModuleT:
    """Freeze ``module`` in place and return it.

    Sets eval mode on the module and all submodules and locks it there (which is also what
    ``is_frozen`` recognises), and sets ``requires_grad=False`` on every parameter.
    """
    module.eval()
    for submodule in module.modules():
        # Instance attribute shadows the class method, and nn.Module.train calls child.train(mode).
        submodule.train = _StayInEval(submodule)
    module.requires_grad_(False)
    return module


def is_frozen(module: nn.Module) -> bool:
    """Whether ``module`` was frozen with ``freeze_`` (the mark survives deepcopy and pickle)."""
    return isinstance(module.__dict__.get("train"), _StayInEval)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of ``model`` an optimizer should own: requiring grad and in no frozen module.

    Checking the module, not just ``requires_grad``, keeps a frozen child out even after a
    parent's ``requires_grad_(True)`` has reached its parameters.
    """
    frozen = {id(p) for m in model.modules() if is_frozen(m) for p in m.parameters()}
    return [p for p in model.parameters() if p.requires_grad and id(p) not in frozen]


def read_diffusers_config(path: str | Path, expected_class: str) -> dict[str, Any]:
    """Read ``<path>/config.json`` of a local diffusers model folder and check its class.

    Raises FileNotFoundError if the folder or its config is missing, ValueError if the config is
    not JSON or names another ``_class_name`` than ``expected_class``.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{expected_class} folder {str(folder)!r} does not exist or is not a directory")
    config_file = folder / "config.json"
    if not config_file.is_file():
        hint = ""
        if (folder / "vae" / "config.json").is_file():
            hint = f"; this looks like a pipeline folder, point at {str(folder / 'vae')!r} instead"
        raise FileNotFoundError(
            f"{str(folder)!r} has no config.json, so it is not a diffusers {expected_class} folder{hint}"
        )
    config = read_json(config_file)
    if not isinstance(config, dict):
        raise ValueError(f"{str(config_file)!r} holds a JSON {type(config).__name__}, not an object")
    class_name = config.get("_class_name")
    if class_name != expected_class:
        raise ValueError(f"{str(config_file)!r} has _class_name={class_name!r}, expected {expected_class!r}")
    return config


def check_declared_size(model_cls: type[nn.Module], config: dict[str, Any], path: str | Path) -> None:
    """ValueError naming ``<path>/config.json`` unless ``model_cls`` builds from ``config`` (on the
    meta device: nothing allocated) with no more parameters than the folder's safetensors files can
    hold at 16 bits each. A crafted width (``base_dim: 1000000``) made diffusers allocate terabytes
    before any weight was read, and a value of the wrong type was a raw TypeError from its layers."""
    config_file = Path(path) / "config.json"
    try:
        with torch.device("meta"):
            model = model_cls.from_config(config)
    except (TypeError, ValueError, KeyError, IndexError, ZeroDivisionError, RuntimeError) as error:
        raise ValueError(
            f"{str(config_file)!r}: not an {model_cls.__name__} config ({type(error).__name__}: {error})"
        ) from None
    count = sum(p.numel() for p in model.parameters())
    shards = [f for f in Path(path).glob("*.safetensors") if f.is_file()]
    stored = sum(f.stat().st_size for f in shards)
    if shards and 2 * count > stored:  # none at all: load_local_diffusers' FileNotFoundError says so
        raise ValueError(
            f"{str(config_file)!r} declares {count:,} parameters of {model_cls.__name__} "
            f"({2 * count / 2**30:.1f} GiB at 16 bits); the folder's safetensors files hold {stored:,} bytes: "
            "not its weights"
        )


def load_local_diffusers(
    model_cls: type[ModuleT], path: str | Path, *, dtype: torch.dtype, device: torch.device | str
) -> ModuleT:
    """Load a diffusers model from a local folder (never the network); ``FrozenPretrained`` freezes it.

    Only safetensors weights are accepted (no pickle), and every weight the model expects must be
    in the checkpoint. Call ``read_diffusers_config`` first to validate the folder's config.
    """
    try:
        model, info = model_cls.from_pretrained(
            str(path),
            local_files_only=True,
            use_safetensors=True,
            torch_dtype=dtype,
            output_loading_info=True,
            # diffusers warns on every load when asked for the low-memory path without accelerate.
            low_cpu_mem_usage=importlib.util.find_spec("accelerate") is not None,
        )
    except OSError as err:
        raise FileNotFoundError(f"could not load {model_cls.__name__} weights from {str(path)!r}: {err}") from err
    missing = info["missing_keys"]
    if missing:
        raise ValueError(
            f"{str(path)!r}: checkpoint lacks {len(missing)} weight(s) of {model_cls.__name__} "
            f"(e.g. {sorted(missing)[:3]}); the folder's weights do not match its config"
        )
    return model.to(device)


class FrozenPretrained:
    """Holds a frozen network *outside* any parent ``nn.Module`` (see the module docstring).

    Subclasses add the modality-specific encode/decode, each under ``torch.no_grad()``.
    """

    def __init__(self, module: nn.Module) -> None:
        self._module = freeze_(module)

    @property
    def module(self) -> nn.Module:
        """The frozen network itself (read it, do not register it under a trained model)."""
        return self._module

    @property
    def device(self) -> torch.device:
        return next(self._module.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self._module.parameters()).dtype

    def to(self: SelfT, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> SelfT:
        """Move/cast the frozen weights in place; a parent's ``.to()`` does not reach them."""
        self._module.to(device=device, dtype=dtype)
        return self
