"""Damaged and unusual media files (docs/DESIGN.md, "Real media"): each is decoded whole, for as
long as it lasts and at its own frame rate, or refused with an error naming the file and what is
wrong with it, in the loader (a shard field) and in generation (conditioning inputs,
``decode_audio_file``, ``decode_video_file``). Files are written by the test."""

from __future__ import annotations

import io
import json
import re
import struct
import subprocess
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.io import wavfile
from world_helpers import load_script

from megatron_cosmos3.data.errors import SampleError
from megatron_cosmos3.data.media import decode_image, encode_json
from megatron_cosmos3.data.media_files import decode_video_file
from megatron_cosmos3.data.schema import decode_audio_file, decode_sample


def _raw(field: str, data: bytes) -> dict:
    return {"__key__": "k", "meta.json": encode_json({"schema": 1, "caption": "a tone"}), field: data}


def _wav_with_chunk_before_fmt(kind: bytes, declared: int, payload: bytes) -> bytes:
    """A 16-bit mono WAV whose ``kind`` chunk, declaring ``declared`` bytes and holding ``payload``,
    comes before its fmt and data chunks."""
    buffer = io.BytesIO()
    wavfile.write(buffer, 16_000, np.arange(400, dtype=np.int16))
    whole = buffer.getvalue()
    body = kind + struct.pack("<I", declared) + payload + whole[12:]
    return b"RIFF" + struct.pack("<I", 4 + len(body)) + b"WAVE" + body


@pytest.mark.parametrize("declared", [0xFFFFFFF0, 5_000, 1_000])
def test_a_wav_cut_inside_a_chunk_before_its_samples_is_corrupt_not_an_internal_error(declared):
    """A LIST/junk chunk declaring more bytes than follow it (a file cut there) made scipy fail with
    UnboundLocalError, a traceback through the loader and the generate command."""
    data = _wav_with_chunk_before_fmt(b"LIST", declared, b"INFOISFT")
    missing = 12 + 8 + declared - len(data)  # where the chunk (after RIFF, WAVE and its header) says it ends
    for decode in (lambda: decode_sample(_raw("audio.wav", data)), lambda: decode_audio_file(data, "audio.wav")):
        with pytest.raises(
            SampleError,
            match=re.escape(f"corrupt_media: audio.wav: truncated WAV file: its chunks declare {missing} more bytes"),
        ):
            decode()


def test_a_wav_with_whole_extra_chunks_before_and_after_its_samples_decodes():
    """Control: a LIST chunk that fits, and a trailing chunk after the samples, are read past."""
    data = _wav_with_chunk_before_fmt(b"LIST", 9, b"INFOISFT\0" + b"\0") + b"id3 " + struct.pack("<I", 4) + b"abcd"
    data = data[:4] + struct.pack("<I", len(data) - 8) + data[8:]
    audio, rate = decode_audio_file(data, "audio.wav")
    assert rate == 16_000
    np.testing.assert_allclose(audio[0], np.arange(400) / 32768.0)
    assert decode_sample(_raw("audio.wav", data)).audio.shape == (1, 400)


def _loud_and_silent_file(path: Path, *codec: str, loud_first: bool) -> bytes:
    """1 s of noise then 3 s of silence (``loud_first``), or 1 s of silence then 3 s of noise, at a
    variable bitrate, by ffmpeg: the first frames' bitrate is far from the file's average."""
    parts = ["[0]atrim=0:1[a]", "[1]atrim=0:3[b]", "[a][b]concat=v=0:a=1"]
    sources = ["anoisesrc=r=44100:a=0.5", "anullsrc=r=44100:cl=mono"]
    command = ["ffmpeg", "-v", "error", "-y"]
    for source in sources if loud_first else sources[::-1]:
        command += ["-f", "lavfi", "-i", source]
    subprocess.run([*command, "-filter_complex", ";".join(parts), *codec, str(path)], check=True)
    return path.read_bytes()


