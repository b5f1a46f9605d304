"""Shards: where they are (index, URLs) and how one is read into raw samples.

A dataset is a list of WebDataset tar shards. Each entry of a dataset's ``shards`` list is one of

* a directory written by ``ShardWriter``: its ``index.json`` lists the shards and their sample
  counts (so blends can weigh datasets by samples and truncated shards are counted exactly);
* an ``index.json`` file, or any ``.json`` index: this reader's, or WebDataset's ``wids`` one;
* a URL pattern WebDataset understands: a local path, ``file:``, ``http(s)://``, ``pipe:<command>``
  (e.g. ``pipe:aws s3 cp s3://bucket/shard-{000000..000099}.tar -``), with brace expansion and
  ``::`` between patterns. Opening goes through ``webdataset.gopen``.

Reading (``read_shard``) streams the tar once, groups members into samples by key (WebDataset's
``base_plus_ext`` rule), and reports shard-level damage as ``Skip`` records instead of raising.
"""

from __future__ import annotations

import json
import logging
import lzma
import os
import re
import stat
import tarfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext

from megatron_cosmos3.atomic_files import write_atomically
from megatron_cosmos3.config_files import file_problem, refuse_irregular_file
from megatron_cosmos3.data.errors import (
    DAMAGED_SHARD,
    DUPLICATE_KEY,
    EXTRA_FIELD,
    INDEX_MISMATCH,
    LOST_TO_TRUNCATION,
    NOT_READ,
    OUT_OF_RANGE,
    SPLIT_SAMPLE,
    STRAY_BYTES,
    TRUNCATED_SHARD,
    UNREADABLE_SHARD,
    UNSAFE_MEMBER,
    SampleError,
    Skip,
    printable,
)
from megatron_cosmos3.data.tar_stream import (
    CUT,
    DAMAGED,
    IN_ARCHIVE,
    TAR_BLOCK,
    Stray,
    TarMembers,
    UnsupportedCompression,
    decompressed,
)
from megatron_cosmos3.data.url_patterns import expand_entry
from megatron_cosmos3.json_files import JsonNumberError, loads, unique_keys

log = logging.getLogger(__name__)

INDEX_FILENAME = "index.json"
# Members that belong to no sample: WebDataset's own metadata (``__info__/...``, the rule of its
# ``tar_file_iterator``), and hidden files (a basename starting with '.': macOS tar's AppleDouble
# ``._x.mp4`` written before each file, ``.DS_Store``). WebDataset drops a hidden file only at the top
# level; in a folder it makes a sample keyed ``dir/`` that also splits the sample around it.
_NO_SAMPLE_MEMBER = re.compile(r"__[^/]*__($|/)|(.*/)?\.[^/]*$")
_INDEX_VERSION = 1
# The most bytes one tar member may hold. Members are read whole into memory, and a compressed
# shard's member can declare far more than the file holds (10 GiB of zeros gzip to 10 MiB): above it
# the sample is an ``out_of_range`` skip and the member is passed over unread. A WebDataset shard is
# typically a few hundred MB; a sample field this large is a whole long recording, to be cut first.
MAX_MEMBER_BYTES = 4 << 30
# Bounds of what an index may declare, far above any real shard set (a 10k-shard set's index is a
# few MB; a shard of 1e9 samples is at least 512 GB): a crafted or damaged index is refused by name
# before anything is read, weighed or allocated by it (docs/DESIGN.md, "The data path, from shard to loss").
INDEX_LIMITS = dict(
    index_bytes=1 << 30,  # the index file itself
    shards=10_000_000,  # entries of one index
    samples=1_000_000_000,  # samples of one shard
    bytes=1 << 40,  # bytes of one shard
    modalities=64,  # modality names of one shard
)


def local_path(url: str) -> str | None:
    """The file a shard URL names on this machine (``file:`` stripped), None for a remote one
    (``http(s)://`` and other schemes, ``pipe:`` commands)."""
    local = url.removeprefix("file://") if url.startswith("file://") else url.removeprefix("file:")
    return None if "://" in local or local.startswith("pipe:") else local


def _same_shard_key(url: str) -> str:
    """What two URLs naming the same shard share: a local file's normalised path, else the URL."""
    local = local_path(url)
    return url if local is None else os.path.normpath(local)


