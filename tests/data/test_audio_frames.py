"""The MP3 / ADTS frame chains (``data/audio_frames.py``): the bytes a cut file's last frame
misses and how long a file that declares no length lasts, against the frames FFmpeg's demuxer
places, at work that does not grow frame by frame."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import tracemalloc
from fractions import Fraction

import av
import numpy as np
import pytest

from megatron_cosmos3.data import audio_frames
from megatron_cosmos3.data.clips import MediaConfig
from megatron_cosmos3.data.errors import SampleError
from megatron_cosmos3.data.media import encode_json
from megatron_cosmos3.data.schema import SchemaContext, decode_audio_file, decode_sample
from megatron_cosmos3.encoders.audio_vae import SAMPLE_RATE

# (FFmpeg's encoder options, header bytes) of each kind of raw audio file.
KINDS = {
    "mp3_mpeg1": (["-ar", "48000", "-c:a", "libmp3lame", "-write_xing", "0", "-id3v2_version", "0", "-f", "mp3"], 4),
    "mp3_mpeg25": (["-ar", "11025", "-c:a", "libmp3lame", "-write_xing", "0", "-id3v2_version", "0", "-f", "mp3"], 4),
    "mp2_44k1": (["-ar", "44100", "-c:a", "mp2", "-f", "mp2"], 4),
    "adts": (["-ar", "48000", "-c:a", "aac", "-f", "adts"], 7),
}


def _encoded(options: list[str], seconds: float) -> bytes:
    tone = ["-f", "lavfi", "-i", f"sine=frequency=440:duration={seconds}"]
    command = ["ffmpeg", "-loglevel", "error", *tone, *options, "-"]
    return subprocess.run(command, capture_output=True, check=True).stdout


def _missing(kind: str, data: bytes) -> int:
    chain = audio_frames.adts_chain if kind == "adts" else audio_frames.mpeg_audio_chain
    return chain(data, 0).missing


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_cut_anywhere_misses_what_the_demuxers_frame_there_holds(kind):
    """Cut at 300 places: inside a frame it misses the rest of that frame (FFmpeg's packet), inside
    a header the rest of the header, and between frames nothing."""
    options, header = KINDS[kind]
    data = _encoded(options, 2)
    with av.open(io.BytesIO(data)) as container:
        frames = [(packet.pos, packet.size) for packet in container.demux(audio=0) if packet.size]
    assert frames[0][0] == 0 and frames[-1][0] + frames[-1][1] == len(data)
    assert _missing(kind, data) == 0
    for cut in np.random.default_rng(0).integers(1, len(data), 300).tolist():
        start, size = next((start, size) for start, size in frames if start < cut <= start + size)
        expected = 0 if cut == start + size else header - (cut - start) if cut - start < header else start + size - cut
        assert _missing(kind, data[:cut]) == expected, (cut, start, size)


def test_a_trailer_or_a_free_format_frame_ends_the_chain_without_a_verdict():
    frame = bytes([0xFF, 0xFF, 0xC4, 0xC0]) + bytes(380)  # MPEG-1 layer I, 384 kbit/s, 48 kHz: 384 bytes
    missing = lambda data: audio_frames.mpeg_audio_chain(data, 0).missing  # noqa: E731
    assert missing(frame * 5 + b"TAG" + bytes(125)) == 0  # an ID3v1 trailer
    assert missing(frame * 5 + frame[:2]) == 2  # a header cut short
    free = frame[:2] + bytes([0x04]) + frame[3:]  # bitrate index 0: no length in the header
    assert missing(frame * 2 + free + frame[:100]) == 0
    assert missing(frame * 3 + frame[:100]) == 284  # the control


def _python_lines_run(function, *args) -> int:
    """How many lines of Python ``function`` runs (every frame a Python loop walks runs its lines)."""
    count = 0

    def tracer(frame, event, arg):
        nonlocal count
        count += event == "line"
        return tracer

    sys.settrace(tracer)
    try:
        function(*args)
    finally:
        sys.settrace(None)
    return count


def test_the_work_in_python_does_not_grow_with_the_frames():
    """20 times the frames, hardly more Python lines: a frame-by-frame walk ran ~10 lines a frame
    (an hour of MP3, 150k frames, took 0.17 s, most of what a 10 s clip of it cost)."""
    short = _encoded(KINDS["mp3_mpeg1"][0], 6)
    long = short * 20
    assert audio_frames.mpeg_audio_chain(long, 0).missing == 0
    few = _python_lines_run(audio_frames.mpeg_audio_chain, short, 0, True)  # measured: the sums too
    many = _python_lines_run(audio_frames.mpeg_audio_chain, long, 0, True)
    frames = len(long) // 384  # at most a 48 kHz 128 kbit/s frame's 384 bytes
    assert many < few + 200 < frames, (few, many, frames)


# FFmpeg's options for MP3s without a Xing/Info header (no frame count declared), each a noise burst
# and silence: constant and variable bitrate, MPEG-1, MPEG-2 and MPEG-2.5 (576 samples a frame), an
# ID3v2 tag before the frames (but where told not to) and, "tagged", ID3v1 (and APEv2) tags after them.
NO_XING = ["-c:a", "libmp3lame", "-write_xing", "0", "-metadata", "title=noise"]
MP3_KINDS = {
    "cbr_mpeg1_tagged": ["-ar", "44100", "-b:a", "128k", "-write_id3v1", "1"],
    "vbr_mpeg1": ["-ar", "48000", "-q:a", "0"],
    "vbr_mpeg2": ["-ar", "22050", "-q:a", "4", "-id3v2_version", "0"],
    "cbr_mpeg25_tagged": ["-ar", "11025", "-b:a", "32k", "-write_id3v1", "1"],
}


def _apev2_tag(key: bytes, value: bytes) -> bytes:
    """An APEv2 tag of one text item, with its header: a 32-byte header and footer ("APETAGEX",
    version 2000, the size of the items and footer, the item count, flags: bit 31 a header is
    present, bit 29 this is the header), as taggers write it before an ID3v1 tag."""
    item = struct.pack("<II", len(value), 0) + key + b"\0" + value
    fields = lambda flags: b"APETAGEX" + struct.pack("<IIII", 2000, len(item) + 32, 1, flags) + bytes(8)  # noqa: E731
    return fields(0xA0000000) + item + fields(0x80000000)


def _burst_and_silence(path, options: list[str]) -> bytes:
    """0.5 s of noise then 1 s of silence, encoded with ``options``: a variable bitrate's frames
    differ in length."""
    sources = ["-f", "lavfi", "-i", "anoisesrc=d=0.5:a=0.5", "-f", "lavfi", "-i", "anullsrc=cl=mono"]
    mix = ["-filter_complex", "[1]atrim=0:1[s];[0][s]concat=v=0:a=1"]
    subprocess.run(["ffmpeg", "-v", "error", "-y", *sources, *mix, *options, str(path)], check=True)
    return path.read_bytes()


def _ffprobe_packets(path) -> list[dict]:
    """Each audio packet's byte position, size, pts and duration (in samples: the stream's time base
    is 1 / its rate only for some files, so its rate is asked too) as ffprobe reads them."""
    entries = ["-show_entries", "packet=pos,size,pts,duration:stream=time_base,sample_rate"]
    command = ["ffprobe", "-v", "error", "-select_streams", "a:0", *entries, "-of", "json", str(path)]
    probed = json.loads(subprocess.run(command, capture_output=True, check=True).stdout)
    return probed["packets"], probed["streams"][0]


@pytest.mark.parametrize("kind", sorted(MP3_KINDS))
def test_an_mp3_without_a_xing_header_lasts_the_frames_ffprobe_reads(tmp_path, kind):
    """Its frame headers chained from after the ID3v2 tag to the tags at its end give ffprobe's
    packets: their count, their samples and where they end (the duration, in samples of its rate);
    and the loader decodes that long. The duration was FFmpeg's packets read every time a clip was
    cut (1.4 s an hour of sound)."""
    path = tmp_path / "a.mp3"
    data = _burst_and_silence(path, [*NO_XING, *MP3_KINDS[kind]])
    if kind.startswith("cbr_mpeg1"):  # an APEv2 tag before the ID3v1 tag
        data = data[:-128] + _apev2_tag(b"Title", b"noise") + data[-128:]
        path.write_bytes(data)
    packets, stream = _ffprobe_packets(path)
    first, last = int(packets[0]["pos"]), int(packets[-1]["pos"]) + int(packets[-1]["size"])
    assert (first > 0) == ("-id3v2_version" not in MP3_KINDS[kind]) and (last < len(data)) == kind.endswith("tagged")
    assert audio_frames.trailer_start(data, first) == last
    rate, base = int(stream["sample_rate"]), Fraction(stream["time_base"])
    end = (int(packets[-1]["pts"]) + int(packets[-1]["duration"])) * base * rate
    assert end.denominator == 1 and int(packets[0]["pts"]) == 0
    assert audio_frames.mpeg_audio_chain(data, first, measure=True).length(last) == (len(packets), int(end), rate)
    if kind.startswith("vbr"):  # a variable bitrate: the frames' lengths differ
        assert len({packet["size"] for packet in packets}) > 2
    audio, _ = decode_audio_file(data, "a.mp3")
    assert abs(audio.shape[1] - Fraction(int(end), rate) * SAMPLE_RATE) <= 1  # the resampler's rounding
    cut = audio_frames.mpeg_audio_chain(data[: last - 1], first, measure=True)
    assert cut.missing == 1 and cut.length(last - 1) is None  # the control: a chain that runs past its end


# FFmpeg's options for raw AAC (ADTS) files, which declare no length: constant and variable
# bitrate, and, "tagged", an ID3v2 tag before the frames and an APEv2 tag after them.
ADTS = ["-c:a", "aac", "-f", "adts", "-metadata", "title=noise"]
ADTS_KINDS = {
    "cbr_48k": ["-ar", "48000", "-b:a", "96k"],
    "vbr_44k1": ["-ar", "44100", "-q:a", "2"],
    "cbr_22k05_tagged": ["-ar", "22050", "-b:a", "64k", "-write_id3v2", "1", "-write_apetag", "1"],
}


@pytest.mark.parametrize("kind", sorted(ADTS_KINDS))
def test_a_raw_aac_file_lasts_the_frames_ffprobe_reads(tmp_path, kind):
    """Its ADTS headers chained from after the ID3v2 tag to the tags at its end give ffprobe's
    packets: their count, their samples (1024 a raw data block) and where they end; and the loader
    decodes that long. The length was FFmpeg's packets, read every time a clip was cut."""
    path = tmp_path / "a.aac"
    data = _burst_and_silence(path, [*ADTS, *ADTS_KINDS[kind]])
    packets, stream = _ffprobe_packets(path)
    first, last = int(packets[0]["pos"]), int(packets[-1]["pos"]) + int(packets[-1]["size"])
    assert (first > 0) == (last < len(data)) == kind.endswith("tagged")
    assert audio_frames.trailer_start(data, first) == last
    rate, base = int(stream["sample_rate"]), Fraction(stream["time_base"])
    end = (int(packets[-1]["pts"]) + int(packets[-1]["duration"])) * base * rate
    assert end.denominator == 1 and int(packets[0]["pts"]) == 0
    chain = audio_frames.adts_chain(data, first, measure=True)
    assert chain.missing == 0 and chain.length(last) == (len(packets), int(end), rate)
    audio, _ = decode_audio_file(data, "a.aac")
    assert abs(audio.shape[1] - Fraction(int(end), rate) * SAMPLE_RATE) <= 1  # the resampler's rounding
    cut = audio_frames.adts_chain(data[: last - 1], first, measure=True)
    assert cut.missing == 1 and cut.length(last - 1) is None  # the control: a chain that runs past its end


