"""A tiny random Qwen3-VL, built and saved with transformers (no hub access), and inputs for it.

Shared by the conversion and inference tests (their conftest.py files import the fixtures below).

Its dimensions are those of ``configs/model/tiny.yaml``; it is saved in several safetensors shards
with an index, like the real checkpoints.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

TINY_YAML = Path(__file__).resolve().parents[2] / "configs" / "model" / "tiny.yaml"
IMAGE, VIDEO, VISION_START, VISION_END = 310, 311, 312, 313
PATCH_DIM = 3 * 2 * 16 * 16  # channels x temporal patch x 16 x 16


def tiny_hf_config(tie_word_embeddings: bool = False, **text_changes):
    from transformers import Qwen3VLConfig

    text = dict(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        rms_norm_eps=1e-6,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 5e6,
            "mrope_section": [4, 2, 2],
            "mrope_interleaved": True,
        },
    )
    text.update(text_changes)
    vision = dict(
        depth=3,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        out_hidden_size=64,
        num_position_embeddings=64,
        deepstack_visual_indexes=[0, 2],
        patch_size=16,
        spatial_merge_size=2,
        temporal_patch_size=2,
    )
    return Qwen3VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=IMAGE,
        video_token_id=VIDEO,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
        tie_word_embeddings=tie_word_embeddings,
    )


def random_qwen3_vl(config, seed: int = 0):
    """A Qwen3-VL with O(1) random weights everywhere (norms around 1), so logits are far from 0
    and every tensor matters."""
    from transformers import Qwen3VLForConditionalGeneration

    model = Qwen3VLForConditionalGeneration(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif p.dim() >= 2:
                p.copy_(noise * (0.5 / p.shape[-1] ** 0.5 if p.dim() == 2 else 0.05))
            else:
                p.copy_(0.1 * noise)
    return model


def save_sharded(model, folder: Path, max_shard_size: str = "150KB") -> Path:
    model.save_pretrained(str(folder), max_shard_size=max_shard_size)
    assert len(list(folder.glob("model-*.safetensors"))) >= 2 and (folder / "model.safetensors.index.json").is_file()
    return folder


def _text(g: torch.Generator, n: int) -> torch.Tensor:
    return torch.randint(0, 300, (n,), generator=g)


def _image_tokens(n: int) -> torch.Tensor:
    return torch.tensor([VISION_START] + [IMAGE] * n + [VISION_END])


def _video_tokens(g: torch.Generator, frames: int, per_frame: int) -> torch.Tensor:
    """Qwen3-VL's video prompt: "<t seconds>" text, then the frame's placeholders, per frame."""
    parts = []
    for _ in range(frames):
        parts += [_text(g, 3), torch.tensor([VISION_START] + [VIDEO] * per_frame + [VISION_END])]
    return torch.cat(parts)


def _pad_left(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(r.numel() for r in rows)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, length - r.numel() :] = r
        mask[i, length - r.numel() :] = 1
    return ids, mask


def _finish(ids, mask, **vision) -> dict:
    kinds = torch.zeros_like(ids)
    kinds[ids == IMAGE] = 1
    kinds[ids == VIDEO] = 2
    return dict(input_ids=ids, attention_mask=mask, mm_token_type_ids=kinds, **vision)


def processor_like_inputs(kind: str, seed: int = 0) -> dict:
    """What a Qwen3-VL processor would give for a batch of 2 prompts: ``text``, ``image`` (several
    images of different, non-square grids, one row left-padded) or ``video`` (two clips of 2 and 3
    frames with timestamp text, plus an image, so image and video features interleave)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "text":
        ids = _text(g, 2 * 17).view(2, 17)
        return _finish(ids, torch.ones_like(ids))
    if kind == "image":
        grids = torch.tensor([[1, 4, 6], [1, 6, 4], [1, 8, 10]])  # patches; tokens = t*h*w/4
        tokens = (grids.prod(-1) // 4).tolist()
        rows = [
            torch.cat([_text(g, 5), _image_tokens(tokens[0]), _text(g, 4), _image_tokens(tokens[1]), _text(g, 3)]),
            torch.cat([_text(g, 2), _image_tokens(tokens[2]), _text(g, 6)]),
        ]
        ids, mask = _pad_left(rows)
        pixels = torch.randn(int(grids.prod(-1).sum()), PATCH_DIM, generator=g)
        return _finish(ids, mask, pixel_values=pixels, image_grid_thw=grids)
    if kind == "video":
        video_grids = torch.tensor([[2, 4, 4], [3, 4, 6]])
        image_grid = torch.tensor([[1, 6, 6]])
        rows = [
            torch.cat([_text(g, 4), _video_tokens(g, 2, 4), _text(g, 3), _image_tokens(9), _text(g, 2)]),
            torch.cat([_text(g, 3), _video_tokens(g, 3, 6), _text(g, 5)]),
        ]
        ids, mask = _pad_left(rows)
        return _finish(
            ids,
            mask,
            pixel_values=torch.randn(36, PATCH_DIM, generator=g),
            image_grid_thw=image_grid,
            pixel_values_videos=torch.randn(int(video_grids.prod(-1).sum()), PATCH_DIM, generator=g),
            video_grid_thw=video_grids,
        )
    raise ValueError(kind)


@pytest.fixture(scope="session")
def hf_folder(tmp_path_factory) -> Path:
    """The tiny random Qwen3-VL saved in >= 2 safetensors shards plus the index (fp32)."""
    return save_sharded(random_qwen3_vl(tiny_hf_config()), tmp_path_factory.mktemp("qwen3_vl_tiny"))


@pytest.fixture(scope="session")
def hf_model(hf_folder):
    from transformers import Qwen3VLForConditionalGeneration

    return Qwen3VLForConditionalGeneration.from_pretrained(str(hf_folder)).eval()
