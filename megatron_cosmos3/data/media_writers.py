"""Media files a person can play: mp4 (H.264 video, AAC audio muxed in), WAV and PNG.

The writers beside the shard codecs of ``data/media.py`` (whose ``encode_png`` / ``encode_wav``
they reuse), for generated outputs and for anything that stores playable media (shards of real
video, issue 17). Each ``encode_*`` returns the file's bytes; each ``write_*`` writes them to a path.

- **mp4**: PyAV (its wheels carry FFmpeg with libx264 and the native AAC encoder). Video is
  H.264, ``yuv420p`` (what every player decodes), constant-quality ``crf``, the index (``moov``)
  ahead of the media data ("faststart"): a browser plays a file it is still downloading only
  then (FFmpeg writes it last, and the MLflow UI serves artifacts whole). The frame rate is kept
  exactly as a fraction: a float rate becomes the nearest fraction with a denominator up to 1001,
  so 12.5 -> 25/2, 29.97 -> 2997/100, 30000/1001 (NTSC as a float) -> 30000/1001; pass a
  ``Fraction`` to state it outright. Frame ``i`` has timestamp ``i / fps``. ``yuv420p`` needs even
  sizes: an odd height or width gets one extra row or column, a copy of the last one, so no source
  pixel is lost (the file is that much larger; ``even_size`` says the written size).
  The same frames give the same bytes, whatever was encoded before in the process: x264's
  macroblock tree, which read memory it had not written, is off (``REPRODUCIBLE_X264``).
  Audio, when given, is AAC at its sample rate, as long as the waveform given, clipped to [-1, 1]
  as the WAV is; a rate AAC cannot store (one of ``aac_sample_rates()``: 7350 to 96000 Hz, e.g.
  not 12345 or 192000) is a ``ValueError`` naming it, before anything is encoded.
- **WAV**: 16-bit PCM (``data/media.py``, ``encode_wav``), values clipped to [-1, 1).
- **PNG**: 8-bit RGB, lossless.

``write_*`` write through a temporary name and a rename (``atomic_files.write_atomically``): a run
killed mid-write leaves no truncated file under the final name.

Bad input (wrong dtype or shape, an empty clip, a rate <= 0) is a ``ValueError`` naming the
argument and its value.
"""

from __future__ import annotations

import numbers
import tempfile
from fractions import Fraction
from pathlib import Path

import numpy as np

from megatron_cosmos3.atomic_files import write_atomically
from megatron_cosmos3.data.media import encode_png, encode_wav

AUDIO_BITRATE = 192_000  # bits per second of AAC stereo: transparent for most listeners
# x264's macroblock-tree rate control reads heap memory it never wrote (valgrind: uninitialised
# values in x264_encoder_encode, none with it off), so the bytes depended on what earlier encodes
# in the process left there; without it the same frames give the same file (docs/DESIGN.md,
# "Generated media").
REPRODUCIBLE_X264 = "mbtree=0"


def exact_rate(fps: float | Fraction, name: str = "fps") -> Fraction:
    """``fps`` as the fraction the container stores (module doc); ValueError unless finite and > 0."""
    if isinstance(fps, bool) or not isinstance(fps, numbers.Real):
        raise ValueError(f"{name} must be a number, got {fps!r}")
    if not np.isfinite(float(fps)) or fps <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {fps!r}")
    rate = (fps if isinstance(fps, Fraction) else Fraction(float(fps))).limit_denominator(1001)
    if rate <= 0:
        raise ValueError(f"{name}={fps!r} is too small to store as a frame rate")
    return rate


def aac_sample_rates() -> list[int]:
    """The sample rates (Hz) FFmpeg's AAC encoder stores, as its build declares them."""
    import av

    return sorted(av.Codec("aac", "w").audio_rates)


def even_size(height: int, width: int) -> tuple[int, int]:
    """The (height, width) an mp4 of ``height x width`` frames is written at (module doc)."""
    return height + height % 2, width + width % 2


def check_frames(frames: np.ndarray, name: str = "frames") -> np.ndarray:
    """``frames`` as a ``(T, H, W, 3)`` uint8 array with T, H, W >= 1; ValueError naming what is wrong."""
    if not isinstance(frames, np.ndarray):
        raise ValueError(f"{name} must be a numpy array (T, H, W, 3) of uint8, got {type(frames).__name__}")
    if frames.dtype != np.uint8:
        raise ValueError(f"{name} must have dtype uint8 (values 0-255), got dtype {frames.dtype}")
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"{name} must have shape (T, H, W, 3), got shape {frames.shape}")
    if 0 in frames.shape:
        raise ValueError(f"{name} is empty: shape {frames.shape} (a clip needs at least one 1x1 frame)")
    return frames


def check_image(image: np.ndarray, name: str = "image") -> np.ndarray:
    """``image`` as an ``(H, W, 3)`` uint8 array with H, W >= 1; ValueError naming what is wrong."""
    if not isinstance(image, np.ndarray) or image.ndim != 3:
        got = f"shape {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"{name} must be a numpy array (H, W, 3) of uint8, got {got}")
    return check_frames(image[None], name)[0]


