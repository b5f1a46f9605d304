"""Text->video: does a generated clip show the balls its caption asks for, in the right colours and
number (docs/DESIGN.md, "Evaluation")? The same ``BallDetector`` as the position metric reads the
clip; the caption is read with the world's wording ("A red ball ...", "Two balls (red and blue)
...")."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from megatron_cosmos3.evaluation.detection import BallDetector


def balls_in_caption(caption: str, colours: Iterable[str]) -> dict[str, int]:
    """Colour -> how many balls of it the caption's first sentence names (the world names each
    colour once: one ball of each)."""
    first = caption.split(".")[0].lower()
    return {c: 1 for c in colours if re.search(rf"\b{re.escape(c.lower())}\b", first)}


@dataclass(frozen=True)
class ObjectsShown:
    """What a clip shows against what was asked. shown: colour -> objects seen (the most frequent
    count over frames, so a ball hidden in a frame or two still counts)."""

    asked: dict[str, int]
    shown: dict[str, int]

    @property
    def colours_right(self) -> bool:
        """Every asked colour shows and no other palette colour does."""
        return set(self.asked) == set(self.shown)

    @property
    def counts_right(self) -> bool:
        """Every colour shows exactly as many objects as asked, and nothing else shows."""
        return self.asked == self.shown


def objects_shown(frames: np.ndarray, asked: dict[str, int], detector: BallDetector) -> ObjectsShown:
    """Reads ``(T, H, W, 3)`` uint8 frames with ``detector`` against ``asked`` (colour -> count)."""
    unknown = sorted(set(asked) - set(detector.names))
    if unknown:
        raise ValueError(f"asked colours {unknown} are not in the detector's palette {list(detector.names)}")
    counts = detector.detect(frames).counts  # (T, K)
    shown = {}
    for k, name in enumerate(detector.names):
        typical = int(np.bincount(counts[:, k]).argmax())
        if typical:
            shown[name] = typical
    return ObjectsShown(dict(asked), shown)


def share_right(results: Iterable[ObjectsShown]) -> tuple[float, float]:
    """(share of clips with the right colours, share with the right colours and counts)."""
    results = list(results)
    if not results:
        raise ValueError("results is empty: the share needs at least one clip")
    return (
        sum(r.colours_right for r in results) / len(results),
        sum(r.counts_right for r in results) / len(results),
    )
