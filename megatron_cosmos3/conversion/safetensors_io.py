"""Sharded safetensors folders, read and written one tensor at a time.

The layout is Hugging Face's: either one ``model.safetensors``, or shards
``model-0000i-of-0000N.safetensors`` plus ``model.safetensors.index.json`` whose ``weight_map`` says
which shard holds each tensor. Reading never holds more than one tensor of the folder in memory;
writing holds at most one shard's worth of converted tensors.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Collection, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_cosmos3.config_files import file_problem
from megatron_cosmos3.json_files import parse_json, read_json

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30

# The widths a weight may be stored in: each converts to the model's dtype by value. Integers are
# not weights of this model, and FP8 values mean nothing without the scales stored beside them.
WEIGHT_DTYPES = frozenset({torch.float64, torch.float32, torch.float16, torch.bfloat16})

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class ConversionError(ValueError):
    """A checkpoint folder that cannot be converted; the message names the file and the key."""


def check_output_folder(folder: Path, what: str = "output") -> None:
    """ConversionError naming ``folder`` unless it is new or an empty folder: a file there was
    NotADirectoryError's traceback, after the model had loaded."""
    if folder.exists() and not folder.is_dir():
        raise ConversionError(f"{folder}: {what} folder is a file, not a folder")
    if folder.exists() and any(folder.iterdir()):
        raise ConversionError(f"{folder}: {what} folder is not empty")


