"""The sample schema of the shards (version 1): one WebDataset sample = one ``Sample``.

A sample is a group of tar members sharing a key (``<key>.<field>``). Fields:

=====================  ===========================================================================
field                  content
=====================  ===========================================================================
meta.json              required. JSON object: ``schema`` (= 1) and the keys listed below.
image.png              a still picture, (H, W, 3) uint8 RGB, H and W >= one video token (32 px at
                       the default ``video_patch_size`` 2: ``16 * video_patch_size``); or ``image.jpg``
                       (``image.jpeg``, as other tools name it), ``image.webp``.
observation.png        the picture the Reasoner sees through the ViT (a policy's observation), H and W
                       >= one ViT token (32 px); when absent, the image or the video's first frame
                       is used (also ``.jpg``, ``.jpeg``, ``.webp``).
video.npy              (T, H, W, 3) uint8 RGB frames, T >= 1, H and W >= one video token; needs ``fps``.
video.mp4              a video file (also ``video.mov``, ``.m4v``, ``.webm``, ``.mkv``, ``.avi``;
                       ``data/media_files.py``): its frame rate and duration from the file, its
                       audio stream used as the sample's audio when there is no audio file. One
                       video field per sample.
audio.wav              WAV (PCM or float), any rate (resampled to 48 kHz to encode); more than two
                       channels, another encoding (mu-law, A-law, ADPCM) or RF64, are decoded to
                       48 kHz stereo by FFmpeg, as compressed files are;
                       or an ``audio.flac``, ``.mp3``, ``.m4a``, ``.aac``, ``.opus``, ``.ogg`` file
                       (decoded to 48 kHz stereo). One audio field per sample.
actions.npy            (N, dim) float pseudo-actions (``encoders/pseudo_actions.py``), step i from
                       frame i to i + 1 at ``action_rate_hz``; needs ``embodiment``.
video_latents.npy      pre-encoded video tokens (t*h*w, D) float16/32 (``encoders/video_vae.py``);
                       needs ``video_latent_grid`` [t, h, w] and ``fps`` (of the source clip);
                       ``video_patch_size`` records the token patch they were made with (absent: 2),
                       ``video_latent_channels`` the VAE channels C of a token's D = C x patch^2
                       (absent: not recorded, only the row width is checked).
image_latents.npy      pre-encoded image tokens (h*w, D); needs ``image_latent_grid`` [1, h, w].
audio_latents.npy      pre-encoded audio tokens (n, D) at 25/s (``encoders/audio_vae.py``); needs
                       ``audio_num_samples`` (48 kHz samples before padding); ``audio_latent_dim``
                       records D (absent: not recorded).
=====================  ===========================================================================

``meta.json`` keys: ``caption``, ``instruction``, ``question``, ``answer`` (text; question and
answer together), ``fps``, ``embodiment``, ``action_rate_hz``, ``video_latent_grid``,
``image_latent_grid``, ``video_patch_size``, ``video_latent_channels``, ``audio_latent_dim``,
``audio_num_samples``, ``duration_s``; ``timing`` (free-form timing
metadata, e.g. event times in seconds from the first frame), ``source`` (free-form provenance) and
``caption_segments`` (timed captions, ``[{"start_s", "end_s", "text"}]``: a clip keeps the segments
it overlaps, clipped and shifted to its start, and its caption is their texts joined).
All streams of a sample start at the same instant (the first video frame).

Decoding cuts the clip ``data.media`` asks for (``data/clips.py``): a window of the sample (video
frames picked at the target frame rate, fitted into a resolution bucket; audio and actions cut to
the same window) — by default the whole sample at its own rate and size. Streams whose lengths
say the sample lasts more than ``media.av_tolerance_s`` apart are a ``duration_mismatch``, in every
member kind (``_check_spans``): a file's declared duration; T frames of ``video.npy`` last
(T - 1) / fps to T / fps; a WAV or ``audio_num_samples`` its samples; t video latent frames
4(t - 1) / fps to 4t / fps (the encoder crops up to 3 frames); N action steps N - 1 to N + 1
steps. So a frame or a step of difference, as npy/WAV shards written before have, still loads.

Anything else is an ``extra_field``; a field missing what it needs, a ``missing_field``. Pixels
and audio may come with their latents (latents win); a sample needs text or some media.

``fps``, ``action_rate_hz`` and ``duration_s`` are numbers or fractions "30000/1001" (as ffprobe
writes frame rates; ``rate_value``). Ranges (``out_of_range`` outside them; the bounds are the
constants below): ``fps`` in FPS_RANGE and ``action_rate_hz`` in ACTION_RATE_RANGE_HZ (they set
the temporal RoPE step, 6 units per second: 1e-9 fps would put frames 1e11 units apart, 1e12 fps
all at 0), ``duration_s`` in
DURATION_RANGE_S, latent grid sides and ``audio_num_samples`` at most MAX_GRID_SIDE and
MAX_AUDIO_SAMPLES, the sample rate of any sound in AUDIO_RATE_RANGE_HZ. Float arrays (actions, latents) may be
float16/32/64; after the cast to float32 every value must be finite and within MAX_ABS_VALUE (so
its square, in the flow-matching loss, is finite too); so must every audio sample, of any file.
Text must be valid Unicode (no lone surrogates: it is encoded to UTF-8 for the tokenizer); a text
of only whitespace or control characters (``blank_text``) is no text, as if the key were absent.

Video and image latents made with another token patch than the model's (``SchemaContext.video_patch_size``,
the model config's ``video_patch_size``) are not a bad sample but a run set up wrong: a
``LoaderSetupError`` naming both sizes stops it (docs/DESIGN.md, "Model shapes"). So are latents
whose recorded width (``video_latent_channels``, ``audio_latent_dim``) is not the model's: every
sample of such shards would be a ``wrong_shape`` until the error budget stopped the run; latents
without the record (older shards) keep the per-sample shape check. So are actions
sampled at another rate than the model's embodiment (``SchemaContext.action_rates``, the model's
``embodiments.<name>.rate_hz``; within ``ACTION_RATE_TOLERANCE``): the model would learn them at
the data's rate and generate at its own.
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np

from megatron_cosmos3.data import media
from megatron_cosmos3.data.clips import (
    MediaConfig,
    Window,
    check_clip_bytes,
    choose_window,
    fit_to_bucket,
    pick_frames,
    sample_span,
    target_times,
)
from megatron_cosmos3.data.errors import (
    BAD_METADATA,
    DURATION_MISMATCH,
    EXTRA_FIELD,
    MISSING_FIELD,
    NON_FINITE,
    OUT_OF_RANGE,
    UNKNOWN_EMBODIMENT,
    WRONG_DTYPE,
    WRONG_SHAPE,
    ZERO_LENGTH,
    LoaderSetupError,
    SampleError,
)
from megatron_cosmos3.data.media import AUDIO_RATE_RANGE_HZ
from megatron_cosmos3.data.media_files import AUDIO_SUFFIXES, VIDEO_SUFFIXES, decode_media_file
from megatron_cosmos3.data.vision_features import VIT_PIXELS_PER_TOKEN
from megatron_cosmos3.encoders.audio_vae import SAMPLE_RATE, num_audio_tokens
from megatron_cosmos3.encoders.pseudo_actions import ACTION_LAYOUTS
from megatron_cosmos3.encoders.video_vae import (
    TOKEN_PATCH,
    VAE_TEMPORAL_FACTOR,
    largest_encodable_frame_count,
    num_latent_frames,
    pixels_per_token,
)
from megatron_cosmos3.tasks.layout import exact
from megatron_cosmos3.tasks.registry import Modality

SCHEMA_VERSION = 1
# Physically sensible ranges, inclusive (module docstring).
FPS_RANGE = (0.1, 1000.0)
ACTION_RATE_RANGE_HZ = (0.1, 1000.0)
DURATION_RANGE_S = (1e-3, 86_400.0)
MAX_GRID_SIDE = 65_536
MAX_AUDIO_SAMPLES = 48_000 * 86_400
MAX_ABS_VALUE = 1e6
# Relative difference within which a dataset's action rate is the model's: 29.97 Hz and 30000/1001
# Hz (3e-5 Hz apart) are one rate; 30 and 29.97 Hz drift a step apart in 33 s.
ACTION_RATE_TOLERANCE = Fraction(1, 10**5)
# Unicode categories of characters that say nothing (``blank_text``): control, format, separators.
BLANK_CATEGORIES = ("Cc", "Cf", "Zs", "Zl", "Zp")
PICTURE_SUFFIXES = ("png", "jpg", "jpeg", "webp")  # both JPEG spellings: tools write either
IMAGE_FIELDS = tuple(f"image.{suffix}" for suffix in PICTURE_SUFFIXES)
OBSERVATION_FIELDS = tuple(f"observation.{suffix}" for suffix in PICTURE_SUFFIXES)
VIDEO_FIELDS = ("video.npy", *(f"video.{suffix}" for suffix in VIDEO_SUFFIXES))
AUDIO_FIELDS = ("audio.wav", *(f"audio.{suffix}" for suffix in AUDIO_SUFFIXES))
FIELDS = (
    "meta.json",
    *IMAGE_FIELDS,
    *OBSERVATION_FIELDS,
    *VIDEO_FIELDS,
    *AUDIO_FIELDS,
    "actions.npy",
    "video_latents.npy",
    "image_latents.npy",
    "audio_latents.npy",
)
TEXT_KEYS = ("caption", "instruction", "question", "answer")
META_KEYS = (
    "schema",
    *TEXT_KEYS,
    "fps",
    "embodiment",
    "action_rate_hz",
    "video_latent_grid",
    "image_latent_grid",
    "video_patch_size",
    "video_latent_channels",
    "audio_latent_dim",
    "audio_num_samples",
    "duration_s",
    "timing",
    "caption_segments",
    "source",
)


@dataclass
class Sample:
    """One decoded sample (shapes in the module table); None = absent."""

    key: str
    caption: str | None = None
    instruction: str | None = None
    question: str | None = None
    answer: str | None = None
    image: np.ndarray | None = None  # (H, W, 3) uint8
    observation: np.ndarray | None = None  # (H, W, 3) uint8
    video: np.ndarray | None = None  # (T, H, W, 3) uint8
    fps: float | None = None
    audio: np.ndarray | None = None  # (channels, samples) float32 in [-1, 1]
    audio_sample_rate: int | None = None  # Hz
    actions: np.ndarray | None = None  # (N, dim) float32
    embodiment: str | None = None
    action_rate_hz: float | None = None
    video_latents: np.ndarray | None = None  # (t*h*w, D) float32
    video_latent_grid: tuple[int, int, int] | None = None
    image_latents: np.ndarray | None = None  # (h*w, D) float32
    image_latent_grid: tuple[int, int, int] | None = None
    video_patch_size: int | None = None  # the token patch video/image latents were made with
    video_latent_channels: int | None = None  # the VAE channels video/image latents were made with
    audio_latents: np.ndarray | None = None  # (n, D) float32
    audio_latent_dim: int | None = None  # the width audio latents were made with
    audio_num_samples: int | None = None  # at 48 kHz
    duration_s: float | None = None
    timing: dict = field(default_factory=dict)
    # Timed captions: (start_s, end_s, text), seconds from the first frame; a clip keeps those it overlaps.
    caption_segments: list[tuple[float, float, str]] = field(default_factory=list)
    source: dict | str | None = None

    @property
    def modalities(self) -> frozenset[Modality]:
        present = {
            Modality.TEXT: any(getattr(self, k) for k in TEXT_KEYS),
            Modality.IMAGE: self.image is not None or self.image_latents is not None,
            Modality.VIDEO: self.video is not None or self.video_latents is not None,
            Modality.AUDIO: self.audio is not None or self.audio_latents is not None,
            Modality.ACTIONS: self.actions is not None,
        }
        return frozenset(m for m, ok in present.items() if ok)

    @property
    def latent_frames(self) -> int:
        """Video latent frames this sample gives (0 without video)."""
        if self.video_latent_grid is not None:
            return self.video_latent_grid[0]
        if self.video is not None:
            return num_latent_frames(largest_encodable_frame_count(len(self.video)))
        return 0


@dataclass(frozen=True)
class SchemaContext:
    """What the model accepts; None = not checked (e.g. when writing shards).

    embodiments: embodiment name -> action width. Default: the pseudo-action layouts.
    video_token_dim / audio_latent_dim: widths of pre-encoded latents.
    video_patch_size: latent cells per video token, each side (the model config's): the smallest
        picture or frame side is one token, and pre-encoded latents must have been made with it.
    action_rates: embodiment name -> the model's action rate (Hz); a sample's actions at another are
        a LoaderSetupError (module doc). None: not checked.
    """

    embodiments: Mapping[str, int] | None = None
    video_token_dim: int | None = None
    audio_latent_dim: int | None = None
    # Tools that carry actions through without training on them (pre-encoding) accept any
    # embodiment at any width; the loader never does.
    any_embodiment: bool = False
    video_patch_size: int = TOKEN_PATCH
    action_rates: Mapping[str, float] | None = None

    @property
    def video_latent_channels(self) -> int | None:
        """The model's VAE channels per latent cell (``video_token_dim`` / patch^2); None: not checked."""
        return None if self.video_token_dim is None else self.video_token_dim // self.video_patch_size**2

    def action_dim(self, embodiment: str) -> int | None:
        known = self.embodiments if self.embodiments is not None else {k: v.dim for k, v in ACTION_LAYOUTS.items()}
        return known.get(embodiment)


# --- encoding (writers) ----------------------------------------------------------------------------


def check_key(key) -> None:
    """ValueError unless ``key`` is a sample key the reader reads back: a string that is a relative
    path without '..' (its members' names; ``tar -x`` would write others outside its folder) whose
    last part is non-empty and without '.' (WebDataset splits the field off at the first '.' after
    the last '/')."""
    parts = key.split("/") if isinstance(key, str) else [""]
    if not parts[-1] or "." in parts[-1] or not parts[0] or ".." in parts:
        raise ValueError(
            f"sample key {key!r} must be a relative path without '..' whose last part is non-empty and "
            "without '.' (WebDataset splits the field off at the first '.' after the last '/')"
        )


def encode_sample(sample: Sample, video_format: str = "npy") -> dict[str, bytes | str]:
    """The WebDataset dict ``{"__key__": key, "<field>": bytes}`` of a sample (no validation).
    ``video_format``: "npy" (raw frames, audio as WAV) or "mp4" (H.264 with the audio muxed in as
    AAC, ``data/media_writers.py``: 50-100x smaller, not bit-exact)."""
    from megatron_cosmos3.data.media_writers import encode_mp4  # writes through PyAV: imported when asked

    check_key(sample.key)
    if video_format not in ("npy", "mp4"):
        raise ValueError(f"video_format must be 'npy' or 'mp4', got {video_format!r}")
    meta: dict = {"schema": SCHEMA_VERSION}
    for name in (*TEXT_KEYS, "fps", "embodiment", "action_rate_hz", "audio_num_samples", "duration_s", "source"):
        if getattr(sample, name) is not None:
            meta[name] = getattr(sample, name)
    for name in ("video_latent_grid", "image_latent_grid"):
        if getattr(sample, name) is not None:
            meta[name] = [int(x) for x in getattr(sample, name)]
    for name in ("video_patch_size", "video_latent_channels", "audio_latent_dim"):
        if getattr(sample, name) is not None:
            meta[name] = int(getattr(sample, name))
    if sample.timing:
        meta["timing"] = sample.timing
    if sample.caption_segments:
        meta["caption_segments"] = [{"start_s": a, "end_s": b, "text": t} for a, b, t in sample.caption_segments]
    out: dict[str, bytes | str] = {"__key__": sample.key, "meta.json": media.encode_json(meta)}
    if sample.image is not None:
        out["image.png"] = media.encode_png(sample.image)
    if sample.observation is not None:
        out["observation.png"] = media.encode_png(sample.observation)
    muxed = video_format == "mp4" and sample.video is not None
    if muxed:
        out["video.mp4"] = encode_mp4(sample.video, sample.fps, sample.audio, sample.audio_sample_rate or 48_000)
    elif sample.video is not None:
        out["video.npy"] = media.encode_npy(sample.video)
    if sample.audio is not None and not muxed:
        out["audio.wav"] = media.encode_wav(sample.audio, sample.audio_sample_rate)
    for name in ("actions", "video_latents", "image_latents", "audio_latents"):
        if getattr(sample, name) is not None:
            out[f"{name}.npy"] = media.encode_npy(getattr(sample, name))
    return out


# --- decoding with validation (the loader) ---------------------------------------------------------


def _fail(reason: str, detail: str):
    raise SampleError(reason, detail)


def rate_value(value) -> float | None:
    """A rate or length as metadata and requests give it: a number, a ``Fraction`` or a string
    "30000/1001" / "29.97" (as ffprobe writes frame rates) -> a float > 0, or None when it is none
    (a boolean, NaN, infinite, <= 0, another type or string). The float of 30000/1001 is read back
    exactly where steps are counted (``tasks.layout.exact``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, Fraction, str)):
        return None
    try:
        number = float(Fraction(value.strip()) if isinstance(value, str) else value)
    except (ValueError, ZeroDivisionError, OverflowError):
        return None
    return number if math.isfinite(number) and number > 0 else None


def _positive_number(meta: dict, name: str, needed_by: str, bounds: tuple[float, float]) -> float:
    if name not in meta:
        _fail(MISSING_FIELD, f"{needed_by} needs meta.json '{name}'")
    value = rate_value(meta[name])
    if value is None:
        _fail(BAD_METADATA, f"meta.json '{name}' must be a positive number or fraction 'N/D', got {meta[name]!r}")
    if not bounds[0] <= value <= bounds[1]:
        _fail(OUT_OF_RANGE, f"meta.json '{name}'={meta[name]!r} is outside [{bounds[0]}, {bounds[1]}]")
    return value


def _grid(meta: dict, name: str, needed_by: str) -> tuple[int, int, int]:
    if name not in meta:
        _fail(MISSING_FIELD, f"{needed_by} needs meta.json '{name}'")
    grid = meta[name]
    if (
        not isinstance(grid, list)
        or len(grid) != 3
        or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in grid)
    ):
        _fail(BAD_METADATA, f"meta.json '{name}' must be 3 non-negative ints [t, h, w], got {grid!r}")
    if max(grid) > MAX_GRID_SIDE:
        _fail(OUT_OF_RANGE, f"meta.json '{name}'={grid} has a side above {MAX_GRID_SIDE}")
    return tuple(grid)


def _latent_patch(meta: dict, key: str, model_patch: int) -> int:
    """The token patch a sample's video/image latents were made with (meta.json ``video_patch_size``,
    2 where absent: shards written before it was recorded); LoaderSetupError unless ``model_patch``."""
    patch = meta.get("video_patch_size", TOKEN_PATCH)
    if isinstance(patch, bool) or not isinstance(patch, int) or patch < 1:
        _fail(BAD_METADATA, f"meta.json 'video_patch_size' must be a positive int, got {patch!r}")
    if patch != model_patch:
        raise LoaderSetupError(
            f"sample {key!r}: its video latents were made with video_patch_size={patch} "
            f"({patch}x{patch} latent cells per token), but model.video_patch_size={model_patch}; "
            "encode the shards again at the model's size (data_pipelines/encode_shards.py --video-patch-size)"
        )
    return patch


def _latent_width(meta: dict, key: str, field: str, model_width: int | None) -> int | None:
    """The latent width meta.json ``field`` records (None where absent: shards written before it
    was recorded keep the per-sample shape check); LoaderSetupError unless ``model_width`` (module doc)."""
    if field not in meta:
        return None
    width = meta[field]
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        _fail(BAD_METADATA, f"meta.json '{field}' must be a positive int, got {width!r}")
    if model_width is not None and width != model_width:
        raise LoaderSetupError(
            f"sample {key!r}: its latents were made with {field}={width}, but model.{field}={model_width}; "
            "encode the shards again with the model's VAE (data_pipelines/encode_shards.py)"
        )
    return width


def _check_action_rate(sample: Sample, context: SchemaContext) -> None:
    """LoaderSetupError unless ``sample``'s actions are at its embodiment's rate in the model (module doc)."""
    rates = context.action_rates or {}
    model_rate = rates.get(sample.embodiment)
    if model_rate is None:
        return
    if abs(exact(sample.action_rate_hz) - exact(model_rate)) > exact(model_rate) * ACTION_RATE_TOLERANCE:
        name = sample.embodiment
        raise LoaderSetupError(
            f"sample {sample.key!r}: its {name!r} actions are sampled at {sample.action_rate_hz:g} Hz (meta.json "
            f"'action_rate_hz'), but model.embodiments.{name}.rate_hz={model_rate:g}: the model would learn them at "
            f"{sample.action_rate_hz:g} Hz and generate at {model_rate:g}; set the embodiment's rate_hz to the "
            "dataset's, or give the dataset another embodiment"
        )


def float_rows(array: np.ndarray, name: str, width: int | None, rows: int | None = None) -> np.ndarray:
    """Checks a (rows, width) float array and returns it as float32: ``rows`` rows (any where None)
    of ``width`` (any where None), at least one, every value finite and within MAX_ABS_VALUE;
    ``SampleError`` naming ``name`` otherwise (shard members and generation requests alike)."""
    if array.dtype.kind != "f":
        _fail(WRONG_DTYPE, f"{name} must hold floats, got dtype {array.dtype}")
    wrong_width = width is not None and array.ndim == 2 and array.shape[1] != width
    wrong_rows = rows is not None and array.ndim == 2 and array.shape[0] != rows
    if array.ndim != 2 or wrong_width or wrong_rows:
        want = f"({rows if rows is not None else 'n'}, {width if width is not None else 'd'})"
        _fail(WRONG_SHAPE, f"{name} must have shape {want}, got {array.shape}")
    if array.shape[0] == 0:
        _fail(ZERO_LENGTH, f"{name} has no rows")
    if not np.isfinite(array).all():
        _fail(NON_FINITE, f"{name} holds {int((~np.isfinite(array)).sum())} NaN/inf values")
    with np.errstate(over="ignore"):
        values = array.astype(np.float32, copy=False)
    largest = float(np.abs(values).max())  # inf when a float64 value does not fit float32
    if not largest <= MAX_ABS_VALUE:
        _fail(OUT_OF_RANGE, f"{name} holds a value of magnitude {np.abs(array).max():.3g} (> {MAX_ABS_VALUE:g})")
    return values


def _picture(data: bytes, name: str, side: int) -> np.ndarray:
    return _picture_size(media.decode_image(data, name), name, side)


def _picture_size(image: np.ndarray, name: str, side: int) -> np.ndarray:
    if min(image.shape[:2]) < side:
        _fail(WRONG_SHAPE, f"{name} is {image.shape[1]}x{image.shape[0]}; both sides must be >= {side} px (one token)")
    return image


def _one_of(files: Mapping[str, bytes], fields: tuple[str, ...], what: str) -> str | None:
    present = [name for name in fields if name in files]
    if len(present) > 1:
        _fail(EXTRA_FIELD, f"a sample holds one {what}, got {present}")
    return present[0] if present else None


def _check_frames(video: np.ndarray, name: str, side: int) -> np.ndarray:
    if video.dtype != np.uint8:
        _fail(WRONG_DTYPE, f"{name} must be uint8 RGB, got dtype {video.dtype}")
    if video.ndim != 4 or video.shape[-1] != 3:
        _fail(WRONG_SHAPE, f"{name} must have shape (T, H, W, 3), got {video.shape}")
    if video.shape[0] == 0:
        _fail(ZERO_LENGTH, f"{name} has 0 frames")
    if min(video.shape[1:3]) < side:
        _fail(
            WRONG_SHAPE,
            f"{name} frames are {video.shape[2]}x{video.shape[1]}; both sides must be >= {side} px (one video token)",
        )
    return video


def _check_audio(audio: np.ndarray, rate: int, name: str) -> tuple[np.ndarray, int]:
    if audio.shape[0] not in (1, 2):
        _fail(WRONG_SHAPE, f"{name} has {audio.shape[0]} channels; expected mono or stereo")
    if audio.shape[1] == 0:
        _fail(ZERO_LENGTH, f"{name} has 0 samples")
    if rate <= 0:
        _fail(BAD_METADATA, f"{name} sample rate is {rate}")
    if not AUDIO_RATE_RANGE_HZ[0] <= rate <= AUDIO_RATE_RANGE_HZ[1]:
        _fail(OUT_OF_RANGE, f"{name} sample rate {rate} Hz is outside {list(AUDIO_RATE_RANGE_HZ)}")
    if not np.isfinite(audio).all():
        _fail(NON_FINITE, f"{name} holds NaN/inf samples")
    if not float(np.abs(audio).max()) <= MAX_ABS_VALUE:  # full scale is 1: this is no sound, and overflows encoders
        _fail(OUT_OF_RANGE, f"{name} holds a sample of magnitude {np.abs(audio).max():.3g} (> {MAX_ABS_VALUE:g})")
    return audio, rate


def _scipy_wav(data: bytes, name: str) -> tuple[np.ndarray, int] | None:
    """A WAV's (channels, samples) at its own rate where scipy reads it and it is mono or stereo;
    None where FFmpeg decodes it to 48 kHz stereo (another encoding, RF64, surround)."""
    if not media.scipy_reads_wav(data):
        return None
    wav = media.decode_wav(data, name)
    return wav if wav[0].shape[0] <= 2 else None


def decode_audio_file(data: bytes, name: str) -> tuple[np.ndarray, int]:
    """A whole audio file (``name`` ends with an ``AUDIO_FIELDS`` suffix) as the loader reads that
    field: (channels, samples) float32 and its rate, a mono/stereo WAV at its own rate, any other
    file at 48 kHz stereo through FFmpeg; checked as every sample's sound is (rate in
    AUDIO_RATE_RANGE_HZ, finite, within MAX_ABS_VALUE). Generation's conditioning audio."""
    wav = _scipy_wav(data, name) if name.lower().endswith(".wav") else None
    if wav is None:
        decoded = decode_media_file(data, name, MediaConfig(), lambda seconds: Window(0.0, seconds), False, True)
        if decoded.audio is None:
            _fail(ZERO_LENGTH, f"{name} has no sound")
        wav = decoded.audio, SAMPLE_RATE
    return _check_audio(*wav, name)


