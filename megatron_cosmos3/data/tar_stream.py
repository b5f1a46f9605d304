"""A shard's tar stream: its members read across concatenated archives and stray bytes, and how it ended.

Python's tarfile ends an archive quietly at anything that is no member header: the archive's
end-of-archive block, the end of the data, or a damaged header. Which one it was decides whether
the last sample read is whole (``read_shard``), so ``TarMembers`` records it. ``cat a.tar b.tar``
(a common way to merge shards) puts a second archive after the first one's end blocks: it is read
on, as ``tar --ignore-zeros`` reads it, where WebDataset and plain ``tar`` stop at the first end and
lose the rest without a sign. Bytes that are no tar (after an end-of-archive block, or where a
member header should be) are scanned past to the next valid member header at any byte (one
tarfile parses whose checksum matches: ustar or v7, whose header has no magic), and reported as
``Stray`` (docs/DESIGN.md, "The data path, from shard to loss"). Decompression is
``compressed_streams``'.
"""

from __future__ import annotations

import re
import tarfile
from dataclasses import dataclass
from typing import NamedTuple

from megatron_cosmos3.data.compressed_streams import Replay, UnsupportedCompression, decompressed

__all__ = [
    "CLEAN",
    "CUT",
    "DAMAGED",
    "FIRST_HEADER_WITHIN",
    "TAR_BLOCK",
    "Stray",
    "TarMembers",
    "UnsupportedCompression",
    "decompressed",
]

TAR_BLOCK = 512
_CHUNK = 1 << 20
# The bytes before its first member header a shard may hold (junk or zeros: an empty archive's end
# blocks); past them it is no tar, refused unread (a 200 MB file of random bytes or zeros was
# scanned or read to its end first, seconds each).
FIRST_HEADER_WITHIN = 64 << 10
_MAGIC_AT = 257  # where a ustar header holds b"ustar"
_CHECKSUM_AT = 148  # where a header's checksum field starts: octal digits, then NUL or space
# Header candidates one scan may try (a few microseconds each): bytes of octal digits throughout
# look like a header at every offset and would keep a scan at a megabyte in seconds.
_MAX_CANDIDATES = 1 << 16
# Zero bytes that end bytes passed over as a member's data padding (random junk ends so once in 2**64).
_PADDING_RUN = 8
_CHECKSUM = re.compile(rb"(?=[0-7 ]{6}[0-7 \x00][\x00 ])")
# How a tar stream ended (``TarMembers.end``).
CLEAN = "clean"  # at an end-of-archive block: every member before it is whole
CUT = "cut"  # the data stops where a member header should start, or inside one
DAMAGED = "damaged"  # at a block that is no member header, with no member header after it


@dataclass(frozen=True)
class Stray:
    """``size`` bytes of the tar stream that are no member, passed over to the next member header,
    found ``where`` (``LEADING``, ``IN_ARCHIVE``: where a member header should be; ``AFTER_END``:
    after an end-of-archive block). ``to_end``: they run to the end of the data.
    ``in_place_of_members``: they may be members whose header was destroyed (``_in_place_of_members``),
    so the samples on either side may lack members; else they were put between members, which
    they leave whole."""

    size: int
    where: str
    to_end: bool = False
    in_place_of_members: bool = False


LEADING = "before the first member header"
IN_ARCHIVE = "where a member header should be"
AFTER_END = "after an end-of-archive block"


class _HeaderReader(tarfile.TarInfo):
    """Reads member headers as ``TarInfo`` does, noting on the archive the header error that ends
    it and the block that raised it (where a scan for the next header starts)."""

    @classmethod
    def fromtarfile(cls, archive: tarfile.TarFile) -> tarfile.TarInfo:
        block = archive.fileobj.read(TAR_BLOCK)
        try:
            member = cls.frombuf(block, archive.encoding, archive.errors)
        except tarfile.HeaderError as error:
            archive.stopped_by, archive.stopped_at = error, block
            raise
        member.offset = archive.fileobj.tell() - TAR_BLOCK
        return member._proc_member(archive)  # a long-name or pax header reads the next one through here


def _open(stream) -> tarfile.TarFile:
    return tarfile.open(fileobj=stream, mode="r|", tarinfo=_HeaderReader)


