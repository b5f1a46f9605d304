"""Real media in the shards (docs/DESIGN.md, "Real media"): video files decode to the frames shown at
the target frame rate's timestamps (checked against the known source frames, PSNR >= 35 dB), a seeked
window equals the same window of a full decode, a click in the audio stays at its frame's time after
decode, cut and resample, rotation and variable frame rates follow the file's metadata and
timestamps, compressed audio files and jpg/webp pictures decode, and pictures fit the nearest
resolution bucket. Files are written by the test (PyAV, Debian's ffmpeg as an independent writer
and reader)."""

from __future__ import annotations

import io
import math
import struct
import subprocess
from fractions import Fraction

import av
import numpy as np
import pytest
from PIL import Image
from scipy.io import wavfile

from megatron_cosmos3.data import audio_frames, clips, media_files
from megatron_cosmos3.data.clips import MediaConfig, bucket_for, choose_window, fit_to_bucket
from megatron_cosmos3.data.errors import SampleError
from megatron_cosmos3.data.media import encode_json, encode_npy
from megatron_cosmos3.data.media_writers import encode_mp4, exact_rate
from megatron_cosmos3.data.schema import Sample, decode_sample, encode_sample

SOURCE_FPS = 60
SIDE = 32


def _source_frames(count: int, fps: float = SOURCE_FPS) -> np.ndarray:
    """Smooth, nearly grey frames (so 4:2:0 chroma keeps them) that differ clearly from one frame to
    the next: a diagonal wave whose phase moves with the frame index, lightly tinted."""
    y, x = np.mgrid[0:SIDE, 0:SIDE] / SIDE
    frames = []
    for index in range(count):
        phase = 2 * math.pi * index / 7.3
        base = 0.5 + 0.35 * np.sin(2 * math.pi * (x + 0.5 * y) + phase)
        frames.append(base[..., None] * np.array([1.0, 0.9, 0.8]) + np.array([0.0, 0.05, 0.1]))
    return np.round(np.stack(frames) * 255).astype(np.uint8)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 100.0 if mse == 0 else 10 * math.log10(255.0**2 / mse)


def _raw(field: str, data: bytes, **meta) -> dict:
    return {"__key__": "k", "meta.json": encode_json({"schema": 1, "caption": "a wave", **meta}), field: data}


@pytest.fixture(scope="module")
def one_second():
    frames = _source_frames(SOURCE_FPS)
    return frames, encode_mp4(frames, SOURCE_FPS, crf=4)


@pytest.mark.parametrize("fps", [12.5, 16, 24, 29.97, 30])
def test_video_decodes_to_the_frames_shown_at_the_target_times(one_second, fps):
    source, data = one_second
    sample = decode_sample(_raw("video.mp4", data), media_config=MediaConfig(fps=fps))
    times = np.arange(math.ceil(1.0 * fps - 1e-6)) / fps
    assert len(sample.video) == len(times) and sample.fps == fps
    shown = np.floor(times * SOURCE_FPS + 1e-9).astype(int)  # the source frame on screen at each time
    for frame, index in zip(sample.video, shown):
        assert _psnr(frame, source[index]) >= 35
        assert _psnr(frame, source[index + 1]) < 35  # control: the next frame is told apart


@pytest.mark.parametrize(
    "rate, fps, timescale",
    [("24000/1001", 24, "24000"), ("60000/1001", 30, "60000"), ("25", 24, "12800"), ("10", 30, "10")],
)
def test_ntsc_and_pal_rates_are_sampled_by_the_last_frame_at_or_before_each_target(tmp_path, rate, fps, timescale):
    """A 23.976 fps frame k lies k * 0.04 ms after the 24 fps target k: the frame on screen there is
    k - 1 (an ffmpeg-written mp4, 1 s). Controls: PAL, with no near coincidence; a 10 fps file whose
    time base is one frame period (its times are exact: no half-period leeway)."""
    source_fps = float(Fraction(rate))
    frames = _source_frames(math.ceil(source_fps) + 1)
    raw_input = ["-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{SIDE}x{SIDE}", "-r", rate, "-i", "-"]
    command = ["ffmpeg", "-loglevel", "error", "-y", *raw_input, "-c:v", "libx264", "-crf", "4", "-pix_fmt", "yuv420p"]
    command += ["-video_track_timescale", timescale]
    subprocess.run([*command, str(tmp_path / "clip.mp4")], input=frames.tobytes(), check=True)
    first_second = MediaConfig(fps=fps, clip_seconds=1.0, clip_start="first")
    sample = decode_sample(_raw("video.mp4", (tmp_path / "clip.mp4").read_bytes()), media_config=first_second)
    shown = np.floor(np.arange(fps) / fps * source_fps + 1e-9).astype(int)
    assert len(sample.video) == fps
    for frame, index in zip(sample.video, shown):
        assert _psnr(frame, frames[index]) >= 35
        assert _psnr(frame, frames[index + 1]) < 35  # control: not the frame that follows a moment later


def test_a_seeked_window_equals_that_window_of_a_full_decode():
    frames = _source_frames(60, fps=30)
    data = encode_mp4(frames, 30, crf=10, keyframe_interval=8)
    whole = decode_sample(_raw("video.mp4", data)).video
    config = MediaConfig(clip_seconds=0.5, clip_start="random")
    clip = decode_sample(_raw("video.mp4", data), media_config=config, draw=0.6)
    start = clip.timing["clip_start_s"]
    first = math.floor(start * 30 + 1e-9)  # the frame on screen at the window's start
    assert first % 8 != 0 and len(clip.video) == 15  # the window starts between keyframes
    np.testing.assert_array_equal(clip.video, whole[first : first + 15])
    assert len(whole) == 60 and _psnr(whole[first], frames[first]) >= 35


def test_a_window_in_an_open_gops_leading_frames_equals_that_window_of_a_full_decode(tmp_path):
    """Open GOPs with B-frames (keyframes every 12, shown 4 frames after they are decoded): a window
    from frame 23 seeked by decoding time to the keyframe of frame 24, whose leading frames the
    decoder drops, and frame 24 stood in for frame 23. Seeking starts further back until the
    keyframe decoded from is shown at or before the window."""
    frames = _source_frames(48, fps=24)
    raw_input = ["-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{SIDE}x{SIDE}", "-r", "24", "-i", "-"]
    gop = ["-c:v", "libx264", "-crf", "4", "-bf", "3", "-x264-params", "open_gop=1:keyint=12:min-keyint=12:scenecut=0"]
    command = ["ffmpeg", "-loglevel", "error", "-y", *raw_input, *gop, "-pix_fmt", "yuv420p"]
    subprocess.run([*command, str(tmp_path / "open.mp4")], input=frames.tobytes(), check=True)
    data = (tmp_path / "open.mp4").read_bytes()
    whole = decode_sample(_raw("video.mp4", data)).video
    config = MediaConfig(clip_seconds=0.5, clip_start="random")
    clip = decode_sample(_raw("video.mp4", data), media_config=config, draw=23.5 / 24 / 1.5)
    assert math.floor(clip.timing["clip_start_s"] * 24) == 23 and len(clip.video) == 12
    np.testing.assert_array_equal(clip.video, whole[23:35])
    assert _psnr(clip.video[0], frames[23]) >= 35


def test_a_click_stays_at_its_frame_after_decode_cut_and_resample():
    fps, rate, click_frame = 24, 44_100, 30
    audio = np.zeros((1, 2 * rate), np.float32)
    click = round(click_frame / fps * rate)
    audio[0, click : click + 20] = 0.9
    data = encode_mp4(_source_frames(48, fps), fps, audio=audio, sample_rate=rate)
    config = MediaConfig(clip_seconds=1.0)
    sample = decode_sample(_raw("video.mp4", data), media_config=config, draw=0.7)
    start = sample.timing["clip_start_s"]
    assert start > 0 and sample.audio_sample_rate == 48_000 and sample.audio.shape == (2, 48_000)
    np.testing.assert_array_equal(sample.audio[0], sample.audio[1])  # mono duplicated
    heard = start + np.argmax(np.abs(sample.audio[0])) / 48_000
    assert abs(heard - click_frame / fps) < 1 / fps
    assert len(sample.video) == fps  # the frames of the same window


