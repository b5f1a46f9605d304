"""The understanding ViT: Qwen3-VL's vision tower, producing Reasoner tokens and DeepStack features.

The module is transformers' ``Qwen3VLVisionModel`` (a maintained implementation of exactly this
network), built from our typed ``VisionConfig``; weights come from a Qwen3-VL checkpoint through
``megatron_cosmos3.conversion``. What it does, for pixels as the Qwen3-VL processors emit them:

* 16x16 patches (2 frames deep) embedded by a 3-D convolution, plus learned positions bilinearly
  resampled to each image's patch grid, and a 2-D rotary embedding inside attention;
* ViT blocks attending within one image / one video frame only;
* every 2x2 block of patches merged by an MLP into one token of the Reasoner's hidden size;
* DeepStack: the outputs of a few intermediate blocks, merged by their own MLPs, which the Reasoner
  adds to the ViT token rows after its first layers (``PackedBatch.ar_deepstack_embeds``).

``image_patches`` is the processor's half for one picture: the pixel rows the ViT takes, laid out
exactly as transformers' Qwen2-VL image processor (which Qwen3-VL uses) lays them out, but kept as
uint8 — a quarter of the processor's float32 in loader queues and pack broadcasts; the encoder
normalises them on its own device (``normalize_pixels``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from megatron_cosmos3.model.config import VisionConfig


@dataclass
class VisionFeatures:
    """What the ViT gives the Reasoner for a list of images (or video clips), in input order."""

    embeds: torch.Tensor  # (n_tokens, out_hidden): one row per merged 2x2 patch block
    deepstack: torch.Tensor  # (k, n_tokens, out_hidden), k = len(deepstack_visual_indexes)


# Qwen3-VL's preprocessor_config.json: pixels scaled to [0, 1], then normalised by mean and std 0.5.
IMAGE_MEAN = IMAGE_STD = 0.5


def normalize_pixels(rows: torch.Tensor) -> torch.Tensor:
    """uint8 pixel rows -> the processor's float32 values; float rows (already normalised) pass."""
    if rows.dtype != torch.uint8:
        return rows
    return (rows.float() / 255.0 - IMAGE_MEAN) / IMAGE_STD


