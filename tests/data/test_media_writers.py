"""mp4 / WAV / PNG writers, checked with readers that are not ours: the ffprobe and ffmpeg command-line
tools (Debian's ffmpeg, installed by launch/setup_env.sh), Python's ``wave`` and Pillow."""

from __future__ import annotations

import re
import wave
from fractions import Fraction

import numpy as np
import pytest
from PIL import Image

from megatron_cosmos3.data.media_writers import encode_mp4, even_size, exact_rate, write_mp4, write_png, write_wav
from megatron_cosmos3.testing.media_probe import ffmpeg_frames, ffprobe_streams, psnr


def smooth_clip(frames: int, height: int, width: int) -> np.ndarray:
    """Colour gradients with a bright square moving across: what video codecs are built for. The square
    sits on even rows and columns, so yuv420p's 2x2 colour samples never straddle its edge."""
    y, x = np.mgrid[0:height, 0:width]
    clip = np.empty((frames, height, width, 3), np.uint8)
    for t in range(frames):
        clip[t, ..., 0] = 40 + 150 * x / width
        clip[t, ..., 1] = 40 + 150 * y / height
        clip[t, ..., 2] = 100 + 8 * t % 100
        left = (2 * t) % (width - 12)
        clip[t, 10:22, left : left + 12] = (230, 230, 40)
    return clip


@pytest.mark.parametrize("fps, stored", [(12.5, "25/2"), (24, "24/1"), (29.97, "2997/100")])
def test_mp4_decodes_back_with_ffmpeg_to_its_frames_and_rate(tmp_path, fps, stored):
    clip = smooth_clip(15, 48, 64)
    path = write_mp4(tmp_path / "clip.mp4", clip, fps)
    video = ffprobe_streams(path)["video"]
    assert video["codec_name"] == "h264" and video["pix_fmt"] == "yuv420p"
    assert int(video["nb_read_frames"]) == 15
    assert video["r_frame_rate"] == stored and video["avg_frame_rate"] == stored
    assert (int(video["height"]), int(video["width"])) == (48, 64)
    assert float(video["duration"]) == pytest.approx(15 / fps, abs=1e-3)
    decoded = ffmpeg_frames(path, 48, 64)
    assert decoded.shape == clip.shape
    assert psnr(decoded, clip) >= 35.0
    # Control: the frames are in order (a shuffled clip would be far off).
    assert psnr(decoded[::-1], clip) < psnr(decoded, clip) - 5


def test_ntsc_rate_as_a_float_is_stored_as_30000_over_1001():
    assert exact_rate(30000 / 1001) == Fraction(30000, 1001)
    assert exact_rate(Fraction(30000, 1001)) == Fraction(30000, 1001)
    assert exact_rate(np.float32(12.5)) == Fraction(25, 2) and exact_rate(np.int64(24)) == 24
    with pytest.raises(ValueError, match="fps must be a number, got '24'"):
        exact_rate("24")


def test_odd_sizes_are_padded_to_even_with_every_source_pixel_kept(tmp_path):
    clip = smooth_clip(5, 33, 47)
    path = write_mp4(tmp_path / "odd.mp4", clip, 24)
    height, width = even_size(33, 47)
    assert (height, width) == (34, 48)
    video = ffprobe_streams(path)["video"]
    assert (int(video["height"]), int(video["width"])) == (34, 48)
    decoded = ffmpeg_frames(path, 34, 48)
    # A lower bound than above: at this size the square's saturated edges are a larger share of the frame.
    assert psnr(decoded[:, :33, :47], clip) >= 32.0
    assert psnr(decoded[:, 33:, :47], clip[:, 32:]) >= 32.0  # the added row repeats the last one


def top_level_boxes(data: bytes) -> list[str]:
    """The mp4's top-level box types in file order (ISO/IEC 14496-12: 32-bit size, 4-byte type;
    size 1 means a 64-bit size follows)."""
    boxes, offset = [], 0
    while offset + 8 <= len(data):
        size, kind = int.from_bytes(data[offset : offset + 4], "big"), data[offset + 4 : offset + 8].decode("latin-1")
        if size == 1:
            size = int.from_bytes(data[offset + 8 : offset + 16], "big")
        boxes.append(kind)
        offset += size if size else len(data)
    return boxes