@pytest.mark.parametrize("loud_first", [True, False])
@pytest.mark.parametrize(
    "suffix, codec",
    [("mp3", ("-c:a", "libmp3lame", "-q:a", "0", "-write_xing", "0")), ("aac", ("-c:a", "aac", "-q:a", "2"))],
)
def test_a_variable_bitrate_file_that_declares_no_length_is_measured_not_guessed(tmp_path, suffix, codec, loud_first):
    """An MP3 without a Xing header or a raw AAC file declares no duration; FFmpeg's guess from the
    first frames' bitrate made 4 s of sound 2.2 s (a silent cut) or 7.4 s (a whole file refused as
    truncated). Its packets say 4 s, up to the codec's priming and last frame."""
    data = _loud_and_silent_file(tmp_path / f"a.{suffix}", *codec, loud_first=loud_first)
    audio, rate = decode_audio_file(data, f"audio.{suffix}")
    assert rate == 48_000 and 4.0 <= audio.shape[1] / rate < 4.08
    loud = np.abs(audio).max(axis=0) > 0.05
    if loud_first:  # the noise where it was, the silence to the end
        assert loud[:rate].any() and not loud[round(1.2 * rate) :].any()
    else:  # the noise to the end: none of it cut off
        assert not loud[: round(0.9 * rate)].any() and loud[-rate // 10 :].mean() > 0.3
    assert decode_sample(_raw(f"audio.{suffix}", data)).audio.shape == audio.shape


@pytest.mark.parametrize("suffix, codec", [("mkv", "libx264"), ("webm", "libvpx-vp9")])
@pytest.mark.parametrize("rate", ["30", "30000/1001", "60000/1001", "24000/1001"])
@pytest.mark.parametrize("frames", [1, 2, 3])
def test_a_matroska_video_of_a_few_frames_has_its_nominal_rate(tmp_path, suffix, codec, rate, frames):
    """Matroska/WebM count milliseconds: one frame at 30 fps lasted "33 ms", an average of 30.3 fps
    taken for a variable rate, and generation conditioned on a 30.3 fps clip."""
    path = tmp_path / f"v.{suffix}"
    source = f"testsrc=size=64x48:rate={rate}"
    command = ["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", source, "-frames:v", str(frames), "-c:v", codec]
    subprocess.run([*command, str(path)], check=True)
    decoded, fps = decode_video_file(path.read_bytes(), path.name)
    assert decoded.shape == (frames, 48, 64, 3)
    assert fps == pytest.approx(float(Fraction(rate)), rel=1e-6)  # FFmpeg guesses 59.94 from ms as 19000/317


def test_a_float_grey_picture_shows_its_tones_from_0_to_1():
    """A 32-bit float TIFF (Pillow's mode F) holds 0..1; Pillow's RGB conversion truncated every
    value to 0 or 1 of 255: a black picture. NaN is shown as 0, values outside 0..1 clipped."""
    ramp = np.linspace(-0.25, 1.25, 32 * 48, dtype=np.float32).reshape(32, 48)
    ramp[0, 0] = np.nan
    buffer = io.BytesIO()
    Image.fromarray(ramp, mode="F").save(buffer, format="TIFF")
    want = np.clip(np.round(np.nan_to_num(ramp.astype(np.float64)) * 255), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(decode_image(buffer.getvalue(), "grey.tif"), np.repeat(want[..., None], 3, axis=2))


@pytest.mark.parametrize("dtype", ["<u4", ">i4", "<i4", "<i2", "<u2", ">u2", "i1", "u1"])
def test_an_integer_grey_tiff_is_scaled_by_the_range_of_its_type(dtype):
    """Pillow reads 32-bit integer grey as mode I, an unsigned one with its upper half wrapped
    negative; it was divided by 257 as if 16-bit, so all but its darkest 1/65536 of tones were white.
    It reads signed 8-bit grey as mode L, its bytes: -128 was shown as 128, -1 white.
    0..the type's largest value is black..white, negative values black; written by tifffile (its
    SampleFormat and BitsPerSample tags), the expected levels computed exactly with fractions."""
    tifffile = pytest.importorskip("tifffile", reason="tifffile (scikit-image's TIFF writer) writes the test files")
    info = np.iinfo(np.dtype(dtype))
    brightest = int(info.max)
    ramp = np.linspace(info.min, info.max, 24 * 40).round().astype(dtype).reshape(24, 40)
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, ramp)
    want = [min(max(round(Fraction(int(v) * 255, brightest)), 0), 255) for v in ramp.ravel().tolist()]
    want = np.asarray(want, np.uint8).reshape(ramp.shape)
    shown = decode_image(buffer.getvalue(), "grey.tif")
    np.testing.assert_array_equal(shown, np.repeat(want[..., None], 3, axis=2))
    assert shown.min() == 0 and shown[-1, -1, 0] == 255  # black to white


@pytest.mark.parametrize("field", ["image.png", "image.jpg", "video.mp4", "video.webm", "audio.wav", "audio.mp3"])
def test_a_zero_length_or_unknown_member_is_named_as_such(field):
    """An empty file said "Invalid data found when processing input" or "cannot identify image file
    <_io.BytesIO object at 0x...>": nothing about the file, an address instead."""
    with pytest.raises(SampleError, match=re.escape(f"corrupt_media: {field}: a zero-length file (0 bytes)")):
        decode_sample(_raw(field, b""))
    if field.startswith("image"):
        with pytest.raises(SampleError, match=re.escape(f"{field}: not a readable image (no picture format Pillow")):
            decode_sample(_raw(field, b"\x17" * 3000))


def _ogg_crc(page: bytes) -> int:
    """The Ogg page checksum (CRC-32, polynomial 0x04C11DB7, not reflected, from 0)."""
    crc = 0
    for byte in page:
        crc ^= byte << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7 if crc & 0x80000000 else crc << 1) & 0xFFFFFFFF
    return crc


