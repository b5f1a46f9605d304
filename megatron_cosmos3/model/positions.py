"""Position rules: where each token sits on the (t, h, w) rotary axes.

AR section (Qwen3-VL): text advances all three axes together by 1 per token; a ViT image grid
shares one start on every axis and spreads over h and w; whatever follows continues at
max(previous) + 1.

DM section (Cosmos 3 FPS rule): time advances by delta_t = TPS_BASE / tokens_per_second per
temporal token, so one second always spans TPS_BASE = 6 units whatever the frame or sample rate,
and streams of one sample (video, audio, actions) all start at the same offset — the first unit
after the AR section — so that events at the same instant share a temporal position.
"""

from __future__ import annotations

import torch

from megatron_cosmos3.model.config import TPS_BASE

VIDEO_VAE_TEMPORAL_COMPRESSION = 4
AUDIO_TOKENS_PER_SECOND = 25.0  # 48 kHz with a hop of 1920 samples


def video_tokens_per_second(fps: float) -> float:
    """Latent frames per second of a video at ``fps`` after 4x temporal compression."""
    if fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    return fps / VIDEO_VAE_TEMPORAL_COMPRESSION


def temporal_position(offset: float, time_s: torch.Tensor | float) -> torch.Tensor | float:
    """The temporal rotary position of an instant ``time_s`` seconds into a sample's DM section."""
    return offset + TPS_BASE * time_s


def text_positions(start: float, num_tokens: int) -> torch.Tensor:
    """(3, num_tokens): all three axes advance together, like a 1-D rotary embedding."""
    steps = start + torch.arange(num_tokens, dtype=torch.float32)
    return steps.expand(3, -1).clone()


def vision_grid_positions(start: float, grid_t: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """(3, t*h*w) positions of a merged ViT grid in raster order (t, then h, then w)."""
    t, h, w = torch.meshgrid(
        torch.arange(grid_t, dtype=torch.float32),
        torch.arange(grid_h, dtype=torch.float32),
        torch.arange(grid_w, dtype=torch.float32),
        indexing="ij",
    )
    return start + torch.stack([t.flatten(), h.flatten(), w.flatten()])


def next_start(positions: torch.Tensor, default: float = 0.0) -> float:
    """The first free position after a section: max over all axes + 1."""
    return float(positions.max()) + 1.0 if positions.numel() else default


def dm_video_positions(offset: float, grid_t: int, grid_h: int, grid_w: int, fps: float,
                       first_frame: int = 0) -> torch.Tensor:
    """(3, t*h*w) positions of video latent tokens; latent frame f sits at time f / TPS.

    ``first_frame`` lets a clip's later frames (e.g. the noisy part of image-to-video) keep the
    times they have in the whole clip.
    """
    delta_t = TPS_BASE / video_tokens_per_second(fps)
    frames = torch.arange(first_frame, first_frame + grid_t, dtype=torch.float32)
    t, h, w = torch.meshgrid(frames * delta_t, torch.arange(grid_h, dtype=torch.float32),
                             torch.arange(grid_w, dtype=torch.float32), indexing="ij")
    return offset + torch.stack([t.flatten(), h.flatten(), w.flatten()])


def dm_sequence_positions(offset: float, num_tokens: int, tokens_per_second: float,
                          first_token: int = 0) -> torch.Tensor:
    """(3, n) positions of a 1-D temporal stream (audio latents, actions): token i at time i / TPS.

    The three axes move together, as for text, since these streams have no spatial extent.
    """
    if tokens_per_second <= 0:
        raise ValueError(f"tokens_per_second must be > 0, got {tokens_per_second}")
    steps = torch.arange(first_token, first_token + num_tokens, dtype=torch.float32)
    return (offset + steps * (TPS_BASE / tokens_per_second)).expand(3, -1).clone()
