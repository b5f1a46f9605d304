"""Bad input: skip reasons, per-reason and per-shard counts, and the error budget.

A sample (or a shard) that cannot be used is never a crash and never silent: it is skipped with a
reason, counted per reason and per shard, logged, and the error budget stops the run with a clear
message once too large a fraction of what was read is bad.

Two kinds of skip: *errors* (the data is broken: corrupt media, wrong shapes, ...) count against
the budget; *filtered* samples (valid, but this stage cannot use them: no task of the mixture
fits, too long even after cropping) are counted and reported but do not.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

# Errors. A truncated shard counts one ``truncated_shard`` (the sample being read when the data
# ended) plus, when the shard index says how many samples it should hold, one
# ``lost_to_truncation`` per sample never reached.
UNREADABLE_SHARD = "unreadable_shard"
TRUNCATED_SHARD = "truncated_shard"
LOST_TO_TRUNCATION = "lost_to_truncation"
# Shard integrity: a damaged member header (one skip for the sample being read, which may miss
# members; reading goes on at the next valid header, and where none follows, lost_to_truncation
# counts the samples the index says were never reached); bytes that are no tar, passed over to the
# next member header (one stray_bytes per run of them: no sample, an event of the shard); a sample
# whose members lie apart, its key seen earlier in the shard with other fields (the whole sample is one
# split_sample skip: ``shards.read_samples`` withdraws its first part); a key given to two samples, its
# later one repeating a field of the first (both are one duplicate_key skip, the same way); an index
# that lists fewer samples than the shard holds (one per shard; its samples are still used); a sample
# with a member that is a link or a device, or whose name is absolute or climbs out with "..".
DAMAGED_SHARD = "damaged_shard"
STRAY_BYTES = "stray_bytes"
SPLIT_SAMPLE = "split_sample"
DUPLICATE_KEY = "duplicate_key"
UNSAFE_MEMBER = "unsafe_member"
INDEX_MISMATCH = "index_mismatch"
CORRUPT_MEDIA = "corrupt_media"
BAD_METADATA = "bad_metadata"
MISSING_FIELD = "missing_field"
EXTRA_FIELD = "extra_field"
WRONG_SHAPE = "wrong_shape"
WRONG_DTYPE = "wrong_dtype"
NON_FINITE = "non_finite"
OUT_OF_RANGE = "out_of_range"  # a value outside what the model represents or what is physically sensible
ZERO_LENGTH = "zero_length"
UNKNOWN_EMBODIMENT = "unknown_embodiment"
# Compressed media (``data/media_files.py``): a file without the video or audio stream its field
# needs; a stream FFmpeg has no decoder for (the detail names the codec); a video in a container
# whose structure does not say how long it is (MPEG-TS/PS, FLV...: a cut one is no cut file to
# FFmpeg); audio and video whose durations differ by more than ``data.media.av_tolerance_s``.
MISSING_STREAM = "missing_stream"
UNSUPPORTED_CODEC = "unsupported_codec"
UNSUPPORTED_CONTAINER = "unsupported_container"
DURATION_MISMATCH = "duration_mismatch"
# An unexpected exception while processing one sample (logged with traceback): a bug, never bad data.
INTERNAL_ERROR = "internal_error"
ERROR_REASONS = (
    UNREADABLE_SHARD,
    TRUNCATED_SHARD,
    LOST_TO_TRUNCATION,
    DAMAGED_SHARD,
    STRAY_BYTES,
    SPLIT_SAMPLE,
    DUPLICATE_KEY,
    UNSAFE_MEMBER,
    INDEX_MISMATCH,
    CORRUPT_MEDIA,
    BAD_METADATA,
    MISSING_FIELD,
    EXTRA_FIELD,
    WRONG_SHAPE,
    WRONG_DTYPE,
    NON_FINITE,
    OUT_OF_RANGE,
    ZERO_LENGTH,
    UNKNOWN_EMBODIMENT,
    MISSING_STREAM,
    UNSUPPORTED_CODEC,
    UNSUPPORTED_CONTAINER,
    DURATION_MISMATCH,
    INTERNAL_ERROR,
)
# Skips that stand for no sample read from the shard: its events (bytes that are no tar, an index
# listing fewer samples than it holds), and the samples it should have given and never did (``LOST``:
# an unreadable shard's, as many as its index lists or else one, and those a cut shard never
# reached). Samples read (``SkipStats.seen``, ``ShardSamples.read``) leave them out; a lost sample
# still counts against the error budget. A split sample is one sample read: its skip replaces its
# first part's (``shards.read_samples``).
SHARD_EVENTS = (STRAY_BYTES, INDEX_MISMATCH)
LOST = (UNREADABLE_SHARD, LOST_TO_TRUNCATION)
NOT_READ = SHARD_EVENTS + LOST
# Filtered.
NO_TASK = "no_task"
TOO_LONG = "too_long"
FILTER_REASONS = (NO_TASK, TOO_LONG)


def printable(text: str) -> str:
    """``text`` as one printable line for logs and messages: a member name's bytes that are not
    UTF-8 (tarfile keeps them as surrogate escapes, which no UTF-8 log or terminal can write) become
    ``\\xff``, other unprintable characters (a newline in a name) their Python escape."""
    return "".join(
        char
        if char.isprintable()
        else f"\\x{ord(char) - 0xDC00:02x}"
        if 0xDC80 <= ord(char) <= 0xDCFF
        else char.encode("unicode_escape", "backslashreplace").decode("ascii")
        for char in text
    )


class SampleError(Exception):
    """A sample cannot be used; ``reason`` is one of ERROR_REASONS or FILTER_REASONS."""

    def __init__(self, reason: str, detail: str) -> None:
        if reason not in ERROR_REASONS and reason not in FILTER_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}")
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


class DataErrorBudgetExceeded(RuntimeError):
    """Too large a fraction of the data read so far is bad; the message says what and where."""


class DataExhaustedError(RuntimeError):
    """A finite stream (``data.epochs`` > 0) ended before the run's last step: the message names the
    step, ``steps``, the epochs and the dataset, where a bare StopIteration named nothing."""


class DataStreamChangedError(ValueError):
    """A checkpoint's loader state belongs to another data stream than this run's config reads: other
    stream settings (``changes``: '<field>: <old> -> <new>' each), another number of data-parallel
    ranks, shards whose saved samples no longer build, or no position for this data rank.
    ``checkpoint.restart_changed_data`` restarts the stream instead (``training/batches.py``)."""

    def __init__(self, message: str, changes: tuple[str, ...] = ()):
        super().__init__(message)
        self.changes = changes


class LoaderSetupError(RuntimeError):
    """The loader is set up wrong for its data (e.g. raw media but no encoder): not a bad sample,
    so it stops the run at once instead of being counted."""


@dataclass(frozen=True)
class Skip:
    """One skipped sample (or shard event): where, what and why."""

    shard: str
    key: str
    reason: str
    detail: str
    count: int = 1  # > 1 only for lost_to_truncation


@dataclass
class SkipStats:
    """Running counts: samples used, skips per reason, skips per shard and reason. ``seen`` counts
    samples read (used, bad or filtered), never a shard's events or the samples it lost (``NOT_READ``)."""

    used: int = 0
    per_reason: Counter = field(default_factory=Counter)
    per_shard: dict[str, Counter] = field(default_factory=dict)

    def record(self, skip: Skip) -> None:
        self.per_reason[skip.reason] += skip.count
        self.per_shard.setdefault(skip.shard, Counter())[skip.reason] += skip.count

    def _count(self, reasons) -> int:
        return sum(n for reason, n in self.per_reason.items() if reason in reasons)

    @property
    def errors(self) -> int:
        """Error skips of every kind (``data/skipped/<reason>`` sums them), shard events too."""
        return self._count(ERROR_REASONS)

    @property
    def bad(self) -> int:
        """Samples read that are bad."""
        return self.errors - self._count(NOT_READ)

    @property
    def lost(self) -> int:
        """Samples shards should have given and never did (``LOST``)."""
        return self._count(LOST)

    @property
    def filtered(self) -> int:
        return self._count(FILTER_REASONS)

    @property
    def seen(self) -> int:
        """Samples read: used, bad or filtered."""
        return self.used + self.bad + self.filtered

    def error_fraction(self) -> float:
        """Of the samples read or lost, the fraction bad or lost (a shard's events count in neither)."""
        total = self.seen + self.lost
        return (self.bad + self.lost) / total if total else 0.0

    def summary(self, top_shards: int = 5) -> str:
        """One line per reason and the shards with most errors, for logs and error messages."""
        reasons = ", ".join(f"{r} {n}" for r, n in self.per_reason.most_common()) or "none"

        def bad(item) -> int:
            return sum(n for reason, n in item[1].items() if reason in ERROR_REASONS)

        worst = sorted(self.per_shard.items(), key=lambda item: -bad(item))
        shards = "; ".join(f"{shard}: {dict(counts)}" for shard, counts in worst[:top_shards])
        counts = f"{self.used} used, {self.bad} bad, {self.filtered} filtered of {self.seen} samples read"
        counts += f", {self.lost} lost with unreadable or cut shards" if self.lost else ""
        return f"{counts}; skips: {reasons}" + (f"; worst shards: {shards}" if shards else "")

    def state_dict(self) -> dict:
        return {
            "used": self.used,
            "per_reason": dict(self.per_reason),
            "per_shard": {shard: dict(counts) for shard, counts in self.per_shard.items()},
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> SkipStats:
        return cls(
            int(state["used"]),
            Counter(state["per_reason"]),
            {shard: Counter(counts) for shard, counts in state["per_shard"].items()},
        )


@dataclass(frozen=True)
class ErrorBudget:
    """Stop once more than ``max_error_fraction`` of the samples read are bad, checked after the
    first ``min_samples`` (a couple of bad samples at the very start is no verdict)."""

    max_error_fraction: float = 0.05
    min_samples: int = 200

    def __post_init__(self) -> None:
        if not 0 <= self.max_error_fraction <= 1 or self.min_samples < 0:
            raise ValueError(
                f"error budget: max_error_fraction={self.max_error_fraction} must be in [0, 1] "
                f"and min_samples={self.min_samples} >= 0"
            )

    def check(self, stats: SkipStats) -> None:
        """Raises DataErrorBudgetExceeded, with the counts and the worst shards, if over budget —
        or if not one of ``min_samples`` samples read or lost is usable (e.g. all filtered by the
        stage, or every shard unreadable). Lost samples count as bad (``SkipStats.error_fraction``)."""
        if stats.seen + stats.lost < self.min_samples:
            return
        lost = f", and {stats.lost} lost with unreadable or cut shards" if stats.lost else ""
        if stats.used == 0:
            raise DataErrorBudgetExceeded(
                f"none of the {stats.seen} samples read is usable by this stage{lost}. {stats.summary()}"
            )
        if stats.error_fraction() > self.max_error_fraction:
            raise DataErrorBudgetExceeded(
                f"data error budget exceeded: {stats.error_fraction():.1%} of the samples are bad or lost: "
                f"{stats.bad} of {stats.seen} samples read are bad (budget {self.max_error_fraction:.1%}, "
                f"data.error_budget.max_error_fraction){lost}. {stats.summary()}"
            )
