"""Compressed media in the shards, decoded with PyAV: video files (``mp4``, ``mov``, ``m4v``,
``webm``, ``mkv``, ``avi``) with the audio stream inside them, and audio files (``flac``, ``mp3``, ``m4a``/``aac``,
``opus``, ``ogg``).

Only the clip's window is decoded (docs/DESIGN.md, "Real media"): the container seeks to the last
keyframe at or before the window, frames are decoded up to the last target time, and only the
frames picked (``data/clips.py``, ``pick_frames``: the frame shown at each target time, by its
timestamp) are converted to RGB, shown as the display matrix says (turned, mirrored) and
fitted into the resolution bucket. Audio is decoded from a little before the window (an AAC or Opus
frame needs its predecessor), cut at the window by timestamp and brought to 48 kHz stereo (mono
duplicated) by the audio encoder's own resampler (``encoders/audio_vae.py``, ``to_stereo_48k``).

A picture in a video field (a 1-frame video) shows Pillow's pixels, as a picture field does:
FFmpeg's JPEG decoder turned a YCCK (Adobe CMYK) JPEG into garbage colours and ignores the EXIF
orientation.

Times are seconds from the first video frame (the schema's origin), or from an audio file's start.
A library failure on the bytes is ``corrupt_media``; a stream FFmpeg has no decoder for is
``unsupported_codec`` naming it; a file without the stream asked for is ``missing_stream``.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from functools import partial

import numpy as np
import torch
from PIL import Image

from megatron_cosmos3.data.audio_frames import FrameChain, adts_chain, flac_cut, mpeg_audio_chain, trailer_start
from megatron_cosmos3.data.clips import (
    MediaConfig,
    Window,
    check_clip_bytes,
    fit_to_bucket,
    pick_frames,
    sample_span,
    target_times,
    timestamp_tolerance,
)
from megatron_cosmos3.data.errors import (
    CORRUPT_MEDIA,
    MISSING_STREAM,
    OUT_OF_RANGE,
    UNSUPPORTED_CODEC,
    UNSUPPORTED_CONTAINER,
    ZERO_LENGTH,
    SampleError,
)
from megatron_cosmos3.data.media import (
    AUDIO_RATE_RANGE_HZ,
    DECODE_ERRORS,
    check_not_empty,
    decode_image,
    missing_wav_bytes,
)
from megatron_cosmos3.data.mp4_fragments import (
    box_header,
    declared_fragment_seconds,
    missing_sidx_bytes,
    track_sample_counts,
)
from megatron_cosmos3.encoders.audio_vae import SAMPLE_RATE, to_stereo_48k

# Containers whose structure says how long they are, so a cut file is found (``_missing_bytes``).
VIDEO_SUFFIXES = ("mp4", "mov", "m4v", "webm", "mkv", "avi")
AUDIO_SUFFIXES = ("flac", "mp3", "m4a", "aac", "opus", "ogg")
# Decoded from this long before an audio window, and thrown away: a frame of a transform codec
# (AAC, Opus, MP3) is only exact after its predecessor.
AUDIO_PREROLL_S = 0.1
# Decoded audio may end this much (or one codec frame) before the duration its stream declares; a
# stream that stops earlier inside the clip is a cut file, not a short one.
AUDIO_END_TOLERANCE_S = 0.1
# How far (relative) a stream's average frame rate may be from its nominal one and still be it: a
# rounded duration (a millisecond in 0.3 s) or a dropped frame, not a variable rate.
NOMINAL_RATE_TOLERANCE = 0.005
# How close (relative) FFmpeg's guess of a rate must be to a whole or NTSC rate to be taken for it: a
# Matroska frame duration in whole nanoseconds is within 1.2e-7 of it up to 240 fps (60000/1001 fps
# was 19001/317); the decimal rates 29.97, 59.94 and 23.976 are 1e-6 from NTSC's and stay themselves.
NOMINAL_RATE_PRECISION = 5e-7
# How many of a stream's indexed timestamps say what unit they were rounded to (``_timestamp_unit``).
UNIT_SAMPLES = 1024
# Where in an MP3's first frame a Xing/Info (after the side information) or VBRI header lies, at most.
MP3_LENGTH_HEADER_BYTES = 4 + 32 + 4 + 4
# A fragmented MP4's fragments may end this much before the duration its mehd box declares (a
# writer's rounding, an audio track's priming); a cut between fragments loses a whole fragment.
FRAGMENT_END_TOLERANCE_S = 0.1


@dataclass
class DecodedMedia:
    """A clip decoded from one file: frames at ``fps`` (None for audio-only files), audio at 48 kHz
    stereo (None without an audio stream), the window they cover and the file's durations."""

    window: Window
    frames: np.ndarray | None = None  # (T, H, W, 3) uint8
    fps: float | None = None
    audio: np.ndarray | None = None  # (2, samples) float32 at 48 kHz
    video_duration_s: float | None = None
    audio_duration_s: float | None = None
    picture: bool = False  # a picture in a video field: ``fps`` is FFmpeg's default (25), not the file's


def decode_media_file(
    data: bytes,
    name: str,
    media: MediaConfig,
    window_for: Callable[[float], Window],
    want_video: bool = True,
    want_audio: bool = True,
) -> DecodedMedia:
    """Decodes the window ``window_for(duration_s)`` of a video or audio file (module doc), frames
    at ``media.fps`` (0: the file's rate) in ``media``'s bucket. ``want_video``: the file must have
    a video stream (a video field); ``want_audio``: decode its audio stream if it has one."""
    import av  # PyAV loads FFmpeg's libraries: only a process that reads compressed media pays for it

    check_not_empty(data, name)
    _check_not_without_packets(data, name)
    try:
        with av.open(io.BytesIO(data), metadata_errors="ignore") as container:
            if not container.streams:
                raise SampleError(CORRUPT_MEDIA, f"{name}: not a readable media file (no stream found)")
            chain = _frame_chain(data, container)  # a raw MP3's or AAC file's: one walk for its end and length
            missing = _missing_bytes(data, container, chain)
            if missing:  # FFmpeg reads what is there: a cut index loses streams, cut data loses frames
                detail = f"{name}: truncated file: it declares {missing} bytes more than it holds"
                raise SampleError(CORRUPT_MEDIA, detail)
            _check_fragments_all_there(data, container, name)
            cut = flac_cut(data) if container.format.name == "flac" else None
            if cut:  # FFmpeg decodes the frames there: a FLAC cut between two was a shorter sound
                raise SampleError(CORRUPT_MEDIA, f"{name}: truncated file: {cut}")
            video = container.streams.video[0] if container.streams.video else None
            audio = container.streams.audio[0] if container.streams.audio and want_audio else None
            if want_video and video is None:
                raise SampleError(MISSING_STREAM, f"{name} has no video stream")
            picture = _check_video_container(data, name, container.format) if want_video else None
            if not want_video and audio is None:
                raise SampleError(MISSING_STREAM, f"{name} has no audio stream")
            for stream in (video if want_video else None, audio):
                if stream is not None and stream.codec_context is None:
                    raise SampleError(
                        UNSUPPORTED_CODEC,
                        f"{name}: FFmpeg has no decoder for its {stream.type} stream ({_codec_tag(data, container)})",
                    )
                if stream is not None:  # one decoding thread: the loader's workers are the parallelism
                    stream.codec_context.thread_count = 1
            out = _decode(
                container, data, video if want_video else None, audio, name, media, window_for, picture, chain
            )
    except SampleError:
        raise
    except (av.error.FFmpegError, *DECODE_ERRORS) as error:
        detail = f"{name}: not a readable media file ({type(error).__name__}: {error})"
        raise SampleError(CORRUPT_MEDIA, detail) from None
    return out