@dataclass(frozen=True)
class ShardInfo:
    """One shard: its URL and, when an index says so, its sample count and size."""

    url: str
    samples: int | None = None
    bytes: int | None = None
    modalities: dict = field(default_factory=dict)  # modality -> samples having it


@dataclass(frozen=True)
class ShardIndex:
    """The index written beside a set of shards (``index.json``); URLs are relative to it."""

    shards: tuple[ShardInfo, ...]
    schema_version: int = 1

    @property
    def total_samples(self) -> int:
        return sum(s.samples or 0 for s in self.shards)

    def save(self, directory: str | Path) -> Path:
        """Writes ``<directory>/index.json`` atomically; shard URLs are stored relative to it."""
        directory = Path(directory)
        document = {
            "format_version": _INDEX_VERSION,
            "schema_version": self.schema_version,
            "total_samples": self.total_samples,
            "shards": [
                {
                    "url": os.path.relpath(s.url, directory)
                    if "://" not in s.url and not s.url.startswith("pipe:")
                    else s.url,
                    "samples": s.samples,
                    "bytes": s.bytes,
                    "modalities": s.modalities,
                }
                for s in self.shards
            ],
        }
        return write_atomically(directory / INDEX_FILENAME, json.dumps(document, indent=1))

    @classmethod
    def load(cls, path: str | Path) -> ShardIndex:
        """Reads an index (a directory means its ``index.json``); relative URLs resolve against it.

        The index is data, so it is checked as such (``ValueError`` naming the file, the entry and
        the value): a JSON object of ``format_version`` 1 whose ``shards`` are objects with a
        non-empty string ``url``, never a ``pipe:`` command (a shard set's own file may not run
        one; a config's ``shards`` entry may), each listed once, ``samples`` and ``bytes`` ints
        >= 0 or null, ``samples`` at most what an uncompressed tar of its declared ``bytes`` can
        hold (a member takes at least one 512-byte block); the file, its entries and every count
        within ``INDEX_LIMITS``.

        A WebDataset ``wids`` index (``{"shardlist": [{"url", "nsamples", "filesize"}]}``, its
        URLs relative to ``base_path`` or to the index) is read as one (``_from_wids``).

        No shard is stat'ed here (a 10k-shard index on a parallel file system would be a metadata
        storm at every start and loader build): a shard missing on disk is found when it is opened,
        one counted ``unreadable_shard`` (``read_shard``), and the loader's set-up refuses a
        dataset none of whose shards is there (``first_local_shard``)."""
        path = Path(path)
        if path.is_dir():
            path = path / INDEX_FILENAME
        refuse_irregular_file("", path)  # a FIFO or device would be read without end
        with open(path, "rb") as f:
            raw = f.read(INDEX_LIMITS["index_bytes"] + 1)
        if len(raw) > INDEX_LIMITS["index_bytes"]:
            limit = INDEX_LIMITS["index_bytes"]
            raise ValueError(f"{path}: the index holds more than INDEX_LIMITS['index_bytes']={limit:,} bytes")
        try:
            document = loads(raw.decode("utf-8"), object_pairs_hook=unique_keys)
        except JsonNumberError as error:
            raise ValueError(f"{path}: {error}") from None
        except (UnicodeDecodeError, ValueError, RecursionError) as error:
            raise ValueError(f"{path}: not a JSON index: {type(error).__name__}: {error}") from None
        if not isinstance(document, dict):
            raise ValueError(f"{path}: an index must be a JSON object, got {type(document).__name__}")
        base, listed, field_names = path.parent, "shards", {"samples": "samples", "bytes": "bytes"}
        if "shardlist" in document and "format_version" not in document:
            document, base = _from_wids(path, document)
            listed, field_names = "shardlist", {"samples": "nsamples", "bytes": "filesize"}
        if document.get("format_version") != _INDEX_VERSION:
            raise ValueError(f"{path}: format_version must be {_INDEX_VERSION}, got {document.get('format_version')!r}")
        entries = document.get("shards")
        if not isinstance(entries, list):
            raise ValueError(f"{path}: shards must be a list, got {type(entries).__name__}")
        if len(entries) > INDEX_LIMITS["shards"]:
            limit = INDEX_LIMITS["shards"]
            raise ValueError(f"{path}: shards lists {len(entries):,}, more than INDEX_LIMITS['shards']={limit:,}")

        def resolve(url: str) -> str:
            if "://" in url or os.path.isabs(url):
                return url
            return f"{base.rstrip('/')}/{url}" if isinstance(base, str) else str(base / url)

        shards, seen = [], {}
        for i, entry in enumerate(entries):
            where = f"{path}: {listed}[{i}]"
            if not isinstance(entry, dict):
                raise ValueError(f"{where} must be an object, got {type(entry).__name__}")
            url = entry.get("url")
            if not isinstance(url, str) or not url:
                raise ValueError(f"{where}.url must be a non-empty string, got {url!r}")
            if url.startswith("pipe:"):
                raise ValueError(f"{where}.url={url!r}: an index may not run a command (pipe:)")
            for name in ("samples", "bytes"):
                value = entry.get(name)
                field_name = field_names[name]
                if value is not None and (type(value) is not int or value < 0):
                    raise ValueError(f"{where}.{field_name}={value!r} must be an int >= 0 or null")
                if value is not None and value > INDEX_LIMITS[name]:
                    limit = INDEX_LIMITS[name]
                    raise ValueError(f"{where}.{field_name}={value:,} is above INDEX_LIMITS['{name}']={limit:,}")
            modalities = entry.get("modalities") or {}
            if not isinstance(modalities, dict):
                raise ValueError(f"{where}.modalities must be an object, got {type(modalities).__name__}")
            if len(modalities) > INDEX_LIMITS["modalities"]:
                raise ValueError(
                    f"{where}.modalities names {len(modalities):,}, "
                    f"more than INDEX_LIMITS['modalities']={INDEX_LIMITS['modalities']}"
                )
            for name, count in modalities.items():
                if type(count) is not int or not 0 <= count <= INDEX_LIMITS["samples"]:
                    limit = INDEX_LIMITS["samples"]
                    raise ValueError(f"{where}.modalities.{name}={count!r} must be an int in 0..{limit:,}")
            resolved = resolve(url)
            key = _same_shard_key(resolved)
            if key in seen:
                raise ValueError(f"{where}.url={url!r} lists the shard of shards[{seen[key]}] again")
            seen[key] = i
            samples, size = entry.get("samples"), entry.get("bytes")
            if samples is not None and size is not None and key.endswith(".tar") and samples > size // TAR_BLOCK:
                raise ValueError(f"{where}.samples={samples}: a tar of {size} bytes holds at most {size // TAR_BLOCK}")
            shards.append(ShardInfo(resolved, samples, entry.get("bytes"), modalities))
        return cls(tuple(shards), document.get("schema_version", 1))