def test_rotated_video_is_turned_upright_as_ffmpeg_shows_it(tmp_path):
    frames = np.zeros((4, 32, 64, 3), np.uint8)
    frames[:, :8, :8] = 255  # a white top-left corner
    (tmp_path / "flat.mp4").write_bytes(encode_mp4(frames, 10, crf=4))
    command = ["ffmpeg", "-loglevel", "error", "-y", "-i", str(tmp_path / "flat.mp4"), "-c", "copy"]
    subprocess.run([*command, "-metadata:s:v:0", "rotate=90", str(tmp_path / "turned.mp4")], check=True)
    ours = decode_sample(_raw("video.mp4", (tmp_path / "turned.mp4").read_bytes(), fps=10)).video
    to_rgb = ["-f", "rawvideo", "-pix_fmt", "rgb24", "-"]
    shown = subprocess.run(
        ["ffmpeg", "-loglevel", "error", "-i", str(tmp_path / "turned.mp4"), *to_rgb], check=True, capture_output=True
    ).stdout
    reference = np.frombuffer(shown, np.uint8).reshape(-1, 64, 32, 3)
    assert ours.shape == reference.shape == (4, 64, 32, 3)
    assert _psnr(ours, reference) >= 40 and ours[0, -1, 0, 0] > 200  # the corner is now bottom-left


def _with_display_matrix(data: bytes, matrix: tuple[int, ...]) -> bytes:
    """The mp4 with its video track's header matrix (tkhd, version 0) replaced: the display matrix
    FFmpeg reads (a, b, u, c, d, v, x, y, w; 16.16 fixed point, w 2.30)."""
    at = data.index(b"tkhd") + 4 + 4 + 5 * 4 + 8 + 8  # version/flags, times, track id, duration, layer..volume
    return data[:at] + struct.pack(">9i", *matrix) + data[at + 36 :]


ONE, W = 1 << 16, 1 << 30


@pytest.mark.parametrize(
    "matrix",
    [
        (-ONE, 0, 0, 0, ONE, 0, 0, 0, W),  # mirrored left to right
        (ONE, 0, 0, 0, -ONE, 0, 0, 0, W),  # mirrored top to bottom
        (0, ONE, 0, ONE, 0, 0, 0, 0, W),  # a quarter turn and a mirror (a transpose)
        (0, -ONE, 0, -ONE, 0, 0, 0, 0, W),  # the other turn and mirror
        (0, -ONE, 0, ONE, 0, 0, 0, 0, W),  # a plain quarter turn: the control
    ],
    ids=["hflip", "vflip", "transpose", "antitranspose", "turn"],
)
def test_a_mirroring_display_matrix_is_applied_as_ffmpeg_shows_it(tmp_path, matrix):
    frames = np.zeros((2, 32, 64, 3), np.uint8)
    frames[:, :8, :8] = 255  # a white top-left corner
    frames[:, :8, -8:, 0] = 255  # a red top-right corner: every mirror and turn moves them apart
    path = tmp_path / "shown.mp4"
    path.write_bytes(_with_display_matrix(encode_mp4(frames, 10, crf=4), matrix))
    ours = decode_sample(_raw("video.mp4", path.read_bytes())).video
    to_rgb = ["-f", "rawvideo", "-pix_fmt", "rgb24", "-"]
    shown = subprocess.run(["ffmpeg", "-loglevel", "error", "-i", str(path), *to_rgb], check=True, capture_output=True)
    reference = np.frombuffer(shown.stdout, np.uint8).reshape(ours.shape)
    assert _psnr(ours, reference) >= 40
    assert _psnr(ours, np.ascontiguousarray(reference[:, ::-1, ::-1])) < 20  # control: not turned half way