def decode_video_file(data: bytes, name: str, fps: float = 0.0) -> tuple[np.ndarray, float | None]:
    """(T, H, W, 3) uint8 RGB frames and the frame rate of a whole video file (mp4, webm, mkv, ...)
    at its own size, upright, and at its own rate, or at ``fps`` (> 0) by the loader's frame
    selection (``media.fps``: the clip lasts as long, its frames are those shown at k / fps):
    generation's conditioning clips. A picture (a 1-frame video) has no rate: None, as a ``.npy``
    clip's (FFmpeg's 25 fps became the request's rate)."""
    media = MediaConfig(fps=fps)
    decoded = decode_media_file(data, name, media, lambda seconds: Window(0.0, seconds), True, False)
    if decoded.picture:  # one frame at any fps: FFmpeg's 0.04 s for it held 3 frames at 60 fps
        return decoded.frames[:1], None
    return decoded.frames, decoded.fps


def _decode(
    container, data: bytes, video, audio, name: str, media: MediaConfig, window_for, picture=None, chain=None
) -> DecodedMedia:
    """``decode_media_file``'s clip; ``picture``: the pixels of a picture in a video field, shown
    for every target (FFmpeg's timing of its one frame); ``chain``: a raw MP3's or AAC file's
    frames (``_frame_chain``)."""
    if video is not None:
        width, height = _display_size(video)
        if width * height > Image.MAX_IMAGE_PIXELS:  # the limit pictures have (a decompression bomb)
            raise SampleError(CORRUPT_MEDIA, f"{name}: {width}x{height} frames exceed {Image.MAX_IMAGE_PIXELS} pixels")
        origin_s = float((video.start_time or 0) * video.time_base)
        # Where the container counts no frames (Matroska/WebM), one read of the packets serves both.
        span = None if video.frames else _packet_span(video, data)
        video_s = _declared_seconds(_stream_seconds(video, container, origin_s, data, span), "video", name)
        rate = _frame_rate(video, video_s, span)
        if not video_s or not rate:
            raise SampleError(ZERO_LENGTH, f"{name}: its video stream has no duration or frame rate")
        audio_s = _stream_seconds(audio, container, origin_s, data, chain=chain) if audio is not None else None
        audio_s = _declared_seconds(audio_s, "audio", name)
        unit = _timestamp_unit(video, rate)
        # At a constant rate frame i is at i / rate: times rounded to the unit are put back there, and
        # are then exact (no leeway at the targets: a 29.97 fps frame 0.03 ms after a 30 fps one is later).
        period = _frame_period(video, rate)
        video_s = _on_grid(video_s, period, 2 * unit)  # a rounded timestamp plus a rounded duration
        tolerance = timestamp_tolerance(0.0 if period else unit)
        window = window_for(video_s)
        fps = media.fps or rate
        # The file's end is a rounded timestamp plus a rounded duration: no target within both roundings of it.
        at_end = window.end_s > video_s - 2 * tolerance
        targets = target_times(window, fps, name, 2 * tolerance if at_end else 0.0)
        check_clip_bytes(len(targets) * height * width * 3, f"{len(targets)} frames of {width}x{height}", name)
        if picture is not None:  # Pillow's pixels, as a picture field's (FFmpeg's can be wrong: module doc)
            frames = np.repeat(picture[None], len(targets), axis=0)
        else:
            size = (width, height)
            frames = _video_window(
                container, video, targets, origin_s, rate, name, size, video_s, tolerance, period, unit
            )
        frames = fit_to_bucket(frames, media.buckets())
        result = DecodedMedia(window, frames, fps, None, video_s, audio_s, picture is not None)
    else:
        origin_s = float((audio.start_time or 0) * audio.time_base)
        audio_s = _declared_seconds(_stream_seconds(audio, container, origin_s, data, chain=chain), "audio", name)
        if not audio_s:
            raise SampleError(ZERO_LENGTH, f"{name}: its audio stream has no duration")
        result = DecodedMedia(window_for(audio_s), audio_duration_s=audio_s)
    if audio is not None and result.audio_duration_s and result.window.start_s < result.audio_duration_s:
        read_from_start = video is None and result.window.start_s <= AUDIO_PREROLL_S  # nothing read yet
        result.audio = _audio_window(
            container, audio, result.window, origin_s, result.audio_duration_s, name, data, not read_from_start
        )
    return result


def _declared_seconds(seconds: float | None, kind: str, name: str) -> float | None:
    """A stream's duration (``_stream_seconds``) where it is one: ``corrupt_media`` naming it where
    it is negative or not finite (a damaged sample table: one bit of an MP4's stts made its video
    last -4.7e14 s, a clip of that "holding no frame")."""
    if seconds is not None and not (math.isfinite(seconds) and seconds >= 0):
        raise SampleError(CORRUPT_MEDIA, f"{name}: its {kind} stream declares a duration of {seconds:.6g} s")
    return seconds