def _cut_samples(values: np.ndarray, rate: float, window: Window) -> np.ndarray:
    """The rows of a stream sampled at ``rate`` per second (row i at i / rate) inside ``window``."""
    first, count = sample_span(window, rate)
    return values[first : first + count]


def _segments(value) -> list[tuple[float, float, str]]:
    """``caption_segments``: a list of {"start_s", "end_s", "text"} with 0 <= start < end."""
    segments = []
    for i, item in enumerate(value if isinstance(value, list) else [None]):
        ok = isinstance(item, dict) and set(item) == {"start_s", "end_s", "text"} and isinstance(item["text"], str)
        times = [item.get("start_s"), item.get("end_s")] if ok else []
        ok = ok and all(isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) for t in times)
        if not ok or not 0 <= times[0] < times[1]:
            _fail(
                BAD_METADATA,
                f"meta.json 'caption_segments'[{i}] must be {{start_s, end_s, text}} with 0 <= start_s < end_s, "
                f"got {item!r}",
            )
        if not blank_text(item["text"]):  # a blank segment says nothing of its seconds
            segments.append((float(times[0]), float(times[1]), item["text"]))
    return segments


def _check_spans(spans: dict[str, tuple[float, float]], tolerance_s: float) -> None:
    """``duration_mismatch`` naming the first two streams whose lengths say the sample lasts more
    than ``tolerance_s`` apart. ``spans``: stream -> (shortest, longest) seconds its length allows
    (a file's declared duration; T frames (T - 1) / fps to T / fps; N action steps N - 1 to N + 1
    steps), so only a clear disagreement is one: npy/WAV shards written before keep loading."""
    items = list(spans.items())
    for i, (name, (low, high)) in enumerate(items):
        for other, (other_low, other_high) in items[:i]:
            if max(low, other_low) - min(high, other_high) > tolerance_s:
                _fail(
                    DURATION_MISMATCH,
                    f"{name} lasts {_seconds(low, high)}, {other} {_seconds(other_low, other_high)} "
                    f"(more than media.av_tolerance_s={tolerance_s} apart)",
                )


