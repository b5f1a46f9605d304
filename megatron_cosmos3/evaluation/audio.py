"""Sound onsets found in a waveform and their error against the simulated collision times
(docs/DESIGN.md, "Evaluation").

Onsets come from log-spectral flux: a short Hann-windowed STFT (``WINDOW`` samples, ``HOP`` apart,
channels summed in power), the log magnitude of each bin, and per frame the summed rise of every
bin over the previous frame. A rise that is the largest within ``min_gap_s`` and exceeds the
clip's median flux by ``threshold`` (in log10 units summed over bins) is an onset, timed at the
start of the hop it first rises in. Log magnitudes make a quiet impact count like a loud one and
keep a new sound visible over the ring of an earlier one at another pitch. The default threshold
finds about 97% of the world's resolvable impacts with no false onsets, and after a pooled-latent
round trip (band noise per 40 ms hop) still most of them, within a hop, with few false ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

from megatron_cosmos3.data.media_writers import check_waveform

WINDOW = 256  # 5.3 ms at 48 kHz: shorter than the gap between two audible impacts
HOP = 96  # 2 ms: the timing resolution
MAGNITUDE_FLOOR = 1e-4  # below the world's noise floor's spectrum: silence is flat, not -inf


def onset_strength(waveform: np.ndarray, sample_rate: int) -> np.ndarray:
    """(frames,) log-spectral flux of a ``(channels, samples)`` waveform; frame f ends at sample
    ``f * HOP + WINDOW`` (module doc). The first frame has no predecessor and strength 0."""
    audio = check_waveform(waveform, sample_rate, "waveform").astype(np.float64)
    if audio.shape[1] < WINDOW:
        raise ValueError(f"waveform of {audio.shape[1]} samples is shorter than one analysis window ({WINDOW})")
    frames = np.lib.stride_tricks.sliding_window_view(audio, WINDOW, axis=1)[:, ::HOP]  # (C, F, WINDOW)
    power = (np.abs(np.fft.rfft(frames * np.hanning(WINDOW), axis=-1)) ** 2).sum(0)  # (F, bins)
    log_magnitude = np.log10(np.sqrt(power) / WINDOW + MAGNITUDE_FLOOR)
    rise = np.maximum(np.diff(log_magnitude, axis=0), 0.0).sum(-1)
    return np.concatenate([[0.0], rise])


def detect_onsets(
    waveform: np.ndarray, sample_rate: int, threshold: float = 16.0, min_gap_s: float = 0.02
) -> np.ndarray:
    """Onset times (s, ascending) of a ``(channels, samples)`` float waveform (module doc)."""
    strength = onset_strength(waveform, sample_rate)
    excess = strength - np.median(strength)
    reach = max(1, int(round(min_gap_s * sample_rate / HOP)))
    padded = np.pad(excess, reach, constant_values=-np.inf)
    window = np.lib.stride_tricks.sliding_window_view(padded, 2 * reach + 1)
    # The largest in its neighbourhood; on a plateau the first frame wins.
    peaks = (excess >= window.max(-1)) & (excess > threshold)
    peaks &= ~np.concatenate([[False], peaks[:-1]])
    frames = np.nonzero(peaks)[0]
    # Frame f's window newly holds samples (f - 1) * HOP + WINDOW .. f * HOP + WINDOW: the sound began in that hop.
    return ((frames - 1) * HOP + WINDOW) / sample_rate


@dataclass(frozen=True)
class OnsetError:
    """Predicted onsets matched one to one with true ones within a tolerance.

    errors_ms: (matched,) predicted minus true time of each matched pair, in ms. missed: true
    onsets with no match. false_onsets: predicted onsets with no match.
    """

    errors_ms: np.ndarray
    missed: int
    false_onsets: int

    @property
    def matched(self) -> int:
        return len(self.errors_ms)

    @property
    def mean_abs_ms(self) -> float:
        """Mean |timing error| over matched pairs (NaN when none matched)."""
        return float(np.abs(self.errors_ms).mean()) if self.matched else float("nan")

    @property
    def recall(self) -> float:
        total = self.matched + self.missed
        return self.matched / total if total else 1.0

    @property
    def precision(self) -> float:
        total = self.matched + self.false_onsets
        return self.matched / total if total else 1.0

    @property
    def f1(self) -> float:
        total = 2 * self.matched + self.missed + self.false_onsets
        return 2 * self.matched / total if total else 1.0


def _check_times(times: Sequence[float], name: str) -> np.ndarray:
    values = np.asarray(times, dtype=np.float64)
    if values.ndim != 1 or not np.isfinite(values).all():
        raise ValueError(f"{name} must be a flat sequence of finite times in seconds, got {times!r}")
    return values


def onset_error(predicted_s: Sequence[float], true_s: Sequence[float], tolerance_s: float = 0.05) -> OnsetError:
    """Matches predicted onset times to true ones (s): the one-to-one pairing with the smallest
    total |difference| among pairs at most ``tolerance_s`` apart (Hungarian); the rest are missed
    or false."""
    predicted, true = _check_times(predicted_s, "predicted_s"), _check_times(true_s, "true_s")
    if not np.isfinite(tolerance_s) or tolerance_s <= 0:
        raise ValueError(f"tolerance_s must be a positive number of seconds, got {tolerance_s!r}")
    distance = np.abs(predicted[:, None] - true[None, :])
    allowed = distance <= tolerance_s
    # A pair beyond the tolerance costs more than any set of allowed pairs: never chosen over one.
    cost = np.where(allowed, distance, tolerance_s * (len(predicted) + len(true) + 1))
    rows, cols = linear_sum_assignment(cost) if cost.size else (np.array([], int), np.array([], int))
    keep = allowed[rows, cols]
    rows, cols = rows[keep], cols[keep]
    return OnsetError(
        errors_ms=(predicted[rows] - true[cols]) * 1000.0,
        missed=len(true) - len(cols),
        false_onsets=len(predicted) - len(rows),
    )


def resolvable_onsets(times_s: Sequence[float], min_gap_s: float = 0.02) -> np.ndarray:
    """The onsets a listener (or ``detect_onsets``) can tell apart: sorted, each kept only when it
    comes more than ``min_gap_s`` after the last one kept (later ones sound as the same onset)."""
    times = np.sort(_check_times(times_s, "times_s"))
    kept: list[float] = []
    for time in times:
        if not kept or time - kept[-1] > min_gap_s:
            kept.append(float(time))
    return np.array(kept)
