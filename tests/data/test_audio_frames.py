"""The MP3 / ADTS frame chains (``data/audio_frames.py``): the bytes a cut file's last frame
misses, against the frames FFmpeg's demuxer places, at work that does not grow frame by frame."""

from __future__ import annotations

import io
import subprocess
import sys

import av
import numpy as np
import pytest

from megatron_cosmos3.data import audio_frames

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
    chain = audio_frames.missing_adts_bytes if kind == "adts" else audio_frames.missing_mpeg_audio_bytes
    return chain(data, 0)


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
    assert audio_frames.missing_mpeg_audio_bytes(frame * 5 + b"TAG" + bytes(125), 0) == 0  # an ID3v1 trailer
    assert audio_frames.missing_mpeg_audio_bytes(frame * 5 + frame[:2], 0) == 2  # a header cut short
    free = frame[:2] + bytes([0x04]) + frame[3:]  # bitrate index 0: no length in the header
    assert audio_frames.missing_mpeg_audio_bytes(frame * 2 + free + frame[:100], 0) == 0
    assert audio_frames.missing_mpeg_audio_bytes(frame * 3 + frame[:100], 0) == 284  # the control


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
    assert audio_frames.missing_mpeg_audio_bytes(long, 0) == 0
    few = _python_lines_run(audio_frames.missing_mpeg_audio_bytes, short, 0)
    many = _python_lines_run(audio_frames.missing_mpeg_audio_bytes, long, 0)
    frames = len(long) // 384  # at most a 48 kHz 128 kbit/s frame's 384 bytes
    assert many < few + 200 < frames, (few, many, frames)
