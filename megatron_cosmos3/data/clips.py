"""What a training clip is cut from a sample's media: the window, the frame times, the picture size.

``MediaConfig`` (``data.media``) says the frame rate clips are sampled at, the resolution buckets
pictures are fitted into and how long a clip is; the functions below turn it into numbers, the same
for every source (``video.npy`` frames or a compressed file, docs/DESIGN.md, "Real media"):

- ``choose_window``: a clip of ``clip_seconds`` at a random start or on a grid, from a draw in
  [0, 1) (the loader draws it from (seed, slot, index), so a resume cuts the same clip), snapped
  to the action grid when the sample has actions so that action step 0 starts at the first frame;
  ``grid_draws`` gives one draw per grid clip (pre-encoding cuts every one of them);
- ``target_times`` / ``pick_frames``: the frame shown at each target time ``start + k / fps`` is
  the last one whose timestamp is at or before it (a constant-rate stream's timestamps put back on
  its grid of i / rate first, then exact; a variable-rate one's to within half the unit they were
  rounded to, at most 1 ms; so variable-frame-rate video is sampled by its timestamps); a target
  past the end of the last frame is a truncated video;
- ``fit_to_bucket``: the bucket of nearest aspect ratio, the picture scaled to cover it
  (antialiased bilinear) and centre-cropped; tokens per sample follow from the bucket size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from megatron_cosmos3.data.errors import CORRUPT_MEDIA, OUT_OF_RANGE, ZERO_LENGTH, SampleError
from megatron_cosmos3.encoders.audio_vae import TOKENS_PER_SECOND as AUDIO_TOKENS_PER_SECOND

CLIP_STARTS = ("random", "grid", "first")
# Durations within this of a clip length count as equal: containers round times to their time base
# (WebM: 1 ms). Frame timestamps are judged by their own stream's base (``timestamp_tolerance``).
TIME_TOLERANCE_S = 1e-3
# How many bytes of float pixels ``fit_to_bucket`` converts at once.
FIT_BYTES = 256 << 20
# The most bytes one clip's frames (RGB) or sound (float, 48 kHz stereo) may decode to, checked
# before decoding: a 3 KB file can declare an hour of frames (a frame at 0 s and one at 3600 s:
# 90,000 targets at 25 fps), and a whole long video or recording is no training clip. Above it a
# sample is ``out_of_range``: cut long media with clip_seconds.
MAX_CLIP_BYTES = 8 << 30
# The shortest clip cut from longer media: one audio latent (1 / 25 s), and one frame at ``fps``
# where it is set. Shorter, every clip's sound is no token (a skip) and a grid cuts thousands of
# clips a second (--clip-seconds 0.001 took minutes to skip them all).
MIN_CLIP_SECONDS = 1 / AUDIO_TOKENS_PER_SECOND


@dataclass
class MediaConfig:
    """How clips are cut and sampled (module doc).

    fps: the frame rate video is sampled at by frame selection (0 = the source's own rate).
    resolution_buckets: "HxW" picture sizes, e.g. ["64x64", "64x96"]; each video or image is fitted
        into the one of nearest aspect ratio (empty = the source size).
    clip_seconds: clip length cut from longer media (0 = the whole sample; else at least
        ``MIN_CLIP_SECONDS`` and one frame at ``fps``).
    clip_start: "random" (any start), "grid" (a random multiple of clip_seconds) or "first".
    av_tolerance_s: the largest difference between a sample's audio and video durations; beyond it
        the sample is skipped as ``duration_mismatch``.
    """

    fps: float = 0.0
    resolution_buckets: list[str] = field(default_factory=list)
    clip_seconds: float = 0.0
    clip_start: str = "random"
    av_tolerance_s: float = 0.1

    def validate(self) -> None:
        """ValueError naming the field and its value."""
        if not (self.fps == 0 or 0.1 <= self.fps <= 1000):
            raise ValueError(f"media.fps={self.fps!r} must be 0 (the source's rate) or in [0.1, 1000]")
        if not (self.clip_seconds >= 0 and math.isfinite(self.clip_seconds)):
            raise ValueError(f"media.clip_seconds={self.clip_seconds!r} must be >= 0 (0 = whole samples)")
        shortest = max(MIN_CLIP_SECONDS, 1 / self.fps if self.fps else 0.0)
        if 0 < self.clip_seconds < shortest:
            frame = f" or one frame at media.fps={self.fps:g}" if self.fps else ""
            raise ValueError(
                f"media.clip_seconds={self.clip_seconds!r} is shorter than one audio latent ({MIN_CLIP_SECONDS:g} s)"
                f"{frame}: use 0 (whole samples) or at least {shortest:.4g} s"
            )
        if self.clip_start not in CLIP_STARTS:
            raise ValueError(f"media.clip_start={self.clip_start!r}; expected one of {list(CLIP_STARTS)}")
        if not self.av_tolerance_s >= 0:
            raise ValueError(f"media.av_tolerance_s={self.av_tolerance_s!r} must be >= 0")
        self.buckets()

    def buckets(self) -> list[tuple[int, int]]:
        """The buckets as (height, width) pairs; ValueError naming a malformed one."""
        out = []
        for text in self.resolution_buckets:
            parts = str(text).lower().split("x")
            if len(parts) != 2 or not all(p.isdecimal() and int(p) > 0 for p in parts):
                raise ValueError(f"media.resolution_buckets entry {text!r} must be 'HxW' with positive integers")
            out.append((int(parts[0]), int(parts[1])))
        return out


@dataclass(frozen=True)
class Window:
    """A clip: ``duration_s`` seconds from ``start_s`` (seconds from the sample's first frame)."""

    start_s: float
    duration_s: float

    @property
    def end_s(self) -> float:
        return self.start_s + self.duration_s


def choose_window(duration_s: float, config: MediaConfig, draw: float, step_s: float | None = None) -> Window:
    """The clip of a sample lasting ``duration_s`` (module doc). ``step_s``: starts are multiples of
    it (the action period), so every stream's step 0 begins at the clip's start."""
    length = config.clip_seconds
    if length <= 0 or length >= duration_s - TIME_TOLERANCE_S:
        return Window(0.0, duration_s)
    if config.clip_start == "first":
        start = 0.0
    elif config.clip_start == "grid":
        start = math.floor(draw * _grid_cells(duration_s, length)) * length
    else:
        start = draw * (duration_s - length)
    if step_s:
        start = math.floor(start / step_s + 1e-9) * step_s
    return Window(start, length)


def _grid_cells(duration_s: float, length: float) -> int:
    return math.floor((duration_s + TIME_TOLERANCE_S) / length)


def grid_draws(duration_s: float, config: MediaConfig) -> list[float]:
    """One draw per clip of the grid ``choose_window`` cuts a ``duration_s`` sample into, in order
    (draw k gives the clip starting at ``k * clip_seconds``); one draw (the whole sample) when no
    clip is shorter than it."""
    length = config.clip_seconds
    cells = _grid_cells(duration_s, length) if 0 < length < duration_s - TIME_TOLERANCE_S else 1
    return [(k + 0.5) / cells for k in range(cells)]


def target_times(window: Window, fps: float, name: str, tolerance_s: float = 0.0) -> np.ndarray:
    """``start + k / fps`` for every k with k / fps inside the window (float64 seconds), but not
    within ``tolerance_s`` of its end: where the window ends with the file, its end is the last
    timestamp plus the last duration, each rounded to the time base (twice ``timestamp_tolerance``),
    so 90 frames at 24000/1001 fps in a WebM, 3.75375 s, last 3.754 s, and a 91st target at
    3.75375 s lay after the last frame. ``zero_length`` naming the file ``name`` where none is."""
    count = math.ceil((window.duration_s - tolerance_s) * fps - 1e-6)
    if count <= 0:
        raise SampleError(ZERO_LENGTH, f"{name}: a {window.duration_s:.4g} s clip holds no frame at {fps:g} fps")
    return window.start_s + np.arange(count, dtype=np.float64) / fps


def sample_span(window: Window, rate: float, origin_s: float = 0.0) -> tuple[int, int]:
    """The samples a clip holds of a stream sampled at ``rate`` per second (sample i at
    ``origin_s + i / rate``): the first, ``round((start + origin) * rate)``, and how many, one per
    ``k / rate`` inside the window (``ceil``, as ``target_times`` counts frames). The one rule for
    sound, whichever decoder read it (a WAV's samples or FFmpeg's), and for action steps: 0.5 s at
    11025 Hz is 5513 samples from either."""
    return round((window.start_s + origin_s) * rate), math.ceil(window.duration_s * rate - 1e-6)


def check_clip_bytes(size: int, what: str, name: str) -> None:
    """``out_of_range`` where a clip's decoded ``size`` bytes (``what``: "N frames of WxH") exceed
    MAX_CLIP_BYTES."""
    if size > MAX_CLIP_BYTES:
        raise SampleError(
            OUT_OF_RANGE,
            f"{name}: the clip is {what} ({size / 2**30:.1f} GiB decoded, above clips.MAX_CLIP_BYTES="
            f"{MAX_CLIP_BYTES}); cut long media into clips with media.clip_seconds",
        )


def timestamp_tolerance(time_base: float) -> float:
    """How far after a target a frame's timestamp may be and still count as at it: half the
    container's time base, or of the coarser unit its timestamps were rounded to (their rounding;
    WebM's 1 ms base stores a frame meant for t as up to t + 0.5 ms), so that a 23.976 fps frame
    0.04 ms after a 24 fps target (base 1/24000) is not shown early; at most TIME_TOLERANCE_S (a
    base of one frame period stores exact frame times). 0 for times known exact (a constant-rate
    stream's, put back on its frame grid): none but a rate's float rounding."""
    return min(float(time_base) / 2, TIME_TOLERANCE_S) + 1e-6  # and a rate's float rounding


def pick_frames(
    times: np.ndarray, targets: np.ndarray, end_s: float, name: str, tolerance_s: float = 1e-9
) -> np.ndarray:
    """Index of the frame shown at each target: the last with ``times <= target`` (within
    ``tolerance_s``, see ``timestamp_tolerance``). ``times`` ascending (seconds), ``end_s`` when the
    last frame stops showing."""
    if len(times) == 0:
        raise SampleError(ZERO_LENGTH, f"{name} has no frames")
    late = targets >= end_s - tolerance_s
    if late.any():
        raise SampleError(
            CORRUPT_MEDIA,
            f"{name}: its last frame stops showing at {end_s:.6g} s, but the clip needs a frame shown at "
            f"{targets[late][0]:.6g} s, at or after that end (truncated?)",
        )
    index = np.searchsorted(times, targets + tolerance_s, side="right") - 1
    return np.maximum(index, 0)  # a first frame stamped a little after 0 shows from the start


def bucket_for(height: int, width: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest (in log ratio) to ``height x width``; first wins ties."""
    aspect = math.log(width / height)
    return min(buckets, key=lambda hw: abs(math.log(hw[1] / hw[0]) - aspect))


def fit_to_bucket(frames: np.ndarray, buckets: list[tuple[int, int]]) -> np.ndarray:
    """``(T, H, W, 3)`` uint8 -> ``(T, h, w, 3)`` in the nearest bucket (module doc); unchanged
    without buckets or when already that size."""
    if not buckets:
        return frames
    height, width = frames.shape[1:3]
    target_h, target_w = bucket_for(height, width, buckets)
    if (height, width) == (target_h, target_w):
        return frames
    scale = max(target_h / height, target_w / width)
    covered_h, covered_w = max(target_h, round(height * scale)), max(target_w, round(width * scale))
    top, left = (covered_h - target_h) // 2, (covered_w - target_w) // 2
    out = np.empty((len(frames), target_h, target_w, 3), np.uint8)
    # A few frames at a time: float copies of a whole 4K clip (12 bytes a pixel) would not fit in memory.
    step = max(1, FIT_BYTES // (height * width * 3 * 4))
    for first in range(0, len(frames), step):
        pixels = torch.from_numpy(np.ascontiguousarray(frames[first : first + step])).permute(0, 3, 1, 2).float()
        resized = torch.nn.functional.interpolate(
            pixels, size=(covered_h, covered_w), mode="bilinear", antialias=True, align_corners=False
        )
        cropped = resized[:, :, top : top + target_h, left : left + target_w]
        out[first : first + step] = cropped.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return out
