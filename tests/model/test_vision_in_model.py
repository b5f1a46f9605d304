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


@pytest.mark.parametrize("tasks", [("text_to_video",), ("understanding", "policy")])
def test_a_pack_padded_for_every_module_gives_its_losses_and_a_zero_gradient_elsewhere(tasks):
    """``MoTModel.with_every_module`` (what ZeRO-3 runs): a pack without audio, actions or pictures
    (or with some) padded with empty streams and an empty picture set has the same losses and
    gradients, and every parameter it did not reach (each stream projection, the ViT) now takes part
    with a gradient of exactly zero."""
    g = torch.Generator().manual_seed(7)
    batch, targets = add_flow_matching_noise(random_pack(CONFIG, g, 3, tasks, pixels=True), FlowMatchingConfig(), g)
    grads, losses = [], []
    for pad in (False, True):
        model = model_with_vit()
        run, run_targets = batch, targets
        if pad:
            run = model.with_every_module(batch)
            run.validate()
            run_targets = {key: targets.get(key, values) for key, values in run.dm_tokens.items()}
            assert list(run.dm_tokens) == ["video", "audio", "action/single_arm", "action/humanoid"]
        loss = mot_losses(model, run, run_targets)
        loss.total.backward()
        losses.append(loss)
        grads.append({n: p.grad for n, p in model.named_parameters()})
    (plain, padded), (plain_loss, padded_loss) = grads, losses
    # The flow-matching sum runs over the streams in another order: equal to rounding.
    torch.testing.assert_close(padded_loss.total, plain_loss.total, rtol=1e-6, atol=0)
    assert all(grad is not None for grad in padded.values()), [n for n, grad in padded.items() if grad is None]
    unreached = {n for n, grad in plain.items() if grad is None}
    assert any(n.startswith("dm_streams.") for n in unreached)  # the padding had modules to reach
    assert any(n.startswith("vision.") for n in unreached) == (tasks == ("text_to_video",))
    for name, grad in padded.items():
        if name in unreached:
            assert not grad.any(), name
        else:
            torch.testing.assert_close(grad, plain[name], rtol=1e-5, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")
