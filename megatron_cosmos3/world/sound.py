"""Stereo 48 kHz audio of the box: one struck-object sound per collision event.

Each event rings a damped sine starting at the exact sample of its time (``round(time * 48000)``),
with a 2 ms noise click at the onset; pitch falls with the ball's size (and depends on what it
hit), loudness grows with the impact speed, and the sound is panned to where the collision
happened (constant-power pan on x). A faint seeded noise floor keeps silence from being exactly 0.
"""

from __future__ import annotations

import numpy as np

from megatron_cosmos3.world.physics import Event

SAMPLE_RATE = 48_000
RING_S = 0.2  # seconds each impact sound lasts
DECAY_S = 0.03  # its amplitude e-folding time
CLICK_S = 0.002
PITCH = {"floor": 220.0, "wall": 330.0, "ceiling": 330.0, "ball": 440.0, "effector": 660.0}  # Hz for a 7 cm ball


def impact_pitch(event: Event, radius: float) -> float:
    return PITCH[event.kind] * 0.07 / radius


def synthesize(events: list[Event], radii: np.ndarray, duration_s: float, rng: np.random.Generator) -> np.ndarray:
    """(2, duration_s * 48000) float32 waveform in [-1, 1]."""
    total = int(round(duration_s * SAMPLE_RATE))
    audio = rng.normal(0.0, 1e-3, size=(2, total))
    ring = np.arange(int(RING_S * SAMPLE_RATE)) / SAMPLE_RATE
    envelope = np.exp(-ring / DECAY_S)
    click = np.zeros_like(ring)
    click[: int(CLICK_S * SAMPLE_RATE)] = rng.uniform(-1, 1, int(CLICK_S * SAMPLE_RATE))
    for event in events:
        onset = int(round(event.time * SAMPLE_RATE))
        if onset >= total:
            continue
        loudness = 0.5 * min(1.0, event.speed / 4.0)
        tone = loudness * envelope * (np.sin(2 * np.pi * impact_pitch(event, radii[event.ball]) * ring) + 0.5 * click)
        pan = np.clip(event.x, 0.0, 1.0) * np.pi / 2
        length = min(len(ring), total - onset)
        audio[0, onset : onset + length] += np.cos(pan) * tone[:length]
        audio[1, onset : onset + length] += np.sin(pan) * tone[:length]
    return np.clip(audio, -1.0, 1.0).astype(np.float32)
