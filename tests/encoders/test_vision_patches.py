"""A picture becomes the ViT's pixel rows exactly as the Qwen3-VL processor makes them (transformers'
Qwen2-VL image processor with Qwen3-VL's settings: 16-pixel patches, 2x2 merge, 2 frames, mean/std 0.5)."""

import numpy as np
import pytest
import torch
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from megatron_cosmos3.model.config import VisionConfig
from megatron_cosmos3.model.vision import image_patches, normalize_pixels
from megatron_cosmos3.testing.training import TINY_VISION

CONFIG = VisionConfig(**TINY_VISION)


@pytest.mark.parametrize("height, width", [(32, 32), (64, 96), (96, 32)])
def test_pixel_rows_equal_the_qwen3_vl_processor(height, width):
    picture = np.random.default_rng(height * width).integers(0, 256, (height, width, 3), dtype=np.uint8)
    processor = Qwen2VLImageProcessorPil(
        patch_size=16, merge_size=2, temporal_patch_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3, do_resize=False
    )
    want = processor(images=[picture], return_tensors="pt")
    rows, grid = image_patches(picture, CONFIG)
    assert rows.dtype == torch.uint8  # 4x lighter than the processor's floats until the ViT's device
    assert [list(grid)] == want["image_grid_thw"].tolist() == [[1, height // 16, width // 16]]
    torch.testing.assert_close(normalize_pixels(rows), want["pixel_values"].float(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("shape", [(48, 64, 3), (64, 64, 4), (64, 64)])
def test_a_picture_not_cut_into_whole_tokens_is_refused_with_its_shape(shape):
    with pytest.raises(
        ValueError, match=r"image_patches: picture of shape \(.*\); need \(H, W, 3\) with H and W multiples of"
    ):
        image_patches(np.zeros(shape, dtype=np.uint8), CONFIG)
