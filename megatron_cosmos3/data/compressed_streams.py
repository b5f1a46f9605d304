"""A compressed shard's bytes, decompressed stream after stream, and what followed the last stream.

gzip, bzip2 and xz files may hold several streams one after the other (``cat a.gz b.gz``, bgzip,
pbzip2): every one is read. Zero bytes between or after streams are padding (``gzip -d`` and xz
skip them). Any other bytes after a stream that start no stream of the same format are counted
(``Decompressed.trailing``) and not read as data: Python's own readers dropped them without a
word (bz2, xz) or failed the shard (gzip). Data that ends inside a stream ends the decompressed
data there, all of it given (``Decompressed.cut``): the tar reader then finds the shard cut where
it is, where an ``EOFError`` lost the part of a tar record decompressed before it
(docs/DESIGN.md, "The data path, from shard to loss").
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

    ``trailing`` counts the bytes after the last stream that are neither padding nor another
    stream; ``cut``: the data ended inside a stream. Both are final once ``read`` has returned b""."""

    def __init__(self, name: str, raw, head: bytes) -> None:
        self.name, self.raw = name, raw
        self.magic, self._new = _FORMATS[name]
        self._decompressor, self._input, self._output = self._new(), head, b""
        self._at = 0  # how much of _output was read: tar reads 10 KiB at a time of a MiB step
        self._done = self.cut = False
        self.trailing = 0

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
            if not self._input:
                self._done = self.cut = True
                return
        self._output, self._at = self._output[self._at :] + decompressor.decompress(self._input, _STEP_OUT), 0
        self._input = decompressor.unconsumed_tail if zlib_like else b""

    def _next_stream(self, rest: bytes) -> None:
        while True:
            rest = rest.lstrip(b"\0")
            while rest and len(rest) < len(self.magic) and (more := self.raw.read(_CHUNK)):
                rest += more
            if rest:
                break
            if not (rest := self.raw.read(_CHUNK)):
                self._done = True
                return
        if rest.startswith(self.magic):
            self._decompressor, self._input = self._new(), rest
            return
        self.trailing = len(rest)
        while more := self.raw.read(_CHUNK):
            self.trailing += len(more)
        self._done = True


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
