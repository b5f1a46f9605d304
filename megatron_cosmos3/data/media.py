"""Byte codecs of the shard fields, with maintained libraries: numpy ``.npy``, PNG (Pillow), WAV
(scipy.io.wavfile) and JSON; video and compressed audio files are ``data/media_files.py``'s (PyAV).
Decoders turn any library failure into ``SampleError(corrupt_media)``; shape and dtype rules belong
to the schema, not here.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import math
import struct
import warnings

import numpy as np
from PIL import Image, ImageCms, ImageOps, TiffImagePlugin, UnidentifiedImageError

from megatron_cosmos3.data.errors import BAD_METADATA, CORRUPT_MEDIA, SampleError
from megatron_cosmos3.json_files import JsonNumberError, loads

logger = logging.getLogger(__name__)

# The sample rates sound may have, inclusive (schema's range, checked on every file before decoding):
# 1 Hz or 10 MHz is no recording, and resampling it to 48 kHz costs seconds.
AUDIO_RATE_RANGE_HZ = (1_000, 768_000)
# The data size a WAV writer that cannot seek back (a pipe) leaves in the header: "read to the end".
STREAMED_WAV_SIZE = 0xFFFFFFFF
# WAV sample encodings scipy reads (PCM, IEEE float); others (mu-law, A-law, ADPCM, ...) FFmpeg decodes.
PCM_WAV_ENCODINGS = (0x0001, 0x0003)
WAVE_FORMAT_EXTENSIBLE = 0xFFFE
# TIFF tags that say what type an integer grey picture's samples are (``_integer_grey_range``).
TIFF_BITS_PER_SAMPLE, TIFF_SAMPLE_FORMAT, TIFF_SIGNED_INTEGER = 258, 339, 2
# A TIFF's first bytes (little- or big-endian), its samples-per-pixel tag, and its sample types by
# SampleFormat, named where Pillow cannot read the file (``_unread_tiff``).
TIFF_PREFIXES, TIFF_SAMPLES_PER_PIXEL = (b"II*\0", b"MM\0*"), 277
TIFF_SAMPLE_FORMATS = {1: "unsigned integer", 2: "signed integer", 3: "floating point"}
# Everything a broken file can make these libraries raise; anything else is a bug, not bad data.
DECODE_ERRORS = (
    ValueError,
    OSError,
    EOFError,
    UnidentifiedImageError,
    SyntaxError,
    TypeError,
    KeyError,
    IndexError,
    MemoryError,
    OverflowError,
    ZeroDivisionError,  # scipy's WAV reader divides by the bytes a sample has: 0 for under 8 bits
    RecursionError,
    struct.error,
    Image.DecompressionBombError,
    Image.DecompressionBombWarning,  # raised as an error below: a header claiming a huge picture
)


def check_not_empty(data: bytes, name: str) -> None:
    """``corrupt_media`` naming an empty file as such: the libraries said "invalid data found" or
    named a BytesIO object at some address."""
    if not data:
        raise SampleError(CORRUPT_MEDIA, f"{name}: a zero-length file (0 bytes)")


def encode_npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def decode_npy(data: bytes, name: str) -> np.ndarray:
    """An array from ``.npy`` bytes; pickled object arrays are refused (shards are untrusted), and so
    is a header declaring more bytes than follow it: numpy allocates the declared array before it
    reads (a 200-byte member declaring a shape of 2**30 bytes took a GiB)."""
    check_not_empty(data, name)
    try:
        stream = io.BytesIO(data)
        version = np.lib.format.read_magic(stream)
        # Format 3.0 differs from 2.0 only in its header's text encoding (UTF-8 field names).
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(stream)
        declared, held = math.prod(shape) * dtype.itemsize, len(data) - stream.tell()
        if declared > held:
            raise SampleError(
                CORRUPT_MEDIA,
                f"{name}: its header declares {dtype} {shape} ({declared} bytes), but {held} bytes follow",
            )
        return np.load(io.BytesIO(data), allow_pickle=False)
    except DECODE_ERRORS as error:
        raise SampleError(
            CORRUPT_MEDIA, f"{name}: not a readable .npy array ({type(error).__name__}: {error})"
        ) from None


def encode_png(image: np.ndarray) -> bytes:
    """(H, W, 3) uint8 -> PNG bytes (lossless, so a decoded image equals what was written)."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image), mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def decode_image(data: bytes, name: str) -> np.ndarray:
    """(H, W, 3) uint8 RGB from PNG/JPEG/... bytes, as a viewer shows the picture: in sRGB by its
    embedded ICC profile (PNG iCCP, JPEG APP2; one that cannot be applied is logged and left out),
    turned and mirrored by its EXIF orientation, integer grey (16- or 32-bit, signed 8-bit) scaled
    from its type's range to 8 bits (Pillow's own conversion clips it at 255), float grey from 0..1
    (NaN as 0), any other mode Pillow reads converted to RGB (alpha dropped); an animation's first
    frame."""
    check_not_empty(data, name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                image.load()  # Image.open is lazy: a truncated file fails only here
                return _viewed_rgb(image, name)
    except UnidentifiedImageError:  # its message names a BytesIO object, not the file
        what = _unread_tiff(data) or "no picture format Pillow reads"
        raise SampleError(CORRUPT_MEDIA, f"{name}: not a readable image ({what})") from None
    except DECODE_ERRORS as error:
        raise SampleError(CORRUPT_MEDIA, f"{name}: not a readable image ({type(error).__name__}: {error})") from None


def _unread_tiff(data: bytes) -> str | None:
    """What a TIFF that Pillow does not identify holds, by its first directory's tags: "a TIFF of 3
    8-bit signed integer samples a pixel, which Pillow does not read" (a signed 8-bit colour TIFF
    was "no picture format Pillow reads"); None for other bytes or a directory that cannot be read."""
    if data[:4] not in TIFF_PREFIXES:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow warns of a damaged directory: then it is judged as it reads
            directory = TiffImagePlugin.ImageFileDirectory_v2(data[:8])
            stream = io.BytesIO(data)
            stream.seek(directory.next)
            directory.load(stream)
    except DECODE_ERRORS:
        return None
    samples = directory.get(TIFF_SAMPLES_PER_PIXEL, 1)
    bits, kind = _tiff_tag(directory, TIFF_BITS_PER_SAMPLE, 1), _tiff_tag(directory, TIFF_SAMPLE_FORMAT, 1)
    kind = TIFF_SAMPLE_FORMATS.get(kind, f"SampleFormat {kind}")
    return f"a TIFF of {samples} {bits}-bit {kind} samples a pixel, which Pillow does not read"


def _viewed_rgb(image: Image.Image, name: str) -> np.ndarray:
    """``decode_image``'s pixels of a loaded picture: a writable (H, W, 3) uint8 array."""
    profile = image.info.get("icc_profile")
    grey_range = _integer_grey_range(image)  # the file's tags, which a turned copy no longer has
    try:
        image = ImageOps.exif_transpose(image)
    except DECODE_ERRORS:  # an unreadable orientation tag: shown as stored, as viewers do
        pass
    if grey_range is not None:
        return _grey_rgb(_integer_grey_levels(np.asarray(image), *grey_range))
    if image.mode == "F":  # float grey (a 32-bit float TIFF) is 0..1: Pillow's conversion made it all black
        return _grey_rgb(np.nan_to_num(np.asarray(image, dtype=np.float64)) * 255.0)
    if profile:
        image = _in_srgb(image, profile, name)
    return np.array(image.convert("RGB"))  # a copy: torch refuses read-only arrays


def _integer_grey_range(image: Image.Image) -> tuple[int, bool] | None:
    """(bits, signed) of an integer grey picture's samples (Pillow's ``I;16*`` and ``I`` modes, and
    ``L`` where a TIFF says signed), None for any other mode. ``I;16*`` is unsigned 16-bit; ``I``
    holds int32 whatever the file stores, so a TIFF's BitsPerSample and SampleFormat tags say which
    type it is (Pillow reads an unsigned 32-bit TIFF into ``I`` with the values past 2**31 wrapped
    negative, a signed 16-bit one as -32768..32767); other files Pillow reads into ``I`` are 16-bit
    (a PGM of any maximum above 255, scaled by Pillow to 0..65535). Pillow reads a signed 8-bit TIFF
    into ``L`` as its bytes, -128 as 128: its SampleFormat tag says so; a TIFF of fewer bits into
    ``I;16`` as they are (12-bit 0..4095: white showed as dark grey), its BitsPerSample says so."""
    tags = getattr(image, "tag_v2", None)  # a TIFF's
    if image.mode.startswith("I;16"):
        bits = 16 if tags is None else int(_tiff_tag(tags, TIFF_BITS_PER_SAMPLE, 16))
        return (bits if 1 < bits <= 16 else 16), False
    if image.mode == "L" and tags is not None and _tiff_tag(tags, TIFF_SAMPLE_FORMAT, 1) == TIFF_SIGNED_INTEGER:
        return 8, True
    if image.mode != "I":
        return None
    if tags is None:
        return 16, False
    bits = int(_tiff_tag(tags, TIFF_BITS_PER_SAMPLE, 32))
    return (bits if 1 < bits <= 32 else 32), _tiff_tag(tags, TIFF_SAMPLE_FORMAT, 1) == TIFF_SIGNED_INTEGER


def _tiff_tag(tags, tag: int, default: int) -> int:
    """A TIFF tag's first value (Pillow gives a tuple, one per sample, or a bare value)."""
    value = tags.get(tag, default)
    return value[0] if isinstance(value, tuple) else value


def _integer_grey_levels(values: np.ndarray, bits: int, signed: bool) -> np.ndarray:
    """Integer grey ``values`` of a ``bits``-bit type on the 0..255 scale: 0 to the type's largest
    value is black to white (a 32-bit one was divided as if 16-bit: all but its darkest tones white);
    a signed type's negative values are black (as scikit-image's ``img_as_ubyte`` shows them)."""
    values = values.astype(np.int64)
    # Read the sample's bits as its type: Pillow's int32 holds an unsigned 32-bit one wrapped
    # negative, its uint8 a signed 8-bit one's two's complement.
    half = 1 << (bits - 1)
    values = ((values + half) & ((1 << bits) - 1)) - half if signed else values & ((1 << bits) - 1)
    brightest = (1 << (bits - 1 if signed else bits)) - 1
    return np.maximum(values, 0) * 255.0 / brightest


def _grey_rgb(levels: np.ndarray) -> np.ndarray:
    """(H, W) grey levels on the 0..255 scale -> (H, W, 3) uint8, rounded and clipped."""
    grey = np.clip(np.round(levels), 0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2)


# The 8-bit modes whose pixels an embedded profile describes as they are stored (a palette's or an
# alpha channel's picture is converted to its colour mode first).
_PROFILED_MODES = {"RGB": "RGB", "RGBA": "RGB", "P": "RGB", "PA": "RGB", "L": "L", "LA": "L", "CMYK": "CMYK"}


@functools.cache
def _srgb_profile() -> ImageCms.ImageCmsProfile:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


def _in_srgb(image: Image.Image, profile: bytes, name: str) -> Image.Image:
    """``image`` converted from its embedded ICC ``profile`` to sRGB (RGB mode), as colour-managed
    viewers show it: a wide-gamut (Display P3, Adobe RGB) or camera profile's pixels are not sRGB
    values. A profile that cannot be read or does not fit the pixels (an RGB profile on a CMYK
    picture) is logged and ignored, the picture decoded as if it had none: a sample is never lost
    to its colour management."""
    mode = _PROFILED_MODES.get(image.mode)
    if mode is None:
        return image
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
        return ImageCms.profileToProfile(image.convert(mode), source, _srgb_profile(), outputMode="RGB")
    except (ImageCms.PyCMSError, *DECODE_ERRORS) as error:
        logger.warning("%s: its ICC profile is not applied (%s: %s)", name, type(error).__name__, error)
        return image


def encode_wav(waveform: np.ndarray, sample_rate: int) -> bytes:
    """(channels, samples) float in [-1, 1] -> 16-bit PCM WAV bytes; ``decode_wav`` gives the values
    back within half a step (1 / 65536), clipped to [-1, 32767 / 32768]."""
    pcm = np.clip(np.round(np.asarray(waveform, dtype=np.float64) * 32768.0), -32768, 32767).astype("<i2")
    from scipy.io import wavfile  # scipy: only a process that handles sound pays for its import

    buffer = io.BytesIO()
    wavfile.write(buffer, int(sample_rate), np.ascontiguousarray(pcm.T))
    return buffer.getvalue()


def decode_wav(data: bytes, name: str) -> tuple[np.ndarray, int]:
    """(channels, samples) float32 in [-1, 1] and the sample rate in Hz from WAV bytes (PCM 8/16/24/32
    bit or float). A data chunk shorter than its header declares is a truncated file
    (``corrupt_media``), unless the size is ``STREAMED_WAV_SIZE`` (written to a pipe: read to the end)."""
    missing = missing_wav_bytes(data)
    if missing:
        raise SampleError(
            CORRUPT_MEDIA,
            f"{name}: truncated WAV file: its chunks declare {missing} more bytes than it holds",
        )
    from scipy.io import wavfile  # scipy: only a process that handles sound pays for its import

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", wavfile.WavFileWarning)  # judged above: a streamed size reads to the end
            rate, samples = wavfile.read(io.BytesIO(data))
    except DECODE_ERRORS as error:
        raise SampleError(CORRUPT_MEDIA, f"{name}: not a readable WAV file ({type(error).__name__}: {error})") from None
    samples = (samples if samples.ndim == 2 else samples[:, None]).T  # mono files come as (samples,)
    if samples.dtype == np.uint8:
        audio = (samples.astype(np.float32) - 128.0) / 128.0
    elif np.issubdtype(samples.dtype, np.integer):
        audio = samples.astype(np.float32) / float(-np.iinfo(samples.dtype).min)
    else:
        audio = samples.astype(np.float32)
    return np.ascontiguousarray(audio), int(rate)


def scipy_reads_wav(data: bytes) -> bool:
    """Whether ``decode_wav`` (scipy) reads a WAV file: RIFF/RIFX of PCM or float samples, or a RIFF
    file it judges itself (no ``fmt`` chunk found: a broken file). RF64 (the 64-bit WAV FFmpeg
    writes for long recordings: scipy fails on it with an internal error), other encodings (mu-law,
    A-law, ADPCM) and bytes that are no RIFF file at all (a FLAC or MP3 saved as .wav, which FFmpeg
    reads by its content, as it reads a WebM saved as .mp4) are FFmpeg's (``data/media_files.py``)."""
    return data[:4] in (b"RIFF", b"RIFX") and wav_encoding(data) in (*PCM_WAV_ENCODINGS, None)


def wav_encoding(data: bytes) -> int | None:
    """The sample encoding a WAV file's ``fmt`` chunk names (its format tag; for
    WAVE_FORMAT_EXTENSIBLE the sub-format's), or None where no ``fmt`` chunk is found."""
    if data[:4] not in (b"RIFF", b"RIFX", b"RF64") or data[8:12] != b"WAVE":
        return None
    order = "<" if data[:4] == b"RIFF" else ">"
    offset = 12
    while offset + 10 <= len(data):
        chunk, size = data[offset : offset + 4], struct.unpack(order + "I", data[offset + 4 : offset + 8])[0]
        if chunk == b"fmt ":
            tag = struct.unpack(order + "H", data[offset + 8 : offset + 10])[0]
            if tag == WAVE_FORMAT_EXTENSIBLE and size >= 26 and offset + 34 <= len(data):
                tag = struct.unpack(order + "H", data[offset + 32 : offset + 34])[0]  # the sub-format GUID's start
            return tag
        offset += 8 + size + (size & 1)
    return None


def missing_wav_bytes(data: bytes) -> int:
    """How many bytes the first ``data`` chunk, or a chunk before it, declares beyond the end of
    the file (0 when complete, streamed or not a RIFF file: the reader judges those). An RF64
    file's data chunk declares its size in the ``ds64`` chunk (64 bits; 0 where a writer to a pipe
    could not fill it in): FFmpeg read a cut one, 2**32 bytes declared and 48 KB there, as a
    shorter sound. A file cut inside a chunk before its samples (a LIST or junk chunk) made scipy
    fail with an internal error (UnboundLocalError) instead of a verdict on the bytes."""
    if data[:4] not in (b"RIFF", b"RIFX", b"RF64") or data[8:12] != b"WAVE":
        return 0
    order = ">" if data[:4] == b"RIFX" else "<"
    rf64_size = None
    offset = 12
    while offset + 8 <= len(data):
        chunk, size = data[offset : offset + 4], struct.unpack(order + "I", data[offset + 4 : offset + 8])[0]
        if chunk == b"ds64" and data[:4] == b"RF64" and offset + 24 <= len(data):
            rf64_size = struct.unpack("<Q", data[offset + 16 : offset + 24])[0]  # after the RIFF size
        if chunk == b"data":
            if size == STREAMED_WAV_SIZE:  # read to the end, unless RF64's ds64 says how much there is
                size = rf64_size or 0
            return max(size - (len(data) - offset - 8), 0)
        offset += 8 + size + (size & 1)  # chunks are padded to an even size
    return max(offset - (size & 1) - len(data), 0) if offset > len(data) else 0


def encode_json(document: dict) -> bytes:
    return json.dumps(document, sort_keys=True).encode()


def decode_json(data: bytes, name: str) -> dict:
    """A JSON object; anything else (bad UTF-8, bad JSON, a list) is ``bad_metadata``."""
    try:
        document = loads(data.decode("utf-8"))
    except JsonNumberError as error:
        raise SampleError(BAD_METADATA, f"{name}: {error}") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as error:  # RecursionError: nested too deep
        raise SampleError(BAD_METADATA, f"{name}: not valid JSON ({error})") from None
    if not isinstance(document, dict):
        raise SampleError(BAD_METADATA, f"{name}: expected a JSON object, got {type(document).__name__}")
    return document
