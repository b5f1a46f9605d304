"""Pictures are shown in sRGB by their embedded ICC profile (PNG iCCP, JPEG APP2), in image and
video fields alike; a profile that cannot be applied leaves the picture as stored, never a skip
(docs/DESIGN.md, "Real media")."""

from __future__ import annotations

import io
import logging
import struct

import numpy as np
import pytest
from PIL import Image

from megatron_cosmos3.data.media import encode_json
from megatron_cosmos3.data.schema import decode_sample

# sRGB's primaries adapted to the D50 connection space, as the ICC's own sRGB profile stores them.
SRGB_RED, SRGB_GREEN, SRGB_BLUE = (0.4361, 0.2225, 0.0139), (0.3851, 0.7169, 0.0971), (0.1431, 0.0606, 0.7141)
D50 = (0.9642, 1.0, 0.8249)


def _s15f16(*values: float) -> bytes:
    return b"".join(struct.pack(">i", round(v * 65536)) for v in values)


def _xyz(values) -> bytes:
    return b"XYZ \0\0\0\0" + _s15f16(*values)


def _matrix_profile(red, green, blue) -> bytes:
    """A minimal ICC v2 RGB display profile: these D50 primaries and linear tone curves (a curv of
    no points is the identity), written by bytes so the test knows exactly what it says."""
    name = b"swapped"
    # desc: ASCII count and text, then empty Unicode (language, count) and ScriptCode (code, count, 67 bytes).
    description = b"desc\0\0\0\0" + struct.pack(">I", len(name) + 1) + name + b"\0" + bytes(4 + 4 + 2 + 1 + 67)
    linear = b"curv\0\0\0\0" + struct.pack(">I", 0)
    tags = [
        (b"desc", description),
        (b"wtpt", _xyz(D50)),
        (b"rXYZ", _xyz(red)),
        (b"gXYZ", _xyz(green)),
        (b"bXYZ", _xyz(blue)),
        (b"rTRC", linear),
        (b"gTRC", linear),
        (b"bTRC", linear),
        (b"cprt", b"text\0\0\0\0none\0"),
    ]
    offset, table, body = 128 + 4 + 12 * len(tags), b"", b""
    for signature, data in tags:
        data += bytes(-len(data) % 4)
        table += signature + struct.pack(">II", offset + len(body), len(data))
        body += data
    size = offset + len(body)
    header = (
        struct.pack(">I", size) + bytes(4) + bytes([2, 0x10, 0, 0]) + b"mntrRGB XYZ " + bytes(12) + b"acsp"
        + bytes(24) + struct.pack(">I", 0) + _s15f16(*D50) + bytes(48)
    )  # fmt: skip
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + table + body


def _srgb_encoded(linear: np.ndarray) -> np.ndarray:
    """sRGB's transfer function (IEC 61966-2-1) of linear values in [0, 1], as 8-bit levels."""
    encoded = np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * np.power(linear, 1 / 2.4) - 0.055)
    return np.round(encoded * 255)


def _raw(field: str, data: bytes) -> dict:
    return {"__key__": "k", "meta.json": encode_json({"schema": 1, "caption": "a picture"}), field: data}


def _picture(pixels: np.ndarray, profile: bytes | None, format: str) -> bytes:
    buffer = io.BytesIO()
    options = {"icc_profile": profile} if profile else {}
    Image.fromarray(pixels).save(buffer, format=format, quality=100, subsampling=0, **options)
    return buffer.getvalue()


PATCHES = np.array([(200, 40, 10), (10, 180, 60), (90, 90, 220), (255, 255, 255), (30, 30, 30)], np.uint8)


def _shown(field: str, data: bytes) -> np.ndarray:
    sample = decode_sample(_raw(field, data))
    return sample.image if field.startswith("image") else sample.video[0]


@pytest.mark.parametrize("format", ["PNG", "JPEG"])
@pytest.mark.parametrize("field", ["image.png", "video.mp4"])
def test_an_embedded_profile_converts_the_picture_to_srgb(field, format):
    """A profile whose red and green primaries are sRGB's swapped, with linear tone curves: a stored
    (r, g, b) is the colour sRGB shows as the encoded linear (g, r, b)."""
    pixels = np.repeat(np.repeat(PATCHES[None], 32, axis=0), 32, axis=1)  # (32, 160, 3)
    profile = _matrix_profile(SRGB_GREEN, SRGB_RED, SRGB_BLUE)
    shown = _shown(field, _picture(pixels, profile, format)).astype(int)
    expected = _srgb_encoded(PATCHES[:, [1, 0, 2]] / 255.0)
    for index, colour in enumerate(expected):
        patch = shown[8:24, index * 32 + 8 : index * 32 + 24].reshape(-1, 3)
        assert np.abs(patch - colour).max() <= 3, (index, colour, patch.mean(axis=0))
    # Control: the same bytes without the profile are shown as stored.
    plain = _shown(field, _picture(pixels, None, format)).astype(int)
    assert np.abs(plain[4:12, 4:12] - PATCHES[0]).max() <= 3


@pytest.mark.parametrize("field", ["image.png", "video.mp4"])
def test_an_unusable_profile_is_logged_and_the_picture_shown_as_stored(field, caplog):
    pixels = np.repeat(np.repeat(PATCHES[None], 32, axis=0), 32, axis=1)
    broken = _matrix_profile(SRGB_GREEN, SRGB_RED, SRGB_BLUE)[:100]  # cut inside its header
    with caplog.at_level(logging.WARNING, logger="megatron_cosmos3.data.media"):
        shown = _shown(field, _picture(pixels, broken, "PNG"))
    np.testing.assert_array_equal(shown, pixels)
    assert "ICC profile is not applied" in caplog.text