def test_an_adts_header_of_a_reserved_rate_or_several_blocks_is_read_as_it_says():
    """A frame of 2 raw data blocks holds 2048 samples; a reserved sampling frequency index (13..15)
    is no frame header: the chain stops before it and no length is given (FFmpeg's packets say it)."""

    def frame(rate_index: int, blocks: int, length: int = 100) -> bytes:
        fields = (0xFFF << 44) | (1 << 40) | (1 << 38) | (rate_index << 34) | (1 << 30)  # AAC LC, no CRC, mono
        fields |= (length << 13) | (0x7FF << 2) | (blocks - 1)
        return fields.to_bytes(7, "big") + bytes(length - 7)

    data = frame(3, 1) + frame(3, 2) + frame(3, 1)  # 48 kHz
    assert audio_frames.adts_chain(data, 0, measure=True).length(len(data)) == (3, 4096, 48_000)
    reserved = frame(3, 1) + frame(13, 1) + frame(3, 1)
    chain = audio_frames.adts_chain(reserved, 0, measure=True)
    assert (chain.missing, chain.end, chain.length(len(reserved))) == (0, 100, None)
    changed = frame(3, 1) + frame(4, 1)  # 48 kHz then 44.1 kHz: FFmpeg's packets say how long
    assert audio_frames.adts_chain(changed, 0, measure=True).length(len(changed)) is None
    assert audio_frames.adts_chain(frame(3, 1) * 2, 0, measure=True).length(200) == (2, 2048, 48_000)  # control


