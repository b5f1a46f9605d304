"""What a generated world holds: picture size, clip length, frame and action rates, which
embodiments act, and the mix of stills, clips and expert demonstrations."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from megatron_cosmos3.data.clips import MAX_CLIP_BYTES
from megatron_cosmos3.tasks.layout import exact
from megatron_cosmos3.world.agents import EMBODIMENT_RATES
from megatron_cosmos3.world.sound import SAMPLE_RATE


@dataclass(frozen=True)
class WorldConfig:
    """resolution: frame side in pixels (a multiple of 32). duration_s: clip length; frames, audio
    and poses all span it exactly. action_rates: embodiment -> poses per second. embodiments: the
    ones that act in the clips — the held-out ``planar_pusher`` is left out of pre- and
    mid-training data by default (docs/DESIGN.md, "The generated world"). demonstration_fraction:
    the share of samples that are an expert solving an environment task (``world/demonstrations.py``)
    instead of a random-motion clip or a still."""

    resolution: int = 64
    duration_s: float = 2.0
    fps_choices: tuple[float, ...] = (16.0, 24.0, 30.0)
    action_rates: dict = field(default_factory=lambda: dict(EMBODIMENT_RATES))
    embodiments: tuple[str, ...] = ("single_arm", "humanoid")
    still_fraction: float = 0.15
    agent_fraction: float = 0.7
    question_fraction: float = 0.3
    max_balls: int = 3
    demonstration_fraction: float = 0.0

    def __post_init__(self) -> None:
        unknown = [kind for kind in self.embodiments if kind not in self.action_rates]
        if unknown or not self.embodiments:
            raise ValueError(
                f"embodiments={list(self.embodiments)} must be a non-empty subset of {sorted(self.action_rates)}"
            )
        if not 0.0 <= self.demonstration_fraction <= 1.0:
            raise ValueError(f"demonstration_fraction={self.demonstration_fraction} must be in [0, 1]")
        if not 0 < self.duration_s < float("inf"):
            raise ValueError(f"duration_s={self.duration_s} must be > 0 and finite")
        if self.resolution % 32 or self.resolution <= 0:
            raise ValueError(f"resolution={self.resolution} must be a positive multiple of 32")
        for rate in (*self.fps_choices, *self.action_rates.values()):
            if (exact(rate) * exact(self.duration_s)).denominator != 1:  # 4.1 s x 30 Hz is 123.00000000000001
                raise ValueError(f"duration_s={self.duration_s} must hold a whole number of frames/poses at {rate}/s")
        self._check_clip_bytes()

    def _check_clip_bytes(self) -> None:
        """A clip the loader reads: its frames (at the highest frame rate) and its 48 kHz stereo float
        sound each decode to at most clips.MAX_CLIP_BYTES (above it the loader skips a sample as
        out_of_range). A crafted size was a MemoryError in the first sample (resolution=100000) or
        its poses (duration_s=1e9), after the output folders were made."""
        frames = math.ceil(max(self.fps_choices) * self.duration_s) + 1
        sizes = {
            f"{frames} frames of {self.resolution}x{self.resolution}": frames * self.resolution**2 * 3,
            f"{self.duration_s:g} s of 48 kHz stereo sound": math.ceil(self.duration_s * SAMPLE_RATE) * 2 * 4,
        }
        for what, size in sizes.items():
            if size > MAX_CLIP_BYTES:
                raise ValueError(
                    f"resolution={self.resolution} and duration_s={self.duration_s}: a clip of {what} decodes to "
                    f"{size / 2**30:.1f} GiB, above clips.MAX_CLIP_BYTES={MAX_CLIP_BYTES}"
                )
