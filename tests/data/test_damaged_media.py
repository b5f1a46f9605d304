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

import av
import numpy as np
import pytest
from PIL import Image
from scipy.io import wavfile
from world_helpers import load_script

from megatron_cosmos3.data import media_files, mp4_fragments
from megatron_cosmos3.data.clips import Window, target_times
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


def _grey_tiff(values: np.ndarray, bits: int) -> bytes:
    """A little-endian grey TIFF of one strip holding (H, W) ``values`` packed ``bits`` (12 or 16)
    bits a sample, big-endian bit order (TIFF 6.0), W even: tifffile writes no 12-bit file."""
    height, width = values.shape
    flat = values.astype(np.int64).ravel()
    if bits == 12:  # two samples in three bytes
        a, b = flat[0::2], flat[1::2]
        pixels = np.stack([a >> 4, ((a & 15) << 4) | (b >> 8), b & 255], axis=1).astype(np.uint8).tobytes()
    else:
        pixels = flat.astype("<u2").tobytes()
    tags = [(256, 3, width), (257, 3, height), (258, 3, bits), (259, 3, 1), (262, 3, 1)]
    tags += [(273, 4, 8), (277, 3, 1), (278, 3, height), (279, 4, len(pixels))]
    entries = b"".join(struct.pack("<HHII", tag, kind, 1, value) for tag, kind, value in tags)  # a SHORT fits too
    ifd = struct.pack("<H", len(tags)) + entries
    return b"II*\0" + struct.pack("<I", 8 + len(pixels)) + pixels + ifd + struct.pack("<I", 0)


def test_a_12_bit_grey_tiff_is_scaled_from_its_12_bits():
    """Pillow reads a 12-bit grey TIFF into mode I;16 as its values, 0..4095: scaled as 16-bit, its
    white showed as level 16 of 255. Its BitsPerSample says 12; the same values in a 16-bit TIFF
    (the control) are dark."""
    values = np.linspace(0, 4095, 8 * 10).round().astype(np.int64).reshape(8, 10)
    want = [[round(Fraction(v * 255, 4095)) for v in row] for row in values.tolist()]
    shown = decode_image(_grey_tiff(values, 12), "grey12.tif")
    np.testing.assert_array_equal(shown, np.repeat(np.asarray(want, np.uint8)[..., None], 3, axis=2))
    assert shown[-1, -1, 0] == 255
    assert decode_image(_grey_tiff(values, 16), "grey16.tif")[-1, -1, 0] == round(4095 * 255 / 65535)


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