WIDS_KIND = "wids-shard-index-v1"


def _from_wids(path: Path, document: dict) -> tuple[dict, Path | str]:
    """A WebDataset ``wids`` shard index (``{"shardlist": [{"url", "nsamples", "filesize"}],
    "base_path"}``) as this reader's index document, and what its URLs resolve against: its
    ``base_path`` (a folder relative to the index, or a URL), else the index's folder. Entries are
    then checked as an ``index.json``'s; one without a ``url`` (an inline shard) is refused by name."""
    kind = document.get("__kind__", WIDS_KIND)
    if kind != WIDS_KIND:
        raise ValueError(f"{path}: __kind__={kind!r}: a wids index this reader knows is {WIDS_KIND!r}")
    entries = document["shardlist"]
    if not isinstance(entries, list):
        raise ValueError(f"{path}: shardlist must be a list, got {type(entries).__name__}")
    shards = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: shardlist[{i}] must be an object with a url, got {type(entry).__name__}")
        if "url" not in entry:
            raise ValueError(
                f"{path}: shardlist[{i}] has no url (fields {sorted(entry)[:8]}): an inline shard cannot be "
                "read; write its samples to a tar and name it by url"
            )
        shards.append({"url": entry["url"], "samples": entry.get("nsamples"), "bytes": entry.get("filesize")})
    base = document.get("base_path")
    if base is not None and (not isinstance(base, str) or not base or base.startswith("pipe:")):
        raise ValueError(f"{path}: base_path={base!r} must be a folder or URL, never a command")
    if base is None:
        base = path.parent
    elif "://" not in base:
        base = path.parent / local_path(base)
    return {"format_version": _INDEX_VERSION, "shards": shards}, base