def _with_last_ogg_page_ending_its_stream(data: bytes) -> bytes:
    """``data`` (an Ogg file) with its last page flagged end-of-stream and its checksum redone."""
    offset, last = 0, 0
    while offset < len(data):  # to the last page: each is a header, a segment table and its data
        last, segments = offset, data[offset + 26]
        offset += 27 + segments + sum(data[offset + 27 : offset + 27 + segments])
    page = bytearray(data[last:])
    assert _ogg_crc(bytes(page[:22]) + bytes(4) + bytes(page[26:])) == struct.unpack("<I", page[22:26])[0]  # control
    page[5] |= 4
    page[22:26] = bytes(4)
    page[22:26] = struct.pack("<I", _ogg_crc(bytes(page)))
    return data[:last] + bytes(page)


def test_a_16_bit_pgm_read_as_32_bit_integers_keeps_its_16_bit_tones():
    """Pillow reads a PGM of a maximum above 255 into mode I (int32), scaled to 0..65535: no TIFF
    tag says 32 bits, so it is shown as 16-bit grey (the control of the 32-bit TIFF's range)."""
    levels = np.array([[0, 1000, 21845, 32768, 65535]], dtype=">u2")
    data = b"P5\n5 1\n65535\n" + levels.tobytes()
    with Image.open(io.BytesIO(data)) as image:
        assert image.mode == "I"
    want = np.round(levels.astype(np.float64) / 257).astype(np.uint8)
    np.testing.assert_array_equal(decode_image(data, "grey.pgm"), np.repeat(want[..., None], 3, axis=2))


# Files of 0 samples as ffmpeg writes them: (field, its options); an MP3 is an ID3 tag and, unless
# told not to, an Info frame declaring 0 frames.
EMPTY_AUDIO = {
    "vorbis": ("audio.ogg", ["-c:a", "libvorbis"]),
    "opus": ("audio.opus", ["-c:a", "libopus"]),
    "mp3_info": ("audio.mp3", ["-c:a", "libmp3lame"]),
    "mp3_id3": ("audio.mp3", ["-c:a", "libmp3lame", "-write_xing", "0"]),
}