def _frame_rate(stream, seconds: float | None, span: tuple[int, float | None] | None) -> float | None:
    """The stream's frame rate: its nominal rate (FFmpeg's guess from its timestamps, 30000/1001)
    where its average, frames over duration, is within NOMINAL_RATE_TOLERANCE of it, else the
    average (variable frame rate); None without either. One rule for every container, the average
    measured where FFmpeg cannot: it averages a stream whose container counts its frames (MP4/MOV
    sample tables, within their edit lists; AVI's header), but a Matroska/WebM stream's "average"
    is its nominal default duration, so a variable-rate MKV was sampled at its nominal 30 fps
    where the same stream in an MP4 was at its 17 frames a second. There the packets, counted
    without decoding (``span``: ``_packet_span``, None where the container counts the frames), over
    the stream's duration ``seconds`` are the average. A duration rounded to
    milliseconds made 37 frames at 60 fps average 60.065 fps, and targets at that rate fell a frame
    early by the 13th frame."""
    nominal = _nominal_rate(stream)
    if span is None:
        average = stream.average_rate
    else:
        average = span[0] / seconds if span[0] and seconds else None
    if (
        average
        and nominal
        and (abs(average / nominal - 1) <= NOMINAL_RATE_TOLERANCE or _lasts_its_frames(stream, nominal, seconds, span))
    ):
        return float(nominal)
    return float(average or nominal or 0) or None


def _nominal_rate(stream) -> Fraction | None:
    """FFmpeg's guess of the stream's rate, or the whole or NTSC (n * 1000 / 1001) rate it is a
    rounding of (within NOMINAL_RATE_PRECISION): from a Matroska/WebM frame duration in whole
    nanoseconds it guessed 59.94 fps as 19001/317, and a clip's rate written back was that."""
    guessed = stream.guessed_rate
    if not guessed:
        return None
    for standard in (Fraction(round(guessed)), Fraction(round(guessed * Fraction(1001, 1000)) * 1000, 1001)):
        if standard and abs(guessed / standard - 1) <= NOMINAL_RATE_PRECISION:
            return standard
    return Fraction(guessed)


def _frame_period(stream, rate: float) -> float | None:
    """Seconds between frames where the stream is at its nominal rate (``_frame_rate`` found its
    average a rounding of it), None at a variable rate."""
    nominal = _nominal_rate(stream)
    return float(1 / nominal) if nominal and rate == float(nominal) else None


def _on_grid(seconds: float, period: float | None, leeway: float) -> float:
    """``seconds`` moved to the nearest multiple of ``period`` where it lies within ``leeway`` of it
    (a time rounded to the container's unit: a Matroska millisecond, an MP4 of a WebM's), else as it
    is (a frame off the grid; no ``period``: a variable rate)."""
    if period is None:
        return seconds
    on = round(seconds / period) * period
    return on if abs(seconds - on) <= leeway + 1e-6 else seconds  # and a rate's float rounding


def _lasts_its_frames(stream, nominal, seconds: float | None, span: tuple[int, float | None] | None) -> bool:
    """Whether the ``span``'s frames at the ``nominal`` rate last ``seconds`` to within one tick of
    the stream's time base: Matroska/WebM count milliseconds, so one frame at 30 fps lasts "33 ms",
    an average of 30.3 fps, 1% off (a rounding NOMINAL_RATE_TOLERANCE only forgives over 0.2 s)."""
    if span is None or not span[0] or not seconds or not stream.time_base:
        return False
    return abs(span[0] / float(nominal) - seconds) <= float(stream.time_base)


def _display_size(stream) -> tuple[int, int]:
    """(width, height) of the stream's pictures as a player shows them: its first frame's size,
    wider or narrower by its sample aspect ratio (anamorphic video: 720x480 stored at 32:27 shows
    as 853x480), which the container or else the codec declares."""
    width, height = stream.codec_context.width, stream.codec_context.height
    ratio = stream.sample_aspect_ratio or stream.codec_context.sample_aspect_ratio
    if ratio and ratio > 0 and ratio != 1:
        width = max(1, round(width * ratio))
    return width, height


def _stream_seconds(
    stream,
    container,
    origin_s: float,
    data: bytes,
    span: tuple[int, float | None] | None = None,
    chain: FrameChain | None = None,
) -> float | None:
    """The stream's duration in seconds from the origin: its own, else the container's where it is
    the file's only stream, else the end of its last packet, read without decoding: a file written
    to a pipe declares no duration, and Matroska/WebM declare only the file's, the end of whichever
    stream lasts longer (a WebM whose sound ran 60 ms past its picture was taken for a video cut
    60 ms short). Packets are read by a second reader of ``data``: the decoding container stays at
    its start (seeking back fails in a stream without packets, and the sound's seek did not bring
    the picture back); ``span``: the stream's ``_packet_span`` where the caller has read it; a raw
    MP3 or AAC file that declares no length lasts its ``chain`` of frames (``_frame_chain_seconds``)
    where that reaches its end."""
    guessed = _duration_is_a_bitrate_guess(data, container)
    if stream.duration is not None and not guessed:
        start = float((stream.start_time or 0) * stream.time_base)
        return start - origin_s + float(stream.duration * stream.time_base)
    if container.duration is not None and len(container.streams) == 1 and not guessed:
        return container.duration / 1_000_000 - origin_s
    end = _frame_chain_seconds(stream, data, chain) if guessed and chain is not None else None
    end = end if end is not None else (span or _packet_span(stream, data))[1]
    return None if end is None else end - origin_s


def _duration_is_a_bitrate_guess(data: bytes, container) -> bool:
    """Whether FFmpeg's duration of the file is its size over its first frames' bitrate: a raw AAC
    (ADTS) file declares no length, nor does an MP3 without a Xing/Info/VBRI header (its frame
    count). A variable-bitrate one was guessed 7.4 s long for 4 s of sound (a whole file refused as
    cut) or 2.2 s (a clip silently cut short); ``_stream_seconds`` measures it instead."""
    if container.format.name == "aac":
        return True
    return container.format.name == "mp3" and _mp3_length_header(data) is None


def _mp3_length_header(data: bytes) -> int | None:
    """Where the Xing/Info or VBRI header in an MP3's first frame (after its ID3v2 tag) starts, the
    frame that declares the file's frame count; None without one."""
    start = _id3v2_end(data)
    first_frame = data[start : start + MP3_LENGTH_HEADER_BYTES]
    found = [at for at in (first_frame.find(tag) for tag in (b"Xing", b"Info", b"VBRI")) if at >= 0]
    return start + min(found) if found else None


