"""``model.vision`` set: the loader packs each picture as the ViT's pixel rows (for the model's own ViT),
in the very layout the stand-in features get: same tokens, positions and ViT rows, pack for pack."""

import dataclasses

import torch
from world_helpers import assert_same_batch, data_config, model_config, tiny_world

from megatron_cosmos3.data.loader import PackedLoader
from megatron_cosmos3.model.config import VisionConfig
from megatron_cosmos3.testing.training import TINY_VISION

VIT_MODEL = dataclasses.replace(model_config(), vision=VisionConfig(**TINY_VISION))


def first_packs(model, count: int = 6):
    with PackedLoader(data_config([str(tiny_world()["latent"])]), model) as loader:
        return [next(loader) for _ in range(count)]


def test_pixel_packs_have_the_layout_of_feature_packs_and_four_patches_per_token():
    with_pixels, with_features = first_packs(VIT_MODEL), first_packs(model_config())
    pictures = 0
    for vit, patch in zip(with_pixels, with_features, strict=True):
        assert vit.ar_vision_embeds is None
        # The ViT rows hold the ViT's image token; the stand-in (a model without a ViT config) has none.
        ids = vit.ar_token_ids if vit.ar_is_vision is None else vit.ar_token_ids.masked_fill(vit.ar_is_vision, 0)
        vit_layout = vit.replace(ar_token_ids=ids, vision_pixels=None, vision_grid_thw=None)
        assert_same_batch(vit_layout, patch.replace(ar_vision_embeds=None))
        if vit.ar_is_vision is None:
            assert vit.vision_pixels is None
            continue
        assert bool((vit.ar_token_ids[vit.ar_is_vision] == VIT_MODEL.vision.image_token_id).all())
        tokens = int(vit.ar_is_vision.sum())
        merge = VIT_MODEL.vision.spatial_merge_size
        assert vit.vision_pixels.shape == (tokens * merge * merge, 3 * 2 * 16 * 16)
        assert int((vit.vision_grid_thw.prod(-1) // merge**2).sum()) == tokens
        assert vit.vision_pixels.dtype == torch.uint8
        pictures += vit.vision_grid_thw.shape[0]
    assert pictures > 0  # the comparison saw pictures