def test_mp4_index_comes_before_the_media_data_so_a_browser_plays_it_while_downloading(tmp_path):
    audio = 0.1 * np.ones((2, 48_000), np.float32)
    for path in (
        write_mp4(tmp_path / "video.mp4", smooth_clip(9, 32, 32), 8),
        write_mp4(tmp_path / "av.mp4", smooth_clip(9, 32, 32), 9, audio=audio),
    ):
        boxes = top_level_boxes(path.read_bytes())
        assert {"moov", "mdat"} <= set(boxes), boxes
        assert boxes.index("moov") < boxes.index("mdat"), boxes  # FFmpeg's default puts moov last
        assert len(ffmpeg_frames(path, 32, 32)) == 9  # and it still decodes whole


# Writes a WAV larger than the file-size limit the process sets itself: the write fails part way,
# as it does when a disk fills or the run is killed mid-write.
_CUT_SHORT = """
import resource, signal, sys
import numpy as np
from megatron_cosmos3.data.media_writers import write_wav
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit a write fails (EFBIG) instead of killing
resource.setrlimit(resource.RLIMIT_FSIZE, (64_000, 64_000))
try:
    write_wav(sys.argv[1], np.zeros((2, 48_000), np.float32))
except OSError as error:
    print("refused", error.errno)
"""


def test_a_write_cut_short_leaves_the_earlier_file_whole_and_no_temporary_file(tmp_path):
    import subprocess
    import sys

    path = write_wav(tmp_path / "audio.wav", 0.5 * np.ones((1, 100), np.float32))
    earlier = path.read_bytes()
    done = subprocess.run([sys.executable, "-c", _CUT_SHORT, str(path)], capture_output=True, text=True, check=True)
    assert done.stdout.startswith("refused"), done.stdout + done.stderr  # control: the write did fail
    assert path.read_bytes() == earlier  # not the first 64 kB of the new file under the final name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audio.wav"]


def test_the_same_frames_give_the_same_bytes_after_encodes_of_other_sizes():
    """x264's macroblock tree read memory it had not written (valgrind), so the same clip encoded
    to other bytes now and then (1-16 in a hundred encodes, by the machine's load) when clips of
    other sizes had been encoded between (decoded, up to 21 levels apart). It is off: the settings
    x264 writes into the stream say so (what fails every time without the fix), and encodes of the
    clip between others are one file; the control, another clip, must differ, so the comparison
    is not between files that ignore their frames."""
    rng = np.random.default_rng(0)
    clip = rng.integers(0, 256, (9, 32, 48, 3), dtype=np.uint8)
    first = encode_mp4(clip, 24)
    assert re.search(rb"x264 - core \d+ .*? mbtree=0 ", first, re.DOTALL)
    for _ in range(60):
        height, width = rng.integers(8, 96, 2)
        encode_mp4(rng.integers(0, 256, (5, height, width, 3), dtype=np.uint8), 24)
        assert encode_mp4(clip, 24) == first
    assert encode_mp4(clip[::-1], 24) != first


def test_muxed_audio_lasts_as_long_as_the_video(tmp_path):
    frames, fps, rate = 25, 12.5, 48_000
    seconds = frames / fps
    t = np.arange(int(seconds * rate)) / rate
    audio = np.stack([0.3 * np.sin(2 * np.pi * 440 * t), 0.3 * np.sin(2 * np.pi * 660 * t)]).astype(np.float32)
    path = write_mp4(tmp_path / "av.mp4", smooth_clip(frames, 32, 32), fps, audio=audio, sample_rate=rate)
    streams = ffprobe_streams(path)
    assert streams["audio"]["codec_name"] == "aac"
    assert int(streams["audio"]["sample_rate"]) == rate and int(streams["audio"]["channels"]) == 2
    assert abs(float(streams["audio"]["duration"]) - float(streams["video"]["duration"])) <= 0.040
    assert float(streams["video"]["duration"]) == pytest.approx(seconds, abs=1e-3)


@pytest.mark.parametrize(
    ("fps", "sample_rate", "channels"),
    [
        (Fraction(24000, 1001), 44_100, 2),
        (25, 16_000, 1),
        (30, 22_050, 2),
        (60, 8_000, 1),
        (12, 96_000, 2),
        (1, 32_000, 1),
    ],
)
def test_muxed_audio_at_other_rates_stays_in_sync_with_video_at_other_frame_rates(tmp_path, fps, sample_rate, channels):
    """Read back by ffprobe: the clip's frames, rate and length, and the sound at its own rate and
    channels, lasting as long as the frames within one frame."""
    frames = 7
    seconds = frames / float(fps)
    audio = (0.2 * np.random.default_rng(0).standard_normal((channels, round(seconds * sample_rate)))).astype(
        np.float32
    )
    path = write_mp4(tmp_path / "av.mp4", smooth_clip(frames, 32, 32), fps, audio=audio, sample_rate=sample_rate)
    video, sound = (ffprobe_streams(path)[kind] for kind in ("video", "audio"))
    assert int(video["nb_read_frames"]) == frames and Fraction(video["r_frame_rate"]) == Fraction(fps)
    assert float(video["duration"]) == pytest.approx(seconds, abs=1e-3)
    assert (int(sound["sample_rate"]), int(sound["channels"])) == (sample_rate, channels)
    assert abs(float(sound["duration"]) - float(video["duration"])) <= 1 / float(fps)


