"""Frozen-module mechanics shared by the generation encoders, and the encoder config section."""

from __future__ import annotations

import copy
import json
import pickle

import pytest
import torch
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError
from torch import nn

from megatron_cosmos3.encoders.frozen import (
    FrozenPretrained,
    freeze_,
    is_frozen,
    read_diffusers_config,
    trainable_parameters,
)
from megatron_cosmos3.encoders.latent_config import LatentEncoderConfig


def _encoder() -> nn.Module:
    # Dropout and BatchNorm are the layers whose behaviour train() would change.
    return nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.BatchNorm1d(4))


class _Parent(nn.Module):
    def __init__(self, frozen_child: nn.Module) -> None:
        super().__init__()
        self.frozen_child = frozen_child  # registered: the case freeze_ alone must cover
        self.head = nn.Linear(4, 4)


def test_freeze_sets_no_grad_eval_and_marks_every_submodule():
    module = freeze_(_encoder().train())
    assert not any(p.requires_grad for p in module.parameters())
    assert not any(m.training for m in module.modules())
    assert all(is_frozen(m) for m in module.modules()) and not is_frozen(_encoder())


def test_parent_train_cannot_switch_a_registered_frozen_child_back():
    parent = _Parent(freeze_(_encoder()))
    parent.train()
    assert parent.training and parent.head.training
    assert not any(m.training for m in parent.frozen_child.modules())
    for m in parent.frozen_child.modules():  # even a direct call on a submodule
        m.train(True)
    assert not any(m.training for m in parent.frozen_child.modules())


@pytest.mark.parametrize("clone", [copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m))])
def test_eval_lock_survives_deepcopy_and_pickle(clone):
    module = clone(freeze_(_encoder()))
    module.train()
    assert not any(m.training for m in module.modules())
    assert is_frozen(module) and not any(p.requires_grad for p in module.parameters())


def test_trainable_parameters_skip_frozen_even_if_requires_grad_is_flipped_back():
    parent = _Parent(freeze_(_encoder()))
    parent.requires_grad_(True)  # reaches the registered child's parameters too
    trainable = {id(p) for p in trainable_parameters(parent)}
    assert trainable == {id(p) for p in parent.head.parameters()}


def test_frozen_holder_is_invisible_to_the_owning_module():
    holder = FrozenPretrained(_encoder())

    class Owner(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = holder
            self.head = nn.Linear(4, 4)

    owner = Owner()
    assert {id(p) for p in owner.parameters()} == {id(p) for p in owner.head.parameters()}
    assert set(owner.state_dict()) == {"head.weight", "head.bias"}
    owner.train().to(torch.float64).requires_grad_(True)
    assert holder.dtype == torch.float32
    assert not any(p.requires_grad for p in holder.module.parameters())
    assert not any(m.training for m in holder.module.modules())
    with pytest.raises(TypeError):
        nn.ModuleList([holder])  # not a Module, so it cannot be registered by accident


def test_frozen_holder_moves_only_when_told():
    holder = FrozenPretrained(_encoder()).to(dtype=torch.float64)
    assert holder.dtype == torch.float64 and holder.device == torch.device("cpu")


def test_read_diffusers_config_names_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_diffusers_config(tmp_path / "absent", "AutoencoderKLWan")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        read_diffusers_config(tmp_path, "AutoencoderKLWan")
    for data, message in (
        (b"{not json", r"not JSON \(Expecting property name"),
        (b"\xff{}", r"not UTF-8 text"),  # was a raw UnicodeDecodeError
        (b"[" * 100_000, r"not JSON \(nested deeper"),  # was a raw RecursionError
    ):
        (tmp_path / "config.json").write_bytes(data)
        with pytest.raises(ValueError, match=rf"{tmp_path / 'config.json'}: {message}"):
            read_diffusers_config(tmp_path, "AutoencoderKLWan")
    (tmp_path / "config.json").write_text("[1, 2]")  # was AttributeError: 'list' object has no attribute 'get'
    with pytest.raises(ValueError, match="config.json' holds a JSON list, not an object"):
        read_diffusers_config(tmp_path, "AutoencoderKLWan")
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(ValueError, match="_class_name=None, expected 'AutoencoderKLWan'"):
        read_diffusers_config(tmp_path, "AutoencoderKLWan")
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLWan", "z_dim": 48}))
    assert read_diffusers_config(tmp_path, "AutoencoderKLWan")["z_dim"] == 48


# --- the encoder section of the config --------------------------------------------------------------


def test_latent_encoder_config_is_an_omegaconf_structured_config():
    schema = OmegaConf.structured(LatentEncoderConfig)
    cfg = OmegaConf.merge(schema, OmegaConf.from_dotlist(["online=true", "video_vae_path=/vae/wan22", "dtype=float32"]))
    encoders = OmegaConf.to_object(cfg)
    assert isinstance(encoders, LatentEncoderConfig)
    encoders.validate()
    assert encoders.online and encoders.torch_dtype == torch.float32
    with pytest.raises(ValidationError):  # typed: a string is not a bool
        OmegaConf.merge(schema, OmegaConf.from_dotlist(["online=maybe"]))


@pytest.mark.parametrize(
    "cfg, message",
    [
        (LatentEncoderConfig(dtype="fp8"), "encoders.dtype='fp8'"),
        (LatentEncoderConfig(online=True), "online=true needs"),
        (LatentEncoderConfig(kind="wan"), "encoders.kind='wan'"),
        (LatentEncoderConfig(kind="pooled", online=True, video_vae_path="/v"), "kind='pooled' with encoders.online"),
    ],
)
def test_latent_encoder_config_validation_names_the_field(cfg, message):
    with pytest.raises(ValueError, match=message):
        cfg.validate()
