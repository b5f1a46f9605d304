"""A crafted safetensors shard, index or weights folder is one ConversionError naming the file and
what is wrong: never a traceback, a hang on a FIFO, or weights other than the file says."""

import json
import os
import re
import shutil
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from megatron_cosmos3.conversion import ConversionError, load_qwen3_vl
from megatron_cosmos3.conversion.mot_folder import load_mot_folder
from megatron_cosmos3.conversion.safetensors_io import INDEX_FILE, SINGLE_FILE
from megatron_cosmos3.release.convert_cli import main as conversion_main

UP_PROJ = "model.language_model.layers.1.mlp.up_proj.weight"


def split(raw: bytes) -> tuple[dict, bytes]:
    """A safetensors file's header (as parsed) and data bytes."""
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def pack(header: bytes | dict, data: bytes, length: int | None = None) -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + data


def edited(change):
    """A craft that edits the header's entries (``change(header, key, other_key)``) and keeps the data."""

    def craft(raw: bytes, key: str, other: str) -> bytes:
        header, data = split(raw)
        change(header, key, other)
        return pack(header, data)

    return craft


def repeated_key(raw: bytes, key: str, other: str) -> bytes:
    """``key`` given twice: first with ``other``'s bytes, then its own (the library keeps the last)."""
    header, data = split(raw)
    text = json.dumps(header).encode()
    first = json.dumps({key: header[other]}).encode()[1:-1]
    return pack(b"{" + first + b", " + text[1:], data)


CRAFTS = {
    "length prefix past the end of the file": (
        lambda raw, key, other: pack(raw[8:], b"", length=len(raw)),
        "invalid header length",
    ),
    "length prefix 2^63": (lambda raw, key, other: pack(raw[8:], b"", length=2**63), "header too large"),
    "header not JSON": (lambda raw, key, other: pack(b"weights!", split(raw)[1]), "invalid JSON in header"),
    "header not UTF-8": (lambda raw, key, other: pack(b'{"\xff": 1}', split(raw)[1]), "invalid UTF-8 in header"),
    "header not an object": (lambda raw, key, other: pack(b"[1, 2]", split(raw)[1]), "invalid JSON in header"),
    "tensor name given twice": (repeated_key, "safetensors header: not JSON (key(s) ['{key}'] given twice)"),
    "offsets reversed": (
        edited(lambda h, key, other: h[key].update(data_offsets=h[key]["data_offsets"][::-1])),
        "invalid offset for tensor",
    ),
    "offsets overlap another tensor": (
        edited(lambda h, key, other: h[key].update(data_offsets=h[other]["data_offsets"])),
        "offset for tensor",
    ),
    "offsets past the end": (
        edited(lambda h, key, other: h[key].update(data_offsets=[h[key]["data_offsets"][0], 2**40])),
        "invalid shape, data type, or offset for tensor",
    ),
    "bytes not dtype x shape": (
        edited(lambda h, key, other: h[key].update(shape=[h[key]["shape"][0] + 1, *h[key]["shape"][1:]])),
        "invalid shape, data type, or offset for tensor",
    ),
    "shape past any size": (
        edited(lambda h, key, other: h[key].update(shape=[2**62, 2**62])),
        "overflow computing buffer size",
    ),
    "unknown dtype": (edited(lambda h, key, other: h[key].update(dtype="Q7")), "unknown variant `Q7`"),
    "negative shape": (edited(lambda h, key, other: h[key].update(shape=[-1, -128])), "invalid value: integer `-1`"),
    "fractional shape": (edited(lambda h, key, other: h[key].update(shape=[64.0, 128])), "floating point `64.0`"),
    "text shape": (edited(lambda h, key, other: h[key].update(shape=["64", 128])), 'string "64"'),
    "metadata value not text": (
        edited(lambda h, key, other: h.update(__metadata__={"format": 1})),
        "invalid type: integer `1`, expected a string",
    ),
    "metadata not a map": (
        edited(lambda h, key, other: h.update(__metadata__=["pt"])),
        "invalid type: sequence, expected a map",
    ),
    "trailing bytes": (lambda raw, key, other: raw + bytes(64), "file not fully covered"),
    "empty file": (lambda raw, key, other: b"", "header too small"),
}


@pytest.fixture
def folder(hf_folder, tmp_path):
    return shutil.copytree(hf_folder, tmp_path / "copy")


def shard_of(folder, key: str):
    return folder / json.loads((folder / INDEX_FILE).read_text())["weight_map"][key]


