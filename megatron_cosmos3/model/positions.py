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


def token_runs(token_kind: torch.Tensor) -> list[tuple[int, int, int]]:
    """(kind, first, end) of each maximal run of equal values in ``token_kind`` (n,)."""
    kinds = token_kind.cpu()
    if kinds.numel() == 0:
        return []
    starts = [0] + (torch.nonzero(kinds[1:] != kinds[:-1]).squeeze(1) + 1).tolist()
    ends = starts[1:] + [kinds.numel()]
    return [(int(kinds[a]), a, b) for a, b in zip(starts, ends)]


def qwen3_vl_positions(token_kind: torch.Tensor, vision_grids: list[tuple[int, int, int]]) -> torch.Tensor:
    """(3, n) positions of one sample's AR tokens exactly as Qwen3-VL's ``get_rope_index`` sets them.

    ``token_kind`` (n,) is 0 for text and > 0 for ViT tokens (the processor's mm_token_type_ids:
    1 image, 2 video; a bool ``is_vision`` mask works too). Each maximal run of one ViT kind is one
    merged grid (t, h, w) of ``vision_grids``, in order: an image, or one frame of a video (Qwen3-VL
    puts timestamp text between frames, so every frame is its own run with t = 1). Text advances
    all axes by 1 per token; a grid starts every axis at the current position
    (``vision_grid_positions``) and the text after it continues at start + max(h, w) — Qwen3-VL's
    rule, which is ``next_start`` for the t = 1 grids it produces.
    """
    parts, start, grids = [], 0.0, iter(vision_grids)
    for kind, first, end in token_runs(token_kind):
        if kind == 0:
            parts.append(text_positions(start, end - first))
            start += end - first
            continue
        grid = next(grids, None)
        if grid is None:
            raise ValueError(
                f"qwen3_vl_positions: ViT run at tokens [{first}, {end}) has no grid left "
                f"({len(vision_grids)} grids given)"
            )
        t, h, w = (int(x) for x in grid)
        if t * h * w != end - first:
            raise ValueError(
                f"qwen3_vl_positions: ViT run at tokens [{first}, {end}) has {end - first} "
                f"tokens but its grid {(t, h, w)} has {t * h * w}"
            )
        parts.append(vision_grid_positions(start, t, h, w))
        start += max(h, w)
    if next(grids, None) is not None:
        raise ValueError(f"qwen3_vl_positions: {len(vision_grids)} grids given but fewer ViT runs in the tokens")
    return torch.cat(parts, dim=1) if parts else torch.zeros(3, 0)


def next_start(positions: torch.Tensor, default: float = 0.0) -> float:
    """The first free position after a section: max over all axes + 1."""
    return float(positions.max()) + 1.0 if positions.numel() else default


def dm_video_positions(
    offset: float, grid_t: int, grid_h: int, grid_w: int, fps: float, first_frame: int = 0
) -> torch.Tensor:
    """(3, t*h*w) positions of video latent tokens; latent frame f sits at time f / TPS.

    ``first_frame`` lets a clip's later frames (e.g. the noisy part of image-to-video) keep the
    times they have in the whole clip.
    """
    delta_t = TPS_BASE / video_tokens_per_second(fps)
    frames = torch.arange(first_frame, first_frame + grid_t, dtype=torch.float32)
    t, h, w = torch.meshgrid(
        frames * delta_t,
        torch.arange(grid_h, dtype=torch.float32),
        torch.arange(grid_w, dtype=torch.float32),
        indexing="ij",
    )
    return offset + torch.stack([t.flatten(), h.flatten(), w.flatten()])


def video_fps_from_times(frame_times: torch.Tensor) -> float | None:
    """The frame rate of a clip read back from its latent frames' temporal positions (ascending,
    distinct, frame 0 first, as ``dm_video_positions`` made them); None for a single frame.

    Float32 positions past a few hundred units carry too little of the step for ``24 / step`` to
    give the rate to three decimals (60 fps after a 200-token prompt reads 60.001), so the rate is
    measured over the whole clip and the first of these whose positions are bit for bit these ones
    is returned: its rounding to 0, 1 and 2 decimals, the NTSC rate ``n * 1000 / 1001`` it is near
    (as the data path reads a 24000/1001 fps file), its rounding to 3 decimals. So any rate of up
    to two decimals comes back exactly (29.97, not 30000/1001, where float32 cannot tell them
    apart), an NTSC rate exactly wherever its positions differ from its two-decimal rounding's
    (always 24000/1001: 23.976 was written as 2997/125), and any other rate of three decimals."""
    times = frame_times.detach().cpu().float()
    if times.numel() < 2:
        return None
    span = float(times[-1]) - float(times[0])
    measured = VIDEO_VAE_TEMPORAL_COMPRESSION * TPS_BASE * (times.numel() - 1) / span
    ntsc = round(measured * 1001 / 1000) * 1000 / 1001
    for candidate in (round(measured, 0), round(measured, 1), round(measured, 2), ntsc, round(measured, 3)):
        if candidate > 0 and torch.equal(dm_video_positions(float(times[0]), times.numel(), 1, 1, candidate)[0], times):
            return candidate
    return round(measured, 3)


def dm_sequence_positions(
    offset: float, num_tokens: int, tokens_per_second: float, first_token: int = 0
) -> torch.Tensor:
    """(3, n) positions of a 1-D temporal stream (audio latents, actions): token i at time i / TPS.

    The three axes move together, as for text, since these streams have no spatial extent.
    """
    if tokens_per_second <= 0:
        raise ValueError(f"tokens_per_second must be > 0, got {tokens_per_second}")
    steps = torch.arange(first_token, first_token + num_tokens, dtype=torch.float32)
    return (offset + steps * (TPS_BASE / tokens_per_second)).expand(3, -1).clone()


def dm_span_positions(
    offset: float, stream: str, grid: tuple[int, int, int], tokens_per_second: float, first_temporal_index: int = 0
) -> torch.Tensor:
    """(3, t*h*w) positions of one DM span of ``stream``: a video-latent grid, or a 1-D temporal
    stream (audio, actions; h = w = 1) whose ``tokens_per_second`` sets its time step."""
    t, h, w = grid
    if stream == "video":
        fps = tokens_per_second * VIDEO_VAE_TEMPORAL_COMPRESSION
        return dm_video_positions(offset, t, h, w, fps, first_temporal_index)
    return dm_sequence_positions(offset, t * h * w, tokens_per_second, first_temporal_index)