def _calls(function, run, *args) -> int:
    """How many times ``run(*args)`` calls ``function`` (a Python function, by its code)."""
    count = 0

    def tracer(frame, event, arg):
        nonlocal count
        count += event == "call" and frame.f_code is function.__code__
        return None  # no line events: only calls are counted

    sys.settrace(tracer)
    try:
        run(*args)
    finally:
        sys.settrace(None)
    return count


@pytest.mark.parametrize(
    "field, options",
    [
        ("audio.mp3", [*NO_XING, "-ar", "48000", "-b:a", "128k", "-id3v2_version", "0"]),
        ("audio.aac", [*ADTS, "-ar", "48000", "-b:a", "96k"]),
    ],
)
def test_a_file_without_a_length_is_measured_in_one_walk_without_reading_its_packets(tmp_path, field, options):
    """A clip of an MP3 without a Xing header or of a raw AAC file costs as many Python lines
    whatever the file's length: measuring it by FFmpeg's packets, a Python loop over every one of
    them, took 1.4 s an hour. Its frames are walked once, for the truncation check and the length
    (an MP3's were walked twice)."""
    short = _burst_and_silence(tmp_path / field, options)
    long = short * 40  # frames that chain, 60 s
    clip = MediaConfig(clip_seconds=0.2, clip_start="first")
    raw = {"__key__": "k", "meta.json": encode_json({"schema": 1, "caption": "noise"})}
    samples = []
    for data in (short, long):
        sample = decode_sample({**raw, field: data}, media_config=clip)
        samples.append(sample)
    assert samples[1].timing["source_duration_s"] == pytest.approx(40 * samples[0].timing["source_duration_s"])
    few = _python_lines_run(decode_sample, {**raw, field: short}, SchemaContext(), clip)
    many = _python_lines_run(decode_sample, {**raw, field: long}, SchemaContext(), clip)
    frames = 40 * 1.5 * 48_000 // 1152  # at least: 60 s of 1152 samples a frame (AAC's hold 1024)
    assert many < few + 200 < frames, (few, many, frames)
    assert _calls(audio_frames._frame_headers, decode_sample, {**raw, field: long}, SchemaContext(), clip) == 1