def local_entry_problem(entry: str) -> str | None:
    """Why a ``shards`` entry that names local files cannot be read, or None (URLs and pipes are not
    checked here: they fail, counted, when read)."""
    entry = local_path(entry)
    if entry is None:
        return None
    if os.path.isdir(entry) or (entry.endswith(".json") and os.path.isfile(entry)):
        if os.path.isdir(entry) and not os.path.isfile(os.path.join(entry, INDEX_FILENAME)):
            return f"the directory has no {INDEX_FILENAME}"
        try:
            ShardIndex.load(entry)
        except (OSError, ValueError) as error:
            return str(error)
        return None
    try:
        paths = expand_entry(entry)
    except ValueError as error:  # a pattern of too many URLs, unbalanced braces
        return str(error)
    if not any(os.path.exists(path) for path in paths):
        missing = "does not exist" if len(paths) == 1 else f"none of its {len(paths)} paths exists"
        if any(char in entry for char in "*?["):  # as WebDataset, the reader expands braces only
            missing += (
                "; glob patterns (*, ?, [...]) are not expanded: name the shards with a brace range "
                "(shard-{000000..000099}.tar), a list (shard-{a,b}.tar) or an index.json"
            )
        return missing
    return None


def first_local_shard(shards: Sequence[ShardInfo]) -> str | None:
    """The URL of the first of ``shards`` that is remote or on disk, None when every one is a local
    file absent from disk. Stats local shards in order up to the first present one (one stat when
    the first is there): the others are found missing when read, one counted ``unreadable_shard``
    each, never by a stat of every shard on every rank (``ShardIndex.load``)."""
    for shard in shards:
        path = local_path(shard.url)
        if path is None or os.path.exists(path):
            return shard.url
    return None


def index_path(entry: str) -> str | None:
    """The local index a ``shards`` entry names — a folder or a ``.json`` file, as a path or a
    ``file:`` URL (``local_path``) — or None for a URL pattern of shards. ValueError naming the
    entry for an index through another scheme (``http(s)://``, ``pipe:``): an index is read from
    this machine's disk, and its URLs resolve against its folder there."""
    local = local_path(entry)
    if local is None:
        if entry.endswith(".json"):
            raise ValueError(f"shards entry {entry!r}: an {INDEX_FILENAME} is read from a local path or file: URL")
        return None
    return local if os.path.isdir(local) or local.endswith(".json") else None


def resolve_shards(entries: list[str]) -> list[ShardInfo]:
    """Every shard of a dataset's ``shards`` entries (module docstring), in order."""
    shards: list[ShardInfo] = []
    for entry in entries:
        index = index_path(entry)
        if index is not None:
            shards.extend(ShardIndex.load(index).shards)
        else:
            shards.extend(ShardInfo(url) for url in expand_entry(entry))
    twice = sorted(url for url, n in Counter(_same_shard_key(s.url) for s in shards).items() if n > 1)
    if twice:  # each epoch would read them twice: a silent re-weighting
        raise ValueError(f"shards {entries} list {twice} more than once")
    return shards


