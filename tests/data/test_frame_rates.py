"""Video at rates other than 24/25/30 fps (docs/DESIGN.md, "Real media": frames): NTSC rates,
12.5, 15, 50, 120 and 1 fps in MP4, Matroska, WebM and AVI, and variable-frame-rate files, each decoded
at its own rate and resampled to others. Each file is made by ffmpeg (32x32, frame i a flat grey of
its own, told apart after decoding by PyAV's reading of the file); its frames' times are checked
against ffprobe's, and the frame shown at each target time is the last one whose true time
(i / rate, exact fractions) is at or before it."""

from __future__ import annotations

import json
import math
import subprocess
from fractions import Fraction

import av
import numpy as np
import pytest

from megatron_cosmos3.data.clips import MediaConfig, Window
from megatron_cosmos3.data.media import encode_json
from megatron_cosmos3.data.media_files import DecodedMedia, decode_media_file
from megatron_cosmos3.data.media_writers import exact_rate
from megatron_cosmos3.data.schema import decode_sample

SIDE = 32
# Lossless (or near: MJPEG at its best quality; VP9 in its lossless mode) so each frame's grey is its own.
CODECS = {
    "mp4": ["-c:v", "libx264", "-qp", "0"],
    "mkv": ["-c:v", "libx264", "-qp", "0"],
    "avi": ["-c:v", "mjpeg", "-q:v", "1"],
    "webm": ["-c:v", "libvpx-vp9", "-lossless", "1"],
}
RATES = ["30000/1001", "24000/1001", "12.5", "15", "50", "60000/1001", "120", "1"]
# The rates each file is resampled to: a film rate, NTSC's 29.97 (not 30), a low one.
TARGET_RATES = [Fraction(24), Fraction(30000, 1001), Fraction(15, 2)]


def _write(path, rate: str, count: int, options: list[str] = (), first: int = 0) -> None:
    """``count`` frames at ``rate`` fps by ffmpeg, frame i a flat grey 16 + 2 (first + i)."""
    greys = (16 + 2 * np.arange(first, first + count)).astype(np.uint8)
    raw_input = ["-f", "rawvideo", "-pix_fmt", "gray", "-s", f"{SIDE}x{SIDE}", "-r", rate, "-i", "-"]
    codec = CODECS[path.suffix[1:]]
    command = ["ffmpeg", "-v", "error", "-y", *raw_input, *options, *codec, "-pix_fmt", "yuv420p", str(path)]
    subprocess.run(command, input=np.repeat(greys, SIDE * SIDE).tobytes(), check=True)


def _ffprobe_times(path) -> tuple[list[Fraction], Fraction]:
    """Each frame's time (exact seconds, in presentation order) and the stream's time base, by ffprobe."""
    entries = ["-show_entries", "frame=pts:stream=time_base"]
    command = ["ffprobe", "-v", "error", "-select_streams", "v:0", *entries, "-of", "json", str(path)]
    probed = json.loads(subprocess.run(command, capture_output=True, check=True).stdout)
    time_base = Fraction(probed["streams"][0]["time_base"])
    return sorted(int(frame["pts"]) * time_base for frame in probed["frames"]), time_base


