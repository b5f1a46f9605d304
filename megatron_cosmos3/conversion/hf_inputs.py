"""What a Hugging Face Qwen3-VL processor produces -> our packed batch, and Reasoner logits from it.

The processor gives a padded (B, L) batch of token ids in which every image and every video frame
is a run of placeholder tokens (``<|image_pad|>`` / ``<|video_pad|>``, one per merged 2x2 patch
block), plus the pixels of those images/videos and their patch grids. Each row becomes one
understanding sample of a pack (padding dropped): placeholder rows take the ViT's tokens and
DeepStack features, and positions follow Qwen3-VL's rules (``positions.qwen3_vl_positions``).
"""

from __future__ import annotations

import torch

from megatron_cosmos3.model import positions as pos
from megatron_cosmos3.model.mot import MoTModel
from megatron_cosmos3.model.packed_batch import IGNORE_INDEX, PackedBatch, PackedSample
from megatron_cosmos3.model.vision import VisionEncoder, VisionFeatures

TEXT, IMAGE, VIDEO = 0, 1, 2  # the processor's mm_token_type_ids values


def _encode(vision: VisionEncoder | None, pixels, grid_thw, kind: str) -> tuple[VisionFeatures | None, list]:
    """ViT features of the images (or videos) and the merged grid of each placeholder run they fill."""
    if pixels is None:
        return None, []
    if vision is None or grid_thw is None:
        raise ValueError(f"{kind} pixels need a vision encoder and their {kind}_grid_thw")
    features = vision(pixels, grid_thw)
    grids = vision.merged_grid(grid_thw)
    if kind == "video":  # Qwen3-VL separates frames with timestamp text: one run per frame
        grids = [(1, h, w) for t, h, w in grids for _ in range(t)]
    return features, grids


def understanding_batch(
    vision: VisionEncoder | None,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    image_grid_thw: torch.Tensor | None = None,
    pixel_values_videos: torch.Tensor | None = None,
    video_grid_thw: torch.Tensor | None = None,
    mm_token_type_ids: torch.Tensor | None = None,
) -> PackedBatch:
    """A pack of B understanding samples from processor outputs (argument names as the processor's).

    input_ids / attention_mask / mm_token_type_ids: (B, L); pixel_values(_videos): (n_patches,
    patch_dim); image/video_grid_thw: (n_items, 3). No labels are set (all IGNORE_INDEX).
    """
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    kind = torch.zeros_like(input_ids)
    if vision is not None:
        kind[input_ids == vision.config.image_token_id] = IMAGE
        kind[input_ids == vision.config.video_token_id] = VIDEO
    if mm_token_type_ids is not None and not torch.equal(mm_token_type_ids.to(kind)[mask], kind[mask]):
        raise ValueError("mm_token_type_ids disagree with the image/video placeholder tokens of input_ids")
    images, image_grids = _encode(vision, pixel_values, image_grid_thw, "image")
    videos, video_grids = _encode(vision, pixel_values_videos, video_grid_thw, "video")

    # Placeholder rows of the whole batch in row-major order take the features in order, as in HF.
    vision_kind = kind[mask][kind[mask] != TEXT]
    joint = None
    for code, features, name in ((IMAGE, images, "image"), (VIDEO, videos, "video")):
        count = int((vision_kind == code).sum())
        have = 0 if features is None else features.embeds.shape[0]
        if count != have:
            raise ValueError(f"{count} {name} placeholder tokens in input_ids but the ViT gave {have} {name} tokens")
        if features is not None:
            if joint is None:
                joint = VisionFeatures(
                    features.embeds.new_zeros(vision_kind.numel(), features.embeds.shape[1]),
                    features.deepstack.new_zeros(
                        features.deepstack.shape[0], vision_kind.numel(), features.deepstack.shape[2]
                    ),
                )
            joint.embeds[vision_kind == code] = features.embeds
            joint.deepstack[:, vision_kind == code] = features.deepstack

    grids = {IMAGE: iter(image_grids), VIDEO: iter(video_grids)}
    samples, offset = [], 0
    for ids, row_kind, keep in zip(input_ids, kind, mask):
        ids, row_kind = ids[keep], row_kind[keep]
        row_grids = [next(grids[k], None) for k, _, _ in pos.token_runs(row_kind) if k != TEXT]
        if None in row_grids:
            raise ValueError("input_ids hold more image/video placeholder runs than the grids describe")
        is_vision = row_kind != TEXT
        n_vision = int(is_vision.sum())
        rows = slice(offset, offset + n_vision)
        offset += n_vision
        samples.append(
            PackedSample(
                task="understanding",
                ar_token_ids=ids,
                ar_labels=torch.full_like(ids, IGNORE_INDEX),
                ar_positions=pos.qwen3_vl_positions(row_kind, row_grids),
                ar_vision_embeds=joint.embeds[rows] if n_vision else None,
                ar_is_vision=is_vision if n_vision else None,
                ar_deepstack_embeds=joint.deepstack[:, rows] if n_vision else None,
            )
        )
    return PackedBatch.from_samples(samples)


def reasoner_logits(
    model: MoTModel,
    vision: VisionEncoder | None,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    **vision_inputs,
) -> torch.Tensor:
    """(B, L, vocab) next-token logits of the Reasoner for processor outputs (zeros at padding).

    ``vision_inputs``: ``pixel_values``, ``image_grid_thw``, ``pixel_values_videos``,
    ``video_grid_thw``, ``mm_token_type_ids``, e.g. ``reasoner_logits(model, vision, **processor(...))``.
    """
    batch = understanding_batch(vision, input_ids, attention_mask, **vision_inputs)
    hidden = model.forward_ar(batch).hidden
    logits = model.lm_logits(hidden)
    ids = input_ids if input_ids.dim() == 2 else input_ids[None]
    mask = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    out = logits.new_zeros(*ids.shape, logits.shape[-1])
    out[mask] = logits
    return out
