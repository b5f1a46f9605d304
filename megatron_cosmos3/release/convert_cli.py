"""``cosmos3-convert`` (also ``python -m megatron_cosmos3.conversion``): both directions of the
Qwen3-VL conversion, and the release export of a trained checkpoint.

    cosmos3-convert import /models/Qwen3-VL-8B-Instruct out/nano-init \
        --config configs/model/nano.yaml --dtype float32
    cosmos3-convert export out/nano-init out/nano-hf \
        --copy-files-from /models/Qwen3-VL-8B-Instruct --dtype bfloat16
    cosmos3-convert export outputs/checkpoints out/release-hf --release out/release
    cosmos3-convert release outputs/checkpoints/step_00001000 out/release

``export`` and ``release`` take a weights folder, a ``step_<N>`` checkpoint folder or a checkpoint
directory (its ``latest``), saved under any parallel layout; they run in one process.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from fractions import Fraction

import torch

from megatron_cosmos3.checkpoint.weights_folder import is_weights_folder
from megatron_cosmos3.conversion.hf_qwen3_vl import copy_support_files, export_qwen3_vl, load_qwen3_vl
from megatron_cosmos3.conversion.mot_folder import load_mot_folder, save_mot_folder
from megatron_cosmos3.conversion.safetensors_io import DEFAULT_MAX_SHARD_BYTES, ConversionError
from megatron_cosmos3.model.config import load_model_config
from megatron_cosmos3.model.summary import count_parameters
from megatron_cosmos3.release.export import write_hf_folder, write_release_folder
from megatron_cosmos3.release.trained import LOAD_ERRORS, load_trained_model

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'5GB' -> 5e9 bytes; also KB/MB, KiB/MiB/GiB, or a plain number of bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match[2].upper() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 5GB, 500MB, 100KB)")
    # Exact: float() of a number of 400 digits is inf, and int(inf) was OverflowError's traceback.
    size = int(Fraction(match[1]) * _UNITS[match[2].upper()])
    if size < 1:  # 0 was taken: every tensor its own shard, silently
        raise argparse.ArgumentTypeError(f"{text!r} is {size} bytes; a shard holds at least 1 byte")
    return size


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cosmos3-convert",
        description="Convert between Hugging Face Qwen3-VL folders and megatron_cosmos3 weights; export a trained "
        "checkpoint for release.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    dtype = dict(
        choices=sorted(_DTYPES), help="parameter dtype (default: the source's own, which keeps conversion exact)"
    )
    shard = dict(type=parse_size, default=DEFAULT_MAX_SHARD_BYTES, help="largest shard file (default 5GiB)")

    imp = commands.add_parser(
        "import",
        help="HF Qwen3-VL folder -> megatron_cosmos3 weights folder (both towers + ViT)",
        description="Both towers start from the language model; the ViT, embeddings, final norm and LM head load "
        "too. Prints parameter counts.",
    )
    imp.add_argument("hf_folder", help="folder with config.json and model*.safetensors (+ index)")
    imp.add_argument("out_folder", help="new or empty folder for model.yaml and the safetensors shards")
    imp.add_argument(
        "--config",
        help="model YAML (e.g. configs/model/nano.yaml) for the DM-stream settings; its "
        "backbone dimensions must equal the checkpoint's",
    )
    imp.add_argument("--dtype", **dtype)
    imp.add_argument("--max-shard-size", **shard)

    source = "weights folder ('import', 'release'), step_<N> checkpoint folder or checkpoint directory (any layout)"
    exp = commands.add_parser(
        "export",
        help="weights folder or trained checkpoint -> HF Qwen3-VL folder (Reasoner + ViT)",
        description="Writes what transformers' Qwen3VLForConditionalGeneration loads as is. The model must have a "
        "ViT (model.vision); the Generator, DM heads and embodiments are not part of Qwen3-VL (see 'release').",
    )
    exp.add_argument("folder", help=source)
    exp.add_argument("out_folder", help="new or empty folder for the Hugging Face checkpoint")
    exp.add_argument(
        "--copy-files-from",
        help="HF folder whose tokenizer/processor/chat-template/generation files to copy "
        "(default for a checkpoint: the run's data.tokenizer.path)",
    )
    exp.add_argument("--release", metavar="DIR", help="also write the release folder of the whole model there")
    exp.add_argument("--dtype", **dtype)
    exp.add_argument("--max-shard-size", **shard)

    rel = commands.add_parser(
        "release",
        help="trained checkpoint -> release folder (whole model, config, tokenizer, action statistics)",
        description="Writes both towers, the DM heads, every embodiment and the ViT as safetensors under our names "
        "(a weights folder), with the run's config, tokenizer files and action statistics: what generation "
        "loads without torch.distributed.checkpoint.",
    )
    rel.add_argument("folder", help=source)
    rel.add_argument("out_folder", help="new or empty folder for the release")
    rel.add_argument("--dtype", **dtype)
    rel.add_argument("--max-shard-size", **shard)
    return parser


def _export(args, dtype: torch.dtype | None) -> None:
    if args.command == "export" and is_weights_folder(args.folder) and not args.release:
        model, vision = load_mot_folder(args.folder, dtype=dtype)  # keeps the folder's own dtype
        if vision is None:
            raise ConversionError(f"{args.folder}: the model has no ViT ('vision' section); Qwen3-VL needs one")
        export_qwen3_vl(
            model, vision, args.out_folder, max_shard_bytes=args.max_shard_size, copy_files_from=args.copy_files_from
        )
        return
    trained = load_trained_model(args.folder)
    release = args.out_folder if args.command == "release" else args.release
    if release:
        write_release_folder(trained, release, dtype=dtype, max_shard_bytes=args.max_shard_size)
        print(f"release: wrote {release} (step {trained.step} of {trained.source})")
    if args.command == "export":
        write_hf_folder(
            trained,
            args.out_folder,
            dtype=dtype,
            max_shard_bytes=args.max_shard_size,
            copy_files_from=args.copy_files_from,
        )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    dtype = _DTYPES[args.dtype] if args.dtype else None
    start = time.perf_counter()
    try:
        # name "": the line below names --config
        config = load_model_config(args.config, "") if args.command == "import" and args.config else None
    except (ValueError, OSError) as error:  # missing, no regular file, not YAML or no valid model config
        print(f"error: --config: {error}", file=sys.stderr)
        return 2
    try:
        if args.command == "import":
            model, vision = load_qwen3_vl(args.hf_folder, config=config, dtype=dtype)
            save_mot_folder(model, vision, args.out_folder, max_shard_bytes=args.max_shard_size)
            # The tokenizer travels with the weights: data.tokenizer.path can name this folder.
            copy_support_files(args.hf_folder, args.out_folder)
            print(count_parameters(model, vision).table())
        else:
            _export(args, dtype)
    except LOAD_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{args.command}: wrote {args.out_folder} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
