"""Shards with bytes that are no tar (between members, between concatenated archives, after the last
compressed stream), cut compressed streams and v7 archives, all written here as real files: every
sample a tar reader can still find is read, the bytes passed over are one counted ``stray_bytes``
skip, and a cut stream is a ``truncated_shard`` (docs/DESIGN.md, "The data path")."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import tarfile
import time
import zipfile

import numpy as np
import pytest

from megatron_cosmos3.data.errors import Skip
from megatron_cosmos3.data.shards import ShardInfo, read_samples, read_shard
from megatron_cosmos3.data.tar_stream import FIRST_HEADER_WITHIN, TarMembers

META = b'{"schema": 1, "caption": "a ball"}'


def _tar(keys, fmt=tarfile.USTAR_FORMAT) -> bytes:
    """A tar of two members per key (``<key>.meta.json``, ``<key>.txt``) as Python's tarfile writes it."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as archive:
        for key in keys:
            for name, data in ((f"{key}.meta.json", META), (f"{key}.txt", key.encode() * 700)):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _v7(data: bytes) -> bytes:
    """``data`` (a ustar tar) with every header made a v7 one: no magic, version or owner names."""
    data = bytearray(data)
    for member in tarfile.open(fileobj=io.BytesIO(bytes(data))):
        block = data[member.offset : member.offset + 512]
        block[257:345] = bytes(88)  # magic, version, uname, gname, devmajor, devminor
        block[148:156] = b" " * 8
        block[148:156] = b"%06o\0 " % sum(block)
        data[member.offset : member.offset + 512] = block
    return bytes(data)


