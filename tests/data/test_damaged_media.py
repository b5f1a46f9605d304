"""Damaged and unusual audio files (docs/DESIGN.md, "Real media"): each is decoded whole or refused
with an error naming the file and what is wrong with it, in the loader (an audio field) and in
generation (conditioning audio, ``decode_audio_file``). Files are written by the test."""

from __future__ import annotations

import io
import re
import struct

import numpy as np
import pytest
from scipy.io import wavfile

from megatron_cosmos3.data.errors import SampleError
from megatron_cosmos3.data.media import encode_json
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