@pytest.mark.parametrize(
    "kind, ends_its_stream", [(kind, False) for kind in EMPTY_AUDIO] + [("vorbis", True), ("opus", True)]
)
def test_an_audio_file_of_no_samples_is_zero_length_not_an_end_of_file_error(tmp_path, kind, ends_its_stream):
    """An Ogg file of header pages only (ffmpeg writes no end-of-stream page for 0 samples) failed to
    open with FFmpeg's "End of file", an MP3 of its tags alone with "Invalid data found": neither says
    what is wrong. Flagging the last Ogg page end-of-stream, as another writer may close it, changes
    nothing; 0.1 s of the same encoder decodes (the control)."""
    field, options = EMPTY_AUDIO[kind]
    source = ["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "sine=sample_rate=48000"]
    for length, path in (
        (["-frames:a", "0"], tmp_path / f"empty.{field}"),
        (["-t", "0.1"], tmp_path / f"short.{field}"),
    ):
        subprocess.run([*source, *length, *options, str(path)], check=True)
    data = (tmp_path / f"empty.{field}").read_bytes()
    data = _with_last_ogg_page_ending_its_stream(data) if ends_its_stream else data
    message = re.escape(f"zero_length: {field}: its audio stream has no samples (")
    for decode in (lambda: decode_sample(_raw(field, data)), lambda: decode_audio_file(data, field)):
        with pytest.raises(SampleError, match=message):
            decode()
    assert decode_sample(_raw(field, (tmp_path / f"short.{field}").read_bytes())).audio.shape[1] > 0


@pytest.mark.parametrize("field, codec", [("video.mkv", "libx264"), ("video.webm", "libvpx-vp9")])
def test_a_matroska_video_of_no_frames_is_zero_length_not_an_end_of_file_error(tmp_path, field, codec):
    """ffmpeg writes 0 frames as a whole segment of headers and no cluster; FFmpeg failed to open it
    with "End of file". Two frames of the same encoder decode (the control)."""
    source = ["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "testsrc=size=32x32:rate=25", "-c:v", codec]
    for frames, stem in ((0, "empty"), (2, "short")):
        subprocess.run([*source, "-frames:v", str(frames), str(tmp_path / f"{stem}.{field}")], check=True)
    data = (tmp_path / f"empty.{field}").read_bytes()
    message = re.escape(f"zero_length: {field}: its streams have no frames or samples (a Matroska/WebM file of")
    for decode in (lambda: decode_sample(_raw(field, data)), lambda: decode_video_file(data, field)):
        with pytest.raises(SampleError, match=message):
            decode()
    assert decode_sample(_raw(field, (tmp_path / f"short.{field}").read_bytes())).video.shape[0] == 2


def _unfragmented(data: bytes) -> bytes:
    """A fragmented MP4 of an empty moov as an unfragmented one, written with empty tracks: its moov
    without the mvex box (which says fragments follow) and nothing after it (the mfra index)."""
    moov = data.index(b"moov") - 4
    mvex = data.index(b"mvex", moov) - 4
    moov_end, mvex_end = (at + int.from_bytes(data[at : at + 4], "big") for at in (moov, mvex))
    body = data[moov + 8 : mvex] + data[mvex_end:moov_end]
    return data[:moov] + struct.pack(">I", 8 + len(body)) + b"moov" + body


# MP4/MOV files of no samples as ffmpeg writes them: (field, its options, whether the fragmented
# file's empty moov is rewritten unfragmented: _unfragmented, what the error says the file holds).
FRAGMENTED = ["-movflags", "frag_keyframe+empty_moov"]
EMPTY_MP4 = {
    "mp4_video_audio": ("video.mp4", ["-c:v", "libx264", "-c:a", "aac"], False, "whose moov holds no track"),
    "mov_video": ("video.mov", ["-c:v", "libx264", "-an"], False, "whose moov holds no track"),
    "m4a": ("audio.m4a", ["-vn", "-c:a", "aac"], False, "whose moov holds no track"),
    "mp4_fragmented": ("video.mp4", ["-c:v", "libx264", "-c:a", "aac", *FRAGMENTED], False, "of 2 tracks listing"),
    "m4a_empty_track": ("audio.m4a", ["-vn", "-c:a", "aac", *FRAGMENTED], True, "of 1 track listing"),
    "mp4_empty_tracks": ("video.mp4", ["-c:v", "libx264", "-c:a", "aac", *FRAGMENTED], True, "of 2 tracks listing"),
}


@pytest.mark.parametrize("kind", sorted(EMPTY_MP4))
def test_an_mp4_of_no_samples_is_zero_length_not_a_file_of_no_stream(tmp_path, kind):
    """ffmpeg writes 0 samples as a moov of no track, which FFmpeg opened as a file of no stream
    ("not a readable media file (no stream found)", corrupt_media); a moov whose tracks list no
    sample (a fragmented file's, none following, or one written so) as streams of no duration.
    0.2 s of the same encoders decodes (the control), fragmented too."""
    field, options, unfragmented, holds = EMPTY_MP4[kind]
    sources = ["-f", "lavfi", "-i", "testsrc=size=32x32:rate=25", "-f", "lavfi", "-i", "sine=sample_rate=48000"]
    for length, stem in ((["-t", "0"], "empty"), (["-t", "0.2"], "short")):
        command = ["ffmpeg", "-v", "error", "-y", *sources, *length, *options]
        subprocess.run([*command, str(tmp_path / f"{stem}.{field}")], check=True)
    data = (tmp_path / f"empty.{field}").read_bytes()
    data = _unfragmented(data) if unfragmented else data
    message = re.escape(f"zero_length: {field}: its streams have no frames or samples (an MP4/MOV file {holds}")
    whole = decode_video_file if field.startswith("video") else decode_audio_file
    for decode in (lambda: decode_sample(_raw(field, data)), lambda: whole(data, field)):
        with pytest.raises(SampleError, match=message):
            decode()
    short = decode_sample(_raw(field, (tmp_path / f"short.{field}").read_bytes()))
    assert (short.video.shape[0] if field.startswith("video") else short.audio.shape[1]) > 0


def test_a_fragmented_mp4_cut_before_its_fragments_is_cut_not_empty(tmp_path):
    """An empty moov cut from its fragments lists no sample either; its global sidx indexes the
    fragments that are missing: a cut file, not one of no samples."""
    path = tmp_path / "v.mp4"
    # Without default_base_moof ffmpeg 5.1 writes global_sidx fragments no FFmpeg decodes.
    flags = ["-g", "5", "-movflags", "frag_keyframe+empty_moov+global_sidx+default_base_moof"]
    source = ["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "testsrc=size=32x32:rate=25", "-t", "1"]
    subprocess.run([*source, "-c:v", "libx264", *flags, str(path)], check=True)
    data = path.read_bytes()
    cut = data[: data.index(b"moof") - 4]
    with pytest.raises(SampleError, match=re.escape("corrupt_media: v.mp4: truncated file: it declares")):
        decode_video_file(cut, "v.mp4")
    assert decode_video_file(data, "v.mp4")[0].shape[0] == 25  # the control: whole


def test_write_shards_counts_damaged_media_as_skips_and_writes_the_rest(tmp_path):
    """The manifest script caught SampleError only: a WAV cut in its LIST chunk (scipy's
    UnboundLocalError) ended the whole run with a traceback."""
    write_shards = load_script("write_shards")
    (tmp_path / "cut.wav").write_bytes(_wav_with_chunk_before_fmt(b"LIST", 5_000, b"INFOISFT"))
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "good.wav").write_bytes(_wav_with_chunk_before_fmt(b"LIST", 8, b"INFOISFT"))
    silent = ["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "sine", "-frames:a", "0", "-c:a", "libopus"]
    subprocess.run([*silent, str(tmp_path / "silent.opus")], check=True)  # Ogg header pages only
    entries = [
        {"key": "cut", "caption": "x", "audio": "cut.wav"},
        {"key": "empty", "caption": "x", "image": "empty.png"},
        {"key": "silent", "caption": "x", "audio": "silent.opus"},
        {"key": "good", "caption": "x", "audio": "good.wav"},
    ]
    (tmp_path / "manifest.jsonl").write_text("\n".join(json.dumps(entry) for entry in entries))
    index, skipped = write_shards.write_shards(tmp_path / "manifest.jsonl", tmp_path / "shards")
    assert index.total_samples == 1 and skipped == {"corrupt_media": 2, "zero_length": 1}