def check_waveform(waveform: np.ndarray, sample_rate: int, name: str = "audio") -> np.ndarray:
    """``waveform`` as a float32 ``(channels, samples)`` array, 1 or 2 channels, >= 1 sample, finite;
    ``sample_rate`` a positive integer. ValueError naming what is wrong."""
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)) or sample_rate <= 0:
        raise ValueError(f"sample_rate must be a positive integer (Hz), got {sample_rate!r}")
    if not isinstance(waveform, np.ndarray):
        raise ValueError(f"{name} must be a numpy array (channels, samples), got {type(waveform).__name__}")
    if not np.issubdtype(waveform.dtype, np.floating):
        raise ValueError(f"{name} must be a float waveform in [-1, 1], got dtype {waveform.dtype}")
    if waveform.ndim != 2 or waveform.shape[0] not in (1, 2):
        raise ValueError(f"{name} must have shape (channels, samples) with 1 or 2 channels, got shape {waveform.shape}")
    if waveform.shape[1] == 0:
        raise ValueError(f"{name} is empty: shape {waveform.shape}")
    if not np.isfinite(waveform).all():
        raise ValueError(f"{name} must be finite; it holds NaN or inf")
    return np.ascontiguousarray(waveform, dtype=np.float32)


def encode_mp4(
    frames: np.ndarray,
    fps: float | Fraction,
    audio: np.ndarray | None = None,
    sample_rate: int = 48_000,
    crf: int = 18,
    keyframe_interval: int | None = None,
) -> bytes:
    """``(T, H, W, 3)`` uint8 RGB frames at ``fps`` (and ``(channels, samples)`` float audio at
    ``sample_rate`` Hz, muxed in) -> mp4 bytes: H.264 ``yuv420p`` + AAC (module doc).

    ``crf``: x264 constant quality, 0 (lossless luma) to 51 (worst); 18 is visually lossless.
    ``keyframe_interval``: frames between keyframes (None: x264's default, 250); a reader seeks
    to a keyframe, so long videos cut into clips want short intervals.
    """
    import av  # PyAV loads FFmpeg's libraries: only a process that writes video pays for it

    frames = check_frames(frames)
    rate = exact_rate(fps)
    if isinstance(crf, bool) or not isinstance(crf, int) or not 0 <= crf <= 51:
        raise ValueError(f"crf must be an integer in 0..51, got {crf!r}")
    if keyframe_interval is not None and (
        isinstance(keyframe_interval, bool) or not isinstance(keyframe_interval, int) or keyframe_interval < 1
    ):
        raise ValueError(f"keyframe_interval must be a positive integer, got {keyframe_interval!r}")
    if audio is not None:
        audio = np.clip(check_waveform(audio, sample_rate), -1.0, 1.0)
        if int(sample_rate) not in aac_sample_rates():  # PyAV's own error was 'Invalid argument', naming nothing
            raise ValueError(
                f"sample_rate={sample_rate!r} is not one AAC stores in an mp4; one of {aac_sample_rates()}"
            )
    height, width = even_size(*frames.shape[1:3])
    if (height, width) != frames.shape[1:3]:
        pad = ((0, 0), (0, height - frames.shape[1]), (0, width - frames.shape[2]), (0, 0))
        frames = np.pad(frames, pad, mode="edge")

    # faststart moves the index to the front in a second pass that reopens the output by name, so
    # the muxer writes a file (into a BytesIO it fails with 'No such file or directory').
    with tempfile.TemporaryDirectory(prefix="cosmos3-mp4-") as scratch:
        path = Path(scratch) / "clip.mp4"
        _mux_mp4(av, path, frames, rate, audio, sample_rate, crf, keyframe_interval)
        return path.read_bytes()


def _mux_mp4(av, path: Path, frames, rate: Fraction, audio, sample_rate: int, crf: int, keyframe_interval) -> None:
    height, width = frames.shape[1:3]
    with av.open(str(path), "w", format="mp4", options={"movflags": "+faststart"}) as container:
        video = container.add_stream("libx264", rate=rate)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        video.time_base = 1 / rate  # pts = frame index
        video.options = {"crf": str(crf), "x264-params": REPRODUCIBLE_X264} | (
            {"g": str(keyframe_interval)} if keyframe_interval else {}
        )
        sound = None
        if audio is not None:
            layout = "stereo" if audio.shape[0] == 2 else "mono"
            sound = container.add_stream("aac", rate=int(sample_rate), layout=layout)
            sound.bit_rate = AUDIO_BITRATE
        for index, picture in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(picture), format="rgb24")
            frame.pts = index
            container.mux(video.encode(frame))
        container.mux(video.encode(None))
        if sound is not None:
            # One planar frame of the whole track: the encoder cuts it into AAC's 1024-sample frames.
            frame = av.AudioFrame.from_ndarray(audio, format="fltp", layout=sound.layout.name)
            frame.sample_rate, frame.pts = int(sample_rate), 0
            container.mux(sound.encode(frame))
            container.mux(sound.encode(None))


def write_mp4(
    path: str | Path,
    frames: np.ndarray,
    fps: float | Fraction,
    audio: np.ndarray | None = None,
    sample_rate: int = 48_000,
    crf: int = 18,
) -> Path:
    """``encode_mp4`` into the file ``path`` (parent folders created); returns the path."""
    return write_atomically(path, encode_mp4(frames, fps, audio, sample_rate, crf))


def write_wav(path: str | Path, waveform: np.ndarray, sample_rate: int = 48_000) -> Path:
    """``(channels, samples)`` float waveform in [-1, 1] -> 16-bit PCM WAV file at ``sample_rate`` Hz."""
    return write_atomically(path, encode_wav(check_waveform(waveform, sample_rate), int(sample_rate)))


def write_png(path: str | Path, image: np.ndarray) -> Path:
    """``(H, W, 3)`` uint8 RGB -> lossless PNG file."""
    return write_atomically(path, encode_png(check_image(image)))
