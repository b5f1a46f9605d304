"""What an MP4 declares about its own length (docs/DESIGN.md, "Real media": truncation, and a
file of no samples).

A fragmented MP4 (``moov`` with ``mvex``, then ``moof`` + ``mdat`` pairs) cut exactly between two
fragments leaves only whole boxes, and FFmpeg plays the fragments that are there: a shorter clip.
Two boxes say how long the file is: a top-level ``sidx`` lists the bytes of the fragments it
indexes (a global one, as DASH writers and ``-movflags global_sidx`` write, all of them), and
``mvex/mehd`` holds the movie's whole duration (FFmpeg reads neither for a cut file). Without
them nothing in the file tells a cut between fragments from a shorter file.
``box_header`` reads a box header for these walks and for ``media_files``' walk of the top-level boxes.

An MP4 lists its samples in each track's sample table, a fragmented one in its fragments: ffmpeg
writes 0 samples as a ``moov`` of no track (FFmpeg opened it as a file of no stream), a fragmented
file of 0 samples as an empty moov and no fragment, and a writer may leave a track's table empty.
``track_sample_counts`` reads how many each track lists.
"""

from __future__ import annotations


def missing_sidx_bytes(data: bytes) -> int:
    """How many bytes the top-level ``sidx`` boxes index beyond the end of ``data``: each one's
    references start ``first_offset`` after the box and span the sum of their sizes (ISO 14496-12
    8.16.3; a reference to another ``sidx`` spans that one's subsegments too)."""
    missing = 0
    for start, end in _boxes(data, 0, len(data), b"sidx"):
        version, at = data[start], start + 12  # version, flags, reference_ID, timescale
        wide = 8 if version else 4  # earliest_presentation_time and first_offset
        if at + 2 * wide + 4 > end:
            continue  # not a sidx: FFmpeg judges it
        first_offset = int.from_bytes(data[at + wide : at + 2 * wide], "big")
        count = int.from_bytes(data[at + 2 * wide + 2 : at + 2 * wide + 4], "big")
        references = at + 2 * wide + 4
        if references + 12 * count > end:
            continue
        sizes = (
            int.from_bytes(data[r : r + 4], "big") & 0x7FFF_FFFF for r in range(references, references + 12 * count, 12)
        )
        missing = max(missing, end + first_offset + sum(sizes) - len(data))
    return missing


def declared_fragment_seconds(data: bytes) -> float | None:
    """The movie's whole duration that ``moov/mvex/mehd`` declares, in seconds of the ``mvhd``
    timescale (None without one: an unfragmented file, or a writer that leaves it out)."""
    for moov_start, moov_end in _boxes(data, 0, len(data), b"moov"):
        mvhd = next(_boxes(data, moov_start, moov_end, b"mvhd"), None)
        mvex = next(_boxes(data, moov_start, moov_end, b"mvex"), None)
        mehd = next(_boxes(data, *mvex, b"mehd"), None) if mvex else None
        if mvhd is None or mehd is None:
            return None
        timescale_at = mvhd[0] + (20 if data[mvhd[0]] else 12)  # after version/flags and two times
        timescale = int.from_bytes(data[timescale_at : timescale_at + 4], "big")
        wide = 8 if data[mehd[0]] else 4
        duration = int.from_bytes(data[mehd[0] + 4 : mehd[0] + 4 + wide], "big")
        if not timescale or mehd[0] + 4 + wide > mehd[1] or timescale_at + 4 > mvhd[1]:
            return None  # not a valid header: FFmpeg judges the file
        return duration / timescale
    return None


def track_sample_counts(data: bytes) -> list[int] | None:
    """How many samples each track (``trak``) of the top-level ``moov`` lists in its sample table
    (``mdia/minf/stbl``: the count in ``stsz`` or its compact ``stz2``); ``[]`` for a moov of no
    track. None where no whole moov is found, a fragment (``moof``) follows it, whose samples its
    own boxes list, or a track's count cannot be read (FFmpeg judges those files)."""
    moov = next(_boxes(data, 0, len(data), b"moov"), None)
    if moov is None or next(_boxes(data, 0, len(data), b"moof"), None) is not None:
        return None
    counts = []
    for trak in _boxes(data, *moov, b"trak"):
        stbl = _child(data, trak, (b"mdia", b"minf", b"stbl"))
        table = None if stbl is None else _child(data, stbl, (b"stsz",)) or _child(data, stbl, (b"stz2",))
        if not table or table[0] + 12 > table[1]:  # version, flags, sample size (or field size), count
            return None
        counts.append(int.from_bytes(data[table[0] + 8 : table[0] + 12], "big"))
    return counts


def _child(data: bytes, box: tuple[int, int], path: tuple[bytes, ...]) -> tuple[int, int] | None:
    """The (payload start, end) of the first box down ``path`` (box types, one a level) inside
    ``box``'s payload, None where one is missing."""
    for kind in path:
        box = next(_boxes(data, *box, kind), None)
        if box is None:
            return None
    return box


def box_header(data: bytes, offset: int) -> tuple[bytes, int, int | None]:
    """The ISO BMFF box header at ``offset`` (at least 8 bytes there): its type, the header's length
    and the box's declared size (the 64-bit size where the 32-bit one is 1, None where that is cut
    short; 0: to the end of its parent)."""
    size, kind = int.from_bytes(data[offset : offset + 4], "big"), data[offset + 4 : offset + 8]
    if size != 1:
        return kind, 8, size
    if offset + 16 > len(data):
        return kind, 16, None
    return kind, 16, int.from_bytes(data[offset + 8 : offset + 16], "big")


def _boxes(data: bytes, start: int, end: int, kind: bytes):
    """The (payload start, end) of each box of type ``kind`` among the boxes from ``start`` to
    ``end``; the walk stops at a box that runs past ``end`` or has no valid size."""
    offset = start
    while offset + 8 <= end:
        found, header, size = box_header(data, offset)
        if size == 0:  # the last box, to the end
            size = end - offset
        if size is None or size < header or offset + size > end:
            return
        if found == kind:
            yield offset + header, offset + size
        offset += size