def _frame_index(path):
    """Decoded grey -> the index of the frame (in presentation order) that shows it, by PyAV."""
    with av.open(str(path)) as container:
        frames = sorted((frame.pts, int(frame.to_ndarray(format="rgb24")[SIDE // 2, SIDE // 2, 0]))
                        for frame in container.decode(video=0))  # fmt: skip
    index = {grey: i for i, (_, grey) in enumerate(frames)}
    assert len(index) == len(frames)  # every frame's grey its own
    return index


def _decode(path, fps: Fraction | int = 0, clip_seconds: float = 0.0, draw: float = 0.0):
    raw = {"__key__": "k", "meta.json": encode_json({"schema": 1, "caption": "greys"}), f"video{path.suffix}": b""}
    raw[f"video{path.suffix}"] = path.read_bytes()
    return decode_sample(raw, media_config=MediaConfig(fps=float(fps), clip_seconds=clip_seconds), draw=draw)


def _native(path) -> DecodedMedia:
    """The whole file at its own rate, with its duration."""
    whole = lambda seconds: Window(0.0, seconds)  # noqa: E731
    return decode_media_file(path.read_bytes(), path.name, MediaConfig(), whole, want_audio=False)


def _shown(decoded, index) -> list[int]:
    frames = decoded.video if hasattr(decoded, "video") else decoded.frames
    return [index[int(grey)] for grey in frames[:, SIDE // 2, SIDE // 2, 0]]


def _last_at_or_before(times: list[Fraction], targets: list[Fraction]) -> list[int]:
    return [max(i for i, t in enumerate(times) if t <= target) for target in targets]


@pytest.mark.parametrize("suffix", sorted(CODECS))
@pytest.mark.parametrize("rate", RATES)
def test_a_constant_rate_video_gives_its_frames_and_the_frame_on_screen_at_each_target(tmp_path, rate, suffix):
    """Natively: every frame once, at the exact rate (29.97 is 30000/1001, not 30; 59.94 in Matroska
    was 19001/317, FFmpeg's guess from nanoseconds) and lasting frames / rate. Resampled: target k
    at k / fps shows the last frame whose true time i / rate is at or before it; a 29.97 fps frame
    0.03 ms after a 30 fps target is not on screen yet (an AVI's time base, one frame period, was
    taken for a 1 ms rounding: the next frame came a target early; a Matroska millisecond likewise),
    and the clip holds every target before the last frame ends."""
    exact = Fraction(rate)
    count = max(3, round(0.8 * exact))  # under a second, but three frames at 1 fps
    path = tmp_path / f"clip.{suffix}"
    _write(path, rate, count)
    probed, time_base = _ffprobe_times(path)
    true_times = [i / exact for i in range(count)]
    assert len(probed) == count
    assert max(abs(t - true) for t, true in zip(probed, true_times)) <= time_base / 2
    index = _frame_index(path)

    native = _native(path)
    assert exact_rate(native.fps) == exact and _shown(native, index) == list(range(count))  # as a writer stores it
    assert native.video_duration_s == pytest.approx(float(count / exact), abs=1e-6)
    for fps in TARGET_RATES:
        sample = _decode(path, fps)
        targets = [Fraction(k) / fps for k in range(math.ceil(count / exact * fps))]  # before the last frame ends
        assert sample.fps == float(fps)
        assert _shown(sample, index) == _last_at_or_before(true_times, targets), fps
    clip = Fraction(9, 20) * count / exact  # a clip of 0.45 of the file at a random start, at 29.97 fps
    window = _decode(path, Fraction(30000, 1001), clip_seconds=float(clip), draw=0.37)
    start = Fraction(window.timing["clip_start_s"])
    targets = [start + Fraction(k * 1001, 30000) for k in range(math.ceil(clip * Fraction(30000, 1001)))]
    assert _shown(window, index) == _last_at_or_before(true_times, targets)


def _variable_rate_file(path, kind: str) -> None:
    """``segments``: clips at 25, 10 and 50 fps joined by ffmpeg's concat demuxer (copied, each
    frame keeps its time); ``dropped``: 29.97 fps with frames 5-12 dropped (a capture that skipped them)."""
    if kind == "dropped":
        _write(path, "30000/1001", 30, ["-vf", "select='not(between(n,5,12))'", "-fps_mode", "vfr"])
        return
    listed, first = [], 0
    for rate, count in (("25", 8), ("10", 6), ("50", 10)):
        part = path.with_name(f"part{first}.mp4")
        _write(part, rate, count, ["-video_track_timescale", "1000"], first=first)
        listed.append(f"file '{part.name}'")
        first += count
    (path.parent / "parts.txt").write_text("\n".join(listed))
    command = ["ffmpeg", "-v", "error", "-y", "-f", "concat", "-safe", "0", "-i", str(path.parent / "parts.txt")]
    subprocess.run([*command, "-c", "copy", str(path)], check=True)


@pytest.mark.parametrize("suffix", ["mp4", "mkv"])
@pytest.mark.parametrize("kind", ["segments", "dropped"])
def test_a_variable_rate_video_is_sampled_by_its_timestamps(tmp_path, kind, suffix):
    """A variable-rate file gives as many frames as it stores at its own rate (their average, not
    the nominal rate of its parts), each frame's time its own; at other rates the frame on screen at
    each target is the last whose time by ffprobe is at or before it; it lasts past its last frame."""
    path = tmp_path / f"clip.{suffix}"
    _variable_rate_file(path, kind)
    times, _ = _ffprobe_times(path)
    index = _frame_index(path)
    assert len({b - a for a, b in zip(times, times[1:])}) > 1  # the control: not one rate
    native = _native(path)
    duration = Fraction(native.video_duration_s).limit_denominator(30000)  # the float of a whole tick
    assert times[-1] < duration <= times[-1] + Fraction(1, 20)
    assert native.fps == pytest.approx(len(times) / float(duration), rel=1e-6) and len(native.frames) == len(times)
    shown = _shown(native, index)
    assert shown[0] == 0 and shown == sorted(shown)  # by their times, whichever the average rate skips
    # Off the grid of a rate, a Matroska end is a millisecond timestamp plus a millisecond duration:
    # no target within both roundings of it (a 29.97 fps frame's 1.001 s end holds no 10 fps target at 1 s).
    rounding = Fraction(1, 1000) if suffix == "mkv" else 0
    for fps in (Fraction(10), Fraction(25)):  # targets on whole milliseconds: no rounding of the times decides
        sample = _decode(path, fps)
        targets = [Fraction(k) / fps for k in range(math.ceil((duration - rounding) * fps))]
        assert _shown(sample, index) == _last_at_or_before(times, targets), fps


@pytest.mark.parametrize("suffix", ["mp4", "mkv"])
@pytest.mark.parametrize("kind", ["segments", "dropped"])
def test_a_variable_rate_clip_shows_the_frame_ffprobe_times_at_each_target(tmp_path, kind, suffix):
    """Clips of 0.3 and 0.7 s at starts across the file, the last ending with it, at 24, 29.97 and
    60 fps: target k at start + k / fps shows the last frame whose time by ffprobe is at or before
    it. A Matroska time is a millisecond rounding of the frame's: one up to half a millisecond after
    a target is at it, and a clip ending with the file holds no target in its last millisecond (its
    end is a rounded time plus a rounded duration); an MP4's times are exact."""
    path = tmp_path / f"clip.{suffix}"
    _variable_rate_file(path, kind)
    times, _ = _ffprobe_times(path)
    index = _frame_index(path)
    duration = Fraction(_native(path).video_duration_s)
    rounding = Fraction(1, 1000) if suffix == "mkv" else Fraction(0)
    for fps in (Fraction(24), Fraction(30000, 1001), Fraction(60)):
        for clip, draw in ((0.3, 0.0), (0.3, 0.37), (0.7, 0.5), (0.7, 0.81), (0.3, 1.0)):
            sample = _decode(path, fps, clip_seconds=clip, draw=draw)
            start, length = Fraction(sample.timing["clip_start_s"]), Fraction(sample.duration_s)
            ends_with_the_file = abs(start + length - duration) < Fraction(1, 10**6)
            length -= rounding if ends_with_the_file else 0
            targets = [start + Fraction(k) / fps for k in range(math.ceil(length * fps - Fraction(1, 10**6)))]
            leeway = rounding / 2 + Fraction(1, 10**6)  # and a float sum's rounding of the start
            shown = _last_at_or_before(times, [target + leeway for target in targets])
            assert _shown(sample, index) == shown, (fps, clip, draw)