def shard_map(folder: str | Path) -> dict[str, list[str]]:
    """Shard file name -> the tensor keys it holds (index order), from the index or the single file."""
    folder = Path(folder)
    index = folder / INDEX_FILE
    # Present in any form (a folder, a FIFO, a dangling link): read, so it is refused by name rather
    # than passed over for the single file or the "no weights" error.
    if os.path.lexists(index):
        document = read_json(index, ConversionError)
        weight_map = document.get("weight_map") if isinstance(document, dict) else None
        if not isinstance(weight_map, dict):
            raise ConversionError(f"{index}: 'weight_map' must map tensor names to shard files")
        shards: dict[str, list[str]] = {}
        for key, shard in weight_map.items():
            # A shard is a file of the folder: never a path that leads out of it, nor one no file has.
            if (
                not isinstance(shard, str)
                or not shard
                or Path(shard).name != shard
                or shard.startswith(".")
                or "\x00" in shard
            ):
                raise ConversionError(f"{index}: tensor {key!r} is mapped to {shard!r}, not a file of the folder")
            shards.setdefault(shard, []).append(key)
        return shards
    if os.path.lexists(folder / SINGLE_FILE):
        with _shard(folder / SINGLE_FILE) as handle:
            return {SINGLE_FILE: list(handle.keys())}
    found = sorted(p.name for p in folder.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    hint = f" (found {found}: only safetensors weights are supported)" if found else ""
    raise ConversionError(f"{folder}: no {INDEX_FILE} or {SINGLE_FILE}{hint}")


@contextmanager
def _shard(path: Path):
    """An open shard (memory-mapped). ConversionError naming the file where it is missing or no
    regular file (a folder, a FIFO: opening one waited for a writer), unreadable, or not a valid
    safetensors file: the library's own checks (header length against the file, header JSON and
    UTF-8, dtype names, shapes, offsets reversed, overlapping, past the end or not dtype x shape,
    trailing bytes, metadata not str -> str) with its reason, and a tensor name given twice in the
    header, which the library lets the last one win."""
    from safetensors import SafetensorError, safe_open

    problem = file_problem(path)
    if problem is not None:
        verb = "" if problem.startswith("cannot") else " is"
        raise ConversionError(f"{path}: shard file{verb} {problem}")
    try:
        opened = safe_open(str(path), framework="pt")
    except SafetensorError as error:
        raise ConversionError(f"{path}: shard is truncated or corrupt ({error})") from None
    except OSError as error:
        raise ConversionError(f"{path}: shard is unreadable ({error})") from None
    try:
        with opened as handle:
            _refuse_repeated_names(path)
            yield handle
    except SafetensorError as error:
        raise ConversionError(f"{path}: shard is truncated or corrupt ({error})") from None


def _refuse_repeated_names(path: Path) -> None:
    """ConversionError naming ``path`` and the key where its header gives a key twice. Called once
    the library has accepted the file, so the header length read here is bounded by its own limit
    and the file's size, and the text is UTF-8 JSON."""
    with path.open("rb") as file:
        (length,) = struct.unpack("<Q", file.read(8))
        header = file.read(length)
    parse_json(header.decode("utf-8"), f"{path}: safetensors header", ConversionError)


def tensor_dtype(folder: str | Path, key: str) -> torch.dtype:
    """The stored dtype of one tensor, read from its shard's header (no tensor data is read), which
    a model built from the folder takes: a ConversionError naming the shard, the tensor and the
    stored dtype unless it is a float width a model computes in (F64, F32, F16, BF16; not an
    integer, FP8 or a dtype this table lacks)."""
    folder = Path(folder)
    shard = next((s for s, keys in shard_map(folder).items() if key in keys), None)
    if shard is None:
        raise ConversionError(f"{folder}: missing tensor {key!r}")
    with _shard(folder / shard) as handle:
        return _float_width(folder / shard, key, handle.get_slice(key).get_dtype(), "the model is built in its dtype")


def _float_width(path: Path, key: str, stored: str, why: str) -> torch.dtype:
    """The torch dtype of a tensor stored as ``stored`` in ``path``; a ConversionError naming the
    file, the tensor, the stored dtype and ``why`` unless it is F64, F32, F16 or BF16."""
    dtype = _DTYPES.get(stored)
    if dtype not in WEIGHT_DTYPES:
        raise ConversionError(f"{path}: tensor {key!r} is stored as {stored}, not as one of F64, F32, F16, BF16: {why}")
    return dtype


def iter_tensors(folder: str | Path, only: Collection[str] | None = None) -> Iterator[tuple[str, str, torch.Tensor]]:
    """Yields (shard file name, key, tensor) for every tensor of the folder — or only those whose
    key is in ``only`` (other shards are not even opened) — one at a time.

    Every shard is checked before its first tensor is read: a missing, truncated or corrupt file,
    or a tensor the index places in a shard that lacks it, is a ConversionError naming both.
    """
    folder = Path(folder)
    for shard, keys in sorted(shard_map(folder).items()):
        wanted = keys if only is None else [key for key in keys if key in only]
        if wanted:
            yield from _stream_shard(folder / shard, wanted)


def _stream_shard(path: Path, keys: list[str]) -> Iterator[tuple[str, str, torch.Tensor]]:
    with _shard(path) as handle:
        present = set(handle.keys())
        absent = [key for key in keys if key not in present]
        if absent:
            raise ConversionError(f"{path}: the index lists tensor {absent[0]!r} but the shard lacks it")
        for key in keys:
            yield path.name, key, handle.get_tensor(key)


def tensor_shapes(folder: str | Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """key -> (shard file name, shape) of every tensor of the folder, read from the shards' headers
    (no tensor data is read); a tensor the index places in a shard that lacks it, or one stored in no
    float width (``_float_width``: an integer, bool, complex or FP8 tensor, which the copy into a
    model's float weights converted without a word), is a ConversionError naming both."""
    folder = Path(folder)
    found = {}
    for shard, keys in sorted(shard_map(folder).items()):
        with _shard(folder / shard) as handle:
            present = set(handle.keys())
            for key in keys:
                if key not in present:
                    raise ConversionError(f"{folder / shard}: the index lists tensor {key!r} but the shard lacks it")
                header = handle.get_slice(key)
                _float_width(folder / shard, key, header.get_dtype(), "the model's weights are floats")
                found[key] = (shard, tuple(header.get_shape()))
    return found


def check_depths(config_file: Path, keys: Collection[str], depths: Iterable[tuple[str, str, int]]) -> None:
    """ConversionError naming the field of ``config_file`` that asks for more layers than the tensor
    ``keys`` hold, for each (field, key prefix ``<prefix><i>.``, depth). Checked before a model is
    built: a crafted depth would build that many layers (even on the meta device) before a missing
    tensor is noticed. Fewer layers than held are named by ``check_shapes``, with the first left over."""
    for field, prefix, depth in depths:
        held = len({key[len(prefix) :].split(".", 1)[0] for key in keys if key.startswith(prefix)})
        if depth > held:
            raise ConversionError(f"{config_file}: {field}={depth}, but the weights hold {held} ({prefix}<i>)")


def check_shapes(
    folder: str | Path,
    wanted: dict[str, tuple[int, ...]],
    optional: Collection[str] = frozenset(),
    describe: str = "the model",
) -> None:
    """ConversionError unless the folder holds exactly the keys of ``wanted`` (those in ``optional``
    may be absent) with those shapes, naming the first that differs. Read from the shards' headers:
    a model can be checked on the meta device, before anything is allocated."""
    folder = Path(folder)
    found = tensor_shapes(folder)
    for key, (shard, shape) in found.items():
        if key not in wanted:
            raise ConversionError(f"{folder / shard}: unexpected tensor {key!r}: {describe} has no such parameter")
        if shape != tuple(wanted[key]):
            raise ConversionError(
                f"{folder / shard}: tensor {key!r} has shape {shape}, but the config gives {describe} "
                f"shape {tuple(wanted[key])} there"
            )
    missing = sorted(set(wanted) - set(found) - set(optional))
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise ConversionError(f"{folder}: missing tensor {missing[0]!r}{more} ({describe} needs it)")


@torch.no_grad()
def load_into(
    folder: str | Path,
    targets: dict[str, list[torch.Tensor]],
    optional: frozenset[str] = frozenset(),
    describe: str = "the model",
) -> None:
    """Copies every tensor of ``folder`` into its pre-allocated ``targets[key]`` (each one of the
    list: a tensor may fill several parameters), streaming one tensor at a time.

    The folder must hold exactly the keys of ``targets`` (those in ``optional`` may be absent) with
    the targets' shapes (``check_shapes``, before any tensor is read); anything else is a
    ConversionError naming the key. Dtypes are converted by the copy.
    """
    check_shapes(folder, {key: tuple(tensors[0].shape) for key, tensors in targets.items()}, optional, describe)
    for _, key, tensor in iter_tensors(folder):
        for target in targets[key]:
            target.copy_(tensor)
        del tensor


@dataclass
class PlannedTensor:
    """One tensor to write: its key, final shape/dtype, and how to produce it when its shard is due."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    produce: Callable[[], torch.Tensor]

    @property
    def num_bytes(self) -> int:
        return int(torch.Size(self.shape).numel()) * torch.empty((), dtype=self.dtype).element_size()


def write_sharded(
    folder: str | Path, tensors: list[PlannedTensor], max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
) -> list[Path]:
    """Writes ``tensors`` in order into shards of at most ``max_shard_bytes`` (a larger tensor gets a
    shard of its own) plus the index, or into one ``model.safetensors`` if they fit in one shard."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    groups: list[list[PlannedTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if groups[-1] and size + tensor.num_bytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(tensor)
        size += tensor.num_bytes
    names = (
        [SINGLE_FILE]
        if len(groups) == 1
        else [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    )
    weight_map = {}
    for name, group in zip(names, groups):
        shard = {}
        for tensor in group:
            value = tensor.produce().detach().to(tensor.dtype).contiguous()
            if tuple(value.shape) != tensor.shape:
                raise ConversionError(f"{tensor.key}: produced shape {tuple(value.shape)}, planned {tensor.shape}")
            shard[tensor.key] = value
            weight_map[tensor.key] = name
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        del shard
    if len(groups) > 1:
        total = sum(t.num_bytes for t in tensors)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return [folder / name for name in names]