def _mp3_declared_frames(data: bytes) -> int | None:
    """The frame count an MP3's Xing/Info header (where its flags' bit 0 says it holds one) or VBRI
    header declares; None without one or where no frame header follows the ID3v2 tag."""
    start, at = _id3v2_end(data), _mp3_length_header(data)
    if at is None or data[start : start + 1] != b"\xff":
        return None
    if data[at : at + 4] == b"VBRI":
        field = data[at + 14 : at + 18]  # after version, delay, quality and the byte count
    else:
        field = data[at + 8 : at + 12] if len(data) >= at + 8 and data[at + 7] & 1 else b""
    return int.from_bytes(field, "big") if len(field) == 4 else None


def _frame_chain(data: bytes, container) -> FrameChain | None:
    """The frames of a raw AAC (ADTS) file or an MP3 (MPEG-1/2/2.5 audio, layer I-III), each
    one's length read from its header, chained from after its ID3v2 tag (``audio_frames``); None
    for other formats. One walk says where a cut file's last frame ends (``_missing_bytes``) and,
    where the file declares no length (``_duration_is_a_bitrate_guess``), how long its frames last
    (``_frame_chain_seconds``): a clip of an MP3 without a Xing header walked its frames twice."""
    walk = {"aac": adts_chain, "mp3": mpeg_audio_chain}.get(container.format.name)
    if walk is None:
        return None
    return walk(data, _id3v2_end(data), _duration_is_a_bitrate_guess(data, container))


def _mp3_frames(data: bytes) -> tuple[int, int, int] | None:
    """(frames, samples, sample rate) of an MP3's frames, chained from after its ID3v2 tag to
    exactly its trailing tags (``audio_frames``); None where they do not reach them."""
    start = _id3v2_end(data)
    return mpeg_audio_chain(data, start, measure=True).length(trailer_start(data, start))


def _frame_chain_seconds(stream, data: bytes, chain: FrameChain) -> float | None:
    """Where the sound of a raw MP3 or AAC file that declares no length ends (seconds), by its
    measured ``chain`` of frames, which must end exactly at its trailing tags; None where they do
    not (FFmpeg resyncs past damaged bytes: its packets are counted instead) or their rate is not
    the stream's (an HE-AAC stream's is twice its ADTS headers')."""
    length = chain.length(trailer_start(data, _id3v2_end(data)))
    if length is None or length[2] != stream.rate:
        return None
    return float((stream.start_time or 0) * stream.time_base) + length[1] / length[2]


def _packet_span(stream, data: bytes) -> tuple[int, float | None]:
    """(packets, the end of the last in seconds or None) of ``stream``, read without decoding by a
    second reader of ``data`` (``_stream_seconds`` says why)."""
    import av

    count, end = 0, None
    with av.open(io.BytesIO(data), metadata_errors="ignore") as reader:
        for packet in reader.demux(reader.streams[stream.index]):
            if packet.pts is not None:
                count += 1
                packet_end = float((packet.pts + (packet.duration or 0)) * stream.time_base)
                end = packet_end if end is None else max(end, packet_end)
    return count, end


def _video_window(
    container,
    stream,
    targets: np.ndarray,
    origin_s: float,
    rate: float,
    name: str,
    size: tuple[int, int],
    declared_s: float,
    tolerance: float,
    period: float | None = None,
    unit: float = 0.0,
) -> np.ndarray:
    """The frames shown at ``targets`` (seconds from the origin), decoded from the keyframe before,
    as ``size`` (width, height) RGB (``_to_rgb``); a frame stamped up to ``tolerance`` after a target
    is shown at it (``timestamp_tolerance``); at a constant rate (a frame ``period``) a frame's time
    rounded to the ``unit`` is put back on the frame grid, and so is the last one's end
    (``_on_grid``). The last frame shows until the stream's declared end ``declared_s`` where that
    is less than a frame period after it (an edit list that starts between two frames: FFmpeg drops
    the partly shown one and the stream lasts that much longer); frames that stop earlier are a cut
    file."""
    lead_s, fresh = (int(stream.codec_context.has_b_frames) + 2) / rate, True
    while True:
        # The keyframe to decode from must be shown at or before the window: seeking by decoding time
        # can land on one shown after it (B-frames), whose leading frames (open GOP: shown before it,
        # referring to the GOP before) the decoder drops. Then the search starts further back.
        seek_s = targets[0] - lead_s
        if seek_s > 0 or not fresh:  # a fresh container reads from the start (a stream without frames cannot seek)
            seek_to = max(math.floor((max(seek_s, 0.0) + origin_s) / stream.time_base), stream.start_time or 0)
            container.seek(seek_to, stream=stream, backward=True, any_frame=False)
        place = partial(_on_grid, period=period, leeway=unit / 2)
        times, frames, ended, key_s = _decode_frames(container, stream, targets, origin_s, tolerance, place)
        if seek_s <= 0 or (key_s is not None and key_s <= targets[0] + tolerance):
            break
        lead_s, fresh = lead_s * 4, False
    end = math.inf
    if ended and frames:  # the stream ended: its last frame shows for its duration (a frame period if unstated)
        last = frames[-1]
        end = times[-1] + (float(last.duration * stream.time_base) if last.duration else 1.0 / rate)
        end = _on_grid(end, period, 2 * unit)  # a rounded timestamp plus a rounded duration
        if end < declared_s < end + 1.0 / rate:
            end = declared_s
    return _to_rgb(frames, pick_frames(np.asarray(times), targets, end, name, tolerance), size)


def _timestamp_unit(stream, rate: float) -> float:
    """The unit (seconds) the stream's timestamps were rounded to: its time base, or a multiple of
    it that every indexed frame's timestamp is (an MP4's index lists every frame) where that is at
    most a quarter of a frame period (a rounding, not the frames' own spacing): a WebM's
    milliseconds remuxed into an MP4's 1/16000 base put 30 fps frames 33 or 34 ms apart, and half a
    1/16000 tick of leeway showed every third frame one target late."""
    base = float(stream.time_base)
    entries = stream.index_entries
    if not stream.frames or len(entries) != stream.frames:
        return base
    first, ticks = entries[0].timestamp, 0
    for entry in entries[1:UNIT_SAMPLES]:
        ticks = math.gcd(ticks, entry.timestamp - first)
    return ticks * base if ticks > 1 and ticks * base <= 0.25 / rate else base