def test_the_walk_for_a_cluster_reads_a_bounded_number_of_elements(tmp_path, monkeypatch):
    """The zero-frames check read a segment's elements one by one in Python until a cluster: 100k
    2-byte Void elements before it (a crafted file) cost 100k steps, 16 s for 5M. It reads at most
    SEGMENT_ELEMENTS_READ; FFmpeg reads past the voids to the 5 frames."""
    path = tmp_path / "v.mkv"
    source = ["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "testsrc=size=32x32:rate=10", "-frames:v", "5"]
    subprocess.run([*source, "-c:v", "libx264", str(path)], check=True)
    data = path.read_bytes()
    header_bytes = data.index(b"\x18\x53\x80\x67")  # the EBML header's, the segment's ID after it
    size_bytes = 9 - data[header_bytes + 4].bit_length()
    body = b"\xec\x80" * 100_000 + data[header_bytes + 4 + size_bytes :]  # Void elements of no content
    segment = b"\x18\x53\x80\x67\x01" + len(body).to_bytes(7, "big")  # an 8-byte size
    crafted = data[:header_bytes] + segment + body
    read = []
    element = media_files._ebml_element
    monkeypatch.setattr(media_files, "_ebml_element", lambda data, offset: read.append(offset) or element(data, offset))
    assert decode_video_file(crafted, "v.mkv")[0].shape[0] == 5
    assert 0 < len(read) < 2 * media_files.SEGMENT_ELEMENTS_READ


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


def test_a_fragmented_mp4_cut_inside_its_first_moof_is_cut_not_empty(tmp_path):
    """A fragmented file without sidx or mehd cut inside its first moof: the moov lists no sample and
    the walk found no whole moof, so it was "zero_length ... of 1 track listing no sample"; its moof
    declares the bytes that are missing. Cut inside the mdat after it (the control) it was cut."""
    path = tmp_path / "v.mp4"
    source = ["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "testsrc=size=32x32:rate=10", "-t", "1"]
    subprocess.run([*source, "-c:v", "libx264", "-g", "5", *FRAGMENTED, str(path)], check=True)
    data = path.read_bytes()
    moof = data.index(b"moof") - 4
    mdat = data.index(b"mdat", moof) - 4
    for cut in (moof + 20, mdat + 20):
        with pytest.raises(SampleError, match=re.escape("corrupt_media: v.mp4: truncated file: it declares")):
            decode_video_file(data[:cut], "v.mp4")


def test_an_mp4_whose_track_box_overruns_its_moov_is_not_a_moov_of_no_track(tmp_path):
    """A trak box declaring more bytes than its moov holds stopped the walk of the moov's boxes, which
    then read as a moov of no track: zero_length. FFmpeg reads the track (its boxes are all there)."""
    path = tmp_path / "v.mp4"
    source = ["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "testsrc=size=32x32:rate=10", "-t", "0.5"]
    subprocess.run([*source, "-c:v", "libx264", str(path)], check=True)
    data = bytearray(path.read_bytes())
    moov, trak = data.index(b"moov") - 4, data.index(b"trak") - 4
    moov_size = int.from_bytes(data[moov : moov + 4], "big")
    data[trak : trak + 4] = (moov_size + 100).to_bytes(4, "big")
    assert decode_video_file(bytes(data), "v.mp4")[0].shape[0] == 5


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


def test_an_mp4_whose_sample_table_makes_its_video_last_negative_seconds_is_corrupt_naming_it(tmp_path):
    """One bit of an MP4's stts entry count (1 -> 65: FFmpeg reads the boxes after it as 64 more
    entries) made the video stream last -4.7e14 s, and the loader said "zero_length: a -4.691e+14
    s clip holds no frame at 10 fps", naming neither the file nor what is wrong with it."""
    path = tmp_path / "v.mp4"
    sources = ["-f", "lavfi", "-i", "testsrc=size=32x32:rate=10", "-f", "lavfi", "-i", "sine=sample_rate=16000"]
    subprocess.run(["ffmpeg", "-v", "error", "-y", *sources, "-t", "0.4", "-c:v", "libx264", str(path)], check=True)
    data = bytearray(path.read_bytes())
    assert decode_video_file(bytes(data), "video.mp4")[0].shape[0] == 4  # the control: whole
    count = data.index(b"stts") + 8  # after the box type, its version and flags
    assert data[count : count + 4] == b"\0\0\0\x01"
    data[count + 3] |= 0x40
    with av.open(io.BytesIO(bytes(data))) as container:
        assert container.streams.video[0].duration < 0  # what FFmpeg makes of it
    message = re.escape("corrupt_media: video.mp4: its video stream declares a duration of -4.")
    for decode in (
        lambda: decode_sample(_raw("video.mp4", bytes(data))),
        lambda: decode_video_file(bytes(data), "video.mp4"),
    ):
        with pytest.raises(SampleError, match=message):
            decode()


def test_a_clip_that_holds_no_frame_names_the_file():
    """The skip said "a 0 s clip holds no frame at 10 fps": of which member, the log did not say."""
    with pytest.raises(SampleError, match=re.escape("zero_length: video.mkv: a 0 s clip holds no frame at 10 fps")):
        target_times(Window(0.0, 0.0), 10.0, "video.mkv")
    assert len(target_times(Window(0.0, 0.25), 10.0, "video.mkv")) == 3  # the control


def _with_a_track_listing_no_sample(data: bytes, handler: bytes) -> bytes:
    """An MP4 whose ``handler`` ("soun", "vide") track lists no sample: its stts, stsc, stco and stsz
    counts 0 (a recorder that opened a track and wrote nothing to it)."""
    out = bytearray(data)
    moov = next(mp4_fragments._boxes(data, 0, len(data), b"moov"))
    for trak in mp4_fragments._boxes(data, *moov, b"trak"):
        hdlr = mp4_fragments._child(data, trak, (b"mdia", b"hdlr"))
        if data[hdlr[0] + 8 : hdlr[0] + 12] == handler:  # after version, flags and pre_defined
            stbl = mp4_fragments._child(data, trak, (b"mdia", b"minf", b"stbl"))
            for kind, count_at in ((b"stts", 4), (b"stsc", 4), (b"stco", 4), (b"stsz", 8)):
                box = mp4_fragments._child(data, stbl, (kind,))
                out[box[0] + count_at : box[0] + count_at + 4] = bytes(4)
    return bytes(out)


def _matroska_with_a_silent_track(frames: int) -> bytes:
    """A Matroska file of ``frames`` video frames and an AAC track that holds no packet."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="matroska") as container:
        video = container.add_stream("libx264", rate=10)
        video.width = video.height = 32
        sound = container.add_stream("aac", rate=16_000, layout="mono")
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 20 * i, np.uint8), format="rgb24")
            frame.pts = i
            container.mux(video.encode(frame))
        container.mux(video.encode(None))
        container.mux(sound.encode(None))
    return buffer.getvalue()


@pytest.mark.parametrize("container", ["mp4", "mkv"])
def test_a_video_whose_audio_track_holds_nothing_is_zero_length_naming_its_audio(tmp_path, container):
    """A good video track beside an audio track of no sample: FFmpeg refused to seek in the empty
    track and the skip read "corrupt_media: not a readable media file (PermissionError: [Errno 1]
    Operation not permitted)". As an audio field the MP4's empty track was already named so; its
    video track, emptied instead, leaves a readable sound (the controls)."""
    field = f"video.{container}"
    if container == "mkv":
        data = _matroska_with_a_silent_track(4)
    else:
        path = tmp_path / "v.mp4"
        sources = ["-f", "lavfi", "-i", "testsrc=size=32x32:rate=10", "-f", "lavfi", "-i", "sine=sample_rate=16000"]
        subprocess.run(["ffmpeg", "-v", "error", "-y", *sources, "-t", "0.4", "-c:v", "libx264", str(path)], check=True)
        whole = path.read_bytes()
        assert decode_sample(_raw(field, whole)).audio.shape[1] > 0  # the control: whole, with its sound
        data = _with_a_track_listing_no_sample(whole, b"soun")
        message = re.escape("zero_length: audio.m4a: its audio stream has no samples")
        with pytest.raises(SampleError, match=message):
            decode_sample(_raw("audio.m4a", data))
        silent_picture = _with_a_track_listing_no_sample(whole, b"vide")
        assert decode_sample(_raw("audio.m4a", silent_picture)).audio.shape[1] > 0
    with av.open(io.BytesIO(data)) as opened:
        assert [stream.type for stream in opened.streams] == ["video", "audio"]
    message = re.escape(f"zero_length: {field}: its audio stream has no samples (its track holds no packet)")
    with pytest.raises(SampleError, match=message):
        decode_sample(_raw(field, data))
    assert decode_video_file(data, field)[0].shape[0] == 4  # without its sound, the frames are all there


@pytest.mark.parametrize(
    "dtype, named",
    [("i1", "3 8-bit signed integer"), ("<i2", "3 16-bit signed integer"), (">f8", "3 64-bit floating point")],
)
def test_a_colour_tiff_of_samples_pillow_does_not_read_is_refused_naming_them(dtype, named):
    """A signed 8-bit colour TIFF (SampleFormat 2, 3 samples a pixel; also signed 16-bit and double
    colour) was "not a readable image (no picture format Pillow reads)": a TIFF, named as none. Its
    tags say what it holds. Unsigned 8-bit colour written the same way decodes exactly (the control)."""
    tifffile = pytest.importorskip("tifffile", reason="tifffile (scikit-image's TIFF writer) writes the test files")
    rgb = np.arange(4 * 6 * 3).reshape(4, 6, 3)
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, rgb.astype(dtype), photometric="rgb")
    message = re.escape(f"corrupt_media: image.png: not a readable image (a TIFF of {named} samples a pixel, which")
    with pytest.raises(SampleError, match=message):
        decode_sample(_raw("image.png", buffer.getvalue()))
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, rgb.astype(np.uint8), photometric="rgb")
    np.testing.assert_array_equal(decode_image(buffer.getvalue(), "image.png"), rgb)
