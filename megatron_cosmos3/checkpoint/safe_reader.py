"""Reading torch.distributed.checkpoint folders without executing pickled code, and verifying them.

DCP stores tensors as raw bytes but its ``.metadata`` index as a pickle, and its stock reader
unpickles it with no restriction: a crafted checkpoint could run code on load. This reader accepts
only the handful of classes DCP's metadata is made of and refuses anything else, naming it. The
index may also declare an item as *bytes*, which DCP's planner would ``torch.load`` without
``weights_only``: every item must be a tensor (our checkpoints hold nothing else; the loader
position is JSON in a uint8 tensor), and every storage record a plain file of the folder.

Checksums: ``ChecksummedFileSystemWriter`` hashes (sha256) the files each rank wrote, in its write
thread, into ``__<rank>_checksums.json``; the commit merges them with ``.metadata`` and
``meta.json`` into ``checksums.json``. On load each rank verifies ``.metadata`` and the files it
reads before reading them, so a flipped or truncated byte is an error naming the checkpoint, the
file and the items it holds, never a silently different weight.
"""

from __future__ import annotations

import enum
import fnmatch
import hashlib
import io
import json
import logging
import math
import pickle
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadItemType

from megatron_cosmos3.json_files import read_json

log = logging.getLogger(__name__)

MANIFEST = "checksums.json"
RANK_MANIFEST_SUFFIX = "checksums.json"  # __<rank>_checksums.json, merged into MANIFEST at commit
METADATA = ".metadata"

_ALLOWED = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("pathlib", "PosixPath"),  # StorageMeta.checkpoint_id
    ("pathlib", "Path"),
    ("collections", "OrderedDict"),
}
_ALLOWED_MODULES = ("torch.distributed.checkpoint.metadata",)


class CheckpointCorruptError(RuntimeError):
    """A checkpoint file differs from what was written (checksum, size) or is missing."""


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint asks for something a tensors-only, no-pickle load refuses."""


def _enum_member(cls, name: str):
    """What ``getattr`` may do in checkpoint metadata: name a member of an allowed Enum. Python
    3.11.0-3.11.4 pickle Enum members as ``getattr(EnumClass, name)`` (e.g. DCP's
    ``_MEM_FORMAT_ENCODING``); any other use of ``getattr`` is refused."""
    if isinstance(cls, enum.EnumMeta) and isinstance(name, str) and name in cls.__members__:
        return cls[name]
    raise UnsafeCheckpointError(
        f"checkpoint metadata calls getattr({cls!r}, {name!r}), which a weights-only load refuses"
    )


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED or module in _ALLOWED_MODULES:
            return super().find_class(module, name)
        if (module, name) == ("builtins", "getattr"):
            return _enum_member
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafeCheckpointError(f"checkpoint metadata refers to {module}.{name}, which a weights-only load refuses")


def file_record(path: Path) -> dict:
    """{"bytes": size, "sha256": hex digest} of one file."""
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return {"bytes": path.stat().st_size, "sha256": digest}


def write_manifest(folder: Path, extra: tuple[str, ...] = (METADATA, "meta.json")) -> None:
    """Merges the per-rank checksum files of ``folder`` with the records of ``extra`` into MANIFEST.
    CheckpointCorruptError naming the part file (and field) for one that is not a JSON object, as a
    rank cut short by a full disk leaves it."""
    files = {}
    for part in sorted(folder.glob(f"__*_{RANK_MANIFEST_SUFFIX}")):
        records = read_json(part, CheckpointCorruptError)
        if not isinstance(records, dict):
            raise CheckpointCorruptError(f"{part}: expected an object of file records, got {records!r:.200}")
        files.update(records)
        part.unlink()
    files.update({name: file_record(folder / name) for name in extra if (folder / name).is_file()})
    (folder / MANIFEST).write_text(json.dumps({"algorithm": "sha256", "files": files}, indent=1, sort_keys=True))


def read_manifest(folder: Path) -> dict[str, dict] | None:
    """{file name: record} of a checkpoint, or None for one written before checksums existed.

    CheckpointCorruptError naming the entry unless each names a file inside the folder (a relative
    path without '.' or '..' parts, as ``deepspeed/<file>``: the manifest says which files are read
    and hashed, and ``../`` or an absolute path would reach outside it) with a record of an int
    ``bytes`` >= 0 and a string ``sha256``."""
    path = Path(folder) / MANIFEST
    if not path.exists():
        return None
    document = read_json(path, CheckpointCorruptError)
    files = document.get("files") if isinstance(document, dict) else None
    if not isinstance(files, dict):
        raise CheckpointCorruptError(f"{path}: expected an object whose 'files' is an object of file records")
    for name, record in files.items():
        if not name_inside(name):
            raise CheckpointCorruptError(f"{path}: files entry {name!r} is not a file of the checkpoint folder")
        size, digest = (record.get("bytes"), record.get("sha256")) if isinstance(record, dict) else (None, None)
        if type(size) is not int or size < 0 or not isinstance(digest, str):
            raise CheckpointCorruptError(
                f"{path}: files[{name!r}]={record!r:.200}: expected {{'bytes': an int >= 0, 'sha256': a string}}"
            )
    return files


def name_inside(name: str) -> bool:
    """A relative path that names something inside its folder: no empty, '.' or '..' part."""
    return "\\" not in name and all(part not in ("", ".", "..") for part in name.split("/"))


def check_file(folder: Path, name: str, manifest: dict[str, dict] | None, holds: str = "", full: bool = True) -> None:
    """Raises CheckpointCorruptError unless ``folder/name`` matches its manifest record (size only
    unless ``full``). ``holds`` says what the file holds, for the message."""
    if manifest is None:
        return
    what = f"checkpoint {folder}: file {name}{f' ({holds})' if holds else ''}"
    record = manifest.get(name)
    if record is None:
        raise CheckpointCorruptError(f"{what} is not in its {MANIFEST}")
    path = Path(folder) / name
    if not path.is_file():
        raise CheckpointCorruptError(f"{what} is missing")
    _check_inside(folder, path, what)
    size = path.stat().st_size
    if size != record["bytes"]:
        raise CheckpointCorruptError(f"{what} has {size} bytes, {record['bytes']} were written (truncated or damaged)")
    if full and file_record(path)["sha256"] != record["sha256"]:
        raise CheckpointCorruptError(f"{what} does not match its sha256 checksum: the data was damaged after saving")


def _check_inside(folder: Path, path: Path, what: str) -> None:
    """CheckpointCorruptError unless ``path`` (a file of the checkpoint) resolves inside ``folder``:
    a link to a file elsewhere would be hashed and read as the checkpoint's data."""
    target = path.resolve()
    if not target.is_relative_to(Path(folder).resolve()):
        raise CheckpointCorruptError(f"{what} is a link to {target}, outside the checkpoint folder")


