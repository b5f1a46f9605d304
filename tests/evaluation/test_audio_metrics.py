"""Sound onsets: found in the world's audio at the simulated collision times; matching counts hits,
misses and false onsets; the truth scores perfectly, late sound and shifted onsets score worse,
noise and random onset times score as chance; bad input is refused by name."""

from __future__ import annotations

import numpy as np
import pytest

from megatron_cosmos3.data.latent_encoders import PooledLatentEncoder
from megatron_cosmos3.evaluation.audio import detect_onsets, onset_error, resolvable_onsets
from megatron_cosmos3.world.sound import SAMPLE_RATE


def test_onsets_are_found_at_the_collision_times(world_clips):
    matched = 0
    for clip in world_clips:
        true = resolvable_onsets(clip.event_times)
        found = onset_error(detect_onsets(clip.audio, SAMPLE_RATE), true, tolerance_s=0.01)
        # Two impacts about min_gap_s apart may be found as the later one: at most one such slip a clip.
        assert found.false_onsets <= 1 and found.missed <= 1, clip.colours
        assert np.abs(found.errors_ms).max() < 3.0  # the hop is 2 ms
        matched += found.matched
    assert matched >= 12


def test_onsets_survive_a_pooled_latent_round_trip_to_within_a_hop(world_clips):
    encoder = PooledLatentEncoder(video_latent_channels=24, audio_latent_dim=16)
    matched = missed = false_onsets = 0
    for clip in world_clips:
        decoded = encoder.decode_audio(encoder.encode_audio(clip.audio, SAMPLE_RATE))
        found = onset_error(detect_onsets(decoded, SAMPLE_RATE), resolvable_onsets(clip.event_times), 0.05)
        # The decoder keeps one band energy per 40 ms hop: an onset moves to within a hop of its time.
        assert np.abs(found.errors_ms).max() <= 40.0
        matched, missed, false_onsets = (
            matched + found.matched,
            missed + found.missed,
            false_onsets + found.false_onsets,
        )
    assert matched >= 0.7 * (matched + missed) and matched >= 0.75 * (matched + false_onsets)


def test_truth_is_perfect_late_sound_and_shifted_onsets_are_worse(world_clips):
    clip = world_clips[2]
    true = resolvable_onsets(clip.event_times)
    oracle = onset_error(true, true)
    assert oracle.f1 == 1.0 and oracle.mean_abs_ms == 0.0

    detected = onset_error(detect_onsets(clip.audio, SAMPLE_RATE), true)
    late_audio = np.concatenate([np.zeros((2, 1440), np.float32), clip.audio[:, :-1440]], axis=1)  # 30 ms late
    late = onset_error(detect_onsets(late_audio, SAMPLE_RATE), true)
    assert late.mean_abs_ms == pytest.approx(30.0, abs=3.0) and late.mean_abs_ms > detected.mean_abs_ms + 25

    shifted = onset_error(true + 0.03, true, tolerance_s=0.05)
    np.testing.assert_allclose(shifted.errors_ms, 30.0)
    beyond = onset_error(true + 0.08, true, tolerance_s=0.05)  # past the tolerance of its own onset
    assert beyond.f1 < shifted.f1 == 1.0


def test_noise_and_random_onsets_score_as_chance(world_clips):
    clip = world_clips[2]
    true = resolvable_onsets(clip.event_times)
    noise = np.random.default_rng(0).uniform(-0.5, 0.5, clip.audio.shape).astype(np.float32)
    assert onset_error(detect_onsets(noise, SAMPLE_RATE), true).recall == 0.0  # steady noise has no onsets
    # Random times, as many as the truth's, over the clip: F1 near the chance of landing within the
    # tolerance of some true onset (at most 2 * tolerance * count / duration).
    rng = np.random.default_rng(1)
    f1 = np.mean([onset_error(rng.uniform(0, 1, len(true)), true, tolerance_s=0.02).f1 for _ in range(200)])
    assert f1 < 2 * 0.02 * len(true) / 1.0 + 0.05