class TarMembers:
    """The members of a tar stream and of every archive concatenated after it, in order, with a
    ``Stray`` between them where bytes that are no tar were passed over.

    ``extract(member)`` reads a member's bytes (call it before the next member). After iteration,
    ``end`` is CLEAN, CUT or DAMAGED; ``unread`` counts the bytes after a damaged header that no
    member header follows. Bytes before the first header are passed over as any others (the first
    ``Stray``); opening raises ``tarfile.ReadError`` where no header follows them or none lies within
    the first ``FIRST_HEADER_WITHIN`` bytes (then no more is read)."""

    def __init__(self, stream) -> None:
        self.stream = stream
        head = _read_up_to(stream, FIRST_HEADER_WITHIN)
        self.first: Stray | None = None
        if len(head) >= TAR_BLOCK and not _is_header(head[:TAR_BLOCK]):  # junk or zeros first
            found = _find_header(head, 0, [_MAX_CANDIDATES])
            if found is None and len(head) == FIRST_HEADER_WITHIN:  # no tar: refused unread past here
                raise tarfile.ReadError(f"no tar member header in its first {len(head):,} bytes")
            if head.count(0, 0, TAR_BLOCK) < TAR_BLOCK:  # zeros are an empty archive's end: read on
                if found is None:
                    raise tarfile.ReadError(f"no tar member header in its {len(head)} bytes")
                scan = _Scan(found, head[found:], head[max(0, found - _PADDING_RUN) : found])
                self.first, head = _stray(scan, head, LEADING), scan.after
        self.archive = _open(Replay(head, stream))
        self.end: str | None = None
        self.unread = 0

    def extract(self, member: tarfile.TarInfo) -> bytes:
        return self.archive.extractfile(member).read()

    def __iter__(self):
        if self.first is not None:
            yield self.first
        while True:
            try:
                yield from self.archive
            except tarfile.ReadError:  # a long-name or pax header not followed by a member header
                if not isinstance(getattr(self.archive, "stopped_by", None), tarfile.InvalidHeaderError):
                    raise
            stop = getattr(self.archive, "stopped_by", None)
            rest_of = self.archive.fileobj
            if isinstance(stop, tarfile.InvalidHeaderError):
                # The bad block starts on the block grid; a header at its own start was refused.
                scan = _next_header(self.archive.stopped_at, rest_of, start=1)
                after = scan.after
                if not after:
                    self.end, self.unread = DAMAGED, scan.passed
                    return
                yield _stray(scan, self.archive.stopped_at, IN_ARCHIVE)
            elif isinstance(stop, tarfile.EOFHeaderError):
                after = _after_zeros(rest_of)
                if after:  # another archive (cat a.tar b.tar), or bytes that are no tar
                    first, scan = after, _next_header(after, rest_of, start=0)
                    after = scan.after
                    if scan.passed:
                        yield _stray(scan, first, AFTER_END)
                if not after:
                    self.end = CLEAN
                    return
            else:  # the data stops at or inside a header
                self.end = CUT
                return
            self.archive = _open(Replay(after, rest_of))


def _read_up_to(stream, size: int) -> bytes:
    """The first ``size`` bytes of ``stream``, fewer only where it ends."""
    head = stream.read(size)
    while len(head) < size and (more := stream.read(size - len(head))):
        head += more
    return head


def _after_zeros(stream) -> bytes:
    """Reads past zero bytes: the bytes from the first non-zero one (at least a block of them where
    the stream holds that many), b"" at the end."""
    while chunk := stream.read(_CHUNK):
        after = chunk.lstrip(b"\0")
        if after:
            while len(after) < TAR_BLOCK and (more := stream.read(TAR_BLOCK)):
                after += more
            return after
    return b""


class _Scan(NamedTuple):
    """What ``_next_header`` passed over: ``passed`` bytes, ending with ``tail`` (their last
    ``_PADDING_RUN`` or fewer), and ``after``, the data from the header found on (b"" where none
    follows)."""

    passed: int
    after: bytes
    tail: bytes = b""


