"""A compressed shard's bytes, decompressed stream after stream, and the bytes that are no stream.

gzip, bzip2 and xz files may hold several streams one after the other (``cat a.gz b.gz``, bgzip,
pbzip2): every one is read. Zero bytes between or after streams are padding (``gzip -d`` and xz
skip them). Other bytes after a stream are scanned past to the next stream of the same format and
counted (``Decompressed.stray``), never read as data: Python's own readers dropped bytes after the
last stream without a word (bz2, xz) or failed the shard (gzip), and lost every stream after junk.
Data that ends inside a stream ends the decompressed data there, all of it given
(``Decompressed.cut``): the tar reader then finds the shard cut where it is, where an ``EOFError``
lost the part of a tar record decompressed before it (docs/DESIGN.md, "The data path, from shard
to loss").
"""

from __future__ import annotations

import bz2
import lzma
import zlib

_GZIP, _BZIP2, _XZ, _ZSTD = b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd"
_CHUNK = 1 << 16
# The most bytes one decompression step makes: a bzip2 block of one repeated byte inflates 45,000-fold.
_STEP_OUT = 1 << 20


class UnsupportedCompression(Exception):
    """A shard compressed in a format this reader has no decompressor for (the message names it)."""


def _gzip():
    return zlib.decompressobj(zlib.MAX_WBITS | 16)


_FORMATS = {"gzip": (_GZIP, _gzip), "bzip2": (_BZIP2, bz2.BZ2Decompressor), "xz": (_XZ, lzma.LZMADecompressor)}


class Decompressed:
    """``raw`` decompressed as ``name`` (a key of ``_FORMATS``), read with ``read(size)``.

    ``stray`` counts the bytes that are neither a stream nor zero padding (between streams, where
    the next one is found by its magic number, or after the last); ``cut``: the data ended inside a
    stream. Both are final once ``read`` has returned b"".

    A stream after the first is a candidate until it has given data: where the decompressor
    refuses what follows its magic number, its first byte is stray and the scan goes on from the
    next (where the data ends first, it is a cut stream)."""

    def __init__(self, name: str, raw, head: bytes) -> None:
        self.name, self.raw = name, raw
        self.magic, self._new = _FORMATS[name]
        self._decompressor, self._input, self._output = self._new(), head, b""
        self._at = 0  # how much of _output was read: tar reads 10 KiB at a time of a MiB step
        self._candidate: bytes | None = None  # a later stream's bytes until it gives data
        self._done = self.cut = False
        self.stray = 0

    def read(self, size: int = -1) -> bytes:
        whole = size is None or size < 0
        while (whole or len(self._output) - self._at < size) and not self._done:
            self._step()
        end = len(self._output) if whole else min(self._at + size, len(self._output))
        data, self._at = self._output[self._at : end], end
        return data

    def close(self) -> None:
        self._done = True

    def _step(self) -> None:
        decompressor = self._decompressor
        if decompressor.eof:
            self._next_stream(decompressor.unused_data + self._input)
            return
        # zlib keeps the input it has not used in unconsumed_tail; bz2 and lzma keep it inside.
        zlib_like = self.name == "gzip"
        if not self._input and (zlib_like or decompressor.needs_input):
            self._input = self.raw.read(_CHUNK)
            if not self._input:  # a candidate the decompressor took so far is a cut stream too
                self._done = self.cut = True
                return
            if self._candidate is not None:
                self._candidate += self._input
        try:
            data = decompressor.decompress(self._input, _STEP_OUT)
        except (zlib.error, OSError, lzma.LZMAError, EOFError):
            if self._candidate is None:
                raise
            self._not_a_stream()
            return
        if data:
            self._candidate = None
        self._output, self._at = self._output[self._at :] + data, 0
        self._input = decompressor.unconsumed_tail if zlib_like else b""

    def _not_a_stream(self) -> None:
        """The candidate stream was none: its first byte is stray, the scan goes on after it."""
        rest, self._candidate = self._candidate, None
        self.stray += 1
        self._scan(rest[1:])

    def _next_stream(self, rest: bytes) -> None:
        """After a stream's end: zero padding, then the next stream or bytes that are none."""
        while not (rest := rest.lstrip(b"\0")):
            if not (rest := self.raw.read(_CHUNK)):
                self._done = True
                return
        self._scan(rest)

    def _scan(self, rest: bytes) -> None:
        """Starts the next stream at the first magic number of ``rest`` and what follows it,
        counting the bytes before it stray; at the end of the data without one, they all are."""
        keep = len(self.magic) - 1  # a magic number may start in the last bytes looked at
        while (found := rest.find(self.magic)) < 0:
            more = self.raw.read(_CHUNK)
            if not more:
                self.stray += len(rest)
                self._done = True
                return
            passed = max(0, len(rest) - keep)
            self.stray += passed
            rest = rest[passed:] + more
        self.stray += found
        self._decompressor, self._input, self._candidate = self._new(), rest[found:], rest[found:]


def decompressed(raw):
    """The tar stream of a shard: ``raw`` itself (its first bytes put back), or a ``Decompressed``
    reader where those bytes are gzip's, bzip2's or xz's magic number. A zstd shard is
    ``UnsupportedCompression`` (tarfile called it a "truncated header", naming nothing)."""
    head = raw.read(len(_XZ))
    while len(head) < len(_XZ) and (more := raw.read(len(_XZ) - len(head))):
        head += more
    for name, (magic, _) in _FORMATS.items():
        if head.startswith(magic):
            return Decompressed(name, raw, head)
    if head.startswith(_ZSTD):
        raise UnsupportedCompression(
            "zstd-compressed (.tar.zst), which this reader cannot decompress: "
            "decompress it (zstd -d) or write the shards as .tar, .tar.gz or .tar.xz"
        )
    return Replay(head, raw)


class Replay:
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
