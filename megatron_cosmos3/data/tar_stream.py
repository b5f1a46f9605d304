"""A shard's tar stream: decompressed, its members read across concatenated archives, and how it ended.

Python's tarfile ends an archive quietly at anything that is no member header: the archive's
end-of-archive block, the end of the data, or a damaged header. Which one it was decides whether
the last sample read is whole (``read_shard``), so ``TarMembers`` records it. ``cat a.tar b.tar``
(a common way to merge shards) puts a second archive after the first one's end blocks: it is read
on, as ``tar --ignore-zeros`` reads it, where WebDataset and plain ``tar`` stop at the first end and
lose the rest without a sign. Other bytes after an end-of-archive block are no tar; they are
counted (``TarMembers.ignored``) and otherwise ignored, as tar ignores them (docs/DESIGN.md, "The
data path, from shard to loss").
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import tarfile

TAR_BLOCK = 512
_GZIP, _BZIP2, _XZ, _ZSTD = b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"\x28\xb5\x2f\xfd"
_CHUNK = 1 << 20
# How a tar stream ended (``TarMembers.end``).
CLEAN = "clean"  # at an end-of-archive block: every member before it is whole
CUT = "cut"  # the data stops where a member header should start, or inside one
DAMAGED = "damaged"  # at a block that is no member header


class UnsupportedCompression(Exception):
    """A shard compressed in a format this reader has no decompressor for (the message names it)."""


class _Replay:
    """``stream`` with ``head`` (bytes already read from it) put back in front."""

    def __init__(self, head: bytes, stream) -> None:
        self.head, self.stream = head, stream

    def read(self, size: int = -1) -> bytes:
        if not self.head:
            return self.stream.read(size)
        if size is None or size < 0:
            data, self.head = self.head + self.stream.read(), b""
            return data
        data, self.head = self.head[:size], self.head[size:]
        return data + (self.stream.read(size - len(data)) if len(data) < size else b"")


def decompressed(raw):
    """The tar stream of a shard: decompressed by Python's own gzip / bz2 / xz readers where its
    first bytes say so. They read every stream of a multi-stream file (``cat a.gz b.gz``, pbzip2,
    bgzip), where tarfile's ``r|*`` stops after the first and the samples after it were lost
    without a sign. A zstd shard is ``UnsupportedCompression`` (tarfile called it a "truncated
    header", naming nothing)."""
    head = raw.read(len(_XZ))
    stream = _Replay(head, raw)
    if head.startswith(_GZIP):
        return gzip.GzipFile(fileobj=stream, mode="rb")
    if head.startswith(_BZIP2):
        return bz2.BZ2File(stream)
    if head.startswith(_XZ):
        return lzma.LZMAFile(stream)
    if head.startswith(_ZSTD):
        raise UnsupportedCompression(
            "zstd-compressed (.tar.zst), which this reader cannot decompress: "
            "decompress it (zstd -d) or write the shards as .tar, .tar.gz or .tar.xz"
        )
    return stream


class _HeaderReader(tarfile.TarInfo):
    """Reads member headers as ``TarInfo`` does, noting on the archive the header error that ends it."""

    @classmethod
    def fromtarfile(cls, archive: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(archive)
        except tarfile.HeaderError as error:
            archive.stopped_by = error
            raise


def _open(stream) -> tarfile.TarFile:
    return tarfile.open(fileobj=stream, mode="r|", tarinfo=_HeaderReader)


class TarMembers:
    """The members of a tar stream and of every archive concatenated after it, in order.

    ``extract(member)`` reads a member's bytes (call it before the next member). After iteration,
    ``end`` is CLEAN, CUT or DAMAGED; ``unread`` counts the bytes after a damaged header,
    ``ignored`` those after the last end-of-archive block that are no tar. Opening raises
    ``tarfile.ReadError`` where the stream starts with no tar header."""

    def __init__(self, stream) -> None:
        self.archive = _open(stream)
        self.end: str | None = None
        self.unread = self.ignored = 0

    def extract(self, member: tarfile.TarInfo) -> bytes:
        return self.archive.extractfile(member).read()

    def __iter__(self):
        while True:
            yield from self.archive
            stop = getattr(self.archive, "stopped_by", None)
            rest_of = self.archive.fileobj
            if isinstance(stop, tarfile.InvalidHeaderError):
                self.end, self.unread = DAMAGED, _length(rest_of)
                return
            if not isinstance(stop, tarfile.EOFHeaderError):  # the data stops at or inside a header
                self.end = CUT
                return
            after, offset = _after_zeros(rest_of)
            if after and offset % TAR_BLOCK == 0 and _is_header(after[:TAR_BLOCK]):
                self.archive = _open(_Replay(after, rest_of))  # another archive: cat a.tar b.tar
                continue
            self.end, self.ignored = CLEAN, len(after) + _length(rest_of) if after else 0
            return


def _read(stream, size: int = _CHUNK) -> bytes:
    """``stream.read(size)``, b"" at bytes after the last gzip stream (``gzip -d`` ignores them)."""
    try:
        return stream.read(size)
    except gzip.BadGzipFile as error:
        if str(error).startswith("Not a gzipped file"):
            return b""
        raise


def _after_zeros(stream) -> tuple[bytes, int]:
    """Reads past zero bytes: (the bytes from the first non-zero one, at least a block of them where
    the stream holds that many; how many zero bytes came before), (b"", n) at the end."""
    zeros = 0
    while chunk := _read(stream):
        after = chunk.lstrip(b"\0")
        if after:
            while len(after) < TAR_BLOCK and (more := _read(stream, TAR_BLOCK)):
                after += more
            return after, zeros + len(chunk) - len(chunk.lstrip(b"\0"))
        zeros += len(chunk)
    return b"", zeros


def _is_header(block: bytes) -> bool:
    try:
        tarfile.TarInfo.frombuf(block, tarfile.ENCODING, "surrogateescape")
    except tarfile.HeaderError:
        return False
    return True


def _length(stream) -> int:
    total = 0
    while chunk := _read(stream):
        total += len(chunk)
    return total