def _next_header(head: bytes, stream, start: int) -> _Scan:
    """Scans ``head`` and then ``stream`` for the first member header at or after byte ``start`` of
    ``head``; where none follows, every byte is passed over."""
    buffer, passed, budget, tail = head, 0, [_MAX_CANDIDATES], b""
    while True:
        found = _find_header(buffer, start, budget)
        if found is not None:
            return _Scan(passed + found, buffer[found:], (tail + buffer[:found])[-_PADDING_RUN:])
        more = stream.read(_CHUNK)
        if not more or budget[0] <= 0:  # the end, or bytes crafted to look like headers everywhere
            return _Scan(passed + len(buffer) + len(more) + _length(stream), b"")
        # Keep the tail a header may start in; every start before it was tried with a whole block.
        drop = max(0, len(buffer) - (TAR_BLOCK - 1))
        tail = (tail + buffer[:drop])[-_PADDING_RUN:]
        passed, buffer, start = passed + drop, buffer[drop:] + more, start if drop == 0 else 0


def _stray(scan: _Scan, first: bytes, where: str) -> Stray:
    """The ``Stray`` of bytes a scan passed over to a header, ``first`` the data they start."""
    return Stray(scan.passed, where, not scan.after, _in_place_of_members(first[:TAR_BLOCK], scan.passed, scan.tail))


def _in_place_of_members(first: bytes, size: int, tail: bytes) -> bool:
    """Whether ``size`` bytes passed over to the next header, starting with the block ``first`` and
    ending with ``tail``, may be members whose header was destroyed. A destroyed header and its
    member's data are whole blocks, the last padded with zeros (``_PADDING_RUN`` or more, unless the
    data (nearly) fills it), or exactly as many as a header whose checksum alone is wrong declares;
    bytes put between members (of any length) are neither, and a sample around them lost nothing."""
    if size % TAR_BLOCK or not size:
        return False
    if len(tail) == _PADDING_RUN and not tail.strip(b"\0"):
        return True
    declared = _size_but_for_checksum(first)
    return declared is not None and size == TAR_BLOCK + -(-declared // TAR_BLOCK) * TAR_BLOCK


def _size_but_for_checksum(block: bytes) -> int | None:
    """The data size ``block`` declares where it is a member header but for its checksum, else None."""
    if len(block) < TAR_BLOCK:
        return None
    fixed = bytearray(block)
    fixed[_CHECKSUM_AT : _CHECKSUM_AT + 8] = b" " * 8
    fixed[_CHECKSUM_AT : _CHECKSUM_AT + 8] = b"%06o\0 " % sum(fixed)
    try:
        return tarfile.TarInfo.frombuf(bytes(fixed), tarfile.ENCODING, "surrogateescape").size
    except (tarfile.HeaderError, ValueError):
        return None


def _find_header(buffer: bytes, start: int, budget: list[int]) -> int | None:
    """The first offset >= ``start`` of ``buffer`` where a whole valid header lies: a candidate has
    an octal checksum field (every tar format's; a v7 header has no magic) or a ustar magic, and
    is a header where tarfile parses it and its checksum matches. ``budget[0]``: candidates left to
    try (each is a header parse)."""
    found = None
    for match in _CHECKSUM.finditer(buffer, start + _CHECKSUM_AT):
        at = match.start() - _CHECKSUM_AT
        if at + TAR_BLOCK > len(buffer) or budget[0] <= 0:
            break
        budget[0] -= 1
        if _is_header(buffer[at : at + TAR_BLOCK]):
            found = at
            break
    magic = buffer.find(b"ustar", start + _MAGIC_AT)
    while magic >= 0 and magic - _MAGIC_AT + TAR_BLOCK <= len(buffer) and budget[0] > 0:
        at = magic - _MAGIC_AT
        if found is not None and at >= found:
            break
        budget[0] -= 1
        if _is_header(buffer[at : at + TAR_BLOCK]):
            return at
        magic = buffer.find(b"ustar", magic + 1)
    return found


def _is_header(block: bytes) -> bool:
    try:
        tarfile.TarInfo.frombuf(block, tarfile.ENCODING, "surrogateescape")
    except (tarfile.HeaderError, ValueError):
        return False
    return True


def _length(stream) -> int:
    total = 0
    while chunk := stream.read(_CHUNK):
        total += len(chunk)
    return total
