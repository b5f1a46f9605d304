"""Where the frames of a raw MP3 or AAC (ADTS) file end, each frame's length read from its header,
to find a cut file (docs/DESIGN.md, "Real media": truncation is never a shorter clip); and how
long such a file lasts where it declares no length (a raw AAC file, an MP3 without a Xing header),
its frames and samples counted on the same walk (``FrameChain``). A FLAC file's frames declare no
length: its last one must pass its CRC-16 and end at the samples its STREAMINFO declares
(``flac_cut``).

The frames are a chain: each header says where the next one starts. Walking it in Python cost
about 1 us a frame, an hour of MP3 (150k frames) 0.17 s, most of the time a 10 s clip of it took.
Here every place a header may start (its sync bits) is found and parsed by numpy, each linked to
the one its length points at, and the chain from the first frame is followed by pointer doubling:
about log2(frames) array steps, the same verdict as the frame-by-frame walk (tested against it).
The file is walked a window (``SEARCH_CHUNK_BYTES``) at a time, so memory is a window's, whatever
the file's size and however many headers it holds.
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
# The chain is walked a window of this many bytes at a time, its candidates parsed this many at a
# time: a window of sync bytes alone (a candidate at every byte, parsed into some 20 int64 arrays
# each) or of valid headers at every third byte stays some 40 MB, and a real file's few candidates
# (~1 a frame) are one batch a window.
SEARCH_CHUNK_BYTES, PARSE_BATCH = 1 << 20, 1 << 16
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
    syncs = lambda second: second & 0xE0 == 0xE0  # noqa: E731
    return _walk(np.frombuffer(data, np.uint8), start, MPEG_HEADER_BYTES, syncs, _mpeg_frames, measure)


def adts_chain(data: bytes, start: int, measure: bool = False) -> FrameChain:
    """The ADTS frames chained from ``start`` (after an ID3v2 tag), each frame's length its header's
    13-bit field; a length under the 7-byte header or a reserved sampling frequency index is no
    frame (the chain stops, ``missing`` 0). ``measure``: count its frames and samples (1024 a raw
    data block, ``number_of_raw_data_blocks_in_frame`` + 1 a frame: ISO 14496-3 1.A.2)."""
    syncs = lambda second: second & 0xF6 == 0xF0  # noqa: E731
    return _walk(np.frombuffer(data, np.uint8), start, ADTS_HEADER_BYTES, syncs, _adts_frames, measure)


def _walk(view: np.ndarray, start: int, header: int, second_byte_syncs, parse, measure: bool) -> FrameChain:
    """The chain of frames from ``start`` to where it ends: the bytes its last frame declares past
    the end, or, where it stops at bytes that are no header, those of a header cut short there
    (``header`` bytes); ``measure``: its frames, samples and rate, summed on the same walk.

    Walked a window of SEARCH_CHUNK_BYTES at a time from where the chain stands: the headers in the
    window (``_frame_headers``), the chain through them by pointer doubling (``_follow_chain``), and
    on from where its last frame ends past the window. Every header of the whole file held at once
    cost some 45 bytes a byte of a crafted file of valid headers at every third byte (a 100 MB shard
    member, 4.5 GB); a window's cost no more than its megabyte's."""
    last = len(view) - header  # the last offset a whole header fits at
    at, frames, samples, first_hz, one_rate = start, 0, 0, None, True
    while True:
        window_end = min(at + SEARCH_CHUNK_BYTES, last + 1)
        offsets, (lengths, counts, hz) = _frame_headers(view, at, window_end, second_byte_syncs, parse)
        if not len(offsets) or offsets[0] != at:  # no frame here: the chain ends where the last one did
            break
        first_hz = int(hz[0]) if first_hz is None else first_hz
        # One row a frame, summed over the chain: 1, its samples, 1 where its rate is not the first's.
        weights = np.stack([np.ones_like(counts), counts, hz != first_hz], axis=1) if measure else None
        index, total = _follow_chain(offsets, lengths, len(view), weights)
        if total is not None:  # the last frame, which the walk's sums leave out, is counted here
            frames, samples = frames + int(total[0]) + 1, samples + int(total[1] + counts[index])
            one_rate = one_rate and not total[2] and hz[index] == first_hz
        at = int(offsets[index] + lengths[index])
        if at < window_end or at > last:  # it stops inside the window, or at (or past) the end of the data
            break
    missing = at - len(view) if at > len(view) else _cut_header_bytes(view, at, header)
    if not measure or not frames:
        return FrameChain(missing, at)
    return FrameChain(missing, at, frames, samples, first_hz if one_rate else None)


def _frame_headers(
    view: np.ndarray, begin: int, end: int, second_byte_syncs, parse
) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The frame headers at offsets ``begin`` to ``end`` (exclusive; a whole header fits at each)
    of ``view``: their sorted offsets (int64) and ``parse``'s (lengths, samples, rates) of them
    (``_mpeg_frames``), only those of a frame (a length above 0). A header may start wherever a byte
    0xFF is followed by a byte ``second_byte_syncs`` accepts. Parsed a batch at a time, and what is
    no frame dropped there: a window of sync bytes alone (0xFF...) is a candidate at every byte,
    whose arrays (some 20 int64 a candidate) and chain walk took 1 GB and 10 s for 8 MB."""
    hits = np.flatnonzero(view[begin:end] == 0xFF) + begin  # one pass; the second byte only where needed
    candidates = hits[second_byte_syncs(view[hits + 1])].astype(np.int64)
    found = []
    for at in range(0, len(candidates), PARSE_BATCH):
        offsets = candidates[at : at + PARSE_BATCH]
        lengths, samples, hz = parse(view, offsets)
        frame = lengths > 0
        found.append((offsets[frame], lengths[frame], samples[frame], hz[frame]))
    if not found:
        return np.zeros(0, np.int64), tuple(np.zeros(0, np.int64) for _ in range(3))
    offsets, *frames = (np.concatenate(column) for column in zip(*found))
    return offsets, tuple(frames)