def read_shard(url: str) -> Iterator[dict | Skip]:
    """Yields the shard's samples in tar order as WebDataset dicts (``__key__`` plus one bytes
    value per field), and ``Skip`` records for shard damage, never raising for bad data:

    * the shard cannot be opened or is not a tar (no member header in its first
      ``tar_stream.FIRST_HEADER_WITHIN`` bytes: the rest is not read): one ``unreadable_shard``;
    * the data ends inside a member, or the tar lacks its end-of-archive block: one
      ``truncated_shard`` for the sample being read (it is dropped: it may miss fields);
    * a member name repeated within a sample: that sample is an ``extra_field`` skip;
    * a sample key seen earlier in the shard: the repeat is one skip, the first time only,
      ``split_sample`` where its fields are others than the first part's (the sample's members lie
      apart), ``duplicate_key`` where it gives one of them again (two samples under one key); the
      first part was yielded before it was met and ``read_samples`` withdraws it;
    * a member that is a link or a device, or named by an absolute path or with a ``..`` component:
      its sample is an ``unsafe_member`` skip (directories, hidden files and WebDataset's
      ``__name__`` metadata are ignored, ``_NO_SAMPLE_MEMBER``, without ending the sample around them);
    * a member declaring more than ``MAX_MEMBER_BYTES``: its sample is an ``out_of_range`` skip and
      the member is passed over unread;
    * bytes that are no tar (``tar_stream.Stray``): one ``stray_bytes`` skip, and reading goes on at
      the next member header; bytes put between members leave every sample whole; where they may
      stand in place of members whose header was destroyed (``Stray.in_place_of_members``), the
      sample being read is a ``damaged_shard`` skip (it may have lost members; its members after
      them are passed over) and so is the first sample after them (it may lack its first members);
      where no header follows them, the sample being read is a ``damaged_shard`` skip and nothing
      after it is read (compressed or not).

    Tars concatenated into one file (``cat a.tar b.tar``) are read one after the other. A gzip,
    bzip2 or xz shard is read through ``compressed_streams``, every stream of a multi-stream file;
    bytes between or after its streams that are none are one ``stray_bytes`` skip (at the end).
    A zstd shard is one ``unreadable_shard`` naming the format.
    """
    local = local_path(url)
    if local is not None:  # one stat: the shard's only one (``ShardIndex.load``)
        try:
            mode = os.stat(local).st_mode
        except FileNotFoundError:
            yield Skip(url, "", UNREADABLE_SHARD, "missing on disk")
            return
        except OSError as error:
            yield Skip(url, "", UNREADABLE_SHARD, f"cannot open: {type(error).__name__}: {error}")
            return
        if not stat.S_ISREG(mode):
            # A device or FIFO never ends (/dev/zero would be read for ever) and a folder is no tar.
            yield Skip(url, "", UNREADABLE_SHARD, file_problem(local) or "not a regular file")
            return
    try:
        raw = gopen(url, "rb")
    except Exception as error:  # noqa: BLE001 - gopen raises anything from OSError to a pipe's ValueError
        yield Skip(url, "", UNREADABLE_SHARD, f"cannot open: {type(error).__name__}: {error}")
        return
    current: dict | None = None
    problems: dict[str, str] = {}  # the current sample's: skip reason -> detail, the first of each
    suspect: str | None = None  # why the next sample to start may lack members (stray bytes before it)
    seen: dict[str, set[str]] = {}  # key of each sample finished -> the fields it gave
    split: set[str] = set()  # keys whose members lie apart: their later parts yield no sample
    dropped: str | None = None  # the key of a sample dropped at stray bytes, whose members may go on
    try:
        stream = None
        try:
            stream = decompressed(raw)
            members = TarMembers(stream)
        except UnsupportedCompression as error:
            yield Skip(url, "", UNREADABLE_SHARD, str(error))
            return
        except (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError) as error:
            detail = f"not a tar archive: {type(error).__name__}: {error}" + _cut_stream(stream)
            yield Skip(url, "", UNREADABLE_SHARD, detail)
            return
        try:
            for member in members:
                if isinstance(member, Stray):
                    if member.in_place_of_members:  # a destroyed header: the samples around it may lack members
                        if member.where == IN_ARCHIVE and current is not None:
                            dropped = current["__key__"]
                            if dropped in seen:  # a split sample's later part: the split is what it is
                                finished = _finished(url, current, problems, seen, split)
                            else:
                                seen[dropped] = _fields(current)
                                detail = (
                                    f"{member.size} bytes that are no tar member, whole blocks that may stand in "
                                    "place of members, stood after its last member read"
                                )
                                finished = Skip(url, dropped, DAMAGED_SHARD, detail)
                            if finished is not None:
                                yield finished
                            current = None
                        suspect = (
                            f"its first member follows {member.size} bytes that are no tar, whole blocks that may "
                            "stand in place of its first members"
                        )
                    then = "run to the end of the data" if member.to_end else "passed over to the next member header"
                    yield Skip(url, "", STRAY_BYTES, f"{member.size} bytes that are no tar {member.where}, {then}")
                    continue
                if member.isdir() or _NO_SAMPLE_MEMBER.match(member.name):
                    continue
                key, suffix = base_plus_ext(member.name)
                if key is None:
                    continue  # a name without an extension belongs to no sample field
                if key == dropped:
                    continue
                dropped = None
                if current is None or key != current["__key__"]:
                    if current is not None and (finished := _finished(url, current, problems, seen, split)):
                        yield finished
                    current, problems = {"__key__": key, "__url__": url}, {}
                    if suspect is not None:
                        problems[DAMAGED_SHARD], suspect = suspect, None
                problem = _member_problem(member)
                if problem is not None:
                    problems.setdefault(UNSAFE_MEMBER, problem)
                    continue
                if member.size > MAX_MEMBER_BYTES:
                    problems.setdefault(
                        OUT_OF_RANGE,
                        f"member '{printable(member.name)}' declares {member.size:,} bytes, more than "
                        f"MAX_MEMBER_BYTES={MAX_MEMBER_BYTES:,}",
                    )
                    continue
                suffix = suffix.lower()
                if key in seen:  # a later part of a key given before: its bytes are never used
                    current.setdefault(suffix, None)  # which fields it gives says why it stood apart
                    continue
                data = members.extract(member)
                if suffix in current:
                    problems.setdefault(EXTRA_FIELD, f"field {suffix!r} appears twice")
                current[suffix] = data
        except (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError) as error:
            yield Skip(
                url,
                current["__key__"] if current else "",
                TRUNCATED_SHARD,
                f"data ends inside a member: {type(error).__name__}: {error}" + _cut_stream(members.stream),
            )
            return
        if members.end == DAMAGED:
            yield Skip(
                url,
                current["__key__"] if current else "",
                DAMAGED_SHARD,
                f"a damaged member header after this sample: the {members.unread} bytes after it hold no member header",
            )
            return
        if members.end == CUT:
            yield Skip(
                url,
                current["__key__"] if current else "",
                TRUNCATED_SHARD,
                "the tar has no end-of-archive block: cut at a member boundary" + _cut_stream(members.stream),
            )
            return
        if current is not None and (finished := _finished(url, current, problems, seen, split)):
            yield finished
        if getattr(members.stream, "cut", False):  # only the tar's end padding is missing: no sample lost
            log.warning("%s: the %s stream ends before its end marker, after the tar's end", url, members.stream.name)
        stray = getattr(members.stream, "stray", 0)
        if stray:
            detail = (
                f"{stray} bytes between or after the {members.stream.name} streams are no {members.stream.name} stream"
            )
            yield Skip(url, "", STRAY_BYTES, detail)
    finally:
        try:
            raw.close()
        except Exception:  # noqa: BLE001 - a pipe that failed reports it on close; its data was judged above
            pass