def _ffmpeg_rgb(path) -> np.ndarray:
    """Every frame of a video file as the ffmpeg command decodes it: flat rgb24 bytes."""
    shown = subprocess.run(
        ["ffmpeg", "-loglevel", "error", "-i", str(path), "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
        check=True,
        capture_output=True,
    )
    return np.frombuffer(shown.stdout, np.uint8)


@pytest.mark.parametrize("pix_fmt", ["yuv420p10le", "yuv422p10le"])
def test_ten_bit_colour_at_sharp_chroma_edges_is_the_ffmpeg_commands(tmp_path, pix_fmt):
    """Blocks of unrelated colours (chroma edges everywhere), 10-bit 4:2:0 and 4:2:2 (PyAV's bare
    swscale context was up to ~85 levels off the command there)."""
    blocks = np.random.default_rng(1).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    frames = np.repeat(np.kron(blocks, np.ones((8, 8, 1), np.uint8))[None], 2, axis=0)
    raw_input = ["-f", "rawvideo", "-pix_fmt", "rgb24", "-s", "48x48", "-r", "10", "-i", "-"]
    command = ["ffmpeg", "-loglevel", "error", "-y", *raw_input, "-c:v", "libx264", "-crf", "0", "-pix_fmt", pix_fmt]
    subprocess.run([*command, str(tmp_path / "blocks.mp4")], input=frames.tobytes(), check=True)
    ours = decode_sample(_raw("video.mp4", (tmp_path / "blocks.mp4").read_bytes())).video
    np.testing.assert_array_equal(ours, _ffmpeg_rgb(tmp_path / "blocks.mp4").reshape(ours.shape))


def test_a_stream_whose_resolution_changes_keeps_its_first_size_as_ffmpeg_does(tmp_path):
    """MJPEG frames of 64x48, then 96x64, in one Matroska stream: the ffmpeg command scales the
    later frames to the first size; so does the loader (a clip of frames of two sizes was refused)."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="matroska") as container:
        stream = container.add_stream("mjpeg", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuvj420p"
        stream.codec_context.time_base = Fraction(1, 10)
        larger = av.CodecContext.create("mjpeg", "w")
        larger.width, larger.height, larger.pix_fmt, larger.time_base = 96, 64, "yuvj420p", Fraction(1, 10)
        for index in range(6):
            encoder, (height, width) = (stream.codec_context, (48, 64)) if index < 3 else (larger, (64, 96))
            y, x = np.mgrid[0:height, 0:width]
            picture = np.stack([x * 255 // width, y * 255 // height, np.full_like(x, 40 * index)], -1)
            frame = av.VideoFrame.from_ndarray(picture.astype(np.uint8), format="rgb24").reformat(format="yuvj420p")
            frame.pts, frame.time_base = index, Fraction(1, 10)
            for packet in encoder.encode(frame):
                packet.stream, packet.pts, packet.dts, packet.time_base = stream, index, index, Fraction(1, 10)
                container.mux(packet)
    (tmp_path / "grows.mkv").write_bytes(buffer.getvalue())
    ours = decode_sample(_raw("video.mkv", buffer.getvalue())).video
    assert ours.shape == (6, 48, 64, 3)
    np.testing.assert_array_equal(ours, _ffmpeg_rgb(tmp_path / "grows.mkv").reshape(ours.shape))


def test_anamorphic_video_is_shown_at_its_display_size(tmp_path):
    """Pixels 3:2 wide (a sample aspect ratio, as DVD and HDV video store them): a player shows the
    32x32 storage as 48x32; the loader gives what the ffmpeg command gives scaled by the ratio."""
    raw_input = ["-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{SIDE}x{SIDE}", "-r", "10", "-i", "-"]
    command = ["ffmpeg", "-loglevel", "error", "-y", *raw_input, "-vf", "setsar=3/2", "-c:v", "libx264", "-crf", "4"]
    subprocess.run([*command, str(tmp_path / "wide.mp4")], input=_source_frames(3).tobytes(), check=True)
    ours = decode_sample(_raw("video.mp4", (tmp_path / "wide.mp4").read_bytes())).video
    shown = ["ffmpeg", "-loglevel", "error", "-i", str(tmp_path / "wide.mp4"), "-vf", "scale=iw*sar:ih:flags=bicubic"]
    reference = subprocess.run([*shown, "-f", "rawvideo", "-pix_fmt", "rgb24", "-"], check=True, capture_output=True)
    assert ours.shape == (3, SIDE, SIDE * 3 // 2, 3)
    np.testing.assert_array_equal(ours, np.frombuffer(reference.stdout, np.uint8).reshape(ours.shape))


def test_an_edit_list_starting_between_frames_keeps_its_last_frame_to_the_declared_end(tmp_path):
    """A stream copied from 0.3 s (an edit list into a 24 fps track): FFmpeg drops the partly shown
    frame, so the stream declares 1.7 s while its 40 frames last 1.667 s. It is no cut file: the
    frames are the ffmpeg command's, the last one held to the end."""
    frames = _source_frames(48, fps=24)
    (tmp_path / "whole.mp4").write_bytes(encode_mp4(frames, 24, crf=4, keyframe_interval=12))
    command = ["ffmpeg", "-loglevel", "error", "-ss", "0.3", "-i", str(tmp_path / "whole.mp4"), "-c", "copy"]
    subprocess.run([*command, str(tmp_path / "cut.mp4")], check=True)
    ours = decode_sample(_raw("video.mp4", (tmp_path / "cut.mp4").read_bytes())).video
    reference = _ffmpeg_rgb(tmp_path / "cut.mp4").reshape(-1, SIDE, SIDE, 3)
    assert len(reference) == 40 and len(ours) == 41  # ceil(1.7 s x 24 fps) targets
    np.testing.assert_array_equal(ours[:40], reference)
    np.testing.assert_array_equal(ours[40], reference[39])


def test_a_clip_after_the_end_of_a_video_files_sound_is_a_mismatch_not_a_silent_clip():
    """2 s of frames, 1.5 s of sound: the clip of the last half second had no sound and was used as
    a silent video; the lengths disagree, whichever clip is cut."""
    data = encode_mp4(_source_frames(48, fps=24), 24, audio=np.zeros((1, 36_000), np.float32), sample_rate=24_000)
    last = MediaConfig(clip_seconds=0.5, clip_start="grid")
    with pytest.raises(SampleError, match="duration_mismatch: video.mp4's audio lasts 1.500 s, video.mp4 2.000 s"):
        decode_sample(_raw("video.mp4", data), media_config=last, draw=0.99)


@pytest.mark.parametrize("suffix, codecs", [("webm", ["libvpx-vp9", "libopus"]), ("mkv", ["libx264", "pcm_s16le"])])
def test_a_matroska_video_whose_sound_outlasts_its_frames_is_measured_stream_by_stream(tmp_path, suffix, codecs):
    """Matroska/WebM declare one duration, the file's: 1 s of frames with 1.06 s of sound declared
    1.06 s for the picture too, and the frames' end 60 ms early made a sound file a cut one
    (corrupt_media). Each stream's end is read from its packets: 25 frames and 1 s of sound, and
    sound 0.5 s longer is the mismatch it is."""
    frames = _source_frames(25)
    raw_input = ["-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{SIDE}x{SIDE}", "-r", "25", "-i", "-"]
    for sound_s, name in ((1.06, "near"), (1.5, "far")):
        command = ["ffmpeg", "-loglevel", "error", "-y", *raw_input, "-f", "lavfi", "-i", f"sine=d={sound_s}"]
        command += ["-c:v", codecs[0], "-c:a", codecs[1], "-pix_fmt", "yuv444p", str(tmp_path / f"{name}.{suffix}")]
        subprocess.run(command, input=frames.tobytes(), check=True)
    sample = decode_sample(_raw(f"video.{suffix}", (tmp_path / f"near.{suffix}").read_bytes()))
    assert len(sample.video) == 25 and sample.audio.shape == (2, 48_000)
    assert min(_psnr(a, b) for a, b in zip(sample.video, frames)) >= 35
    with pytest.raises(
        SampleError, match=rf"duration_mismatch: video.{suffix}'s audio lasts 1.[45]\d\d s, video.{suffix} 1.000 s"
    ):
        decode_sample(_raw(f"video.{suffix}", (tmp_path / f"far.{suffix}").read_bytes()))


def _stamped_video(frames: np.ndarray, stamps_ms: list[int], nominal: int, format="mp4", codec="libx264") -> bytes:
    """``frames`` stamped at ``stamps_ms`` (a variable frame rate) in a container declaring ``nominal`` fps."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=format) as container:
        stream = container.add_stream(codec, rate=nominal)
        stream.width = stream.height = SIDE
        stream.pix_fmt, stream.time_base, stream.options = "yuv420p", Fraction(1, 1000), {"crf": "4"}
        stream.codec_context.time_base = Fraction(1, 1000)  # the encoder keeps the frames' own stamps
        for stamp, picture in zip(stamps_ms, frames):
            frame = av.VideoFrame.from_ndarray(picture, format="rgb24")
            frame.pts, frame.time_base = stamp, Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return buffer.getvalue()


def test_variable_frame_rate_video_is_sampled_by_its_timestamps():
    stamps_ms = [0, 100, 150, 400, 450, 900]  # the frame shown at t is the last stamped at or before t
    frames = _source_frames(len(stamps_ms))
    data = _stamped_video(frames, stamps_ms, nominal=10)
    sample = decode_sample(_raw("video.mp4", data), media_config=MediaConfig(fps=10))
    shown = [np.searchsorted(stamps_ms, t, side="right") - 1 for t in range(0, len(sample.video) * 100, 100)]
    assert len(sample.video) >= 7 and shown[:7] == [0, 1, 2, 2, 3, 4, 4]
    for frame, index in zip(sample.video, shown):
        assert _psnr(frame, frames[index]) >= 35


@pytest.mark.parametrize("format, codec", [("mp4", "libx264"), ("matroska", "libx264"), ("webm", "libvpx-vp9")])
def test_variable_frame_rate_video_at_its_own_rate_is_its_average_in_every_container(format, codec):
    """1 s at 30 fps then 2 s at 10 fps: 50 frames, nominally 30 fps. At the file's own rate every
    container gives its frames' average (50 frames over its duration), one frame per stored frame;
    a Matroska/WebM stream's FFmpeg average is its nominal rate, and it was sampled at 30 fps: 88
    targets, most of them repeats."""
    stamps_ms = [round(i * 1000 / 30) for i in range(30)] + [1000 + 100 * i for i in range(20)]
    data = _stamped_video(_source_frames(len(stamps_ms)), stamps_ms, nominal=30, format=format, codec=codec)
    suffix = "mkv" if format == "matroska" else format
    sample = decode_sample(_raw(f"video.{suffix}", data))
    assert len(sample.video) == len(stamps_ms) and 16 < sample.fps < 18


@pytest.mark.parametrize("count", [90, 91])
def test_an_ntsc_webm_gives_its_frames_though_its_duration_is_rounded_past_the_last(tmp_path, count):
    """90 frames at 24000/1001 fps last 3.75375 s; WebM stores milliseconds, so the file lasts
    3.754 s and 91 frames 3.796 s (3.79546 s). The 91st (92nd) target, 0.25 (0.54) ms before that
    rounded end, was after the last frame's end: a whole file skipped as truncated. Each target
    within the end's rounding (two half milliseconds) is no target, where the clip ends with the file."""
    frames = _source_frames(count)
    raw_input = ["-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{SIDE}x{SIDE}", "-r", "24000/1001", "-i", "-"]
    codec = ["-c:v", "libvpx-vp9", "-crf", "10", "-b:v", "0", "-pix_fmt", "yuv444p"]
    path = tmp_path / "ntsc.webm"
    subprocess.run(
        ["ffmpeg", "-loglevel", "error", "-y", *raw_input, *codec, str(path)], input=frames.tobytes(), check=True
    )
    for fps in (0, 24000 / 1001):
        sample = decode_sample(_raw("video.webm", path.read_bytes()), media_config=MediaConfig(fps=fps))
        assert len(sample.video) == count
        assert min(_psnr(a, b) for a, b in zip(sample.video, frames)) >= 35
    # A clip inside the file ends at no rounded timestamp: 1 s at 1000 fps is 1000 frames, not 998.
    first_second = MediaConfig(fps=1000, clip_seconds=1.0, clip_start="first")
    assert len(decode_sample(_raw("video.webm", path.read_bytes()), media_config=first_second).video) == 1000


@pytest.mark.parametrize("rate, remux", [("30", True), ("60", True), ("60000/1001", False)])
def test_a_video_of_millisecond_timestamps_gives_each_frame_once_at_its_rate(tmp_path, rate, remux):
    """A WebM stores milliseconds; remuxed into an MP4 (ffmpeg -c copy) they sit in a 1/16000 base,
    30 fps frames 33 or 34 ms apart, and half a tick of leeway showed every third frame one target
    late; its rounded duration made 37 frames at 60 fps average 60.065 fps (a frame early by the
    13th). The leeway is half the unit the timestamps are multiples of, the rate the nominal one;
    a 59.94 fps WebM's frame 30, at 501 ms for 500.5, was missed by 30 ns of a rate's rounding."""
    frames = _source_frames(37)
    raw_input = ["-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{SIDE}x{SIDE}", "-r", rate, "-i", "-"]
    codec = ["-c:v", "libvpx-vp9", "-crf", "10", "-b:v", "0", "-pix_fmt", "yuv444p"]
    webm = tmp_path / "clip.webm"
    subprocess.run(
        ["ffmpeg", "-loglevel", "error", "-y", *raw_input, *codec, str(webm)], input=frames.tobytes(), check=True
    )
    path = tmp_path / ("clip.mp4" if remux else "clip.webm")
    if remux:
        subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-i", str(webm), "-c", "copy", str(path)], check=True)
    for fps in (0, float(Fraction(rate))):
        sample = decode_sample(_raw(f"video.{path.suffix[1:]}", path.read_bytes()), media_config=MediaConfig(fps=fps))
        assert sample.fps == pytest.approx(float(Fraction(rate)), rel=1e-6) and len(sample.video) == len(frames)
        for index, frame in enumerate(sample.video):
            assert _psnr(frame, frames[index]) >= 35, index
            assert index == len(frames) - 1 or _psnr(frame, frames[index + 1]) < 35  # control: told apart


def test_a_files_rate_is_its_nominal_one_where_its_average_is_a_rounding(tmp_path):
    """60000/1001 fps in an MP4 of a 90 kHz time base (as MPEG-TS remuxes keep it): each frame lasts
    1501.5 ticks, so 37 frames average 832500/13889 fps, and a conditioning clip's rate written back
    was 57482/959. The file's rate is the nominal 60000/1001, as generation writes it."""
    frames = _source_frames(37)
    raw_input = ["-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{SIDE}x{SIDE}", "-r", "60000/1001", "-i", "-"]
    path = tmp_path / "clip.mp4"
    command = ["ffmpeg", "-loglevel", "error", "-y", *raw_input, "-c:v", "libx264", "-crf", "4", "-pix_fmt", "yuv444p"]
    subprocess.run([*command, "-video_track_timescale", "90000", str(path)], input=frames.tobytes(), check=True)
    with av.open(str(path)) as container:
        assert container.streams.video[0].average_rate != Fraction(60000, 1001)  # the rounding
    decoded, fps = media_files.decode_video_file(path.read_bytes(), "clip.mp4")
    assert exact_rate(fps) == Fraction(60000, 1001) and len(decoded) == len(frames)


@pytest.mark.parametrize("suffix", ["webm", "mkv", "mov", "m4v", "avi"])
def test_webm_mkv_mov_m4v_and_avi_videos_decode(tmp_path, suffix):
    frames = _source_frames(12)
    codec = {
        "webm": ["-c:v", "libvpx-vp9", "-crf", "10", "-b:v", "0"],
        "mkv": ["-c:v", "ffv1"],
        "avi": ["-c:v", "ffv1"],
    }
    codec = codec.get(suffix, ["-c:v", "libx264", "-crf", "4"])
    raw_input = ["-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{SIDE}x{SIDE}", "-r", "12", "-i", "-"]
    path = tmp_path / f"clip.{suffix}"
    subprocess.run(
        ["ffmpeg", "-loglevel", "error", "-y", *raw_input, *codec, "-pix_fmt", "yuv444p", str(path)],
        input=frames.tobytes(),
        check=True,
    )
    sample = decode_sample(_raw(f"video.{suffix}", path.read_bytes()))
    assert sample.fps == 12 and len(sample.video) == 12
    assert min(_psnr(a, b) for a, b in zip(sample.video, frames)) >= 35


@pytest.mark.parametrize("suffix", ["flac", "mp3", "m4a", "opus", "ogg", "wav"])
def test_audio_files_decode_to_48k_stereo(tmp_path, suffix):
    rate = 44_100
    tone = (0.5 * np.sin(2 * math.pi * 440 * np.arange(rate) / rate)).astype(np.float32)
    path = tmp_path / f"tone.{suffix}"
    codec = {"m4a": ["-c:a", "aac"], "opus": ["-c:a", "libopus", "-ar", "48000"], "ogg": ["-c:a", "libvorbis"]}
    codec = codec.get(suffix, [])
    raw_input = ["-f", "f32le", "-ar", str(rate), "-ac", "1", "-i", "-"]
    subprocess.run(
        ["ffmpeg", "-loglevel", "error", "-y", *raw_input, *codec, str(path)], input=tone.tobytes(), check=True
    )
    sample = decode_sample(_raw(f"audio.{suffix}", path.read_bytes()))
    seconds = sample.audio.shape[1] / sample.audio_sample_rate
    assert sample.audio.shape[0] in (1, 2) and abs(seconds - 1.0) < 0.06
    spectrum = np.abs(np.fft.rfft(sample.audio[0]))
    assert abs(np.argmax(spectrum) / seconds - 440) < 3
    if suffix != "wav":  # WAV stays at its own rate (the encoder resamples it), compressed files are 48 kHz stereo
        assert sample.audio_sample_rate == 48_000 and sample.audio.shape[0] == 2


def _ogg_page_ends(data: bytes) -> list[int]:
    """Where each Ogg page ends (27-byte header, segment table, segments): an independent walk."""
    ends, offset = [], 0
    while offset < len(data):
        segments = data[offset + 26]
        offset += 27 + segments + sum(data[offset + 27 : offset + 27 + segments])
        ends.append(offset)
    return ends


@pytest.mark.parametrize(("suffix", "codec"), [("opus", "libopus"), ("ogg", "libvorbis"), ("aac", "aac")])
def test_a_cut_ogg_or_adts_file_is_corrupt_not_a_shorter_clip(tmp_path, suffix, codec):
    """FFmpeg measures Ogg (Opus, Vorbis) by its last page and raw AAC (ADTS) by its bytes, so a file
    cut at 90 % was a shorter sound (an Opus of 2 s gave 1 s); the cut is found from the last page's
    or frame's declared length, and an Ogg file cut between pages by its stream's missing last page."""
    tone = ["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000:duration=2"]
    path = tmp_path / f"tone.{suffix}"
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", *tone, "-c:a", codec, str(path)], check=True)
    data = path.read_bytes()
    assert decode_sample(_raw(f"audio.{suffix}", data)).audio.shape[1] >= 96_000
    cuts = [len(data) * 9 // 10] + ([_ogg_page_ends(data)[-2]] if suffix != "aac" else [])
    for cut in cuts:
        with pytest.raises(SampleError, match=f"corrupt_media: audio.{suffix}: truncated file"):
            decode_sample(_raw(f"audio.{suffix}", data[:cut]))


# MPEG audio of each version and layer FFmpeg writes: (rate, encoder options).
_MPEG_AUDIO = {
    "mpeg1_layer3_cbr": (48_000, ["-c:a", "libmp3lame", "-write_xing", "0"]),
    "mpeg1_layer3_vbr_xing": (48_000, ["-c:a", "libmp3lame", "-q:a", "2"]),
    "mpeg1_layer2": (44_100, ["-c:a", "mp2", "-f", "mp2"]),  # 44.1 kHz: padded frames
    "mpeg2_layer2": (24_000, ["-c:a", "mp2", "-f", "mp2"]),
    "mpeg2_layer3": (24_000, ["-c:a", "libmp3lame", "-write_xing", "0"]),
    "mpeg25_layer3": (11_025, ["-c:a", "libmp3lame", "-write_xing", "0"]),
}


def _layer1_silence(frames: int) -> bytes:
    """MPEG-1 layer I, 48 kHz, 384 kbit/s, mono (FFmpeg has no layer I encoder): each frame a header
    and 380 zero bytes (no subband allocated: 384 samples of silence), 4 * 12 * 384000 / 48000 bytes."""
    return (bytes([0xFF, 0xFF, 0xC4, 0xC0]) + bytes(380)) * frames


@pytest.mark.parametrize("variant", [*_MPEG_AUDIO, "mpeg1_layer1"])
def test_a_cut_mp3_file_is_corrupt_not_a_shorter_clip(tmp_path, variant):
    """FFmpeg estimates an MP3 without a Xing/Info header from its bytes, so a file cut inside a
    frame was a shorter sound; the cut is found from the last frame's length in its header (layer
    I, II and III of MPEG-1, 2 and 2.5). Frames are where FFmpeg's demuxer places its packets. With
    a Xing header FFmpeg declares the duration, so a cut between frames is found too."""
    if variant == "mpeg1_layer1":
        data = _layer1_silence(250)
    else:
        rate, options = _MPEG_AUDIO[variant]
        tone = ["-f", "lavfi", "-i", f"sine=frequency=440:sample_rate={rate}:duration=2"]
        path = tmp_path / "tone.mp3"
        subprocess.run(["ffmpeg", "-loglevel", "error", "-y", *tone, *options, str(path)], check=True)
        data = path.read_bytes()
    assert decode_sample(_raw("audio.mp3", data)).audio.shape[1] >= 0.99 * 2 * 48_000  # whole: not refused
    with av.open(io.BytesIO(data)) as container:
        frames = [(packet.pos, packet.size) for packet in container.demux(audio=0) if packet.size]
    assert frames[-1][0] + frames[-1][1] == len(data)
    middle, last = frames[len(frames) * 9 // 10], frames[-1]
    cuts = [middle[0] + middle[1] // 2, last[0] + 2]  # inside a frame, inside the last frame's header
    cuts += [middle[0]] if variant.endswith("xing") else []  # between frames
    for cut in cuts:
        with pytest.raises(SampleError, match="corrupt_media: audio.mp3: .*truncated"):
            decode_sample(_raw("audio.mp3", data[:cut]))


def test_the_mp3_walk_skips_an_id3v2_tag_and_its_footer():
    """An ID3v2.4 tag may end in a 10-byte footer (flag bit 4): the frames start after it, so a cut
    one is found (the walk stopped at the footer and called the file whole)."""
    size = bytes([0, 0, 0, 5])  # syncsafe 5: the tag's body
    tag = b"ID3\x04\x00\x10" + size + bytes(5) + b"3DI\x04\x00\x10" + size
    data = tag + _layer1_silence(250)
    assert decode_sample(_raw("audio.mp3", data)).audio.shape[1] == 2 * 48_000
    with pytest.raises(SampleError, match="corrupt_media: audio.mp3: truncated file: it declares 100 bytes"):
        decode_sample(_raw("audio.mp3", data[:-100]))


def test_free_format_mp3_frames_are_left_to_ffmpeg():
    """A free-format frame (bitrate index 0) has no length in its header: the walk stops there and
    never calls such a file cut (FFmpeg judges it), whole or not."""
    free = bytearray(_layer1_silence(10))
    free[2::384] = bytes([0x04]) * 10  # bitrate index 0, 48 kHz
    assert audio_frames.mpeg_audio_chain(bytes(free), 0).missing == 0
    assert audio_frames.mpeg_audio_chain(bytes(free[:-100]), 0).missing == 0
    assert audio_frames.mpeg_audio_chain(_layer1_silence(10)[:-100], 0).missing == 100  # the control


def _top_boxes(data: bytes) -> list[tuple[int, bytes, int]]:
    """(offset, type, size) of each top-level MP4 box: an independent walk (32-bit sizes)."""
    boxes, offset = [], 0
    while offset < len(data):
        size = int.from_bytes(data[offset : offset + 4], "big")
        boxes.append((offset, data[offset + 4 : offset + 8], size))
        offset += size
    return boxes


def _fragmented_mp4(tmp_path, flags: str) -> bytes:
    """4 s at 10 fps in fragments of 1 s (a keyframe each second), written by ffmpeg with ``flags``."""
    source = ["-f", "lavfi", "-i", "testsrc=size=64x64:rate=10:duration=4", "-c:v", "libx264", "-g", "10"]
    path = tmp_path / "fragmented.mp4"
    command = ["ffmpeg", "-loglevel", "error", "-y", *source, "-pix_fmt", "yuv420p", "-movflags", flags, str(path)]
    subprocess.run(command, check=True)
    return path.read_bytes()


def _with_mehd(data: bytes, milliseconds: int) -> bytes:
    """``data`` with a version-0 mehd box (fragment_duration in the mvhd's timescale, 1000 as ffmpeg
    writes it) at the start of moov/mvex: no writer at hand writes one. Fragments placed relative to
    their moof (default_base_moof) do not move."""
    moov = data.index(b"moov") - 4
    mvex = data.index(b"mvex", moov) - 4
    assert int.from_bytes(data[data.index(b"mvhd") + 16 : data.index(b"mvhd") + 20], "big") == 1000
    mehd = (16).to_bytes(4, "big") + b"mehd" + bytes(4) + milliseconds.to_bytes(4, "big")
    out = bytearray(data[: mvex + 8] + mehd + data[mvex + 8 :])
    for at in (moov, mvex):
        out[at : at + 4] = (int.from_bytes(out[at : at + 4], "big") + len(mehd)).to_bytes(4, "big")
    return bytes(out)


def test_a_fragmented_mp4_cut_between_fragments_is_corrupt_where_it_declares_its_length(tmp_path):
    """A fragmented MP4 cut exactly between two fragments holds only whole boxes, and FFmpeg plays
    the fragments there (a clip of the first second looked fine, the whole sample was shorter):
    a global sidx's references (DASH) past the end, or fragments ending before the duration in
    mvex/mehd, are a cut file; whole files decode."""
    first_second = MediaConfig(clip_seconds=1.0, clip_start="first")
    dash = _fragmented_mp4(tmp_path, "frag_keyframe+empty_moov+default_base_moof+global_sidx")
    assert len(decode_sample(_raw("video.mp4", dash)).video) == 40
    boxes = _top_boxes(dash)
    last_mdat_end = max(offset + size for offset, kind, size in boxes if kind == b"mdat")
    for cut in [offset for offset, kind, _ in boxes if kind == b"moof"][1:]:
        with pytest.raises(SampleError, match=f"truncated file: it declares {last_mdat_end - cut} bytes more"):
            decode_sample(_raw("video.mp4", dash[:cut]), media_config=first_second)
    with_mehd = _with_mehd(_fragmented_mp4(tmp_path, "frag_keyframe+empty_moov+default_base_moof"), 4000)
    assert len(decode_sample(_raw("video.mp4", with_mehd)).video) == 40
    last_moof = [offset for offset, kind, _ in _top_boxes(with_mehd) if kind == b"moof"][-1]
    with pytest.raises(SampleError, match="its fragments end at 3.000 s but its mehd box declares 4.000 s"):
        decode_sample(_raw("video.mp4", with_mehd[:last_moof]), media_config=first_second)


@pytest.mark.parametrize("suffix", ["flac", "mp3"])
def test_a_compressed_file_saved_as_wav_decodes_by_its_content(tmp_path, suffix):
    """FFmpeg reads a file by its bytes (a WebM saved as .mp4 plays): a FLAC or MP3 saved as .wav is
    that file's sound (it was corrupt_media: scipy reads only RIFF); bytes of no format stay corrupt."""
    tone = ["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000:duration=0.5"]
    path = tmp_path / f"tone.{suffix}"
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", *tone, str(path)], check=True)
    named = decode_sample(_raw(f"audio.{suffix}", path.read_bytes()))
    misnamed = decode_sample(_raw("audio.wav", path.read_bytes()))
    np.testing.assert_array_equal(misnamed.audio, named.audio)
    assert misnamed.audio_sample_rate == 48_000
    with pytest.raises(SampleError, match="corrupt_media: audio.wav: not a readable media file"):
        decode_sample(_raw("audio.wav", b"\x17" * 3000))


@pytest.mark.parametrize("codec", ["pcm_mulaw", "adpcm_ms", "rf64"])
def test_a_wav_of_another_encoding_is_decoded_by_ffmpeg(tmp_path, codec):
    """mu-law (telephony corpora), ADPCM and RF64 (64-bit sizes, long recordings) WAVs, which scipy
    cannot read (RF64: an UnboundLocalError inside it), decode as compressed files do, all of their
    sound (an ADPCM WAV stamps every other block: unstamped blocks were dropped)."""
    rate = 16_000
    tone = (0.5 * np.sin(2 * math.pi * 440 * np.arange(rate) / rate)).astype(np.float32)
    raw_input = ["-f", "f32le", "-ar", str(rate), "-ac", "1", "-i", "-"]
    path = tmp_path / "tone.wav"
    encoding = ["-c:a", "pcm_s16le", "-rf64", "always"] if codec == "rf64" else ["-c:a", codec]
    command = ["ffmpeg", "-loglevel", "error", *raw_input, *encoding, str(path)]
    subprocess.run(command, input=tone.tobytes(), check=True)
    sample = decode_sample(_raw("audio.wav", path.read_bytes()))
    assert sample.audio_sample_rate == 48_000 and sample.audio.shape[0] == 2
    assert abs(sample.audio.shape[1] / 48_000 - 1.0) < 0.03  # ADPCM pads its last block
    expected = np.sin(2 * math.pi * 440 * np.arange(48_000) / 48_000)
    assert np.corrcoef(sample.audio[0, 2000:46_000], expected[2000:46_000])[0, 1] > 0.99


def test_a_cut_rf64_wav_or_one_declaring_four_gib_is_corrupt_not_a_shorter_sound(tmp_path):
    """RF64 states its data size in its ds64 chunk (64 bits): FFmpeg read one declaring 2**32 bytes
    of sound with 32 KB there as the 1 s that is there; one cut in half is found by its header too."""
    command = ["ffmpeg", "-loglevel", "error", "-f", "lavfi", "-i", "sine=d=1:sample_rate=16000", "-rf64", "always"]
    subprocess.run([*command, str(tmp_path / "tone.wav")], check=True)
    whole = (tmp_path / "tone.wav").read_bytes()
    assert decode_sample(_raw("audio.wav", whole)).audio.shape == (2, 48_000)  # control: intact
    size_at = whole.index(b"ds64") + 16  # the data size, after the chunk header and the RIFF size
    four_gib = whole[:size_at] + struct.pack("<Q", 2**32) + whole[size_at + 8 :]
    for damaged, missing in ((four_gib, 2**32 - 32_000), (whole[: len(whole) // 2], len(whole) - len(whole) // 2)):
        with pytest.raises(SampleError, match=f"corrupt_media: audio.wav: truncated file: it declares {missing} bytes"):
            decode_sample(_raw("audio.wav", damaged))


def test_a_flac_of_one_sample_decodes(tmp_path):
    """FFmpeg cannot seek in it (no seek point): read from its start, as a fresh file is."""
    command = ["ffmpeg", "-loglevel", "error", "-f", "f32le", "-ar", "48000", "-ac", "1", "-i", "-"]
    subprocess.run([*command, str(tmp_path / "one.flac")], input=np.float32(0.25).tobytes(), check=True)
    sample = decode_sample(_raw("audio.flac", (tmp_path / "one.flac").read_bytes()))
    assert sample.audio.shape == (2, 1) and abs(float(sample.audio[0, 0]) - 0.25) < 0.05


def test_a_compressed_file_at_a_rate_no_recording_has_is_out_of_range(tmp_path):
    """As a WAV's: a 500 Hz FLAC (or 1 Hz: seconds of resampling to 48 kHz) is refused before decoding."""
    command = ["ffmpeg", "-loglevel", "error", "-f", "f32le", "-ar", "500", "-ac", "1", "-i", "-"]
    subprocess.run([*command, str(tmp_path / "low.flac")], input=np.zeros(500, np.float32).tobytes(), check=True)
    with pytest.raises(SampleError, match=r"out_of_range: audio.flac: its sound is at 500 Hz, outside \[1000, "):
        decode_sample(_raw("audio.flac", (tmp_path / "low.flac").read_bytes()))


def test_a_wav_written_to_a_pipe_is_read_to_its_end():
    """A writer that cannot seek back leaves the data size "unknown" (0xFFFFFFFF); ffmpeg writes one."""
    tone = (0.25 * np.sin(2 * math.pi * 440 * np.arange(4410) / 44_100)).astype(np.float32)
    raw_input = ["-f", "f32le", "-ar", "44100", "-ac", "1", "-i", "-"]
    piped = subprocess.run(
        ["ffmpeg", "-loglevel", "error", *raw_input, "-f", "wav", "-c:a", "pcm_s16le", "-"],
        input=tone.tobytes(),
        capture_output=True,
        check=True,
    ).stdout
    assert piped[piped.index(b"data") + 4 :][:4] == b"\xff\xff\xff\xff"
    sample = decode_sample(_raw("audio.wav", piped))
    assert sample.audio.shape == (1, 4410) and np.abs(sample.audio[0] - tone).max() <= 1 / 32768


def test_a_surround_wav_is_downmixed_to_stereo_as_a_surround_flac_is(tmp_path):
    """6 channels (5.1): the same FFmpeg downmix for the WAV as for compressed files, not a skip."""
    tone = 0.2 * np.sin(2 * math.pi * np.outer(np.arange(1, 7) * 110, np.arange(4800) / 48_000))  # a tone per channel
    pcm = np.round(tone.T * 32767).astype("<i2")
    buffer = io.BytesIO()
    wavfile.write(buffer, 48_000, pcm)
    (tmp_path / "six.wav").write_bytes(buffer.getvalue())
    command = ["ffmpeg", "-loglevel", "error", "-y", "-i", str(tmp_path / "six.wav"), str(tmp_path / "six.flac")]
    subprocess.run(command, check=True)
    wav = decode_sample(_raw("audio.wav", buffer.getvalue()))
    flac = decode_sample(_raw("audio.flac", (tmp_path / "six.flac").read_bytes()))
    assert wav.audio.shape == flac.audio.shape == (2, 4800) and wav.audio_sample_rate == 48_000
    np.testing.assert_allclose(wav.audio, flac.audio, atol=1e-6)
    assert np.abs(wav.audio[0] - wav.audio[1]).max() > 0.05  # left and right hold different channels


@pytest.mark.parametrize("suffix", ["jpg", "webp", "png"])
def test_pictures_decode_and_fit_the_nearest_bucket(suffix):
    picture = _source_frames(1)[0].repeat(3, axis=0).repeat(5, axis=1)[:, :160]  # 96 x 160
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format={"jpg": "JPEG"}.get(suffix, suffix.upper()), quality=95)
    plain = decode_sample(_raw(f"image.{suffix}", buffer.getvalue()))
    assert plain.image.shape == (96, 160, 3) and _psnr(plain.image, picture) >= 35
    config = MediaConfig(resolution_buckets=["32x32", "32x64", "64x32"])
    fitted = decode_sample(_raw(f"image.{suffix}", buffer.getvalue()), media_config=config)
    assert fitted.image.shape == (32, 64, 3)  # 160 / 96 = 1.67 is nearest 2 (log ratio)


# EXIF orientation -> how a viewer turns the stored picture (the TIFF/EXIF specification's table).
VIEWED = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, k=-1),
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: np.rot90(a, k=1),
}


@pytest.mark.parametrize("orientation", sorted(VIEWED))
def test_a_pictures_exif_orientation_is_applied_as_a_viewer_shows_it(orientation):
    stored = np.zeros((32, 48, 3), np.uint8)
    stored[:4, :4], stored[:4, -4:], stored[-4:, :4] = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    picture = Image.fromarray(stored)
    exif = picture.getexif()
    exif[0x0112] = orientation  # the Orientation tag
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", exif=exif)  # lossless: the turned pixels compare exactly
    viewed = decode_sample(_raw("image.png", buffer.getvalue())).image
    np.testing.assert_array_equal(viewed, VIEWED[orientation](stored))


@pytest.mark.parametrize("field", ["image.png", "video.mp4"])
def test_a_picture_in_a_video_field_is_turned_by_its_exif_orientation_too(field):
    """A picture in a video field is shown as a picture field is (FFmpeg left it as stored)."""
    stored = np.zeros((32, 48, 3), np.uint8)
    stored[:4, :4], stored[:4, -4:], stored[-4:, :4] = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    picture = Image.fromarray(stored)
    exif = picture.getexif()
    exif[0x0112] = 6  # turned a quarter clockwise
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", exif=exif)
    sample = decode_sample(_raw(field, buffer.getvalue()))
    viewed = sample.image if field.startswith("image") else sample.video[0]
    np.testing.assert_array_equal(viewed, VIEWED[6](stored))


def _four_colour_jpeg(channels: np.ndarray, transform: int) -> bytes:
    """An Adobe four-colour JPEG whose stored components are ``channels`` (H, W, 4), with the APP14
    transform flag ``transform`` (0: CMYK, 2: YCCK), as Photoshop writes them: Pillow writes the
    Adobe marker with transform 0 and stores 255 - v (Adobe's inverted CMYK), so it is given the
    inverse and the flag is set after."""
    buffer = io.BytesIO()
    Image.fromarray(255 - channels, "CMYK").save(buffer, format="JPEG", quality=95)
    data = bytearray(buffer.getvalue())
    adobe = data.index(b"Adobe")
    assert data[adobe + 11] == 0  # the transform byte of APP14 ("Adobe", version, flags0, flags1)
    data[adobe + 11] = transform
    return bytes(data)


@pytest.mark.parametrize("transform", [0, 2])
@pytest.mark.parametrize("field", ["image.jpg", "video.mp4"])
def test_cmyk_and_ycck_jpegs_show_their_colours(field, transform):
    """A CMYK JPEG, or one stored as YCCK (YCbCr of the inverted C, M, Y, and K), shows the colours
    of its ink: R = (255 - C)(255 - K) / 255, each patch within JPEG's loss. As a video field's
    picture FFmpeg decoded the YCCK one to garbage (a red patch came out (178, 170, 0))."""
    colours = np.array([(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (128, 64, 32)])
    rgb = np.repeat(np.repeat(colours[None].astype(np.uint8), 32, axis=0), 16, axis=1)  # (32, 96, 3)
    black = 255 - rgb.max(axis=2, keepdims=True).astype(np.float64)  # K, then C, M, Y under it
    ink = np.where(black < 255, (255 - rgb - black) * 255 / np.maximum(255 - black, 1), 0)
    cmyk = np.round(np.concatenate([ink, black], axis=2))
    if transform == 2:  # stored: YCbCr (JFIF's matrix) of 255 - (255 - C) = C, ..., and 255 - K
        c, m, y = cmyk[..., 0], cmyk[..., 1], cmyk[..., 2]
        luma = 0.299 * c + 0.587 * m + 0.114 * y
        stored = np.stack([luma, 128 + (y - luma) / 1.772, 128 + (c - luma) / 1.402, 255 - cmyk[..., 3]], axis=2)
    else:  # stored: 255 - each ink (Adobe's inverted CMYK)
        stored = 255 - cmyk
    data = _four_colour_jpeg(np.clip(np.round(stored), 0, 255).astype(np.uint8), transform)
    sample = decode_sample(_raw(field, data))
    shown = sample.image if field.startswith("image") else sample.video[0]
    for index, colour in enumerate(colours):
        patch = shown[4:28, index * 16 + 4 : index * 16 + 12].reshape(-1, 3).astype(int)
        assert np.abs(patch - colour).max() <= 4, (index, colour, patch.mean(axis=0))


def test_a_16_bit_grey_picture_keeps_its_tones():
    """Pillow reads it as mode I;16 and its own RGB conversion clips every value above 255."""
    ramp = np.linspace(0, 65535, 32 * 48).reshape(32, 48).astype(np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(ramp).save(buffer, format="PNG")
    image = decode_sample(_raw("image.png", buffer.getvalue())).image
    np.testing.assert_array_equal(image, np.repeat(np.round(ramp / 257).astype(np.uint8)[..., None], 3, axis=2))


def test_bucket_and_window_rules():
    assert bucket_for(720, 1280, [(64, 64), (64, 112), (112, 64)]) == (64, 112)
    config = MediaConfig(clip_seconds=1.0, clip_start="grid")
    assert [choose_window(3.5, config, d).start_s for d in (0.0, 0.34, 0.67, 0.99)] == [0.0, 1.0, 2.0, 2.0]
    random = MediaConfig(clip_seconds=1.0)
    assert choose_window(3.0, random, 0.5, step_s=0.3).start_s == pytest.approx(0.9)  # on the action grid
    assert choose_window(0.8, random, 0.5).duration_s == 0.8  # shorter than a clip: taken whole
    with pytest.raises(ValueError, match="media.resolution_buckets entry '64-64'"):
        MediaConfig(resolution_buckets=["64-64"]).validate()


@pytest.mark.parametrize("suffix", ["mkv", "webm", "avi"])
def test_a_cut_file_is_corrupt_even_where_the_clip_lies_in_its_intact_part(tmp_path, suffix):
    """FFmpeg decodes what is there: a Matroska/WebM or AVI file cut at 80 % still gives its first
    half second, so the cut is found from the size its segment (its RIFF chunk) declares."""
    raw_input = ["-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{SIDE}x{SIDE}", "-r", "24", "-i", "-"]
    command = ["ffmpeg", "-loglevel", "error", "-y", *raw_input, str(tmp_path / f"clip.{suffix}")]
    subprocess.run(command, input=_source_frames(48).tobytes(), check=True)
    data = (tmp_path / f"clip.{suffix}").read_bytes()
    first_half_second = MediaConfig(clip_seconds=0.5, clip_start="first")
    assert len(decode_sample(_raw(f"video.{suffix}", data), media_config=first_half_second).video) == 12
    with pytest.raises(SampleError, match=f"corrupt_media: video.{suffix}: truncated file"):
        decode_sample(_raw(f"video.{suffix}", data[: len(data) * 4 // 5]), media_config=first_half_second)


@pytest.mark.parametrize(("muxer", "codec"), [("mpegts", "libx264"), ("mpeg", "mpeg2video"), ("flv", "libx264")])
def test_a_video_field_in_a_container_that_does_not_say_its_length_is_unsupported(tmp_path, muxer, codec):
    """MPEG-TS/PS or FLV bytes under a video field's name (video.mp4): FFmpeg reads them to where
    they stop, so a cut one was a shorter clip (TS cut at half: 9 of 20 frames), never a cut file."""
    raw_input = ["-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{SIDE}x{SIDE}", "-r", "10", "-i", "-"]
    path = tmp_path / "clip.bin"
    command = ["ffmpeg", "-loglevel", "error", "-y", *raw_input, "-c:v", codec, "-f", muxer, str(path)]
    subprocess.run(command, input=_source_frames(20).tobytes(), check=True)
    data = path.read_bytes()
    for cut in (data, data[: len(data) // 2]):
        with pytest.raises(SampleError, match="unsupported_container: video.mp4: a .* file; video fields take MP4/MOV"):
            decode_sample(_raw("video.mp4", cut))


@pytest.mark.parametrize("suffix", ["png", "jpg"])
def test_a_picture_in_a_video_field_is_a_one_frame_video_and_a_cut_one_is_corrupt(suffix):
    """A still picture stored as a video field decodes as one frame; cut, it was a whole frame to
    FFmpeg's JPEG decoder (grey below the cut), now Pillow's truncation check refuses it."""
    picture = _source_frames(1)[0]
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="PNG" if suffix == "png" else "JPEG", quality=95)
    data = buffer.getvalue()
    assert len(decode_sample(_raw("video.mp4", data)).video) == 1
    with pytest.raises(SampleError, match="corrupt_media: video.mp4: not a readable image"):
        decode_sample(_raw("video.mp4", data[: len(data) // 2]))


@pytest.mark.parametrize("junk", [b"\n", b"\x00\x00\x00", b"appended by a tool\n" * 4, bytes(range(256))])
def test_junk_after_an_mp4_is_not_a_cut_file(one_second, tmp_path, junk):
    """Bytes after the last box (a tool's trailer, a newline, noise) are no part of the file: FFmpeg
    plays all its frames, and so does the loader. Control: a file whose index comes first (faststart)
    cut inside its sample data is still a cut file."""
    _, data = one_second
    whole = decode_sample(_raw("video.mp4", data)).video
    np.testing.assert_array_equal(decode_sample(_raw("video.mp4", data + junk)).video, whole)
    (tmp_path / "clip.mp4").write_bytes(data)
    command = ["ffmpeg", "-loglevel", "error", "-i", str(tmp_path / "clip.mp4"), "-c", "copy", "-movflags"]
    subprocess.run([*command, "+faststart", str(tmp_path / "fast.mp4")], check=True)
    fast = (tmp_path / "fast.mp4").read_bytes()
    assert fast.index(b"moov") < fast.index(b"mdat")
    with pytest.raises(SampleError, match="corrupt_media: video.mp4: truncated file"):
        decode_sample(_raw("video.mp4", fast[: len(fast) * 4 // 5] + junk))


def test_fitting_a_clip_a_few_frames_at_a_time_gives_the_frames_a_whole_fit_gives(monkeypatch):
    """fit_to_bucket bounds its float copy (clips.FIT_BYTES: a 4K clip at once would not fit in
    memory); the bucket's pixels do not depend on how many frames go through together."""
    frames = np.random.default_rng(0).integers(0, 256, (7, 45, 80, 3), dtype=np.uint8)
    buckets = [(32, 32), (32, 64)]
    whole = fit_to_bucket(frames, buckets)
    monkeypatch.setattr(clips, "FIT_BYTES", 2 * 45 * 80 * 3 * 4)  # two frames at a time
    assert whole.shape == (7, 32, 64, 3) and np.array_equal(fit_to_bucket(frames, buckets), whole)
    assert np.array_equal(fit_to_bucket(frames[3:4], buckets)[0], whole[3])


def test_video_frames_above_the_picture_pixel_limit_are_refused_before_decoding(monkeypatch):
    """A header may claim frames of any size (a decompression bomb): videos obey Pillow's limit too."""
    data = encode_mp4(_source_frames(2), 10)
    assert len(decode_sample(_raw("video.mp4", data)).video) == 2
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", SIDE * SIDE - 1)
    with pytest.raises(SampleError, match=f"corrupt_media: video.mp4: {SIDE}x{SIDE} frames exceed"):
        decode_sample(_raw("video.mp4", data))


def test_a_clip_too_large_to_hold_is_refused_before_decoding(monkeypatch):
    """A 3 KB Matroska file whose last frame is stamped an hour after its first: 90,000 frames at
    25 fps (its own rate, 4 frames an hour, is out of range too). Over clips.MAX_CLIP_BYTES a sample
    is out_of_range, for files, video.npy and sound alike, before anything is decoded; a cut clip of
    it is not (control)."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="matroska") as container:
        stream = container.add_stream("mjpeg", rate=25)
        stream.width, stream.height, stream.pix_fmt = SIDE, SIDE, "yuvj420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        for index, stamp_ms in enumerate([0, 40, 80, 3_600_000]):
            picture = av.VideoFrame.from_ndarray(_source_frames(4)[index], format="rgb24").reformat(format="yuvj420p")
            picture.pts, picture.time_base = index, Fraction(1, 1000)
            for packet in stream.codec_context.encode(picture):
                packet.stream, packet.pts, packet.dts, packet.time_base = stream, stamp_ms, stamp_ms, Fraction(1, 1000)
                container.mux(packet)
    monkeypatch.setattr(clips, "MAX_CLIP_BYTES", 1 << 20)
    too_large = r"out_of_range: video.mkv: the clip is 90001 frames of 32x32 \(0.3 GiB decoded"
    with pytest.raises(SampleError, match=too_large):
        decode_sample(_raw("video.mkv", buffer.getvalue()), media_config=MediaConfig(fps=25))
    one_second = MediaConfig(fps=25, clip_seconds=1.0, clip_start="first")
    assert len(decode_sample(_raw("video.mkv", buffer.getvalue()), media_config=one_second).video) == 25
    frames = encode_npy(_source_frames(2))
    with pytest.raises(SampleError, match="out_of_range: video.npy: the clip is 2000 frames of 32x32"):
        decode_sample(_raw("video.npy", frames, fps=1), media_config=MediaConfig(fps=1000))
    sound = subprocess.run(  # 3 s: 1.1 MB as float 48 kHz stereo
        ["ffmpeg", "-loglevel", "error", "-f", "f32le", "-ar", "48000", "-ac", "1", "-i", "-", "-f", "flac", "-"],
        input=np.zeros(3 * 48_000, np.float32).tobytes(),
        capture_output=True,
        check=True,
    ).stdout
    with pytest.raises(SampleError, match="out_of_range: audio.flac: the clip is 3.0 s of sound"):
        decode_sample(_raw("audio.flac", sound))
    assert decode_sample(_raw("audio.flac", sound), media_config=one_second).audio.shape == (2, 48_000)


def test_a_high_rate_video_sampled_at_a_low_rate_holds_only_the_frames_it_shows(one_second, monkeypatch):
    """60 fps sampled at 2 fps: of the 32 frames decoded (to the first after the last target), only
    the two shown at 0 s and 0.5 s are held until they are converted; holding every decoded frame
    took tens of GB for a minute of 4K 120 fps at 1 fps. The frames are those of a full decode."""
    source, data = one_second
    held, convert = [], media_files._to_rgb

    def counting(frames, *rest):
        held.append(sum(frame is not None for frame in frames))
        return convert(frames, *rest)

    monkeypatch.setattr(media_files, "_to_rgb", counting)
    sample = decode_sample(_raw("video.mp4", data), media_config=MediaConfig(fps=2))
    assert held == [2]
    whole = decode_sample(_raw("video.mp4", data)).video
    assert np.array_equal(sample.video, whole[[0, 30]])
    assert held[-1] == SOURCE_FPS  # control: at the source's rate every frame is shown


def test_an_undecodable_codec_is_named_in_the_skip_reason():
    data = encode_mp4(_source_frames(3), 10).replace(b"avc1", b"zzzz")
    with pytest.raises(SampleError, match="unsupported_codec: video.mp4: FFmpeg has no decoder .* 'zzzz'"):
        decode_sample(_raw("video.mp4", data))


SEGMENTS = [(0.0, 1.5, "a red ball rolls"), (1.5, 2.2, "it hits the wall"), (2.2, 4.0, "it rests")]


@pytest.mark.parametrize("clip_start, draws", [("grid", [0.1, 0.3, 0.6, 0.9]), ("random", [0.37, 0.81])])
def test_clips_of_a_long_video_carry_exactly_their_windows_captions_and_actions(clip_start, draws):
    fps = 10  # frames and actions both at 10 per second: frame i and action i start together
    actions = np.repeat(np.arange(40, dtype=np.float32)[:, None], 19, axis=1)  # row i holds i
    long = Sample(
        key="long",
        video=_source_frames(40),
        fps=fps,
        actions=actions,
        embodiment="single_arm",
        action_rate_hz=10.0,
        caption_segments=SEGMENTS,
    )
    raw = encode_sample(long, video_format="mp4")
    whole = decode_sample(raw)
    assert len(whole.video) == 40 and whole.caption == "a red ball rolls it hits the wall it rests"
    starts = []
    for draw in draws:
        clip = decode_sample(raw, media_config=MediaConfig(clip_seconds=1.0, clip_start=clip_start), draw=draw)
        start = clip.timing["clip_start_s"]
        first = round(start * fps)
        assert start == pytest.approx(first / fps)  # on the action grid
        np.testing.assert_array_equal(clip.actions[:, 0], np.arange(first, first + 10))
        np.testing.assert_array_equal(clip.video, whole.video[first : first + 10])
        kept = [
            (max(a, start) - start, min(b, start + 1) - start, t) for a, b, t in SEGMENTS if a < start + 1 and b > start
        ]
        assert [t for *_, t in clip.caption_segments] == [t for *_, t in kept]
        assert np.allclose([s[:2] for s in clip.caption_segments], [s[:2] for s in kept])
        assert clip.caption == " ".join(t for *_, t in kept)
        starts.append(start)
    assert starts == ([0.0, 1.0, 2.0, 3.0] if clip_start == "grid" else [pytest.approx(1.1), pytest.approx(2.4)])


def test_an_audio_file_without_a_declared_duration_is_measured_and_checked_against_the_video():
    rate = 44_100
    tone = (0.5 * np.sin(2 * math.pi * 440 * np.arange(rate) / rate)).astype(np.float32)
    piped = subprocess.run(  # written to a pipe: the FLAC header cannot say how long it is
        ["ffmpeg", "-loglevel", "error", "-f", "f32le", "-ar", str(rate), "-ac", "1", "-i", "-", "-f", "flac", "-"],
        input=tone.tobytes(),
        capture_output=True,
        check=True,
    ).stdout
    assert decode_sample(_raw("audio.flac", piped)).audio.shape == (2, 48_000)
    with_video = {**_raw("audio.flac", piped, fps=10), "video.npy": encode_npy(np.zeros((30, 32, 32, 3), np.uint8))}
    with pytest.raises(
        SampleError,
        match=r"duration_mismatch: audio.flac lasts 1.000 s, video.npy \(30 frames at 10 fps\) 2.900-3.000 s",
    ):
        decode_sample(with_video)


def test_a_frame_needed_at_or_after_the_last_frames_end_is_named_with_both_times():
    """Frames at 0, 1 and 2 s showing until 3 s: a target at 1.5 s takes frame 1; one at exactly 3 s
    has no frame, named so that the two times read apart (it printed 'end at 3.000 s but the clip
    needs one at 3.000 s')."""
    times = np.array([0.0, 1.0, 2.0])
    assert clips.pick_frames(times, np.array([0.0, 1.5, 2.999]), 3.0, "video.mp4").tolist() == [0, 1, 2]
    with pytest.raises(SampleError) as error:
        clips.pick_frames(times, np.array([0.0, 3.0]), 3.0, "video.mp4")
    assert str(error.value) == (
        "corrupt_media: video.mp4: its last frame stops showing at 3 s, but the clip needs a frame shown at 3 s, "
        "at or after that end (truncated?)"
    )
