"""Balls of known colours found in frames, in metres, and the error between two clips' balls
(docs/DESIGN.md, "Evaluation").

The detector unmixes colours rather than thresholding them, so that it also reads the blocky
frames a pooled-latent decoder returns, where an 8x8 block is a mean of ball and background. Per
pixel, the background is the median of its row in that frame (the world's background is a
vertical gradient, and no row is mostly ball); the pixel's offset from it is explained as a
fraction ``a`` of each known colour's offset (least squares along that colour's direction); the
colour with the smallest residual claims the pixel with weight ``a`` when ``a >= min_fraction``.
Distractors (the world's effectors and hands) are colours that claim pixels for nobody. A blob is
a 4-connected group of claimed pixels; its area is its summed weight in pixels (partial coverage
counts partially), its position the weighted centroid. A ball is present when its largest blob's
area reaches ``min_area_px``; every further blob of a colour that large is an extra object.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from megatron_cosmos3.data.media_writers import check_frames


@dataclass(frozen=True)
class Detections:
    """What a detector found in a clip.

    colours: the palette's names, in order. positions: (T, K, 2) ball centres (x right, z up) in
    metres, NaN where the colour is absent. areas: (T, K) the largest blob's area in pixels (0 when
    absent). counts: (T, K) how many blobs of each colour are large enough to be a ball.
    """

    colours: tuple[str, ...]
    positions: np.ndarray
    areas: np.ndarray
    counts: np.ndarray

    @property
    def present(self) -> np.ndarray:
        """(T, K) bool: the colour is seen in the frame."""
        return ~np.isnan(self.positions[..., 0])


class BallDetector:
    """Finds balls of ``palette`` (name -> RGB) in frames that show a ``box_m`` x ``box_m`` scene
    (module doc). ``min_radius_m``: the smallest ball; a blob needs ``min_area_share`` of its
    area to count. ``distractors``: RGB colours of other objects, never reported."""

    def __init__(
        self,
        palette: Mapping[str, Sequence[int]],
        box_m: float,
        min_radius_m: float,
        distractors: Sequence[Sequence[int]] = (),
        min_fraction: float = 0.2,
        min_area_share: float = 0.35,
        max_residual: float = 60.0,
    ) -> None:
        if not palette:
            raise ValueError("palette is empty: the detector needs at least one ball colour (name -> RGB)")
        colours = np.array([list(c) for c in (*palette.values(), *distractors)], dtype=np.float64)
        if colours.ndim != 2 or colours.shape[1] != 3 or ((colours < 0) | (colours > 255)).any():
            raise ValueError(f"palette and distractors must be RGB triples in 0-255, got {colours.tolist()}")
        for name, value in (("box_m", box_m), ("min_radius_m", min_radius_m)):
            if not np.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a positive number of metres, got {value!r}")
        if not 0 < min_fraction <= 1:
            raise ValueError(f"min_fraction must be in (0, 1], got {min_fraction!r}")
        self.names = tuple(palette)
        self.colours = colours
        self.box_m, self.min_radius_m = float(box_m), float(min_radius_m)
        self.min_fraction, self.min_area_share, self.max_residual = min_fraction, min_area_share, max_residual

    def min_area_px(self, width_px: int) -> float:
        """The smallest blob area (pixels) that is a ball in frames ``width_px`` wide."""
        radius_px = self.min_radius_m * width_px / self.box_m
        return self.min_area_share * np.pi * radius_px**2

    def claims(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per pixel of ``(T, H, W, 3)`` uint8 frames: the index of the colour that claims it (-1:
        background) and its weight in [0, 1]."""
        check_frames(frames, "frames")
        pixels = frames.astype(np.float32)
        background = np.median(pixels, axis=2, keepdims=True)  # (T, H, 1, 3): each row's own
        offset = pixels - background
        direction = self.colours.astype(np.float32)[None, None] - background  # (T, H, K, 3)
        norm = np.maximum((direction**2).sum(-1), 1e-6)[:, :, None]  # (T, H, 1, K)
        along = np.einsum("thwc,thkc->thwk", offset, direction)
        fraction = np.clip(along / norm, 0.0, 1.0)  # (T, H, W, K)
        # |offset - fraction * direction|, expanded so that no (T, H, W, K, 3) array is made.
        squared = (offset**2).sum(-1, keepdims=True) - 2 * fraction * along + fraction**2 * norm
        residual = np.sqrt(np.maximum(squared, 0.0))
        residual = np.where(fraction >= self.min_fraction, residual, np.inf)
        best = residual.argmin(-1)
        weight = np.take_along_axis(fraction, best[..., None], -1)[..., 0]
        claimed = np.take_along_axis(residual, best[..., None], -1)[..., 0] <= self.max_residual
        return np.where(claimed, best, -1), np.where(claimed, weight, 0.0)

    def detect(self, frames: np.ndarray) -> Detections:
        """The balls of every palette colour in each frame (module doc)."""
        owner, weight = self.claims(frames)
        steps, height, width = owner.shape
        k = len(self.names)
        positions = np.full((steps, k, 2), np.nan)
        areas, counts = np.zeros((steps, k)), np.zeros((steps, k), dtype=np.int64)
        min_area = self.min_area_px(width)
        rows, cols = np.mgrid[0:height, 0:width]
        for t in range(steps):
            for c in range(k):
                mine = np.where(owner[t] == c, weight[t], 0.0)
                labels, blobs = ndimage.label(mine > 0)
                if not blobs:
                    continue
                index = np.arange(1, blobs + 1)
                blob_areas = ndimage.sum(mine, labels, index)
                counts[t, c] = int((blob_areas >= min_area).sum())
                largest = int(blob_areas.argmax())
                if blob_areas[largest] < min_area:
                    continue
                w = np.where(labels == largest + 1, mine, 0.0)
                row, col = (w * rows).sum() / w.sum(), (w * cols).sum() / w.sum()
                # Pixel centres: column c sits at (c + 0.5) / W of the box, row 0 at the top.
                positions[t, c] = ((col + 0.5) / width * self.box_m, (1.0 - (row + 0.5) / height) * self.box_m)
                areas[t, c] = blob_areas[largest]
        return Detections(self.names, positions, areas, counts)