def test_the_trailing_tags_are_peeled_in_any_order_and_a_bogus_footer_ends_the_peeling():
    """ID3v1, APEv2 (with its header) and Lyrics3v2 after the frames, stacked as taggers leave them,
    all lie after the frames; an APE footer declaring fewer bytes than itself is no tag (it looped)."""
    frames = bytes([0xFF, 0xFB, 0x90, 0x64]) + bytes(413)  # an MPEG-1 layer III frame's header and body
    id3v1 = b"TAG" + bytes(125)
    lyrics = b"LYRICSBEGIN" + b"IND0000210" + b"000021" + b"LYRICS200"
    for trailer in (id3v1, _apev2_tag(b"Title", b"noise") + id3v1, lyrics + _apev2_tag(b"A", b"b") + id3v1):
        assert audio_frames.trailer_start(frames + trailer) == len(frames), trailer
    bogus = b"APETAGEX" + struct.pack("<IIII", 2000, 0, 0, 0) + bytes(8)
    assert audio_frames.trailer_start(frames + bogus) == len(frames + bogus)
    assert audio_frames.trailer_start(frames + bogus + id3v1) == len(frames + bogus)


def _walked_with_peak(walk, data: bytes) -> tuple[audio_frames.FrameChain, int]:
    """``walk``'s measured chain of ``data`` and the most bytes Python held while walking it."""
    tracemalloc.start()
    try:
        chain = walk(data, 0, measure=True)
        return chain, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize(
    "walk, sync", [(audio_frames.mpeg_audio_chain, b"\xff"), (audio_frames.adts_chain, b"\xff\xf1")]
)
def test_a_file_of_sync_bytes_alone_costs_memory_of_a_chunk_not_of_its_size(walk, sync):
    """Every byte of 0xFF (every pair 0xFF 0xF1) may start a header, none of them a frame's (bitrate
    index 15; sampling frequency index 15): the walk kept ~20 int64 arrays a candidate and walked
    them all, 130 bytes a byte of the file (1 GB and 10 s for 8 MB of MPEG sync bytes)."""
    data = sync * (audio_frames.SEARCH_CHUNK_BYTES * 16 // len(sync))  # 4 MB
    chain, peak = _walked_with_peak(walk, data)
    assert (chain.missing, chain.end, chain.frames) == (0, 0, 0)
    assert peak < 16 * len(data), peak  # ~40 MB: a chunk's candidates


@pytest.mark.parametrize(
    "walk, header, length",
    [(audio_frames.mpeg_audio_chain, b"\xff\xfb\x90", 417), (audio_frames.adts_chain, b"\xff\xf1\x50", 0)],
)
def test_valid_headers_at_every_third_byte_cost_memory_of_a_window_not_of_the_file(walk, header, length):
    """FF FB 90 repeated is an MPEG-1 layer III header (128 kbit/s, 44.1 kHz: 417 bytes, a multiple
    of 3) at every third byte, a chain through the whole file; FF F1 50 an ADTS one whose length
    field reads each candidate a frame. Every header of the file was held at once, with the chain's
    arrays: ~45 bytes a byte (360 MB for 8 MB). The chain is exact: it ends with the last frame
    whose header fits, past the end of the data."""
    data = header * (audio_frames.SEARCH_CHUNK_BYTES * 8 // 3)
    chain, peak = _walked_with_peak(walk, data)
    assert peak < 80 * audio_frames.SEARCH_CHUNK_BYTES, f"peak {peak / 2**20:.0f} MiB for {len(data) >> 20} MiB"
    if length:  # frames at 0, 417, ... while a whole header fits: the last runs past the end
        frames = (len(data) - 4) // length + 1
        assert (chain.frames, chain.samples, chain.rate) == (frames, 1152 * frames, 44_100)
        assert (chain.end, chain.missing) == (frames * length, frames * length - len(data))


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_chain_walked_across_many_windows_gives_the_verdicts_of_one_window(kind, monkeypatch):
    """The chain is walked a window at a time; with windows of 1000 bytes (a frame or two each, some
    frames across a window's end) every cut and the measured length are those of one window."""
    options, _ = KINDS[kind]
    data = _encoded(options, 2)
    walk = audio_frames.adts_chain if kind == "adts" else audio_frames.mpeg_audio_chain
    cuts = [len(data), *np.random.default_rng(1).integers(1, len(data), 60).tolist()]
    whole = [walk(data[:cut], 0, measure=True) for cut in cuts]
    assert whole[0].frames > 20 and whole[0].missing == 0  # the control: many windows' worth of frames
    monkeypatch.setattr(audio_frames, "SEARCH_CHUNK_BYTES", 1000)
    assert [walk(data[:cut], 0, measure=True) for cut in cuts] == whole


@pytest.mark.parametrize("rate, layout", [(16_000, "mono"), (44_100, "stereo"), (96_000, "mono")])
def test_a_cut_flac_is_corrupt_where_ffmpeg_would_decode_a_shorter_sound(tmp_path, rate, layout):
    """FFmpeg decodes the FLAC frames that are there: a file cut between its last two frames was a
    shorter sound (1.944 s of 2), and any cut was unseen by a clip ending before it. Its last frame
    must pass its CRC-16 and end at the samples its STREAMINFO declares. Cut between frames, inside
    the last, in the middle: corrupt, whole and as a clip of its first 0.3 s; whole, and with a
    trailer (an ID3v1 tag, junk FFmpeg reads past), it decodes (the controls)."""
    path = tmp_path / "a.flac"
    tone = ["-f", "lavfi", "-i", f"sine=frequency=440:sample_rate={rate}", "-ac", "2" if layout == "stereo" else "1"]
    subprocess.run(["ffmpeg", "-v", "error", "-y", *tone, "-t", "2", "-c:a", "flac", str(path)], check=True)
    data = path.read_bytes()
    with av.open(io.BytesIO(data)) as container:
        frames = [packet.pos for packet in container.demux(audio=0) if packet.size]
    raw = lambda data: {"__key__": "k", "meta.json": encode_json({"schema": 1}), "audio.flac": data}  # noqa: E731
    clip = MediaConfig(clip_seconds=0.3, clip_start="first")
    for cut in (frames[-1], frames[-2], len(data) - 1, frames[-1] + 10, len(data) // 2):
        with pytest.raises(SampleError, match="corrupt_media: a.flac: truncated file: its "):
            decode_audio_file(data[:cut], "a.flac")
        with pytest.raises(SampleError, match="corrupt_media: audio.flac: truncated file: its "):
            decode_sample(raw(data[:cut]), media_config=clip)
    for trailer in (b"", b"TAG" + bytes(125), bytes(range(100))):
        audio, _ = decode_audio_file(data + trailer, "a.flac")
        assert audio.shape[1] == 2 * SAMPLE_RATE
        assert decode_sample(raw(data + trailer), media_config=clip).audio.shape[1] == 0.3 * SAMPLE_RATE