@pytest.mark.parametrize("craft, message", CRAFTS.values(), ids=list(CRAFTS))
def test_a_crafted_shard_is_a_conversion_error_naming_the_file(folder, craft, message):
    shard = shard_of(folder, UP_PROJ)
    raw = shard.read_bytes()
    other = next(key for key in split(raw)[0] if key not in (UP_PROJ, "__metadata__"))
    shard.write_bytes(craft(raw, UP_PROJ, other))
    with pytest.raises(ConversionError) as error:
        load_qwen3_vl(folder)
    assert str(error.value).startswith(f"{shard}: ") and message.format(key=UP_PROJ) in str(error.value)
    assert "\n" not in str(error.value)


def test_the_library_lets_a_repeated_tensor_name_through(folder):
    """Control for the repeated-name craft: the library reads it without a word, the last one winning,
    so the check is ours; a reader taking the first would load other bytes under that name."""
    shard = shard_of(folder, UP_PROJ)
    raw = shard.read_bytes()
    other = next(key for key in split(raw)[0] if key not in (UP_PROJ, "__metadata__"))
    shard.write_bytes(repeated_key(raw, UP_PROJ, other))
    with safe_open(str(shard), framework="pt") as handle:
        assert UP_PROJ in handle.keys()


def fifo(path):
    path.unlink()
    os.mkfifo(path)


def folder_in_place(path):
    path.unlink()
    path.mkdir()


@pytest.mark.parametrize(
    "replace, what", [(fifo, "not a regular file (a FIFO)"), (folder_in_place, "not a regular file (a folder)")]
)
@pytest.mark.parametrize("which", ["shard", "index"])
def test_a_shard_or_index_that_is_no_regular_file_is_refused_by_name(folder, replace, what, which):
    """A FIFO was opened and waited on for a writer (a hang); a folder was 'missing'; an index that
    is no regular file was passed over as if the folder had none."""
    path = shard_of(folder, UP_PROJ) if which == "shard" else folder / INDEX_FILE
    replace(path)
    with pytest.raises(ConversionError, match=f"^{re.escape(str(path))}: (shard file is )?{re.escape(what)}"):
        load_qwen3_vl(folder)


@pytest.fixture(scope="module")
def imported(hf_folder, tmp_path_factory):
    folder = tmp_path_factory.mktemp("imported") / "weights"
    assert conversion_main(["import", str(hf_folder), str(folder)]) == 0
    return folder


@pytest.mark.parametrize(
    "shard",
    ["../weights/model.safetensors", "/etc/passwd", "..", ".", "sub/model.safetensors", "model\x00.safetensors", ""],
)
def test_a_weights_folder_index_naming_a_shard_outside_the_folder_is_refused(imported, tmp_path, shard):
    """Our own weights folder: an index may only name files of the folder itself."""
    folder = shutil.copytree(imported, tmp_path / "weights")
    (folder / SINGLE_FILE).rename(folder / "model-00001-of-00001.safetensors")
    (folder / INDEX_FILE).write_text(json.dumps({"weight_map": {"embed_tokens.weight": shard}}))
    with pytest.raises(
        ConversionError, match=f"^{re.escape(str(folder / INDEX_FILE))}: tensor 'embed_tokens.weight' is mapped to"
    ):
        load_mot_folder(folder)


def test_a_weights_folder_whose_model_safetensors_is_a_fifo_is_refused(imported, tmp_path):
    folder = shutil.copytree(imported, tmp_path / "weights")
    fifo(folder / SINGLE_FILE)
    with pytest.raises(
        ConversionError, match=f"^{re.escape(str(folder / SINGLE_FILE))}: shard file is not a regular file \\(a FIFO\\)"
    ):
        load_mot_folder(folder)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.uint16, torch.complex64, torch.float8_e4m3fn])
def test_a_weight_stored_in_no_float_width_is_refused_naming_the_tensor(folder, imported, tmp_path, dtype):
    """Only the embedding's stored dtype was checked: any other tensor stored as integers, bools,
    complex numbers or FP8 (its scales elsewhere) was copied into the float weights without a word."""
    shard = shard_of(folder, UP_PROJ)
    tensors = load_file(str(shard))
    tensors[UP_PROJ] = tensors[UP_PROJ].to(dtype)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(
        ConversionError, match=f"^{re.escape(str(shard))}: tensor '{UP_PROJ}' is stored as \\w+, not as"
    ):
        load_qwen3_vl(folder)

    ours = shutil.copytree(imported, tmp_path / "weights")
    name = "layers.1.generator.mlp.down_proj.weight"
    tensors = load_file(str(ours / SINGLE_FILE))
    tensors[name] = tensors[name].to(dtype)
    save_file(tensors, str(ours / SINGLE_FILE), metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=f"^{re.escape(str(ours / SINGLE_FILE))}: tensor '{name}' is stored as"):
        load_mot_folder(ours)
