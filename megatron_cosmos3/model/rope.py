"""Qwen3-VL's interleaved 3-axis rotary embedding (MRoPE), on explicit (t, h, w) positions.

Positions are floats: DM tokens advance time by fractional steps (the FPS rule), which plain
integer position ids could not express.
"""

from __future__ import annotations

import torch
from torch import nn


class MultimodalRotaryEmbedding(nn.Module):
    """Maps positions (3, N) to (cos, sin), each (N, head_dim).

    Frequency j of the head_dim/2 frequencies rotates with the t position, except that the
    interleaved slots j = 1, 4, 7, ... (< 3*section_h) follow h and j = 2, 5, ... (< 3*section_w)
    follow w — Qwen3-VL's layout, which keeps every axis spread over low and high frequencies.
    """

    def __init__(self, head_dim: int, theta: float, mrope_section: list[int]):
        super().__init__()
        self.head_dim, self.theta, self.mrope_section = head_dim, theta, list(mrope_section)
        self.reset_buffers()

    def reset_buffers(self, device: torch.device | str | None = None) -> None:
        """(Re)computes the tables, e.g. after ``to_empty`` left a meta-built model's buffers blank."""
        d = self.head_dim
        device = device or torch.get_default_device()  # e.g. meta inside ``with torch.device("meta")``
        # float32 on the CPU exactly as Qwen3-VL computes it: the converted model must reproduce its logits.
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, d, 2, dtype=torch.float32, device="cpu") / d))
        self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)
        axis = torch.zeros(d // 2, dtype=torch.long)
        axis[1 : 3 * self.mrope_section[1] : 3] = 1
        axis[2 : 3 * self.mrope_section[2] : 3] = 2
        self.register_buffer("frequency_axis", axis.to(device), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        # (3, N, D/2) angles per axis, then each frequency keeps the angle of its own axis.
        angles = positions.float()[..., None] * self.inv_freq
        angles = angles.gather(0, self.frequency_axis.expand(1, angles.shape[1], -1)).squeeze(0)
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates x (N, heads, head_dim) by per-token (cos, sin) of shape (N, head_dim)."""
    return x * cos[:, None, :] + rotate_half(x) * sin[:, None, :]