# Files a person or a model hub adds beside a checkpoint or release (a model card, a licence, git's
# attributes) that no loader reads: ``check_listed`` lets them be.
NEVER_READ = ("README*", "LICENSE*", "NOTICE*", "*.md", ".gitattributes", ".gitignore")


def check_listed(folder: Path, manifest: dict[str, dict] | None) -> None:
    """CheckpointCorruptError naming the first file under ``folder`` (besides MANIFEST and the
    ``NEVER_READ`` documents) that the manifest does not list: one copied in after the save is never
    verified, yet a loader that takes every file of a kind reads it (DeepSpeed's counts its
    ``*_optim_states.pt`` against the saving world size; a release's tokenizer files are read by
    name). Nothing to check for a checkpoint saved before checksums (``manifest`` None)."""
    if manifest is None:
        return
    for path in sorted(Path(folder).rglob("*")):
        name = path.relative_to(folder).as_posix()
        if any(fnmatch.fnmatchcase(path.name, pattern) for pattern in NEVER_READ):
            continue
        if name != MANIFEST and name not in manifest and not path.is_dir():
            raise CheckpointCorruptError(
                f"checkpoint {folder}: file {name} is not in its {MANIFEST}: it was added after the save and "
                "cannot be verified (remove it, or copy the checkpoint's own files only)"
            )


def check_sizes(folder: Path) -> None:
    """Cheap structural check of a checkpoint folder: every file of its manifest is there, whole,
    and no other file is (``check_listed``)."""
    manifest = read_manifest(folder)
    check_listed(Path(folder), manifest)
    for name in sorted(manifest or {}):
        check_file(Path(folder), name, manifest, full=False)


def verify_checkpoint(folder: Path, share: tuple[int, int] = (0, 1)) -> None:
    """Reads and checks every file of the checkpoint's manifest, and that the folder holds no other
    file (``check_listed``): CheckpointCorruptError otherwise. ``share`` = (rank, ranks): hashes
    only every ranks-th file from the rank-th, in name order, and checks the others' sizes, so that
    the ranks of a job together read each file once (the caller makes them agree on the verdict)."""
    manifest = read_manifest(folder)
    if manifest is None:
        raise CheckpointCorruptError(f"checkpoint {folder} has no {MANIFEST}: it cannot be verified")
    check_listed(Path(folder), manifest)
    rank, ranks = share
    for i, name in enumerate(sorted(manifest)):
        check_file(Path(folder), name, manifest, full=i % ranks == rank)


class ChecksummedFileSystemWriter(FileSystemWriter):
    """FileSystemWriter that records the sha256 of the files this rank wrote, in its write thread."""

    def write_data(self, plan, planner):
        future = super().write_data(plan, planner)
        results = future.wait()  # the stock writer finishes before returning its future
        folder = Path(self.path)
        names = sorted({result.storage_data.relative_path for result in results})
        records = {name: file_record(folder / name) for name in names}
        (folder / f"{plan.storage_data.prefix}{RANK_MANIFEST_SUFFIX}").write_text(json.dumps(records))
        return future


