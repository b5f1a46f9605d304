"""Pictures -> what the packer puts in the ViT token rows of a sample (``model.vision`` picks which).

A ``VisionFeaturizer`` takes one picture and returns ``PictureTokens``: its merged token grid (one
Reasoner token per 32x32 pixels: 16x16 patches merged 2x2, as Qwen3-VL) and either

* ``pixels`` — ``ViTPixels`` (``model.vision`` set): the picture cut into the ViT's input rows
  (``model.vision.image_patches``, exactly what Qwen3-VL's processor makes); the model's own ViT
  encodes them in the training step, so the ViT trains with the towers; or
* ``embeds`` — ``PatchVisionFeatures`` (``model.vision=null``): a weight-free stand-in, a fixed
  random projection of each 32x32 patch's pooled colours, for models without a ViT.

Both centre-crop the picture to whole tokens, so the layout, token counts and positions are the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from megatron_cosmos3.data.errors import WRONG_SHAPE, SampleError
from megatron_cosmos3.model.config import VisionConfig

# One Reasoner token per 32x32 pixels (Qwen3-VL: 16x16 patches merged 2x2): the ViT's own grid,
# whatever the video token patch of the Generator's latents (encoders/video_vae.py).
VIT_PIXELS_PER_TOKEN = 32
_POOL = 4  # each 32x32 patch is pooled to 4x4 cells x 3 colours = 48 features


@dataclass
class PictureTokens:
    grid: tuple[int, int, int]  # (1, h, w) Reasoner tokens, row-major
    embeds: torch.Tensor | None = None  # (h * w, hidden): ready-made token embeddings
    pixels: torch.Tensor | None = None  # (n_patches, patch_dim): the ViT's input rows
    patch_grid: tuple[int, int, int] | None = None  # (1, 2h, 2w): the ViT's patch grid of ``pixels``


class VisionFeaturizer(Protocol):
    def __call__(self, picture: np.ndarray) -> PictureTokens:
        """(H, W, 3) uint8 -> its ViT tokens (module doc)."""
        ...


def crop_to_tokens(picture: np.ndarray) -> np.ndarray:
    """The centre of ``picture`` cut to whole 32x32-pixel tokens."""
    h, w = picture.shape[0] // VIT_PIXELS_PER_TOKEN, picture.shape[1] // VIT_PIXELS_PER_TOKEN
    if h == 0 or w == 0:
        size = f"{picture.shape[0]}x{picture.shape[1]}"
        raise SampleError(WRONG_SHAPE, f"a picture of {size} pixels is smaller than one ViT token")
    top, left = (picture.shape[0] - h * VIT_PIXELS_PER_TOKEN) // 2, (picture.shape[1] - w * VIT_PIXELS_PER_TOKEN) // 2
    return picture[top : top + h * VIT_PIXELS_PER_TOKEN, left : left + w * VIT_PIXELS_PER_TOKEN]


def check_vit_token_size(config: VisionConfig) -> None:
    """ValueError naming the fields unless a merged ViT token covers the data's VIT_PIXELS_PER_TOKEN
    square (pictures are cut on that grid) and the ViT reads RGB, as the data's pictures are: run
    when the training config loads, by the loader and the eval suite, and at ``ViTPixels``'s first
    picture."""
    if config.in_channels != 3:
        raise ValueError(f"model.vision: in_channels={config.in_channels}, but the data's pictures are RGB (3)")
    if config.patch_size * config.spatial_merge_size != VIT_PIXELS_PER_TOKEN:
        raise ValueError(
            f"model.vision: patch_size*spatial_merge_size={config.patch_size}*{config.spatial_merge_size}="
            f"{config.patch_size * config.spatial_merge_size}, but the data's ViT tokens are "
            f"{VIT_PIXELS_PER_TOKEN}x{VIT_PIXELS_PER_TOKEN} pixels"
        )


class ViTPixels:
    """The ViT's input rows of each picture (a model with ``model.vision``). A ViT the data's
    pictures do not fit (``check_vit_token_size``) is refused at the first picture, not when built:
    such a model (trained on synthetic packs) still generates text, video and sound from a prompt."""

    def __init__(self, config: VisionConfig) -> None:
        self.config = config

    def __call__(self, picture: np.ndarray) -> PictureTokens:
        from megatron_cosmos3.model.vision import image_patches  # transformers: only when used

        check_vit_token_size(self.config)
        pixels, patch_grid = image_patches(crop_to_tokens(picture), self.config)
        m = self.config.spatial_merge_size
        grid = (patch_grid[0], patch_grid[1] // m, patch_grid[2] // m)
        return PictureTokens(grid, pixels=pixels, patch_grid=patch_grid)


class PatchVisionFeatures:
    """Weight-free ViT stand-in (module doc); deterministic given ``seed``."""

    def __init__(self, hidden_size: int, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        features = 3 * _POOL * _POOL
        self.hidden_size = hidden_size
        self._projection = torch.randn(features, hidden_size, generator=generator) / features**0.5

    def __call__(self, picture: np.ndarray) -> PictureTokens:
        crop = crop_to_tokens(picture)
        h, w = crop.shape[0] // VIT_PIXELS_PER_TOKEN, crop.shape[1] // VIT_PIXELS_PER_TOKEN
        pixels = torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1).float() / 127.5 - 1.0
        pooled = torch.nn.functional.avg_pool2d(pixels, VIT_PIXELS_PER_TOKEN // _POOL)  # (3, 4h, 4w)
        patches = pooled.reshape(3, h, _POOL, w, _POOL).permute(1, 3, 0, 2, 4).reshape(h * w, -1)
        return PictureTokens((1, h, w), embeds=patches @ self._projection)


def vision_featurizer(model_config) -> VisionFeaturizer:
    """The ViT's pixel rows when the model has its own ViT (``model_config.vision``), else the stand-in."""
    if model_config.vision is not None:
        return ViTPixels(model_config.vision)
    return PatchVisionFeatures(model_config.hidden_size)
