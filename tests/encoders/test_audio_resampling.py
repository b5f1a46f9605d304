"""The audio encoder's resampler at every allowed rate: exact where the ratio's factors are small,
bounded in memory and within MAX_RATIO_ERROR where they are not (docs/DESIGN.md, "Real media")."""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest
import torch

from megatron_cosmos3.data.media import AUDIO_RATE_RANGE_HZ
from megatron_cosmos3.encoders.audio_vae import (
    MAX_POLYPHASE_FACTOR,
    MAX_RATIO_ERROR,
    SAMPLE_RATE,
    polyphase_factors,
    resample,
)

COMMON_RATES = [8000, 11025, 16000, 22050, 24000, 32000, 44100, 88200, 96000, 176400, 192000, 384000, 768000]
# Phones and field recorders report rates like these; the last two reduce to factors over 2**16.
ODD_RATES = [44056, 47999, 1001, 527996, 719989, 767999]


@pytest.mark.parametrize("rate", COMMON_RATES + [47999, 44056])
def test_common_and_small_factor_rates_resample_at_the_exact_ratio(rate):
    up, down = polyphase_factors(rate, SAMPLE_RATE)
    assert up * rate == down * SAMPLE_RATE and math.gcd(up, down) == 1


def test_every_allowed_rate_has_bounded_factors_within_the_ratio_error():
    rates = np.arange(AUDIO_RATE_RANGE_HZ[0], AUDIO_RATE_RANGE_HZ[1] + 1, 7).tolist() + ODD_RATES
    worst = 0.0
    for rate in rates:
        up, down = polyphase_factors(rate, SAMPLE_RATE)
        assert max(up, down) <= MAX_POLYPHASE_FACTOR, rate
        worst = max(worst, abs(up * rate / (down * SAMPLE_RATE) - 1))
    assert 0 < worst <= MAX_RATIO_ERROR  # some rates are approximated, none beyond the bound


@pytest.mark.parametrize("rate", ODD_RATES + [8000, 44100, 192000])
def test_a_band_limited_tone_lands_where_its_analytic_samples_are(rate):
    """A 1 kHz sine (200 Hz at 1001 Hz, under its Nyquist) sampled at ``rate`` for 0.5 s, resampled,
    against the sine sampled at 48 kHz: filter ripple plus the phase the (bounded) ratio error
    accumulates by the clip's end."""
    seconds, freq = 0.5, min(1000.0, rate / 5)
    source = np.sin(2 * np.pi * freq * np.arange(round(seconds * rate)) / rate)
    out = resample(torch.from_numpy(source)[None].repeat(2, 1), rate, SAMPLE_RATE)
    assert out.shape == (2, math.ceil(len(source) * SAMPLE_RATE / rate)) and out.dtype == torch.float64
    expected = np.sin(2 * np.pi * freq * np.arange(out.shape[1]) / SAMPLE_RATE)
    up, down = polyphase_factors(rate, SAMPLE_RATE)
    drift = 2 * np.pi * freq * seconds * abs(up * rate / (down * SAMPLE_RATE) - 1)
    edge = 200 + 10 * math.ceil(SAMPLE_RATE / rate)  # the filter's 10 input samples see zeros beyond the clip
    assert np.abs(out[:, edge:-edge].numpy() - expected[edge:-edge]).max() <= 2e-3 + drift


def test_resampling_an_awkward_rate_is_bounded_in_memory():
    """767999 Hz reduces to up 48000 / down 767999: its exact polyphase filter had 15 M taps (~0.7 GB
    and ~4 s for one second of sound). A tenth of a second now stays within a few MB."""
    tone = torch.from_numpy(np.sin(np.arange(76_800) * 0.01))[None].repeat(2, 1)
    resample(tone, 767_999, SAMPLE_RATE)  # scipy's first import is no part of the measure
    tracemalloc.start()
    try:
        resample(tone, 767_999, SAMPLE_RATE)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 * 2**20, f"peak {peak / 2**20:.0f} MiB"


def test_a_ratio_no_bounded_filter_can_make_is_an_error_naming_the_rates():
    with pytest.raises(ValueError, match="10000000000 Hz -> 48000 Hz"):
        polyphase_factors(10**10, SAMPLE_RATE)
