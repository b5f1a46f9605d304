"""The model's own ViT (``model.vision`` set): packs carry pictures, the forward pass encodes them.

Reference: the same ViT run on its own (``VisionEncoder``, checked against transformers' Qwen3-VL in
tests/conversion) and its tokens fed to the model as ready-made embeddings."""

import copy

import pytest
import torch

from megatron_cosmos3.data.synthetic_packs import random_pack
from megatron_cosmos3.model.config import VisionConfig
from megatron_cosmos3.model.mot import MoTModel
from megatron_cosmos3.objectives.flow_matching import FlowMatchingConfig, add_flow_matching_noise
from megatron_cosmos3.objectives.losses import mot_losses
from megatron_cosmos3.testing.training import TINY_VISION, tiny_mot_config

CONFIG = tiny_mot_config(vision=VisionConfig(**TINY_VISION))


def model_with_vit(seed: int = 0) -> MoTModel:
    torch.manual_seed(seed)
    model = MoTModel(copy.deepcopy(CONFIG))
    model.add_vision_encoder()
    return model


def picture_pack(seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    batch = random_pack(CONFIG, g, num_samples=6, tasks=("understanding", "policy"), pixels=True)
    return add_flow_matching_noise(batch, FlowMatchingConfig(), g)


def test_a_pack_of_pictures_equals_the_pack_of_the_vits_tokens():
    model = model_with_vit()
    batch, _ = picture_pack()
    assert batch.vision_pixels is not None and batch.ar_vision_embeds is None
    with torch.no_grad():
        features = model.vision(batch.vision_pixels, batch.vision_grid_thw)  # the ViT on its own
        embedded = batch.replace(
            ar_vision_embeds=features.embeds,
            ar_deepstack_embeds=features.deepstack,
            vision_pixels=None,
            vision_grid_thw=None,
        )
        embedded.validate()
        got, want = model(batch), model(embedded)
    assert features.embeds.shape == (int(batch.ar_is_vision.sum()), CONFIG.hidden_size)
    assert torch.equal(got.ar_hidden, want.ar_hidden) and torch.equal(got.dm_hidden, want.dm_hidden)
    ar_pass = model.forward_ar(batch)  # the cached-inference pass encodes too
    assert torch.equal(ar_pass.hidden, want.ar_hidden)


def test_every_vit_parameter_trains_and_a_frozen_vit_gets_no_gradient():
    model = model_with_vit()
    batch, targets = picture_pack()
    mot_losses(model, batch, targets).total.backward()
    vit = dict(model.vision.named_parameters())
    assert vit and all(p.grad is not None and p.grad.abs().sum() > 0 for p in vit.values()), [
        n for n, p in vit.items() if p.grad is None or p.grad.abs().sum() == 0
    ]

    frozen = model_with_vit()
    frozen.vision.requires_grad_(False)
    mot_losses(frozen, batch, targets).total.backward()
    assert all(p.grad is None for p in frozen.vision.parameters())
    assert frozen.embed_tokens.weight.grad is not None


def test_built_on_meta_and_materialised_the_vit_equals_the_eager_one():
    eager = model_with_vit(seed=4)
    torch.manual_seed(4)
    with torch.device("meta"):
        lazy = MoTModel(copy.deepcopy(CONFIG))
        lazy.add_vision_encoder()
    lazy.materialize("cpu")
    lazy.reset_parameters()
    values = dict(eager.named_parameters())
    assert all(torch.equal(p, values[n]) for n, p in lazy.named_parameters())
    assert any(n.startswith("vision.vit.") for n in values)
    batch, _ = picture_pack()
    with torch.no_grad():
        assert torch.equal(lazy(batch).ar_hidden, eager(batch).ar_hidden)  # rotary table recomputed


def test_pictures_without_a_vit_or_with_the_wrong_grid_are_named_errors():
    batch, _ = picture_pack()
    with pytest.raises(
        ValueError, match=r"carries pictures \(vision_pixels\) but the model has no ViT: set model.vision"
    ):
        MoTModel(copy.deepcopy(CONFIG))(batch)
    with pytest.raises(ValueError, match="model.vision is not set"):
        MoTModel(tiny_mot_config()).add_vision_encoder()
    wrong = batch.replace(vision_grid_thw=batch.vision_grid_thw.flip(0) * torch.tensor([1, 2, 1]))
    with pytest.raises(ValueError, match=r"vision_grid_thw covers \d+ patches, vision_pixels has shape"):
        wrong.validate()
    both = batch.replace(ar_vision_embeds=torch.zeros(int(batch.ar_is_vision.sum()), CONFIG.hidden_size))
    with pytest.raises(ValueError, match="vision_pixels or ar_vision_embeds, not both"):
        both.validate()


def test_full_recompute_keeps_no_vit_block_activations_and_gives_the_same_gradients():
    batch, targets = picture_pack()
    gradients, saved = [], []
    for mode in ("none", "full"):
        model = model_with_vit()
        model.vision.set_recompute(mode)
        count = [0]

        def keep(tensor, count=count):
            count[0] += 1
            return tensor

        # Tensors autograd keeps for backward outside any checkpointed block (a checkpoint keeps
        # only its inputs and recomputes the rest in backward).
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
            features = model.vision(batch.vision_pixels, batch.vision_grid_thw)
        saved.append(count[0])
        (features.embeds.square().sum() + features.deepstack.square().sum()).backward()
        gradients.append({n: p.grad for n, p in model.vision.named_parameters()})
    assert saved[1] < saved[0] / 2, saved
    assert all(torch.equal(gradients[0][n], gradients[1][n]) for n in gradients[0])
