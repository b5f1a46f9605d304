"""A task's DM layout applied to one sample's streams: which rows go where, clean or noisy.

``Stream`` is one DM stream of a sample (video or image latents, audio latents, pseudo-actions),
its rows time-major. ``dm_layout`` cuts the streams into the spans a ``TaskSpec`` lists, in layout
order (clean conditioning first), each span keeping the times its rows have in the whole clip
(``first_temporal_index``), so the FPS rule places a clip's later frames where they belong.

How many steps of a stream a length of time holds is one rule, ``steps_before``, in exact
arithmetic: training cuts audio and actions to the seconds of the encoded frames with it and
generation sizes a request's streams with it, so a model generates as many steps as it trained on.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from fractions import Fraction

import torch

from megatron_cosmos3.tasks.registry import DMRole, TaskSpec

# A float rate or time is the fraction of at most this denominator within float rounding of it
# (30000/1001 fps given as 29.97002997002997), else the decimal it prints as (29.97 -> 2997/100).
_SNAP_DENOMINATOR = 1001
_SNAP_TOLERANCE = Fraction(1, 10**12)


def exact(value: float | Fraction) -> Fraction:
    """``value`` (a rate in Hz or a time in seconds) as an exact fraction (see ``_SNAP_DENOMINATOR``)."""
    if isinstance(value, (int, Fraction)):
        return Fraction(value)
    decimal = Fraction(repr(float(value)))
    simple = decimal.limit_denominator(_SNAP_DENOMINATOR)
    return simple if abs(simple - decimal) <= abs(decimal) * _SNAP_TOLERANCE else decimal


def steps_before(seconds: float | Fraction, rate: float | Fraction) -> int:
    """Steps of a stream sampled at ``rate`` per second (step i at i / rate) that start before
    ``seconds``: ceil(seconds x rate), exactly (``exact``). 13 frames at 24 fps hold 9 steps at 15 Hz
    (8.125: the ninth starts at 0.533 s, while the 13th frame shows)."""
    return math.ceil(exact(seconds) * exact(rate))


@dataclass(frozen=True)
class Stream:
    """One DM stream of one sample.

    key: the model's stream key: "video" (video and image latents), "audio" or "action/<embodiment>".
    values: (t * h * w, d) rows, row-major over ``grid`` (time first).
    grid: (t, h, w) token grid; (n, 1, 1) for audio and actions.
    tokens_per_second: temporal tokens per second (video: fps / 4, audio: 25, actions: their rate).
    first_temporal_index: index of row group 0 within the whole clip (0 unless cut from a clip).
    """

    key: str
    values: torch.Tensor
    grid: tuple[int, int, int]
    tokens_per_second: float
    first_temporal_index: int = 0

    def __post_init__(self) -> None:
        t, h, w = self.grid
        if self.values.dim() != 2 or self.values.shape[0] != t * h * w:
            raise ValueError(
                f"stream {self.key!r}: values of shape {tuple(self.values.shape)} do not fit grid {self.grid}"
            )
        if self.tokens_per_second <= 0:
            raise ValueError(f"stream {self.key!r}: tokens_per_second must be > 0, got {self.tokens_per_second}")

    @property
    def num_tokens(self) -> int:
        return int(self.values.shape[0])

    @property
    def num_steps(self) -> int:
        """Temporal steps (latent frames, audio tokens, actions)."""
        return self.grid[0]

    @property
    def duration_s(self) -> float:
        return self.num_steps / self.tokens_per_second

    def steps(self, start: int, stop: int) -> Stream:
        """Temporal steps ``[start, stop)``, keeping their times within the clip."""
        t, h, w = self.grid
        start, stop = max(0, start), min(t, stop)
        per_step = h * w
        return replace(
            self,
            values=self.values[start * per_step : stop * per_step],
            grid=(stop - start, h, w),
            first_temporal_index=self.first_temporal_index + start,
        )

    def first_seconds(self, seconds: float | Fraction) -> Stream:
        """The steps that start before ``seconds`` (``steps_before``, at least one): a crop of the
        clip's beginning."""
        return self.steps(0, max(1, steps_before(seconds, self.tokens_per_second)))


def past_frames(num_latent_frames: int) -> int:
    """Latent frames a forward-dynamics layout treats as the past (the rest is the future)."""
    return max(1, num_latent_frames // 2)


def _part(stream: Stream, role: DMRole) -> Stream:
    t = stream.num_steps
    if role.part == "all":
        return stream
    if role.part == "first_frame":
        return stream.steps(0, 1)
    if role.part == "after_first_frame":
        return stream.steps(1, t)
    if role.part == "past":
        return stream.steps(0, past_frames(t))
    if role.part == "future":
        return stream.steps(past_frames(t), t)
    raise ValueError(f"unknown span part {role.part!r}")


def dm_layout(task: TaskSpec, streams: Mapping[str, Stream]) -> list[tuple[Stream, bool]]:
    """The DM spans of ``task`` as ``(stream piece, noisy)`` pairs in layout order.

    ``streams`` maps a stream name of the registry ("image", "video", "audio", "actions") to the
    sample's stream. Raises ValueError if a needed stream is missing or a span comes out empty
    (e.g. image-to-video on a one-frame clip).
    """
    spans = []
    for role in task.dm:
        if role.stream not in streams:
            raise ValueError(f"task {task.name!r} needs a {role.stream!r} stream; the sample has {sorted(streams)}")
        piece = _part(streams[role.stream], role)
        if piece.num_tokens == 0:
            raise ValueError(f"task {task.name!r}: span {role} of a {streams[role.stream].grid} stream is empty")
        spans.append((piece, role.noisy))
    return spans


def noise_mask(spans: list[tuple[Stream, bool]]) -> torch.Tensor:
    """(n_dm,) bool: True on the rows of noisy spans — False on a prefix, True on the rest."""
    if not spans:
        return torch.zeros(0, dtype=torch.bool)
    return torch.cat([torch.full((piece.num_tokens,), noisy, dtype=torch.bool) for piece, noisy in spans])
