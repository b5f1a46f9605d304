"""Pictures -> Reasoner ViT tokens (``PackedSample.ar_vision_embeds``) for the loader.

``VisionFeaturizer`` is what the packer needs: one picture in, its merged token grid and one
embedding per token out. The grid follows Qwen3-VL (16x16 patches merged 2x2: one token per 32x32
pixels). ``PatchVisionFeatures`` is a weight-free stand-in — a fixed random projection of each
32x32 patch's pooled colours — used by the CPU demo and tests until the loader runs Qwen3-VL's
ViT (``encoders/vision.py``) on pixels; it keeps the layout, token counts and positions exact.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from megatron_cosmos3.encoders.video_vae import PIXELS_PER_TOKEN

_POOL = 4  # each 32x32 patch is pooled to 4x4 cells x 3 colours = 48 features


class VisionFeaturizer(Protocol):
    def __call__(self, picture: np.ndarray) -> tuple[tuple[int, int, int], torch.Tensor]:
        """(H, W, 3) uint8 -> grid (1, h, w) and embeddings (h * w, hidden), row-major."""
        ...


class PatchVisionFeatures:
    """Weight-free ViT stand-in (module doc); deterministic given ``seed``."""

    def __init__(self, hidden_size: int, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        features = 3 * _POOL * _POOL
        self.hidden_size = hidden_size
        self._projection = torch.randn(features, hidden_size, generator=generator) / features**0.5

    def __call__(self, picture: np.ndarray) -> tuple[tuple[int, int, int], torch.Tensor]:
        h, w = picture.shape[0] // PIXELS_PER_TOKEN, picture.shape[1] // PIXELS_PER_TOKEN
        top, left = (picture.shape[0] - h * PIXELS_PER_TOKEN) // 2, (picture.shape[1] - w * PIXELS_PER_TOKEN) // 2
        crop = picture[top : top + h * PIXELS_PER_TOKEN, left : left + w * PIXELS_PER_TOKEN]
        pixels = torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1).float() / 127.5 - 1.0
        pooled = torch.nn.functional.avg_pool2d(pixels, PIXELS_PER_TOKEN // _POOL)  # (3, 4h, 4w)
        patches = pooled.reshape(3, h, _POOL, w, _POOL).permute(1, 3, 0, 2, 4).reshape(h * w, -1)
        return (1, h, w), patches @ self._projection