@pytest.mark.parametrize("sample_rate", [12_345, 192_000, 6_000])
def test_a_sample_rate_aac_cannot_store_is_refused_naming_it(tmp_path, sample_rate):
    """PyAV raised 'Invalid argument' from avcodec_open2, naming neither the rate nor the rates AAC takes."""
    audio = np.zeros((2, sample_rate // 4), np.float32)
    with pytest.raises(
        ValueError, match=rf"sample_rate={sample_rate} is not one AAC stores in an mp4; one of \[7350, "
    ):
        write_mp4(tmp_path / "av.mp4", smooth_clip(5, 32, 32), 20, audio=audio, sample_rate=sample_rate)
    assert not (tmp_path / "av.mp4").exists()
    write_mp4(tmp_path / "av.mp4", smooth_clip(5, 32, 32), 20, audio=audio[:, :12_000], sample_rate=48_000)  # control


def test_wav_reads_back_48k_stereo_16_bit_of_the_right_length(tmp_path):
    waveform = np.random.default_rng(0).uniform(-0.9, 0.9, (2, 4801)).astype(np.float32)
    path = write_wav(tmp_path / "a.wav", waveform)
    with wave.open(str(path)) as wav:
        assert (wav.getframerate(), wav.getnchannels(), wav.getsampwidth(), wav.getnframes()) == (48_000, 2, 2, 4801)
        pcm = np.frombuffer(wav.readframes(4801), "<i2").reshape(-1, 2).T
    np.testing.assert_allclose(pcm / 32768.0, waveform, atol=1 / 32768)


def test_png_round_trips_exactly(tmp_path):
    image = np.random.default_rng(1).integers(0, 256, (17, 23, 3), dtype=np.uint8)
    with Image.open(write_png(tmp_path / "i.png", image)) as png:
        np.testing.assert_array_equal(np.array(png.convert("RGB")), image)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            dict(frames=np.zeros((2, 8, 8, 3), np.float32)),
            "frames must have dtype uint8 \\(values 0-255\\), got dtype float32",
        ),
        (dict(frames=np.zeros((2, 8, 8), np.uint8)), r"frames must have shape \(T, H, W, 3\), got shape \(2, 8, 8\)"),
        (dict(frames=np.zeros((0, 8, 8, 3), np.uint8)), r"frames is empty: shape \(0, 8, 8, 3\)"),
        (dict(fps=0), "fps must be a finite number > 0, got 0"),
        (dict(fps=-24.0), "fps must be a finite number > 0, got -24.0"),
        (dict(fps=float("nan")), "fps must be a finite number > 0, got nan"),
        (dict(audio=np.zeros((2, 10), np.int16)), "audio must be a float waveform in \\[-1, 1\\], got dtype int16"),
        (dict(audio=np.zeros((3, 10), np.float32)), r"audio must have shape \(channels, samples\).*\(3, 10\)"),
        (dict(audio=np.zeros((2, 0), np.float32)), r"audio is empty: shape \(2, 0\)"),
        (dict(audio=np.zeros((2, 10), np.float32), sample_rate=0), "sample_rate must be a positive integer .*got 0"),
        (dict(crf=60), "crf must be an integer in 0..51, got 60"),
    ],
)
def test_bad_input_is_a_clear_error(kwargs, message):
    args = dict(frames=np.zeros((2, 8, 8, 3), np.uint8), fps=24.0) | kwargs
    with pytest.raises(ValueError, match=message):
        encode_mp4(**args)


def test_bad_wav_and_png_input_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="sample_rate must be a positive integer"):
        write_wav(tmp_path / "a.wav", np.zeros((2, 4), np.float32), sample_rate=-1)
    with pytest.raises(ValueError, match=r"image must be a numpy array \(H, W, 3\) of uint8, got shape \(4, 4\)"):
        write_png(tmp_path / "i.png", np.zeros((4, 4), np.uint8))
    assert not (tmp_path / "a.wav").exists() and not (tmp_path / "i.png").exists()