def _member_end(data: bytes, name: str) -> int:
    """The offset just after member ``name``'s data blocks."""
    member = next(m for m in tarfile.open(fileobj=io.BytesIO(data)) if m.name == name)
    return member.offset_data + -(-member.size // 512) * 512


def _read(path) -> tuple[list[str], list[tuple[str, str, str]]]:
    """(keys of the samples, (reason, key, first word of the detail) of the skips) ``read_shard`` gives."""
    items = list(read_shard(str(path)))
    keys = [item["__key__"] for item in items if isinstance(item, dict)]
    return keys, [(s.reason, s.key, s.detail.split(" ")[0]) for s in items if isinstance(s, Skip)]


JUNK = bytes(range(1, 256)) * 3 + b"!"  # 766 bytes: no multiple of a block, no zero run


def _samples(path) -> dict[str, dict]:
    """The samples ``read_shard`` gives, by key, without their url."""
    items = [item for item in read_shard(str(path)) if isinstance(item, dict)]
    return {item["__key__"]: {k: v for k, v in item.items() if k != "__url__"} for item in items}


@pytest.mark.parametrize("fill", [b"\xa5", b"\x01", b"7", None], ids=["a5", "01", "octal", "random"])
@pytest.mark.parametrize("length", [1, 511, 512, 1024, 4096 + 7])
@pytest.mark.parametrize("after", ["b.txt", "b.meta.json"], ids=["between_samples", "inside_a_sample"])
def test_junk_put_between_members_is_one_stray_bytes_skip_and_every_sample_is_whole(tmp_path, fill, length, after):
    """Bytes put between members lose no member: a multiple of 512 of them (on the block grid, as a
    destroyed header and its data would be) once made the sample after them a damaged_shard skip too."""
    # Random bytes here end in a zero byte, as one run of random junk in 256 does.
    junk = np.random.default_rng(length).integers(1, 256, length - 1, np.uint8).tobytes() + b"\0"
    junk = junk if fill is None else fill * length
    for data in (_tar(["a", "b", "c", "d"]), _v7(_tar(["a", "b", "c", "d"]))):  # v7: no magic to find
        at = _member_end(data, after)
        shard = tmp_path / "junk.tar"
        shard.write_bytes(data[:at] + junk + data[at:])
        assert _read(shard) == (["a", "b", "c", "d"], [("stray_bytes", "", str(length))])
        clean = tmp_path / "clean.tar"
        clean.write_bytes(data)
        assert _samples(shard) == _samples(clean)  # b keeps both its members, wherever the junk stood


def test_a_destroyed_header_makes_the_samples_around_it_damaged(tmp_path):
    data = _tar(["a", "b", "c", "d"])
    at = _member_end(data, "b.txt")
    # A whole block of junk overwriting c's first header: c's other member is never read as a sample
    # missing a field (what was passed over ends in the zero padding of c.meta.json's data).
    overwritten = tmp_path / "overwritten.tar"
    overwritten.write_bytes(data[:at] + b"\xa5" * 512 + data[at + 512 :])
    assert _read(overwritten) == (
        ["a", "d"],
        [("damaged_shard", "b", "1024"), ("stray_bytes", "", "1024"), ("damaged_shard", "c", "its")],
    )
    # A header whose checksum alone is wrong, over data that fills its blocks (no zero padding): the
    # header declares as many bytes as were passed over, so it stood in place of a member.
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for name, payload in (("a.txt", b"a" * 10), ("b.txt", b"b" * 1024), ("b.json", b"{}"), ("c.txt", b"c")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    flipped = bytearray(buffer.getvalue())
    header = next(m for m in tarfile.open(fileobj=io.BytesIO(bytes(flipped))) if m.name == "b.txt").offset
    flipped[header] ^= 1  # "c.txt": the checksum no longer matches
    shard = tmp_path / "flipped.tar"
    shard.write_bytes(bytes(flipped))
    assert _read(shard) == (
        ["c"],
        [("damaged_shard", "a", "1536"), ("stray_bytes", "", "1536"), ("damaged_shard", "b", "its")],
    )
    # Junk to the end with no header after it: the sample being read is the damaged one.
    cut = tmp_path / "junk_to_end.tar"
    cut.write_bytes(data[:at] + JUNK * 3)
    assert _read(cut) == (["a"], [("damaged_shard", "b", "a")])


def test_junk_between_concatenated_tars_and_a_v7_tar_after_the_end_are_read(tmp_path):
    first, second, third = _tar(["a", "b"]), _tar(["c"]), _v7(_tar(["d", "e"]))
    shard = tmp_path / "cat.tar"
    shard.write_bytes(first + JUNK + second + bytes(1024) + third)
    assert _read(shard) == (["a", "b", "c", "d", "e"], [("stray_bytes", "", "766")])
    # A v7 archive (no magic to find) after junk of any length: found by its checksum field.
    for junk in (JUNK, b"0" * 3000):
        shard.write_bytes(first + junk + third)
        assert _read(shard) == (["a", "b", "d", "e"], [("stray_bytes", "", str(len(junk)))])
    # Whole blocks of junk put between the archives lose nothing; a destroyed first header of the
    # second (a block of junk over it, its data after it) may leave its first sample without its
    # first members, so that sample is a damaged_shard skip too.
    shard.write_bytes(first + b"\x01" * 1024 + third)
    assert _read(shard) == (["a", "b", "d", "e"], [("stray_bytes", "", "1024")])
    shard.write_bytes(first + b"\x01" * 512 + third[512:])
    assert _read(shard) == (["a", "b", "e"], [("stray_bytes", "", "1024"), ("damaged_shard", "d", "its")])
    # The v7 archive read alone, as Python's tarfile reads it.
    alone = tmp_path / "alone.tar"
    alone.write_bytes(third)
    assert _read(alone) == (["d", "e"], [])


@pytest.mark.parametrize("compress", [gzip.compress, bz2.compress, lzma.compress], ids=["gz", "bz2", "xz"])
def test_compressed_streams_are_all_read_and_bytes_between_or_after_them_are_counted(tmp_path, compress):
    data = _tar(["a", "b", "c"])
    split = _member_end(data, "a.txt") + 100  # inside sample b
    streams = compress(data[:split]) + bytes(8) + compress(data[split:])  # zero padding between them
    shard = tmp_path / "s.tar.x"
    shard.write_bytes(streams)
    assert _read(shard) == (["a", "b", "c"], [])
    shard.write_bytes(streams + JUNK)
    assert _read(shard) == (["a", "b", "c"], [("stray_bytes", "", "766")])
    # Junk between streams, holding a magic number that starts no stream: scanned past to the next.
    fake = {gzip.compress: b"\x1f\x8b\x09", bz2.compress: b"BZh0", lzma.compress: b"\xfd7zXZ\x00\xff\xff"}[compress]
    between = compress(data[:split]) + JUNK + fake + JUNK + compress(data[split:])
    shard.write_bytes(between)
    assert _read(shard) == (["a", "b", "c"], [("stray_bytes", "", str(2 * len(JUNK) + len(fake)))])
    # The last stream cut in half: whatever of it decompresses is read (bzip2 gives no part of a cut
    # block), the sample the data ends in is the one truncated_shard, and c is never whole.
    at = _member_end(data, "b.txt")
    last = compress(data[at:])
    shard.write_bytes(compress(data[:at]) + last[: len(last) // 2])
    keys, skips = _read(shard)
    assert keys[0] == "a" and "c" not in keys and [reason for reason, _, _ in skips] == ["truncated_shard"]
    (skip,) = [s for s in read_shard(str(shard)) if isinstance(s, Skip)]
    assert "stream ends before its end marker" in skip.detail
    # Cut before its first member header: the shard is unreadable, and the message says it was cut.
    shard.write_bytes(streams[:20])
    (skip,) = read_shard(str(shard))
    assert skip.reason == "unreadable_shard" and "stream ends before its end marker" in skip.detail


def test_a_shard_with_stray_bytes_counts_them_as_no_sample_against_its_index(tmp_path):
    first, second = _tar(["a", "b"]), _tar(["c"])
    shard = tmp_path / "cat.tar"
    shard.write_bytes(first + JUNK + second)
    read = read_samples(ShardInfo(str(shard), samples=3), lambda index, raw: raw["__key__"])
    assert [key for _, key in read.results] == ["a", "b", "c"] and read.read == 3
    assert [s.reason for s in read.skips] == ["stray_bytes"]  # no index_mismatch: 3 samples, as listed


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT], ids=["gnu", "pax"])
def test_a_damaged_header_after_a_long_name_header_is_passed_over_too(tmp_path, fmt):
    long = "d" * 120  # a GNU long-name or a pax header comes before each member of this folder
    data = bytearray(_tar([f"{long}/a", f"{long}/b", f"{long}/c"], fmt))
    member = next(m for m in tarfile.open(fileobj=io.BytesIO(bytes(data))) if m.name == f"{long}/b.txt")
    header = member.offset_data - 512  # the member's own header, after its long-name one
    assert header > member.offset
    data[header : header + 512] = b"\xa5" * 512
    shard = tmp_path / "long.tar"
    shard.write_bytes(bytes(data))
    keys, skips = _read(shard)
    # The header and its data are whole blocks: c, after them, may lack members and is damaged too.
    assert keys == [f"{long}/a"]
    assert [(reason, key) for reason, key, _ in skips] == [
        ("damaged_shard", f"{long}/b"),
        ("stray_bytes", ""),
        ("damaged_shard", f"{long}/c"),
    ]


def test_a_split_sample_whose_later_part_meets_stray_bytes_is_still_one_split_skip(tmp_path):
    data = _tar(["a", "b", "a", "c"])  # a key given twice, apart: one duplicate_key skip
    later = list(tarfile.open(fileobj=io.BytesIO(data)))[4]  # the first member of a's later part
    assert later.name == "a.meta.json"
    at = later.offset_data + 512
    shard = tmp_path / "split.tar"
    shard.write_bytes(data[:at] + JUNK + data[at:])
    read = read_samples(ShardInfo(str(shard)), lambda index, raw: raw["__key__"])
    assert [key for _, key in read.results] == ["b", "c"]
    assert [(s.reason, s.key) for s in read.skips] == [("stray_bytes", ""), ("duplicate_key", "a")]
    # A shard cut inside a's later part: the whole sample is the truncated_shard, b the only one used.
    shard.write_bytes(data[: at - 100])
    read = read_samples(ShardInfo(str(shard), samples=3), lambda index, raw: raw["__key__"])
    assert [key for _, key in read.results] == ["b"] and read.read == 2
    assert [(s.reason, s.key, s.count) for s in read.skips] == [
        ("truncated_shard", "a", 1),
        ("lost_to_truncation", "", 1),
    ]


def test_bytes_before_the_first_header_are_passed_over_and_a_shard_of_no_header_is_unreadable(tmp_path):
    shard = tmp_path / "prefixed.tar"
    for prefix in (JUNK, b"0" * 2000):
        shard.write_bytes(prefix + _v7(_tar(["a", "b"])))
        assert _read(shard) == (["a", "b"], [("stray_bytes", "", str(len(prefix)))])
        assert "before the first member header" in next(s for s in read_shard(str(shard)) if isinstance(s, Skip)).detail
    # A destroyed first header (a whole block): the sample it began may lack that member.
    data = _tar(["a", "b"])
    shard.write_bytes(b"\x01" * 512 + data[512:])
    assert _read(shard) == (["b"], [("stray_bytes", "", "1024"), ("damaged_shard", "a", "its")])
    shard.write_bytes(JUNK * 20)
    (skip,) = read_shard(str(shard))
    assert skip.reason == "unreadable_shard" and f"no tar member header in its {len(JUNK) * 20} bytes" in skip.detail


def test_a_file_that_is_no_tar_is_refused_at_its_start_without_reading_the_rest(tmp_path):
    """Random bytes, text, zeros (a sparse file) or a zip named .tar: one unreadable_shard within
    ``FIRST_HEADER_WITHIN`` bytes; a 200 MB one was scanned or read to its end first (seconds)."""
    rng = np.random.default_rng(0)
    sparse = tmp_path / "sparse.tar"
    with open(sparse, "wb") as f:
        f.truncate(200 << 20)
    noise = tmp_path / "noise.tar"
    with open(noise, "wb") as f:
        f.write(rng.integers(0, 256, 1 << 20, np.uint8).tobytes())
        f.truncate(200 << 20)
    text = tmp_path / "text.tar"
    text.write_text("frame 0001 7 0 0644 caption: a ball bounces\n" * 100_000)
    zipped = tmp_path / "zipped.tar"
    with zipfile.ZipFile(zipped, "w") as archive:
        archive.writestr("a.txt", rng.integers(0, 256, 1 << 20, np.uint8).tobytes())
    for path in (sparse, noise, text, zipped):
        started = time.perf_counter()
        (skip,) = read_shard(str(path))
        assert time.perf_counter() - started < 1.0, path
        assert (skip.reason, skip.shard) == ("unreadable_shard", str(path))
        assert f"no tar member header in its first {FIRST_HEADER_WITHIN:,} bytes" in skip.detail
    # What the reader took of the stream: the first FIRST_HEADER_WITHIN bytes, not the rest.
    stream = io.BytesIO(rng.integers(0, 256, 8 << 20, np.uint8).tobytes())
    with pytest.raises(tarfile.ReadError, match="no tar member header"):
        TarMembers(stream)
    assert stream.tell() == FIRST_HEADER_WITHIN
    # Control: a tar behind junk just short of the bound is still read, and an empty tar is one.
    shard = tmp_path / "late.tar"
    late = FIRST_HEADER_WITHIN - 2 * 512 - 3
    shard.write_bytes(b"\x01" * late + _tar(["a", "b"]))
    assert _read(shard) == (["a", "b"], [("stray_bytes", "", str(late))])
    empty = tmp_path / "empty.tar"
    tarfile.open(empty, "w").close()
    assert _read(empty) == ([], [])