def _seconds(low: float, high: float) -> str:
    return f"{low:.3f} s" if math.isclose(low, high, abs_tol=5e-4) else f"{low:.3f}-{high:.3f} s"


def blank_text(text: str) -> bool:
    """Whether a text says nothing: only whitespace, control and invisible format characters (a
    zero-width space). Such a caption, instruction or task text is no text: the sample is read as
    one without it, by the loader and by every tool that writes shards."""
    return all(char.isspace() or unicodedata.category(char) in BLANK_CATEGORIES for char in text)


def decode_sample(
    raw: Mapping[str, bytes],
    context: SchemaContext = SchemaContext(),
    media_config: MediaConfig | None = None,
    draw: float = 0.0,
) -> Sample:
    """A validated ``Sample`` from a WebDataset dict; ``SampleError`` naming the reason otherwise.
    ``media_config`` says which clip to cut (``data/clips.py``; default: the whole sample at its own
    rate and size) and ``draw`` in [0, 1) where a random clip starts."""
    clip = media_config or MediaConfig()
    key = str(raw.get("__key__", "?"))
    files = {name: value for name, value in raw.items() if not name.startswith("__")}
    extra = sorted(set(files) - set(FIELDS))
    if extra:
        _fail(EXTRA_FIELD, f"unknown field(s) {extra}; schema v{SCHEMA_VERSION} fields are {list(FIELDS)}")
    if "meta.json" not in files:
        _fail(MISSING_FIELD, "no meta.json")
    meta = media.decode_json(files["meta.json"], "meta.json")
    unknown = sorted(set(meta) - set(META_KEYS))
    if unknown:
        _fail(EXTRA_FIELD, f"unknown meta.json key(s) {unknown}")
    if meta.get("schema") != SCHEMA_VERSION or isinstance(meta.get("schema"), bool):
        _fail(BAD_METADATA, f"meta.json 'schema' must be {SCHEMA_VERSION}, got {meta.get('schema')!r}")
    sample = Sample(key=key, timing=meta.get("timing") or {}, source=meta.get("source"))
    for name in TEXT_KEYS:
        if name in meta:
            if not isinstance(meta[name], str):
                _fail(BAD_METADATA, f"meta.json '{name}' must be a string, got {type(meta[name]).__name__}")
            try:
                meta[name].encode("utf-8")
            except UnicodeEncodeError as error:
                _fail(BAD_METADATA, f"meta.json '{name}' is not valid Unicode ({error.reason} at {error.start})")
            setattr(sample, name, None if blank_text(meta[name]) else meta[name])
    if (sample.question is None) != (sample.answer is None):
        _fail(MISSING_FIELD, "meta.json 'question' and 'answer' come together")
    if not isinstance(sample.timing, dict):
        _fail(BAD_METADATA, f"meta.json 'timing' must be an object, got {type(sample.timing).__name__}")
    if "duration_s" in meta:
        sample.duration_s = _positive_number(meta, "duration_s", "duration_s", DURATION_RANGE_S)

    buckets = clip.buckets()
    side = pixels_per_token(context.video_patch_size)
    for attribute, fields in (("image", IMAGE_FIELDS), ("observation", OBSERVATION_FIELDS)):
        name = _one_of(files, fields, attribute)
        if name is not None:
            # An image becomes video tokens; an observation only ViT tokens, whatever the video patch.
            least = side if attribute == "image" else VIT_PIXELS_PER_TOKEN
            picture = fit_to_bucket(_picture(files[name], name, least)[None], buckets)[0]
            setattr(sample, attribute, _picture_size(picture, name, least))
    actions = None
    if "actions.npy" in files:
        if not isinstance(meta.get("embodiment"), str):
            _fail(MISSING_FIELD, f"actions.npy needs meta.json 'embodiment' (a string), got {meta.get('embodiment')!r}")
        sample.embodiment = meta["embodiment"]
        width = context.action_dim(sample.embodiment)
        if width is None and not context.any_embodiment:
            _fail(UNKNOWN_EMBODIMENT, f"embodiment {sample.embodiment!r} is not one the model knows")
        sample.action_rate_hz = _positive_number(meta, "action_rate_hz", "actions.npy", ACTION_RATE_RANGE_HZ)
        _check_action_rate(sample, context)
        actions = float_rows(media.decode_npy(files["actions.npy"], "actions.npy"), "actions.npy", width)
    elif "embodiment" in meta or "action_rate_hz" in meta:
        _fail(MISSING_FIELD, "meta.json names an embodiment / action rate but the sample has no actions.npy")
    step_s = 1.0 / sample.action_rate_hz if actions is not None else None

    source_s = None  # how long the uncut sample lasts (recorded with a cut clip)

    def window_for(duration_s: float) -> Window:
        nonlocal source_s
        source_s = duration_s
        return choose_window(duration_s, clip, draw, step_s)

    window = None
    spans: dict[str, tuple[float, float]] = {}  # what each stream's length says the sample lasts (_check_spans)
    video_field = _one_of(files, VIDEO_FIELDS, "video")
    audio_field = _one_of(files, AUDIO_FIELDS, "audio")
    if video_field == "video.npy":
        video = _check_frames(media.decode_npy(files[video_field], video_field), video_field, side)
        source_fps = _positive_number(meta, "fps", "a video", FPS_RANGE)
        seconds = len(video) / source_fps
        # T frames last from the last frame's instant, (T - 1) / fps, to the end of its showing, T / fps.
        spans[f"{video_field} ({len(video)} frames at {source_fps:g} fps)"] = (
            (len(video) - 1) / source_fps,
            seconds,
        )
        window = window_for(seconds)
        sample.fps = clip.fps or source_fps
        targets = target_times(window, sample.fps, video_field)
        height, width = video.shape[1:3]
        check_clip_bytes(len(targets) * height * width * 3, f"{len(targets)} frames of {width}x{height}", video_field)
        picked = pick_frames(np.arange(len(video)) / source_fps, targets, seconds, video_field)
        if len(picked) != len(video) or (picked != np.arange(len(video))).any():
            video = video[picked]
        sample.video = _check_frames(fit_to_bucket(video, buckets), video_field, side)
    elif video_field is not None:
        decoded = decode_media_file(files[video_field], video_field, clip, window_for, True, audio_field is None)
        window, sample.fps = decoded.window, decoded.fps
        if not FPS_RANGE[0] <= sample.fps <= FPS_RANGE[1]:  # the file's own rate sets the RoPE step
            _fail(OUT_OF_RANGE, f"{video_field} runs at {sample.fps:g} fps, outside [{FPS_RANGE[0]}, {FPS_RANGE[1]}]")
        sample.video = _check_frames(decoded.frames, video_field, side)
        spans[video_field] = (decoded.video_duration_s, decoded.video_duration_s)
        if decoded.audio is not None:
            sample.audio, sample.audio_sample_rate = _check_audio(decoded.audio, SAMPLE_RATE, f"{video_field}'s audio")
        if decoded.audio_duration_s is not None:  # also where its sound ends before the clip: not a silent clip
            spans[f"{video_field}'s audio"] = (decoded.audio_duration_s, decoded.audio_duration_s)
    if "video_latents.npy" in files:
        sample.fps = _positive_number(meta, "fps", "a video", FPS_RANGE)
        latent_frames = _grid(meta, "video_latent_grid", "video_latents.npy")[0]
        if latent_frames:  # t latent frames encode 4(t - 1) + 1 frames, of a clip cropped from up to 3 more
            frames = VAE_TEMPORAL_FACTOR * (latent_frames - 1)
            name = f"video_latents.npy ({latent_frames} latent frames at {sample.fps:g} fps)"
            spans[name] = (frames / sample.fps, (frames + VAE_TEMPORAL_FACTOR) / sample.fps)
    wav = _scipy_wav(files[audio_field], audio_field) if audio_field == "audio.wav" else None
    if wav is not None:
        audio, rate = _check_audio(*wav, audio_field)
        seconds = audio.shape[1] / rate
        spans[audio_field] = (seconds, seconds)
        _check_spans(spans, clip.av_tolerance_s)  # before the cut: a short file is no short clip
        window = window or window_for(seconds)
        sample.audio = _check_audio(np.ascontiguousarray(_cut_samples(audio.T, rate, window).T), rate, audio_field)[0]
        sample.audio_sample_rate = rate
    elif audio_field is not None:  # a compressed file, a WAV scipy cannot read or surround: FFmpeg's, 48 kHz stereo
        decoded = decode_media_file(
            files[audio_field], audio_field, clip, (lambda _: window) if window else window_for, False, True
        )
        window = decoded.window
        if decoded.audio is None:  # the file ends before the clip starts
            seconds = decoded.audio_duration_s
            _fail(DURATION_MISMATCH, f"{audio_field} lasts {seconds:.3f} s; the clip is {window}")
        sample.audio, sample.audio_sample_rate = _check_audio(decoded.audio, SAMPLE_RATE, audio_field)
        if decoded.audio_duration_s is not None:
            spans[audio_field] = (decoded.audio_duration_s, decoded.audio_duration_s)
    if actions is not None:
        # Row i is the step from frame i to i + 1: rows span the video within a step (T frames may
        # give T - 1 steps); a video at another rate or length than its actions says is not this episode.
        step = 1.0 / sample.action_rate_hz
        spans[f"actions.npy ({len(actions)} steps at {sample.action_rate_hz:g} Hz)"] = (
            (len(actions) - 1) * step,
            (len(actions) + 1) * step,
        )
    _check_spans(spans, clip.av_tolerance_s)
    if actions is not None:
        if window is not None:
            actions = _cut_samples(actions, sample.action_rate_hz, window)
            if len(actions) == 0:
                _fail(ZERO_LENGTH, f"actions.npy has no step in the clip {window}")
        sample.actions = actions
    if "caption_segments" in meta:
        sample.caption_segments = _segments(meta["caption_segments"])
    if window is not None and (window.start_s > 0 or clip.clip_seconds > 0):
        sample.duration_s = window.duration_s
        sample.timing = {**sample.timing, "clip_start_s": window.start_s, "source_duration_s": source_s}
        sample.caption_segments = [
            (max(a, window.start_s) - window.start_s, min(b, window.end_s) - window.start_s, text)
            for a, b, text in sample.caption_segments
            if a < window.end_s and b > window.start_s
        ]
    if sample.caption_segments:  # the clip is described by what is said of its own seconds
        sample.caption = " ".join(text for _, _, text in sample.caption_segments)
    if "video_latents.npy" in files or "image_latents.npy" in files:
        sample.video_patch_size = _latent_patch(meta, key, context.video_patch_size)
        sample.video_latent_channels = _latent_width(meta, key, "video_latent_channels", context.video_latent_channels)
    else:
        for name in ("video_patch_size", "video_latent_channels"):
            if name in meta:
                _fail(MISSING_FIELD, f"meta.json names a {name} but the sample has no video or image latents")
    if "audio_latents.npy" in files:
        sample.audio_latent_dim = _latent_width(meta, key, "audio_latent_dim", context.audio_latent_dim)
    elif "audio_latent_dim" in meta:
        _fail(MISSING_FIELD, "meta.json names an audio_latent_dim but the sample has no audio latents")
    for name, grid_key, width in (
        ("video_latents", "video_latent_grid", context.video_token_dim),
        ("image_latents", "image_latent_grid", context.video_token_dim),
    ):
        if f"{name}.npy" in files:
            grid = _grid(meta, grid_key, f"{name}.npy")
            if name == "image_latents" and grid[0] != 1:
                _fail(BAD_METADATA, f"meta.json 'image_latent_grid' must have t = 1, got {list(grid)}")
            values = media.decode_npy(files[f"{name}.npy"], f"{name}.npy")
            setattr(sample, name, float_rows(values, f"{name}.npy", width, rows=math.prod(grid)))
            setattr(sample, grid_key, grid)
    if "audio_latents.npy" in files:
        count = meta.get("audio_num_samples")
        if count is None:
            _fail(MISSING_FIELD, "audio_latents.npy needs meta.json 'audio_num_samples'")
        if isinstance(count, bool) or not isinstance(count, int) or count <= 0:
            _fail(BAD_METADATA, f"meta.json 'audio_num_samples' must be a positive int, got {count!r}")
        if count > MAX_AUDIO_SAMPLES:
            _fail(OUT_OF_RANGE, f"meta.json 'audio_num_samples'={count} is above {MAX_AUDIO_SAMPLES} (24 h at 48 kHz)")
        latents = float_rows(
            media.decode_npy(files["audio_latents.npy"], "audio_latents.npy"),
            "audio_latents.npy",
            context.audio_latent_dim,
            rows=num_audio_tokens(count),
        )
        sample.audio_latents, sample.audio_num_samples = latents, count
        spans[f"audio_latents.npy ({count} samples at {SAMPLE_RATE} Hz)"] = (count / SAMPLE_RATE, count / SAMPLE_RATE)
        _check_spans(spans, clip.av_tolerance_s)
    if not sample.modalities:
        _fail(MISSING_FIELD, "the sample has neither text nor media")
    return sample