def _decode_frames(container, stream, targets: np.ndarray, origin_s: float, tolerance: float, place):
    """Decodes from where the container stands to the last target (each frame's time ``place``d:
    ``_on_grid``): (times, frames) from the last
    frame at or before the first target on, whether the stream ended (no frame past the last
    target), and the time of the first keyframe decoded (None without one). Only frames that
    ``pick_frames`` will pick are kept (the first, the last and those shown at a target; the
    others are None): a 120 fps stream sampled at 1 fps held every decoded frame until the clip
    was picked, 12 MB each at 4K, so a minute of it took tens of GB for 60 pictures."""
    times, frames, key_s = [], [], None
    shown_at = targets + tolerance  # the times pick_frames compares frame timestamps with
    for frame in container.decode(stream):
        if frame.pts is None:
            continue
        t = place(float(frame.pts * stream.time_base) - origin_s)
        if key_s is None and frame.key_frame:
            key_s = t
        if times and t <= times[-1]:
            continue  # a repeated timestamp: the first frame holds it
        if t > targets[-1] + tolerance:
            return times, frames, False, key_s
        if t <= targets[0] + tolerance:
            times, frames = [], []  # this frame supersedes every earlier one
        elif len(frames) > 1:  # the first frame shows from the window's start, whatever its time
            first = np.searchsorted(shown_at, times[-1], side="left")
            if first == len(shown_at) or shown_at[first] >= t:
                frames[-1] = None  # no target falls between it and this frame: never shown
        times.append(t)
        frames.append(frame)
    return times, frames, True, key_s