def _mpeg_frames(view: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each MPEG audio header's frame length in bytes (0 for a reserved field: no frame), the
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
    sampling frequency index: no frame), the samples its frame holds and its sample rate (Hz;
    1 where reserved)."""
    at = view[offsets[:, None] + np.arange(2, 7)].astype(np.int64)
    lengths = ((at[:, 1] & 3) << 11) | (at[:, 2] << 3) | (at[:, 3] >> 5)
    hz_table = np.zeros(16, np.int64)  # by sampling frequency index; 0 where reserved
    hz_table[: len(ADTS_RATES)] = ADTS_RATES
    hz = hz_table[(at[:, 0] >> 2) & 15]
    valid = (lengths >= ADTS_HEADER_BYTES) & (hz > 0)
    samples = AAC_BLOCK_SAMPLES * ((at[:, 4] & 3) + 1)
    return np.where(valid, lengths, 0), np.where(valid, samples, 0), np.where(valid, hz, 1)


def _follow_chain(
    offsets: np.ndarray, lengths: np.ndarray, size: int, weights: np.ndarray | None = None
) -> tuple[int, np.ndarray | None]:
    """The chain of frames (headers at ``offsets``, ``lengths`` bytes long) from the first within
    ``size`` bytes: the index of its last frame, and the sums of ``weights`` (int64, a row a frame)
    over the frames before that one (None without weights)."""
    ends = offsets + lengths
    following = np.searchsorted(offsets, ends)
    linked = (ends <= size) & (following < len(offsets))
    linked &= offsets[np.minimum(following, len(offsets) - 1)] == ends
    nxt = np.where(linked, following, np.arange(len(offsets)))  # a frame the chain ends at points at itself
    total = None if weights is None else np.where(linked[:, None], weights, 0)
    # Pointer doubling: after k rounds each frame points 2**k frames on, or at its chain's end, and
    # its total sums the frames it passed (the chain's end adds nothing). Done once the first
    # frame points at its chain's end: a short chain among many headers takes few rounds.
    for _ in range(max(1, int(len(offsets)).bit_length())):
        if nxt[nxt[0]] == nxt[0]:
            break
        if total is not None:
            total = total + total[nxt]
        nxt = nxt[nxt]
    return int(nxt[0]), None if total is None else total[0]


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


# FLAC (the native stream, not FLAC in Ogg): its magic, STREAMINFO's block type and size, the
# second bytes of the two frame sync codes (0xFF 0xF8: fixed block size, 0xF9: variable); the bytes
# before the end (after the last frame: a trailer) searched for its header, and how many sync codes
# there are tried (a crafted run of sync codes is no header: past them FFmpeg judges the file).
FLAC_MAGIC, FLAC_STREAMINFO, FLAC_STREAMINFO_BYTES = b"fLaC", 0, 34
FLAC_FIXED, FLAC_VARIABLE = 0xF8, 0xF9
FLAC_SEARCH_BYTES, FLAC_SYNCS_TRIED = 1 << 20, 4096


def _crc_table(polynomial: int, bits: int) -> tuple[int, ...]:
    """The byte-at-a-time table of a CRC of ``bits`` bits, MSB first, of ``polynomial``."""
    top, mask, table = 1 << (bits - 1), (1 << bits) - 1, []
    for byte in range(256):
        crc = byte << (bits - 8)
        for _ in range(8):
            crc = ((crc << 1) ^ polynomial if crc & top else crc << 1) & mask
        table.append(crc)
    return tuple(table)


FLAC_CRC8, FLAC_CRC16 = _crc_table(0x07, 8), _crc_table(0x8005, 16)


def flac_cut(data: bytes) -> str | None:
    """Why a FLAC file is cut, for its error ("its frames end at sample 88064 but its STREAMINFO
    declares 96000"), None where it is whole or cannot be judged (no STREAMINFO, a total of 0 samples:
    a writer to a pipe could not fill it in; no frame header found). FFmpeg decodes what is there: a
    file cut between two frames was a shorter sound, and one cut anywhere a clip that ends before
    the cut was taken from a whole file. The last frame, found from the end by its sync code and
    header checksum, must pass its CRC-16 somewhere (bytes after it are a tool's trailer, which
    FFmpeg reads past too) and end at the samples STREAMINFO declares."""
    if data[:4] != FLAC_MAGIC:
        return None
    offset, info = 4, None
    while offset + 4 <= len(data):  # the metadata blocks, to the one flagged last
        kind, size = data[offset], int.from_bytes(data[offset + 1 : offset + 4], "big")
        if kind & 0x7F == FLAC_STREAMINFO and size >= FLAC_STREAMINFO_BYTES:
            info = data[offset + 4 : offset + 4 + FLAC_STREAMINFO_BYTES]
        offset += 4 + size
        if kind & 0x80:
            break
    if offset > len(data):
        return f"its metadata blocks declare {offset - len(data)} bytes more than it holds"
    if info is None or len(info) < FLAC_STREAMINFO_BYTES:
        return None
    fixed_block = int.from_bytes(info[0:2], "big")
    max_frame = int.from_bytes(info[7:10], "big") or FLAC_SEARCH_BYTES
    total = int.from_bytes(info[10:18], "big") & ((1 << 36) - 1)
    if not total:
        return None
    last = _last_flac_frame(data, offset, max_frame)
    if last is None:
        return None
    at, first_sample, block = last
    first_sample *= fixed_block if data[at + 1] == FLAC_FIXED else 1  # a frame number at a fixed size
    if not _crc_passes_somewhere(data[at : at + max_frame + FLAC_SEARCH_BYTES]):
        return f"its last frame, at byte {at}, fails its CRC-16 check to the end of the file"
    if first_sample + block != total:
        return f"its frames end at sample {first_sample + block} but its STREAMINFO declares {total}"
    return None


def _last_flac_frame(data: bytes, start: int, max_frame: int) -> tuple[int, int, int] | None:
    """(offset, frame or sample number, block size) of the last FLAC frame header from ``start``
    (after the metadata), searched for within ``max_frame`` bytes and a trailer's before the end;
    None where none is found in ``FLAC_SYNCS_TRIED`` sync codes."""
    floor = max(start, len(data) - max_frame - FLAC_SEARCH_BYTES)
    view = np.frombuffer(data, np.uint8)[floor:]
    syncs = np.flatnonzero((view[:-1] == 0xFF) & (view[1:] | 1 == FLAC_VARIABLE)) + floor
    for at in syncs[::-1][:FLAC_SYNCS_TRIED].tolist():
        header = _flac_frame_header(data, at)
        if header is not None:
            return (at, *header)
    return None


def _flac_frame_header(data: bytes, at: int) -> tuple[int, int] | None:
    """(frame or sample number, block size) of the FLAC frame header at ``at``; None where its fields
    are reserved or its CRC-8 does not match (a sync code in the audio data)."""
    if at + 6 > len(data):
        return None
    size_code, channels = data[at + 2] >> 4, data[at + 3] >> 4
    if size_code == 0 or data[at + 2] & 15 == 15 or channels > 10 or data[at + 3] & 1:
        return None
    first = data[at + 4]
    length = 1 if first < 0x80 else 8 - (first ^ 0xFF).bit_length()  # UTF-8 style: 1..7 bytes
    if first >= 0x80 and not 2 <= length <= 7:
        return None
    offset = at + 4 + length
    number = first & (0x7F >> (length - 1 if length > 1 else 0)) if length < 7 else 0
    for byte in data[at + 5 : offset]:
        if byte & 0xC0 != 0x80:
            return None
        number = (number << 6) | (byte & 0x3F)
    extra = {6: 1, 7: 2}.get(size_code, 0)
    if offset + extra > len(data):
        return None
    if extra:
        block = int.from_bytes(data[offset : offset + extra], "big") + 1
    else:
        block = 192 if size_code == 1 else 576 << (size_code - 2) if size_code < 6 else 256 << (size_code - 8)
    offset += extra + {12: 1, 13: 2, 14: 2}.get(data[at + 2] & 15, 0)  # a sample rate in the header
    if offset >= len(data) or _crc(FLAC_CRC8, 8, data[at:offset]) != data[offset]:
        return None
    return number, block


def _crc(table: tuple[int, ...], bits: int, data: bytes) -> int:
    crc, mask = 0, (1 << bits) - 1
    for byte in data:
        crc = ((crc << 8) & mask) ^ table[(crc >> (bits - 8)) ^ byte]
    return crc


def _crc_passes_somewhere(frame: bytes) -> bool:
    """Whether the FLAC frame at the start of ``frame`` ends somewhere in it with its CRC-16: the
    CRC of a frame with its own CRC appended is 0 (what follows is a trailer)."""
    crc = 0
    for byte in frame:
        crc = ((crc << 8) & 0xFFFF) ^ FLAC_CRC16[(crc >> 8) ^ byte]
        if crc == 0:
            return True
    return False
