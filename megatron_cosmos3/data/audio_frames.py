"""Where the frames of a raw MP3 or AAC (ADTS) file end, each frame's length read from its header,
to find a cut file (docs/DESIGN.md, "Real media": truncation is never a shorter clip); and how
long such a file lasts where it declares no length (a raw AAC file, an MP3 without a Xing header),
its frames and samples counted on the same walk (``FrameChain``).

The frames are a chain: each header says where the next one starts. Walking it in Python cost
about 1 us a frame, an hour of MP3 (150k frames) 0.17 s, most of the time a 10 s clip of it took.
Here every place a header may start (its sync bits) is found and parsed by numpy, each linked to
the one its length points at, and the chain from the first frame is followed by pointer doubling:
about log2(frames) array steps, the same verdict as the frame-by-frame walk (tested against it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# MPEG audio frame headers (ISO 11172-3 / 13818-3): kbit/s by (MPEG-1?, layer) and bitrate index 1..14,
# and sample rates by version (3: MPEG-1, 2: MPEG-2, 0: MPEG-2.5).
MPEG_BITRATES = {
    (True, 1): (32, 64, 96, 128, 160, 192, 224, 256, 288, 320, 352, 384, 416, 448),
    (True, 2): (32, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384),
    (True, 3): (32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),
    (False, 1): (32, 48, 56, 64, 80, 96, 112, 128, 144, 160, 176, 192, 224, 256),
    (False, 2): (8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
    (False, 3): (8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
}
MPEG_RATES = {3: (44_100, 48_000, 32_000), 2: (22_050, 24_000, 16_000), 0: (11_025, 12_000, 8_000)}
# ADTS (ISO 14496-3 1.A.2): sample rates by sampling frequency index 0..12 (13..15 reserved), and
# the samples of each raw data block of AAC.
ADTS_RATES = (96_000, 88_200, 64_000, 48_000, 44_100, 32_000, 24_000, 22_050, 16_000, 12_000, 11_025, 8_000, 7_350)
AAC_BLOCK_SAMPLES = 1024
# The bytes of a frame header: MPEG audio's, an ADTS one's without its CRC.
MPEG_HEADER_BYTES, ADTS_HEADER_BYTES = 4, 7
# Sync candidates are searched this many bytes at a time: the masks stay a few MB for any file.
SEARCH_CHUNK_BYTES = 1 << 22
# Tags a tagger appends after the last frame: ID3v1 (128 bytes from "TAG"), an APEv2 tag's 32-byte
# footer, Lyrics3v2's closing "LYRICS200" after its 6-digit size.
ID3V1_BYTES, APE_FOOTER_BYTES, LYRICS3_END = 128, 32, b"LYRICS200"


@dataclass(frozen=True)
class FrameChain:
    """The frames of a raw MP3 or AAC (ADTS) file chained from its first (``mpeg_audio_chain``,
    ``adts_chain``): ``missing``, the bytes its last frame, or a header cut short after it, declares
    beyond the end of the data (0 where the chain stops at bytes that are no frame header: a
    trailer, a free-format or damaged frame, which FFmpeg judges); ``end``, where its last frame
    ends; and where measured, how many ``frames`` it holds, their ``samples`` and their sample
    ``rate`` in Hz (None where they change rate)."""

    missing: int
    end: int
    frames: int = 0
    samples: int = 0
    rate: int | None = None

    def length(self, end: int) -> tuple[int, int, int] | None:
        """(frames, samples, sample rate in Hz) of a measured chain that ends exactly at ``end``
        (where the tags after the frames start: ``trailer_start``) at one rate: the duration a
        raw file declares nowhere, exact and without demuxing its packets (FFmpeg's demuxer took
        ~1.4 s for an hour). None where it stops before (bytes that are no frame header: a
        damaged or free-format frame, junk, which FFmpeg's demuxer resyncs past), runs past the
        end or changes rate: FFmpeg's packets say how long those are."""
        if self.end != end or not self.frames or self.rate is None:
            return None
        return self.frames, self.samples, self.rate


def mpeg_audio_chain(data: bytes, start: int, measure: bool = False) -> FrameChain:
    """The MPEG-1/2/2.5 audio frames (layer I-III) chained from ``start`` (after an ID3v2 tag), each
    frame's length read from its header; a header of a reserved version, layer, bitrate or rate is
    no frame (the chain stops, ``missing`` 0). ``measure``: count its frames and samples (384 a
    frame in layer I; 1152; 576 in layer III of MPEG-2/2.5)."""
    view = np.frombuffer(data, np.uint8)
    offsets = _sync_offsets(view, MPEG_HEADER_BYTES, lambda second: second & 0xE0 == 0xE0)
    return _chain(view, start, offsets, _mpeg_frames(view, offsets), MPEG_HEADER_BYTES, measure)


def adts_chain(data: bytes, start: int, measure: bool = False) -> FrameChain:
    """The ADTS frames chained from ``start`` (after an ID3v2 tag), each frame's length its header's
    13-bit field; a length under the 7-byte header or a reserved sampling frequency index is no
    frame (the chain stops, ``missing`` 0). ``measure``: count its frames and samples (1024 a raw
    data block, ``number_of_raw_data_blocks_in_frame`` + 1 a frame: ISO 14496-3 1.A.2)."""
    view = np.frombuffer(data, np.uint8)
    offsets = _sync_offsets(view, ADTS_HEADER_BYTES, lambda second: second & 0xF6 == 0xF0)
    return _chain(view, start, offsets, _adts_frames(view, offsets), ADTS_HEADER_BYTES, measure)


def _sync_offsets(view: np.ndarray, header: int, second_byte_syncs) -> np.ndarray:
    """Sorted offsets (int64) where a byte 0xFF is followed by a byte ``second_byte_syncs`` accepts
    and ``header`` bytes fit in ``view``: every place a frame may start."""
    found, last = [], len(view) - header  # the last offset a whole header fits at
    for begin in range(0, last + 1, SEARCH_CHUNK_BYTES):
        end = min(begin + SEARCH_CHUNK_BYTES, last + 1)
        hits = np.flatnonzero(view[begin:end] == 0xFF) + begin  # one pass; the second byte only where needed
        found.append(hits[second_byte_syncs(view[hits + 1])])
    return np.concatenate(found).astype(np.int64) if found else np.zeros(0, np.int64)


def _mpeg_frames(view: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each MPEG audio header's frame length in bytes (0 for a reserved field: the walk stops), the
    samples its frame holds and its sample rate (Hz; 1 where reserved)."""
    second, third = view[offsets + 1].astype(np.int64), view[offsets + 2].astype(np.int64)
    version, layer = (second >> 3) & 3, 4 - ((second >> 1) & 3)
    bitrate, rate, padding = third >> 4, (third >> 2) & 3, (third >> 1) & 1
    kbits_table = np.zeros((2, 5, 16), np.int64)  # [MPEG-1?, layer, bitrate index]; 0 where reserved
    for (mpeg1, table_layer), kbits in MPEG_BITRATES.items():
        kbits_table[int(mpeg1), table_layer, 1:15] = kbits
    hz_table = np.zeros((4, 4), np.int64)  # [version, rate index]; 0 where reserved
    for table_version, rates in MPEG_RATES.items():
        hz_table[table_version, :3] = rates
    kbits, hz = kbits_table[(version == 3).astype(np.int64), layer, bitrate], hz_table[version, rate]
    valid = (kbits > 0) & (hz > 0) & (version != 1)
    hz = np.where(valid, hz, 1)
    slots = np.where(layer == 1, (12_000 * kbits // hz + padding) * 4, 0)  # 384 samples in 4-byte slots
    # 1152 samples, but layer III of MPEG-2/2.5 holds 576.
    half = (layer == 3) & (version != 3)
    per_kbit = np.where(half, 72_000, 144_000)
    lengths = np.where(layer == 1, slots, per_kbit * kbits // hz + padding)
    samples = np.where(layer == 1, 384, np.where(half, 576, 1152))
    return np.where(valid, lengths, 0), np.where(valid, samples, 0), hz


def _adts_frames(view: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each ADTS header's frame length in bytes (0 under the header's 7 bytes or at a reserved
    sampling frequency index: the walk stops), the samples its frame holds and its sample rate (Hz;
    1 where reserved)."""
    at = view[offsets[:, None] + np.arange(2, 7)].astype(np.int64)
    lengths = ((at[:, 1] & 3) << 11) | (at[:, 2] << 3) | (at[:, 3] >> 5)
    hz_table = np.zeros(16, np.int64)  # by sampling frequency index; 0 where reserved
    hz_table[: len(ADTS_RATES)] = ADTS_RATES
    hz = hz_table[(at[:, 0] >> 2) & 15]
    valid = (lengths >= ADTS_HEADER_BYTES) & (hz > 0)
    samples = AAC_BLOCK_SAMPLES * ((at[:, 4] & 3) + 1)
    return np.where(valid, lengths, 0), np.where(valid, samples, 0), np.where(valid, hz, 1)


def _chain(
    view: np.ndarray,
    start: int,
    offsets: np.ndarray,
    frames: tuple[np.ndarray, np.ndarray, np.ndarray],
    header: int,
    measure: bool,
) -> FrameChain:
    """The chain of frames from ``start`` (offsets of candidate headers and each one's length,
    samples and rate: ``_mpeg_frames``; a length of 0 is no frame) to where it ends: the bytes its
    last frame declares past the end, or, where it stops at bytes that are no header, those of a
    header cut short there (``header`` bytes); ``measure``: its frames, samples and rate, summed on
    the same walk."""
    lengths, samples, hz = frames
    first = np.searchsorted(offsets, start)
    if first == len(offsets) or offsets[first] != start:
        return FrameChain(_cut_header_bytes(view, start, header), start)
    # One row a frame, summed over the chain: 1, its samples, 1 where its rate is not the first's.
    weights = np.stack([np.ones_like(samples), samples, hz != hz[first]], axis=1) if measure else None
    last, total = _follow_chain(offsets, lengths, len(view), first, weights)
    end = int(offsets[last] + lengths[last])
    if lengths[last] == 0:  # no frame: FFmpeg judges what it is
        missing = 0
    else:
        missing = end - len(view) if end > len(view) else _cut_header_bytes(view, end, header)
    if total is None:
        return FrameChain(missing, end)
    whole = int(lengths[last] > 0)  # the last frame, which the walk's sums leave out
    rate = int(hz[first]) if not total[2] and hz[last] == hz[first] else None
    return FrameChain(missing, end, int(total[0]) + whole, int(total[1] + samples[last] * whole), rate)


def _follow_chain(
    offsets: np.ndarray, lengths: np.ndarray, size: int, first: int, weights: np.ndarray | None = None
) -> tuple[int, np.ndarray | None]:
    """The chain of frames (candidate headers at ``offsets``, ``lengths`` bytes long; 0: no frame)
    from index ``first`` within ``size`` bytes: the index of its last frame, and the sums of
    ``weights`` (int64, a row a frame) over the frames before that one (None without weights)."""
    ends = offsets + lengths
    following = np.searchsorted(offsets, ends)
    linked = (lengths > 0) & (ends <= size) & (following < len(offsets))
    linked &= offsets[np.minimum(following, len(offsets) - 1)] == ends
    nxt = np.where(linked, following, np.arange(len(offsets)))  # a frame the chain ends at points at itself
    total = None if weights is None else np.where(linked[:, None], weights, 0)
    # Pointer doubling: after k rounds each frame points 2**k frames on, or at its chain's end, and
    # its total sums the frames it passed (the chain's end adds nothing).
    for _ in range(max(1, int(len(offsets)).bit_length())):
        if total is not None:
            total = total + total[nxt]
        nxt = nxt[nxt]
    return int(nxt[first]), None if total is None else total[first]


def _cut_header_bytes(view: np.ndarray, offset: int, header: int) -> int:
    """The bytes missing from a frame header cut short at ``offset`` (a 0xFF with fewer than
    ``header`` bytes after it to the end), else 0: bytes that are no header are no part of it."""
    tail = len(view) - offset
    return header - tail if 0 < tail < header and view[offset] == 0xFF else 0


def trailer_start(data: bytes, start: int = 0) -> int:
    """Where the tags after an MP3's or ADTS file's last frame begin (``len(data)`` without any, not
    before ``start``): ID3v1, APEv2 (its footer's size, and its header where flagged) and
    Lyrics3v2, in any order, as taggers stack them."""
    end = len(data)
    while True:
        if end - ID3V1_BYTES >= start and data[end - ID3V1_BYTES : end - ID3V1_BYTES + 3] == b"TAG":
            end -= ID3V1_BYTES
        elif end - APE_FOOTER_BYTES >= start and data[end - APE_FOOTER_BYTES : end - 24] == b"APETAGEX":
            footer = data[end - APE_FOOTER_BYTES : end]
            size = int.from_bytes(footer[12:16], "little")  # items and footer, not the header
            header = APE_FOOTER_BYTES if int.from_bytes(footer[20:24], "little") & (1 << 31) else 0
            if size < APE_FOOTER_BYTES or end - size - header < start:  # no APE tag: too small to hold its footer
                return end
            end -= size + header
        elif end - 15 >= start and data[end - 9 : end] == LYRICS3_END and data[end - 15 : end - 9].isdigit():
            size = int(data[end - 15 : end - 9])  # from "LYRICSBEGIN" to the size field
            if end - 15 - size < start:
                return end
            end -= 15 + size
        else:
            return end