@dataclass
class ShardSamples:
    """What one shard gave one reader (``read_samples``): ``results`` as ``(index, use's result)`` of
    the samples used, in shard order; ``skips``; ``read``, how many samples the shard gave."""

    url: str
    results: list[tuple[int, object]] = field(default_factory=list)
    skips: list[Skip] = field(default_factory=list)
    read: int = 0


def read_samples(shard: ShardInfo, use: Callable[[int, dict], object]) -> ShardSamples:
    """Reads ``shard`` (``read_shard``) and passes each sample to ``use(index, sample)``, ``index``
    its position in what the shard yields; a ``SampleError`` from ``use`` is a skip of its reason.
    The loader, ``inspect_shards --verify`` and ``encode_shards`` all read through it, so they
    count a shard the same way:

    * a key given again (a ``split_sample`` or ``duplicate_key`` skip: its key seen earlier in the
      shard; or any skip under a key given before, as where the shard ends in its later part)
      withdraws what its first part gave, a result or a skip: the whole sample is that one skip;
    * an ``unreadable_shard`` counts every sample the index lists (at least one);
    * shard events and lost samples (``errors.NOT_READ``) are skips but no sample read;
    * ``lost_to_truncation`` counts the samples the index lists that the shard never gave, one
      ``index_mismatch`` says that it gave more.

    ``results`` are only final at the shard's end: a reader that writes what it made does so then."""
    out = ShardSamples(shard.url)
    given: dict[str, tuple[list, int]] = {}  # sample key -> (the list, position) of what it gave
    truncated = unreadable = False
    for index, raw in enumerate(read_shard(shard.url)):
        if isinstance(raw, Skip):
            if raw.reason == UNREADABLE_SHARD:
                unreadable = True
                raw = Skip(raw.shard, raw.key, raw.reason, raw.detail, count=shard.samples or 1)
            truncated = truncated or raw.reason in (TRUNCATED_SHARD, DAMAGED_SHARD)
            again = raw.key in given  # a later part of a sample already given (its members apart)
            if again:  # the whole sample is this one skip
                where, at = given.pop(raw.key)
                where[at] = None
            if raw.key and raw.reason not in NOT_READ:
                given[raw.key] = (out.skips, len(out.skips))
            out.skips.append(raw)
            out.read += raw.reason not in NOT_READ and not again
            continue
        out.read += 1
        key = raw["__key__"]
        try:
            result = use(index, raw)
        except SampleError as error:
            given[key] = (out.skips, len(out.skips))
            out.skips.append(Skip(shard.url, key, error.reason, error.detail))
        else:
            given[key] = (out.results, len(out.results))
            out.results.append((index, result))
    out.results = [r for r in out.results if r is not None]
    out.skips = [s for s in out.skips if s is not None]
    if shard.samples is not None and out.read < shard.samples and not unreadable:
        detail = f"the index lists {shard.samples} samples, the shard gave {out.read}"
        detail += " before it ended" if truncated else ""
        out.skips.append(Skip(shard.url, "", LOST_TO_TRUNCATION, detail, count=shard.samples - out.read))
    if shard.samples is not None and out.read > shard.samples:
        detail = f"the index lists {shard.samples} samples, the shard holds {out.read}"
        out.skips.append(Skip(shard.url, "", INDEX_MISMATCH, detail))
    return out