def image_patches(picture: np.ndarray, config: VisionConfig) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """One (H, W, 3) uint8 picture -> (pixel rows (n_patches, patch_dim) uint8, patch grid (1, gh, gw)).

    H and W must be multiples of ``patch_size * spatial_merge_size`` (the caller crops or resizes).
    Each row is one patch, channel-major, the still picture repeated over ``temporal_patch_size``
    frames; rows are ordered so that every ``spatial_merge_size``-square block of patches (one
    Reasoner token) is consecutive, blocks in row-major order.
    """
    p, m, t = config.patch_size, config.spatial_merge_size, config.temporal_patch_size
    height, width = picture.shape[0], picture.shape[1]
    if picture.ndim != 3 or picture.shape[2] != config.in_channels or height % (p * m) or width % (p * m):
        raise ValueError(
            f"image_patches: picture of shape {tuple(picture.shape)}; need (H, W, {config.in_channels}) with H and W "
            f"multiples of patch_size*spatial_merge_size={p * m}"
        )
    pixels = torch.from_numpy(np.ascontiguousarray(picture, dtype=np.uint8)).permute(2, 0, 1)
    gh, gw = height // p, width // p
    blocks = pixels.reshape(config.in_channels, gh // m, m, p, gw // m, m, p).permute(1, 4, 2, 5, 0, 3, 6)
    rows = blocks[:, :, :, :, :, None].expand(*blocks.shape[:5], t, p, p)  # (gh/m, gw/m, m, m, C, t, p, p)
    return rows.reshape(gh * gw, config.in_channels * t * p * p).contiguous(), (1, gh, gw)


def hf_vision_config(config: VisionConfig):
    """The transformers ``Qwen3VLVisionConfig`` with the same dimensions."""
    # transformers is imported where a ViT is built: importing it costs every process that imports
    # this module (checkpoints, conversion, the trainer) seconds of start-up, with or without a ViT.
    from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLVisionConfig

    return Qwen3VLVisionConfig(
        depth=config.depth,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_heads=config.num_heads,
        in_channels=config.in_channels,
        patch_size=config.patch_size,
        temporal_patch_size=config.temporal_patch_size,
        spatial_merge_size=config.spatial_merge_size,
        out_hidden_size=config.out_hidden_size,
        num_position_embeddings=config.num_position_embeddings,
        deepstack_visual_indexes=list(config.deepstack_visual_indexes),
        hidden_act=config.hidden_act,
        rope_parameters={"rope_type": "axial", "rope_theta": config.rope_theta},
    )


class VisionEncoder(nn.Module):
    """Qwen3-VL's ViT. ``vit`` holds transformers' module, whose parameter names are the
    checkpoint's ``model.visual.*`` names."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

        self.config = config
        self.vit = Qwen3VLVisionModel(hf_vision_config(config))
        # How a pack's pictures are shared out over ranks (parallel/vision_parallel.PictureSharing);
        # None: this rank encodes them all.
        self.sharing = None

    @property
    def patch_dim(self) -> int:
        """Width of one row of ``pixel_values``: channels x temporal patch x patch x patch."""
        c = self.config
        return c.in_channels * c.temporal_patch_size * c.patch_size**2

    def num_tokens(self, grid_thw: torch.Tensor) -> list[int]:
        """Reasoner tokens per item of ``grid_thw`` (n_items, 3) patch grids."""
        return (grid_thw.prod(-1) // self.config.spatial_merge_size**2).tolist()

    def merged_grid(self, grid_thw: torch.Tensor) -> list[tuple[int, int, int]]:
        """(t, h, w) of each item's Reasoner tokens: the patch grid with h and w merged."""
        m = self.config.spatial_merge_size
        return [(int(t), int(h) // m, int(w) // m) for t, h, w in grid_thw.tolist()]

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> VisionFeatures:
        """pixel_values (n_patches, patch_dim) and grid_thw (n_items, 3) as the HF processor gives
        them (``pixel_values``/``image_grid_thw`` or ``pixel_values_videos``/``video_grid_thw``), or
        as uint8 rows (``image_patches``), normalised here."""
        if pixel_values.dim() != 2 or pixel_values.shape[1] != self.patch_dim:
            raise ValueError(
                f"pixel_values must have shape (n_patches, {self.patch_dim}), got {tuple(pixel_values.shape)}"
            )
        if int(grid_thw.prod(-1).sum()) != pixel_values.shape[0]:
            raise ValueError(
                f"grid_thw {grid_thw.tolist()} covers {int(grid_thw.prod(-1).sum())} patches, "
                f"pixel_values has {pixel_values.shape[0]}"
            )
        dtype = self.vit.patch_embed.proj.weight.dtype
        out = self.vit(normalize_pixels(pixel_values).to(dtype), grid_thw=grid_thw, return_dict=True)
        embeds = out.pooler_output
        deepstack = (
            torch.stack(out.deepstack_features) if out.deepstack_features else embeds.new_zeros(0, *embeds.shape)
        )
        return VisionFeatures(embeds, deepstack)

    def set_recompute(self, mode: str) -> None:
        """``"full"``: every ViT block's activations are recomputed in backward (transformers'
        gradient checkpointing, non-reentrant); ``"none"`` and ``"selective"`` keep them (selective
        recomputation is the towers' core attention only)."""
        if mode == "full":
            self.vit.activation_checkpointing_enable({"use_reentrant": False})
        else:
            self.vit.activation_checkpointing_disable()

    def materialize(self, device: torch.device | str) -> None:
        """Allocates an encoder built on the meta device, weights left for a checkpoint to fill;
        only the rotary table (a non-persistent buffer) is recomputed."""
        self.to_empty(device=device)
        self.reset_buffers(device)

    def reset_buffers(self, device: torch.device | str) -> None:
        """Recomputes the rotary table, which ``to_empty`` leaves uninitialised."""
        from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionRotaryEmbedding

        with torch.device("cpu"):  # the table as transformers computes it, then moved
            self.vit.rotary_pos_emb = Qwen3VLVisionRotaryEmbedding(self.vit.config).to(device)