class SafeFileSystemReader(FileSystemReader):
    """FileSystemReader whose metadata is unpickled through an allow-list, whose items must all be
    tensors stored in plain files of the folder, and whose files are checked against checksums."""

    def __init__(self, path, *args, **kwargs):
        super().__init__(path, *args, **kwargs)
        self.folder = Path(path)
        self.manifest = read_manifest(self.folder)
        if self.manifest is None:
            log.warning("checkpoint %s has no %s (saved before checksums): its files are not verified", path, MANIFEST)
        self._verified: set[str] = set()

    def _check(self, name: str, holds: str = "") -> None:
        if name not in self._verified:
            check_file(self.folder, name, self.manifest, holds)
            self._verified.add(name)

    def read_metadata(self, *args, **kwargs):
        path = self._get_metadata_path(kwargs.get("rank"))
        self._check(Path(path).name, "the index of every item")
        with self.fs.create_stream(path, "rb") as stream:
            metadata = _MetadataUnpickler(io.BytesIO(stream.read())).load()
        validate_metadata(metadata, self.folder)
        if getattr(metadata, "storage_meta", None) is None:
            from torch.distributed.checkpoint.metadata import StorageMeta

            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan, planner):
        per_file: dict[str, list[str]] = {}
        for item in plan.items:
            if item.type == LoadItemType.BYTE_IO:  # validate_metadata refuses these already
                fqn = item.dest_index.fqn
                raise UnsafeCheckpointError(f"checkpoint {self.folder}: item {fqn!r} would be unpickled")
            per_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(item.dest_index.fqn)
        for name, items in per_file.items():
            shown = ", ".join(sorted(set(items))[:3]) + (" ..." if len(set(items)) > 3 else "")
            self._check(name, f"items {shown}")
        return super().read_data(plan, planner)


def validate_metadata(metadata, folder: Path) -> None:
    """Refuses every item kind but tensors (a bytes item is unpickled by DCP's planner), storage
    records outside the folder, and storage transforms (extensions), naming the item."""
    for key, item in metadata.state_dict_metadata.items():
        if not isinstance(item, TensorStorageMetadata):
            raise UnsafeCheckpointError(
                f"checkpoint {folder}: item {key!r} is stored as {type(item).__name__}, not a tensor; loading it "
                "would unpickle it, which a tensors-only load refuses"
            )
    for index, info in (metadata.storage_data or {}).items():
        name = getattr(info, "relative_path", None)
        if not isinstance(name, str) or not name or "/" in name or "\\" in name or name.startswith("."):
            raise UnsafeCheckpointError(
                f"checkpoint {folder}: item {index.fqn!r} is stored at {name!r}, not a file of the folder"
            )
        if getattr(info, "transform_descriptors", None):
            raise UnsafeCheckpointError(
                f"checkpoint {folder}: item {index.fqn!r} needs storage transforms {info.transform_descriptors}, "
                "which this reader does not run"
            )
    check_storage_bounds(metadata, folder)


def check_storage_bounds(metadata, folder: Path) -> None:
    """CheckpointCorruptError naming the item and the file for a storage record that lies outside
    its file (a missing or truncated file whose checksums were rewritten, or an index that lies):
    DCP would otherwise fail deep inside a read with no file named."""
    sizes: dict[str, int | None] = {}
    stored: dict[str, int] = {}  # bytes of each item's records
    for index, info in (metadata.storage_data or {}).items():
        name, offset, length = info.relative_path, getattr(info, "offset", None), getattr(info, "length", None)
        if type(offset) is not int or type(length) is not int or offset < 0 or length < 0:
            raise CheckpointCorruptError(
                f"checkpoint {folder}: item {index.fqn!r} has storage offset={offset!r}, length={length!r} in {name}"
            )
        if name not in sizes:
            sizes[name] = (folder / name).stat().st_size if (folder / name).is_file() else None
            if sizes[name] is not None:
                _check_inside(folder, folder / name, f"checkpoint {folder}: file {name} (item {index.fqn!r})")
        if sizes[name] is None:
            raise CheckpointCorruptError(f"checkpoint {folder}: file {name} (item {index.fqn!r}) is missing")
        if offset + length > sizes[name]:
            raise CheckpointCorruptError(
                f"checkpoint {folder}: item {index.fqn!r} lies at bytes {offset}..{offset + length} of file {name}, "
                f"which has {sizes[name]} bytes (truncated or damaged)"
            )
        stored[index.fqn] = stored.get(index.fqn, 0) + length
    # A tensor's records hold at least its bytes: an index declaring more would have the loader
    # allocate what it says (a crafted size of terabytes) before any byte is read.
    for key, item in metadata.state_dict_metadata.items():
        declared = math.prod(item.size) * item.properties.dtype.itemsize
        if declared > stored.get(key, 0):
            raise CheckpointCorruptError(
                f"checkpoint {folder}: item {key!r} declares size {tuple(item.size)} ({declared} bytes), but its "
                f"records hold {stored.get(key, 0)} bytes"
            )