def _cut_stream(stream) -> str:
    """What a truncation message adds for a compressed shard whose last stream is cut."""
    return f" (the {stream.name} stream ends before its end marker)" if getattr(stream, "cut", False) else ""


def _key_given_again(url: str, key: str, first: set[str], later: set[str]) -> Skip:
    """The skip of a sample whose key came back after another sample's members: ``duplicate_key``
    where the later part gives a field the first gave again (two samples under one key),
    ``split_sample`` where it gives others (one sample whose members lie apart)."""
    again = sorted(first & later)
    if again:
        detail = (
            f"sample key {printable(key)!r} is given to two samples: fields {again} appear under it again after "
            "other samples: both are skipped"
        )
        return Skip(url, key, DUPLICATE_KEY, detail)
    detail = (
        f"the members of sample {printable(key)!r} lie apart in the shard (fields {sorted(first)}, then "
        f"{sorted(later)} after other samples): the whole sample is skipped (a sample's members must be adjacent: "
        "GNU tar orders a folder's files by directory order unless given --sort=name)"
    )
    return Skip(url, key, SPLIT_SAMPLE, detail)


def _member_problem(member: tarfile.TarInfo) -> str | None:
    """Why a member cannot be part of a sample (``read_shard``), or None for a plain file."""
    if not member.isreg():
        kind = "a symbolic link" if member.issym() else "a hard link" if member.islnk() else "not a regular file"
        return f"member '{printable(member.name)}' is {kind}"
    if member.name.startswith("/") or ".." in member.name.split("/"):
        return f"member name '{printable(member.name)}' is absolute or climbs out with '..'"
    return None


def _fields(sample: dict) -> set[str]:
    """The fields of a sample being read (its ``__key__`` and ``__url__`` are none)."""
    return {name for name in sample if not name.startswith("__")}


def _finished(
    url: str, sample: dict, problems: dict[str, str], seen: dict[str, set[str]], split: set[str]
) -> dict | Skip | None:
    """The sample read, or the Skip it is; None for a later part of a key already reported."""
    key = sample["__key__"]
    if key in seen:
        if key in split:
            return None
        split.add(key)
        return _key_given_again(url, key, seen[key], _fields(sample))

    seen[key] = _fields(sample)
    for reason in (DAMAGED_SHARD, UNSAFE_MEMBER, OUT_OF_RANGE, EXTRA_FIELD):  # the first that applies
        if reason in problems:
            return Skip(url, key, reason, problems[reason])
    return sample