def _to_rgb(frames: list, picked: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The picked frames as upright (T, H, W, 3) uint8 RGB, each distinct frame converted once, by
    FFmpeg's scale filter as the ``ffmpeg`` command converts them (``_rgb_graph``); frames of
    another size (a stream whose resolution changes) are scaled to ``size`` (width, height), as the
    command scales them to its first frame's."""
    graphs: dict[tuple, object] = {}  # one conversion graph per kind of frame: made once a clip
    converted: dict[int, np.ndarray] = {}
    for index in np.unique(picked):
        frame = frames[index]
        kind = (frame.width, frame.height, frame.format.name)
        graph = graphs.get(kind) or graphs.setdefault(kind, _rgb_graph(frame, size))
        graph.push(frame)
        rgb = graph.pull().to_ndarray()
        matrix = frame.side_data.get("DISPLAYMATRIX")
        converted[int(index)] = _upright(rgb, np.frombuffer(bytes(matrix), np.int32)) if matrix is not None else rgb
    return np.stack([converted[int(i)] for i in picked])


def _rgb_graph(frame, size: tuple[int, int]):
    """A filter graph from frames like ``frame`` to ``size`` rgb24, bicubic (the ``ffmpeg``
    command's scaler). Not a bare swscale context (PyAV's reformatter): the scale filter also hands
    swscale the frames' chroma siting and colour details, without which 10-bit 4:2:0 and 4:2:2
    colour differs from the command's by up to ~100 levels at sharp chroma edges (no swscale flag
    makes up for it); on 8-bit 4:2:0 both give the same pixels."""
    import av

    graph = av.filter.Graph()
    time_base = frame.time_base or Fraction(1, 1000)
    chain = [
        graph.add_buffer(width=frame.width, height=frame.height, format=frame.format.name, time_base=time_base),
        graph.add("scale", f"{size[0]}:{size[1]}:flags=bicubic"),
        graph.add("format", "rgb24"),
        graph.add("buffersink"),
    ]
    for source, sink in zip(chain, chain[1:]):
        source.link_to(sink)
    graph.configure()
    return graph


def _upright(rgb: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` pixels as FFmpeg's player shows them under a display matrix (9 int32, 16.16
    fixed point): the quarter turns, flips and turned flips of ``ffmpeg``'s autorotate, decided as
    it decides them (its rotation angle rounded to a degree, then the signs of the matrix).
    Other angles (rare: FFmpeg rotates by them with black corners) are left unrotated."""
    a, b, c, d = (float(matrix[i]) for i in (0, 1, 3, 4))
    if math.hypot(a, c) == 0 or math.hypot(b, d) == 0:  # no rotation can be read from it (FFmpeg: NaN)
        return rgb
    theta = round(math.degrees(math.atan2(b / math.hypot(b, d), a / math.hypot(a, c))))
    theta -= 360 * math.floor(theta / 360 + 0.9 / 360)
    if theta == 90:  # "transpose=cclock_flip" (a mirrored turn), else "transpose=clock"
        shown = rgb.transpose(1, 0, 2) if c > 0 else np.rot90(rgb, k=-1)
    elif theta == 180:  # "hflip" and / or "vflip"
        shown = rgb[:, ::-1] if a < 0 else rgb
        shown = shown[::-1] if d < 0 else shown
    elif theta == 270:  # "transpose=clock_flip", else "transpose=cclock"
        shown = rgb[::-1, ::-1].transpose(1, 0, 2) if c < 0 else np.rot90(rgb, k=1)
    elif theta == 0:  # "vflip" when mirrored top to bottom
        shown = rgb[::-1] if d < 0 else rgb
    else:
        shown = rgb
    return shown if shown is rgb else np.ascontiguousarray(shown)


def _audio_window(
    container,
    stream,
    window: Window,
    origin_s: float,
    declared_s: float,
    name: str,
    data: bytes,
    seek: bool = True,
) -> np.ndarray:
    """``(2, samples)`` float32 at 48 kHz covering ``window`` (shorter where the stream ends, at
    ``declared_s``; ``corrupt_media`` where its data ends earlier, see AUDIO_END_TOLERANCE_S).
    ``seek=False``: the container has read nothing yet and the window starts within the preroll, so
    it decodes from its start (a FLAC of a few samples has no seek point: FFmpeg refuses to seek).
    A seek FFmpeg refuses in a stream of no packet (``data`` read again to count them: an empty
    audio track beside a good video track, in MP4 or Matroska) is ``zero_length`` naming it; it was
    "not a readable media file (PermissionError: Operation not permitted)"."""
    import av

    rate = stream.rate
    if not AUDIO_RATE_RANGE_HZ[0] <= rate <= AUDIO_RATE_RANGE_HZ[1]:  # as a WAV's, before resampling it
        raise SampleError(OUT_OF_RANGE, f"{name}: its sound is at {rate} Hz, outside {list(AUDIO_RATE_RANGE_HZ)}")
    seconds = min(window.duration_s, declared_s - window.start_s)
    check_clip_bytes(math.ceil(seconds * max(rate, SAMPLE_RATE)) * 2 * 4, f"{seconds:.1f} s of sound", name)
    layout = "mono" if stream.channels == 1 else "stereo"
    start = max(window.start_s - AUDIO_PREROLL_S, 0.0)
    if seek:
        try:
            container.seek(max(math.floor((start + origin_s) / stream.time_base), 0), stream=stream, backward=True)
        except av.error.FFmpegError:
            if _packet_span(stream, data)[0]:
                raise
            raise SampleError(
                ZERO_LENGTH, f"{name}: its audio stream has no samples (its track holds no packet)"
            ) from None
    resampler = av.AudioResampler(format="fltp", layout=layout, rate=rate)
    first_sample, chunks, decoded = None, [], 0
    needed, count = sample_span(window, rate, origin_s)
    for frame in container.decode(stream):
        if first_sample is None:
            if frame.pts is None:  # not placed yet: nothing to cut by
                continue
            first_sample = round(float(frame.pts * stream.time_base) * rate)
        # Sound is contiguous: a frame without a timestamp (a WAV of ADPCM blocks stamps every other
        # one) follows its predecessor; skipping it lost half the sound.
        for out in resampler.resample(frame):
            chunks.append(out.to_ndarray())
            decoded += chunks[-1].shape[1]
        if first_sample + decoded >= needed + count:
            break
    if first_sample is None:
        raise SampleError(ZERO_LENGTH, f"{name}: its audio stream has no samples")
    waveform = np.concatenate(chunks, axis=1)
    begin = needed - first_sample
    if begin < 0:  # the stream starts after the window does: the missing start is silence
        waveform, begin = np.pad(waveform, ((0, 0), (-begin, 0))), 0
    cut = waveform[:, begin : begin + count]
    ends_s = window.start_s + cut.shape[1] / rate
    frame_s = (stream.codec_context.frame_size or 0) / rate
    if ends_s < min(window.end_s, declared_s) - max(AUDIO_END_TOLERANCE_S, frame_s):
        raise SampleError(
            CORRUPT_MEDIA,
            f"{name}: its audio data ends at {ends_s:.3f} s but the stream declares {declared_s:.3f} s (truncated?)",
        )
    if cut.shape[1] == 0:
        raise SampleError(ZERO_LENGTH, f"{name}: no audio samples in the clip {window}")
    stereo = to_stereo_48k(torch.from_numpy(np.ascontiguousarray(cut, dtype=np.float32)), rate)
    return np.ascontiguousarray(stereo.numpy())


def _check_video_container(data: bytes, name: str, demuxer) -> np.ndarray | None:
    """A video field's bytes, whatever its suffix, must be a container whose structure says how long
    it is (MP4/MOV, Matroska/WebM, AVI: ``_missing_bytes`` finds a cut one), or a picture (a 1-frame
    video), which Pillow reads whole or refuses as cut: its pixels are returned (None for a video).
    FFmpeg reads MPEG-TS/PS or FLV bytes to where they stop: a cut one was a shorter clip, never a
    cut file."""
    if taken_video_suffix(demuxer.name) is not None:
        return None
    if is_picture_demuxer(demuxer.name):
        return decode_image(data, name)
    raise SampleError(UNSUPPORTED_CONTAINER, f"{name}: {untaken_container_detail(demuxer)}")


def untaken_container_detail(demuxer) -> str:
    """Why a video in FFmpeg's ``demuxer`` (a container other than ``taken_video_suffix``'s) is refused."""
    return (
        f"a {demuxer.long_name or demuxer.name} file; video fields take MP4/MOV, Matroska/WebM or AVI, "
        "whose structure says how long they are (remux it: ffmpeg -i IN -c copy OUT.mkv)"
    )


def taken_video_suffix(demuxer_name: str) -> str | None:
    """The video field suffix for bytes that FFmpeg's ``demuxer_name`` reads, where a video field
    takes them (``_check_video_container``): ``mp4`` for the MP4/MOV family (3GP, F4V and M4V
    too), ``mkv`` for Matroska/WebM, ``avi``; None for any other container."""
    if demuxer_name.startswith("mov"):
        return "mp4"
    if demuxer_name.startswith("matroska"):
        return "mkv"
    return "avi" if demuxer_name == "avi" else None


def is_picture_demuxer(demuxer_name: str) -> bool:
    """Whether FFmpeg reads these bytes as a picture (its image2 and ``*_pipe`` demuxers)."""
    return demuxer_name == "image2" or demuxer_name.endswith("_pipe")


def _missing_bytes(data: bytes, container, chain: FrameChain | None = None) -> int:
    """How many bytes the container's own structure declares beyond the end of ``data``: the MP4/MOV
    index and the samples it lists, the Matroska/WebM segment, the AVI's RIFF chunks, the WAV data
    chunk, the last Ogg page (or a stream without its end page), the last ADTS or MP3 frame (its
    ``chain``: ``_frame_chain``; 0 for other formats: FFmpeg judges them). Bytes after the last box
    or the segment (a tool's junk, padding) are no part of it.

    A raw AAC file's frames declare their own length; FFmpeg estimates the duration from the bytes
    there, so a cut file was a shorter clip. An MP3 without a Xing/Info header declares no duration
    and its frames are measured: a cut file was a shorter sound (with the header, FFmpeg declares
    its duration and ``_audio_window`` finds the missing end; a file cut between frames without it
    declares nothing that finds the cut). The walk stops at the first bytes that are no frame
    header (an ID3v1 or APE trailer, a free-format frame, whose length is not in its header, or a
    damaged one: FFmpeg judges those)."""
    if container.format.name.startswith("mov"):
        return max(_missing_box_bytes(data), _missing_sample_bytes(data, container), missing_sidx_bytes(data))
    if container.format.name.startswith("matroska"):
        return _missing_segment_bytes(data)
    if container.format.name == "wav":
        return missing_wav_bytes(data)
    if container.format.name == "avi":
        return _missing_riff_bytes(data)
    if container.format.name == "ogg":
        return _missing_ogg_bytes(data)
    return chain.missing if chain is not None else 0


def _check_fragments_all_there(data: bytes, container, name: str) -> None:
    """A fragmented MP4 cut between two fragments holds only whole boxes; where its ``mehd`` box
    declares the whole duration, fragments that end earlier (``FRAGMENT_END_TOLERANCE_S``) are a
    cut file (``mp4_fragments``)."""
    if not container.format.name.startswith("mov") or container.duration is None:
        return
    declared_s, there_s = declared_fragment_seconds(data), container.duration / 1_000_000
    if declared_s is not None and there_s < declared_s - FRAGMENT_END_TOLERANCE_S:
        detail = (
            f"{name}: truncated file: its fragments end at {there_s:.3f} s but its mehd box declares {declared_s:.3f} s"
        )
        raise SampleError(CORRUPT_MEDIA, detail)


@dataclass(frozen=True)
class OggPage:
    """An Ogg page's header fields: where it starts and ends (``end`` past the data where the page
    is cut; the end of its segment table where that is cut), its header type flags (2: the first
    page of a stream, 4: its last), granule position (the stream's samples to its last packet's
    end; 0 on header pages, -1 where no packet ends on the page) and stream serial number."""

    offset: int
    end: int
    flags: int
    granule: int
    serial: bytes


def _ogg_pages(data: bytes):
    """The Ogg pages from the start of ``data`` (``OggPage``), up to the first bytes that are no
    page header or the first page cut short (the last yielded)."""
    offset = 0
    while offset + 27 <= len(data) and data[offset : offset + 4] == b"OggS":
        segments = data[offset + 26]
        end = offset + 27 + segments
        if end <= len(data):
            end += sum(data[offset + 27 : end])
        granule = int.from_bytes(data[offset + 6 : offset + 14], "little", signed=True)
        yield OggPage(offset, end, data[offset + 5], granule, data[offset + 14 : offset + 18])
        if end > len(data):
            return
        offset = end


def _missing_ogg_bytes(data: bytes) -> int:
    """How many bytes an Ogg file's last page (Vorbis, Opus, FLAC in Ogg) declares beyond its end.
    A file cut between pages is found by its streams: each one that began (BOS) must end on an
    end-of-stream page (1 where one does not: the count is unknown). FFmpeg measures an Ogg file
    by its last page, so a cut one was a shorter clip. Bytes that are no page (a trailer) are no
    part of it."""
    offset, begun, ended = 0, set(), set()
    for page in _ogg_pages(data):
        if page.end > len(data):
            return page.end - len(data)
        begun.update([page.serial] if page.flags & 2 else [])
        ended.update([page.serial] if page.flags & 4 else [])
        offset = page.end
    tail = data[offset:]
    if 0 < len(tail) < 27 and b"OggS".startswith(tail[:4]):  # a page header cut short
        return 27 - len(tail)
    return 1 if begun - ended else 0


def _check_not_without_packets(data: bytes, name: str) -> None:
    """``zero_length`` for a file that holds its headers and no media packet, named as such: FFmpeg
    failed to open them with "End of file" (an Ogg file of header pages only, as ffmpeg writes 0
    samples of Vorbis or Opus, with no end-of-stream page; a Matroska/WebM file of 0 frames) or
    "Invalid data found" (an MP3 or ADTS file of an ID3 tag alone), or opened them as a file of no
    stream (an MP4/MOV whose moov holds no track, as ffmpeg writes 0 samples) or of streams of no
    duration (one whose tracks list no sample). An Ogg stream places no sample where no page's
    granule position is above 0; one cut right after its headers reads the same as an empty one."""
    if data[:4] == b"OggS":
        if any(page.granule > 0 for page in _ogg_pages(data)):  # a page of sound, the 3rd or 4th
            return
        pages = list(_ogg_pages(data))
        if pages and all(page.end <= len(data) for page in pages):  # else cut in a page: _missing_bytes says so
            detail = f"an Ogg file of {len(pages)} header pages, no audio packet"
            raise SampleError(ZERO_LENGTH, f"{name}: its audio stream has no samples ({detail})")
    elif data[:3] == b"ID3" and len(data) >= _id3v2_end(data) >= trailer_start(data, _id3v2_end(data)):
        raise SampleError(ZERO_LENGTH, f"{name}: its audio stream has no samples (an ID3 tag and no audio frame)")
    elif _mp3_declared_frames(data) == 0 and (_mp3_frames(data) or (0,))[0] == 1:  # the header's frame alone
        detail = "an MP3 of its Xing/Info header frame alone, declaring 0 frames"
        raise SampleError(ZERO_LENGTH, f"{name}: its audio stream has no samples ({detail})")
    elif data[:4] == EBML_MAGIC and _segment_holds_no_cluster(data):
        detail = "a Matroska/WebM file of its headers, no cluster of frames or sound"
        raise SampleError(ZERO_LENGTH, f"{name}: its streams have no frames or samples ({detail})")
    elif data[4:8] in MP4_FIRST_BOXES and (detail := _mp4_without_samples(data)):
        raise SampleError(ZERO_LENGTH, f"{name}: its streams have no frames or samples ({detail})")


def _mp4_without_samples(data: bytes) -> str | None:
    """What an MP4/MOV file whose whole moov lists no sample, and no fragment follows, holds
    (``mp4_fragments.track_sample_counts``); None for any other file, and for a fragmented one
    whose sidx or mehd box declares fragments that are not there, or whose index box (a fragment's
    moof) is cut short (a cut file: ``_missing_bytes``, ``_check_fragments_all_there``; one cut
    inside its first moof was "of 1 track listing no sample")."""
    counts = track_sample_counts(data)
    if counts is None or any(counts) or missing_sidx_bytes(data) or declared_fragment_seconds(data):
        return None
    if _missing_box_bytes(data):
        return None
    if not counts:
        return "an MP4/MOV file whose moov holds no track"
    return f"an MP4/MOV file of {len(counts)} {'track' if len(counts) == 1 else 'tracks'} listing no sample"


def _id3v2_end(data: bytes) -> int:
    """Where the ID3v2 tag at the start of an MP3 or ADTS file ends (0 without one): its 10-byte
    header, the size it declares, and the 10-byte footer that ID3v2.4 flags (bit 4)."""
    if data[:3] != b"ID3" or len(data) < 10:
        return 0
    return 10 + _syncsafe(data[6:10]) + (10 if data[5] & 0x10 else 0)


def _syncsafe(four: bytes) -> int:
    """An ID3v2 size: four bytes of seven bits each."""
    return sum((byte & 0x7F) << (7 * (3 - i)) for i, byte in enumerate(four))


def _missing_riff_bytes(data: bytes) -> int:
    """How many bytes an AVI's top-level RIFF chunks (``AVI `` and OpenDML's ``AVIX`` beyond 1 GB)
    declare beyond the end of the file (0 when complete; a size of 0 is a recording never finalised:
    FFmpeg judges it)."""
    offset = 0
    while offset + 8 <= len(data) and data[offset : offset + 4] == b"RIFF":
        size = int.from_bytes(data[offset + 4 : offset + 8], "little")
        if size == 0:
            return 0
        if offset + 8 + size > len(data):
            return offset + 8 + size - len(data)
        offset += 8 + size + (size & 1)
    return 0


def _ebml_number(data: bytes, offset: int) -> tuple[int, int, bool] | None:
    """An EBML variable-length number at ``offset``: (value, length, all value bits set), or None
    where the data ends first or no length marker is found."""
    if offset >= len(data) or data[offset] == 0:
        return None
    length = 9 - data[offset].bit_length()
    if offset + length > len(data):
        return None
    value = int.from_bytes(data[offset : offset + length], "big") & ((1 << (7 * length)) - 1)
    return value, length, value == (1 << (7 * length)) - 1


def _ebml_element(data: bytes, offset: int) -> tuple[int, int] | None:
    """(ID bytes, total bytes: ID, size and content) of the EBML element at ``offset``; None where
    the data ends first, no length marker is found or the size is left unknown (a live writer's)."""
    element = _ebml_number(data, offset)
    size = _ebml_number(data, offset + element[1]) if element else None
    return None if size is None or size[2] else (element[1], element[1] + size[1] + size[0])


def _segment_span(data: bytes) -> tuple[int, int] | None:
    """Where a Matroska/WebM file's segment's children start and where it declares it ends (after
    the EBML header); None where too short to judge or of unknown size."""
    header = _ebml_element(data, 0)
    segment = _ebml_element(data, header[1]) if header else None
    if segment is None:
        return None
    size = _ebml_number(data, header[1] + segment[0])  # the segment's children follow its size
    return header[1] + segment[0] + size[1], header[1] + segment[1]


def _segment_holds_no_cluster(data: bytes) -> bool:
    """Whether a whole Matroska/WebM segment holds no Cluster (the elements of frames and sound):
    its elements read to its end without one. False where one is found first, or the segment or an
    element of it is of unknown size or runs past the end (a cut file: ``_missing_segment_bytes``),
    bytes are no element, or more than ``SEGMENT_ELEMENTS_READ`` elements come before any cluster
    (FFmpeg judges the file)."""
    span = _segment_span(data)
    if span is None or span[1] > len(data):
        return False
    offset = span[0]
    for _ in range(SEGMENT_ELEMENTS_READ):
        if offset >= span[1]:
            return True
        element = _ebml_element(data, offset)
        if element is None or offset + element[1] > span[1] or data[offset : offset + element[0]] == CLUSTER:
            return False
        offset += element[1]
    return offset >= span[1]


def _missing_segment_bytes(data: bytes) -> int:
    """How many bytes a Matroska/WebM file's segment declares beyond its end (0 when complete, or
    of unknown size as a live stream writes it: FFmpeg decides)."""
    span = _segment_span(data)
    return 0 if span is None else max(span[1] - len(data), 0)


# A Matroska/WebM file's first bytes (its EBML header's ID), and the ID of a Cluster, the segment's
# element that holds frames and sound.
EBML_MAGIC, CLUSTER = b"\x1a\x45\xdf\xa3", b"\x1f\x43\xb6\x75"
# The segment's elements read for a cluster: a file's few (seek head, info, tracks, tags, cues, a
# void) come before its first, but a crafted one of 2-byte Void elements took 16 s for 9 MB.
SEGMENT_ELEMENTS_READ = 1024
# Top-level MP4/MOV boxes that hold the index (the whole one, a fragment's): cut, frames are lost.
INDEX_BOXES = (b"moov", b"moof")
# The boxes an MP4/MOV file starts with (ISO's ftyp; QuickTime's may be any of the others).
MP4_FIRST_BOXES = (b"ftyp", b"moov", b"wide", b"free", b"skip", b"mdat")
# How many of a stream's last samples (in time) are checked against the end of the file (a cut
# loses the last samples of every stream; checking all of an hour's 100k samples would cost 0.2 s).
LAST_SAMPLES = 64


def _missing_box_bytes(data: bytes) -> int:
    """How many bytes an MP4/MOV index box (``INDEX_BOXES``) at the top level declares beyond the
    end of the file (0 when complete). Another box that runs past the end, or a partial header, is
    what follows the file (a player plays it: FFmpeg stops reading there)."""
    offset = 0
    while offset + 8 <= len(data):
        kind, header, size = box_header(data, offset)
        if size is None:  # its 64-bit size cut short
            return offset + header - len(data) if kind in INDEX_BOXES else 0
        if size == 0 or size < 8:  # the last box, to the end of the file; or not a box: FFmpeg judges
            return 0
        if offset + size > len(data):
            return offset + size - len(data) if kind in INDEX_BOXES else 0
        offset += size
    return 0


def _missing_sample_bytes(data: bytes, container) -> int:
    """How many bytes past the end of the file the index places the last samples of any stream (a
    file cut inside its sample data; 0 when they are all there)."""
    end = 0
    for stream in container.streams:
        entries = stream.index_entries
        for entry in entries[max(len(entries) - LAST_SAMPLES, 0) :]:
            end = max(end, entry.pos + entry.size)
    return max(end - len(data), 0)


def _codec_tag(data: bytes, container) -> str:
    """Names the codec FFmpeg has no decoder for: an MP4/MOV sample entry's four-character code."""
    at = data.find(b"stsd")
    if container.format.name.startswith("mov") and at >= 0 and len(data) >= at + 20:
        return f"codec tag {data[at + 16 : at + 20].decode('latin-1')!r}"
    return "a codec unknown to FFmpeg"


__all__ = [
    "AUDIO_SUFFIXES",
    "SAMPLE_RATE",
    "VIDEO_SUFFIXES",
    "DecodedMedia",
    "decode_media_file",
    "decode_video_file",
    "is_picture_demuxer",
    "taken_video_suffix",
    "untaken_container_detail",
]
