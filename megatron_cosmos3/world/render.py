"""Pure-numpy rendering of the box: (H, W, 3) uint8 frames, z up, anti-aliased discs.

The picture is the whole 1 m x 1 m box: pixel column c covers x in [c, c + 1) / W, row 0 is the
ceiling. Discs are drawn with one pixel of coverage ramp so that sub-pixel motion shows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BALL_COLOURS = {"red": (220, 50, 47), "blue": (38, 110, 210), "green": (60, 170, 70), "yellow": (235, 195, 40)}
EFFECTOR_COLOUR = (70, 70, 80)
HAND_COLOUR = (225, 150, 110)
PUSHER_COLOUR = (120, 60, 150)
EMBODIMENT_COLOURS = {"single_arm": EFFECTOR_COLOUR, "humanoid": HAND_COLOUR, "planar_pusher": PUSHER_COLOUR}
MARK_COLOUR = (250, 250, 250)


@dataclass(frozen=True)
class Disc:
    x: float
    z: float
    radius: float
    colour: tuple[int, int, int]


class Canvas:
    """A square frame of ``size`` pixels."""

    def __init__(self, size: int) -> None:
        self.size = size
        centres = (np.arange(size) + 0.5) / size
        self._x = centres[None, :]
        self._z = 1.0 - centres[:, None]
        # Background: a vertical gradient, so position in the box is visible even without objects.
        shade = (200 + 40 * self._z).repeat(size, axis=1)
        self._background = np.stack([shade, shade, shade + 10], axis=-1).clip(0, 255)

    def draw(self, discs: list[Disc]) -> np.ndarray:
        """The frame with ``discs`` painted in order (later ones on top)."""
        frame = self._background.copy()
        for disc in discs:
            distance = np.hypot(self._x - disc.x, self._z - disc.z) * self.size
            coverage = np.clip(disc.radius * self.size - distance + 0.5, 0.0, 1.0)[..., None]
            frame = frame * (1 - coverage) + np.array(disc.colour, dtype=np.float64) * coverage
        return np.round(frame).astype(np.uint8)
