"""Sound at the rates recordings have, mono, stereo and 5.1 (docs/DESIGN.md, "Real media"): a clip
cut from a file holds the samples of its window, checked against the signal itself. Each file is
ffmpeg's rendering of two chirps (one a channel; mono holds the first, 5.1 the two in front left and
right and silence elsewhere), so a sample a place early or late, or channels swapped, is seen (a
pure tone repeats every period). A mono or stereo WAV stays at its rate (scipy); FLAC and a 5.1 WAV
are FFmpeg's, at 48 kHz stereo through the audio encoder's resampler."""

from __future__ import annotations

import math
import subprocess

import numpy as np
import pytest
import torch

from megatron_cosmos3.data.clips import MediaConfig
from megatron_cosmos3.data.media import encode_json
from megatron_cosmos3.data.schema import decode_sample
from megatron_cosmos3.encoders.audio_vae import SAMPLE_RATE, to_stereo_48k

RATES = [8000, 11025, 22050, 44100, 48000, 96000]
# Chirps from 200 and 300 Hz, under 8 kHz's Nyquist frequency for the whole 2 s.
LEFT, RIGHT = "0.5*sin(2*PI*(200*t+150*t*t))", "0.3*sin(2*PI*(300*t+100*t*t))"
CHANNELS = {"mono": [LEFT], "stereo": [LEFT, RIGHT], "5.1": [LEFT, RIGHT, "0", "0", "0", "0"]}
SECONDS, CLIP_SECONDS, DRAW = 2.0, 0.5, 0.37


def _chirps(times: np.ndarray, layout: str) -> np.ndarray:
    """(2, len(times)) of what a player plays of the file at ``times`` (seconds): mono in both ears."""
    left = 0.5 * np.sin(2 * np.pi * (200 * times + 150 * times**2))
    right = 0.3 * np.sin(2 * np.pi * (300 * times + 100 * times**2))
    return np.stack([left, left if layout == "mono" else right])


@pytest.mark.parametrize("layout", sorted(CHANNELS))
@pytest.mark.parametrize("suffix, codec", [("wav", "pcm_s16le"), ("flac", "flac")])
@pytest.mark.parametrize("rate", RATES)
def test_a_clip_holds_the_samples_of_its_window_at_every_rate_and_layout(tmp_path, rate, suffix, codec, layout):
    """The clip's first sample is the file's sample round(start * rate), and the rest follow it:
    the same values at the file's rate (within 16-bit rounding), or at 48 kHz by the resampler
    (within its ripple, away from the clip's edges, where its filter sees beyond the cut), as many as
    the window's samples at the file's rate make at either rate; channels in their order."""
    path = tmp_path / f"a.{suffix}"
    source = f"aevalsrc={'|'.join(CHANNELS[layout])}:s={rate}:c={layout}:d={SECONDS}"
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", source, "-c:a", codec, str(path)], check=True)
    raw = {"__key__": "k", "meta.json": encode_json({"schema": 1, "caption": "chirps"}), f"audio.{suffix}": b""}
    raw[f"audio.{suffix}"] = path.read_bytes()
    sample = decode_sample(raw, media_config=MediaConfig(clip_seconds=CLIP_SECONDS), draw=DRAW)
    start = sample.timing["clip_start_s"]
    assert start == pytest.approx(DRAW * (SECONDS - CLIP_SECONDS))
    audio = np.broadcast_to(sample.audio, (2, sample.audio.shape[1]))  # mono in both ears
    own_rate = suffix == "wav" and layout != "5.1"
    assert sample.audio_sample_rate == (rate if own_rate else SAMPLE_RATE)
    if own_rate:
        length, edge, tolerance = math.ceil(CLIP_SECONDS * rate - 1e-6), 0, 1 / 32768
    else:
        length, edge, tolerance = math.ceil(math.ceil(CLIP_SECONDS * rate - 1e-6) * SAMPLE_RATE / rate), 300, 2e-3
    assert audio.shape[1] == length
    times = round(start * rate) / rate + np.arange(length) / sample.audio_sample_rate
    want = _chirps(times, layout)
    inner = slice(edge, length - edge)
    assert np.abs(audio[:, inner] - want[:, inner]).max() <= tolerance
    early = _chirps(times - 1 / min(rate, SAMPLE_RATE), layout)  # the control: a sample early is seen
    assert np.abs(audio[:, inner] - early[:, inner]).max() > 10 * tolerance


def _clip_of(tmp_path, rate: int, suffix: str, codec: str, clip_seconds: float):
    path = tmp_path / f"{codec}.{suffix}"
    source = f"aevalsrc={LEFT}|{RIGHT}:s={rate}:c=stereo:d={SECONDS}"
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", source, "-c:a", codec, str(path)], check=True)
    raw = {
        "__key__": "k",
        "meta.json": encode_json({"schema": 1, "caption": "chirps"}),
        f"audio.{suffix}": path.read_bytes(),
    }
    return decode_sample(raw, media_config=MediaConfig(clip_seconds=clip_seconds), draw=DRAW)


@pytest.mark.parametrize("clip_seconds", [0.5, 0.30005])
@pytest.mark.parametrize("rate", [8000, 11025, 22050, 44100])
def test_a_clip_is_as_many_samples_from_a_wav_as_from_a_compressed_file_of_the_same_sound(tmp_path, rate, clip_seconds):
    """One rule counts a clip's samples, whichever decoder reads the file (``clips.sample_span``):
    a WAV's clip at its own rate, brought to 48 kHz by the encoder's resampler, is as long as the
    clip FFmpeg's path makes of a FLAC, MP3 or M4A of the same sound: ceil(seconds x rate) samples
    at the file's rate. 0.5 s at 11025 Hz (5512.5) was 5513 from the WAV but 5512 from the others
    (round() to even), 24002 against 23998 samples at 48 kHz; 0.30005 s is a fraction at every rate."""
    wav = _clip_of(tmp_path, rate, "wav", "pcm_s16le", clip_seconds)
    assert wav.audio_sample_rate == rate
    own = math.ceil(clip_seconds * rate - 1e-6)
    assert wav.audio.shape == (2, own)
    want = to_stereo_48k(torch.from_numpy(wav.audio), rate).shape[1]
    assert want == math.ceil(own * SAMPLE_RATE / rate)
    for suffix, codec in [("flac", "flac"), ("mp3", "libmp3lame"), ("m4a", "aac")]:
        other = _clip_of(tmp_path, rate, suffix, codec, clip_seconds)
        assert other.audio_sample_rate == SAMPLE_RATE
        assert other.timing["clip_start_s"] == wav.timing["clip_start_s"]
        assert other.audio.shape == (2, want), f"{suffix} at {rate} Hz"