def test_matching_is_one_to_one_within_the_tolerance():
    result = onset_error([0.10, 0.50, 0.90], [0.11, 0.50, 0.70], tolerance_s=0.05)
    np.testing.assert_allclose(sorted(result.errors_ms), [-10.0, 0.0])
    assert (result.missed, result.false_onsets) == (1, 1)
    # The nearest-first pairing would match 0.10-0.13 and leave 0.14 without 0.17; the optimal one matches both.
    assert onset_error([0.10, 0.14], [0.13, 0.17], tolerance_s=0.035).matched == 2
    assert onset_error([], [0.2]).recall == 0.0 and onset_error([0.2], []).precision == 0.0
    np.testing.assert_allclose(resolvable_onsets([0.5, 0.1, 0.11, 0.14]), [0.1, 0.14, 0.5])


def test_bad_input_is_refused_by_name():
    with pytest.raises(ValueError, match="waveform must be a float waveform"):
        detect_onsets(np.zeros((2, 4800), np.int16), SAMPLE_RATE)
    with pytest.raises(ValueError, match=r"waveform must have shape \(channels, samples\)"):
        detect_onsets(np.zeros(4800, np.float32), SAMPLE_RATE)
    with pytest.raises(ValueError, match="waveform is empty"):
        detect_onsets(np.zeros((2, 0), np.float32), SAMPLE_RATE)
    with pytest.raises(ValueError, match="shorter than one analysis window"):
        detect_onsets(np.zeros((2, 100), np.float32), SAMPLE_RATE)
    with pytest.raises(ValueError, match="sample_rate must be a positive integer"):
        detect_onsets(np.zeros((2, 4800), np.float32), 0)
    with pytest.raises(ValueError, match="predicted_s must be a flat sequence of finite times"):
        onset_error([[0.1]], [0.1])
    with pytest.raises(ValueError, match="tolerance_s must be a positive number of seconds, got 0"):
        onset_error([0.1], [0.1], tolerance_s=0)


def _reference_onset_strength(waveform: np.ndarray) -> np.ndarray:
    """The module doc's log-spectral flux, frame by frame in a loop (not the module's strided views)."""
    from megatron_cosmos3.evaluation.audio import HOP, MAGNITUDE_FLOOR, WINDOW

    frames = 1 + (waveform.shape[1] - WINDOW) // HOP
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(WINDOW) / (WINDOW - 1))  # the symmetric Hann
    log_magnitudes = []
    for f in range(frames):
        segment = waveform[:, f * HOP : f * HOP + WINDOW].astype(np.float64) * window
        power = sum(np.abs(np.fft.rfft(channel)) ** 2 for channel in segment)
        log_magnitudes.append(np.log10(np.sqrt(power) / WINDOW + MAGNITUDE_FLOOR))
    rise = [np.clip(b - a, 0.0, None).sum() for a, b in zip(log_magnitudes, log_magnitudes[1:])]
    return np.array([0.0, *rise])


@pytest.mark.parametrize("sample_rate", [16_000, 44_100, 96_000])
def test_onsets_at_other_sample_rates_equal_a_reference_and_fall_at_the_impacts(sample_rate):
    """Away from 48 kHz the flux equals a loop reimplementation, and decaying tones struck at known
    times are found there within a hop (``HOP / sample_rate`` seconds) and a sample."""
    from megatron_cosmos3.evaluation.audio import HOP, onset_strength

    rng = np.random.default_rng(sample_rate)
    times = np.array([0.15, 0.41, 0.72, 1.03])
    waveform = 1e-3 * rng.standard_normal((2, int(1.3 * sample_rate)))
    ring = np.arange(int(0.08 * sample_rate)) / sample_rate
    for time, pitch in zip(times, (700.0, 1300.0, 2100.0, 900.0)):
        start = round(time * sample_rate)
        waveform[:, start : start + len(ring)] += 0.4 * np.exp(-ring / 0.015) * np.sin(2 * np.pi * pitch * ring)
    waveform = waveform.astype(np.float32)
    np.testing.assert_allclose(onset_strength(waveform, sample_rate), _reference_onset_strength(waveform), atol=1e-9)
    found = detect_onsets(waveform, sample_rate)
    assert len(found) == len(times)
    assert np.abs(found - times).max() <= (HOP + 1) / sample_rate