@dataclass(frozen=True)
class PositionError:
    """Ball positions of a predicted clip against the true clip's, per ball and frame.

    errors_m: (T, K) distance in metres where both show the ball, NaN elsewhere. matched: how many
    (frame, ball) pairs both show. missed: shown in the truth, not in the prediction. extra: shown in
    the prediction but not the truth, plus surplus blobs (a colour seen twice in a frame).
    """

    errors_m: np.ndarray
    matched: int
    missed: int
    extra: int

    @property
    def mean_m(self) -> float:
        """Mean distance over matched pairs (NaN when none matched)."""
        return float(np.nanmean(self.errors_m)) if self.matched else float("nan")

    @property
    def missed_rate(self) -> float:
        """Missed over the (frame, ball) pairs the truth shows."""
        return self.missed / max(self.matched + self.missed, 1)

    def penalised_mean_m(self, penalty_m: float) -> float:
        """One number: the mean over every matched, missed and extra pair, a missed or extra one
        costing ``penalty_m`` (e.g. the box diagonal: as wrong as a ball can be)."""
        total = np.nansum(self.errors_m) + penalty_m * (self.missed + self.extra)
        count = self.matched + self.missed + self.extra
        return float(total / count) if count else 0.0


def position_error(predicted: Detections, true: Detections) -> PositionError:
    """Per ball and frame distance between two clips' detections of the same palette."""
    if predicted.colours != true.colours:
        raise ValueError(f"predicted colours {predicted.colours} differ from true colours {true.colours}")
    if predicted.positions.shape != true.positions.shape:
        raise ValueError(
            f"predicted detections of shape {predicted.positions.shape} differ from true {true.positions.shape}"
        )
    both = predicted.present & true.present
    errors = np.where(both, np.linalg.norm(predicted.positions - true.positions, axis=-1), np.nan)
    surplus = np.maximum(predicted.counts - 1, 0).sum() - np.maximum(true.counts - 1, 0).sum()
    return PositionError(
        errors_m=errors,
        matched=int(both.sum()),
        missed=int((true.present & ~predicted.present).sum()),
        extra=int((predicted.present & ~true.present).sum() + max(int(surplus), 0)),
    )
