"""Parameter counts per tower of a model config, built instantly on the meta device.

    python -m megatron_cosmos3.model.summary configs/model/nano.yaml

Groups: the ViT; the vocabulary (embeddings + LM head, once if tied); the Reasoner towers (+ its
final norm); the Generator towers (+ its final norm); the DM stream projections and timestep
embedding. "Qwen3-VL equivalent" = ViT + vocabulary + Reasoner: the size of the Qwen3-VL checkpoint
the config starts from, which must match that model's published size.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch
from torch import nn

from megatron_cosmos3.model.config import MoTConfig, load_model_config
from megatron_cosmos3.model.mot import MoTModel
from megatron_cosmos3.model.vision import VisionEncoder


@dataclass
class ParameterCounts:
    vision: int
    vocabulary: int
    reasoner: int
    generator: int
    dm_streams: int

    @property
    def qwen3_vl_equivalent(self) -> int:
        return self.vision + self.vocabulary + self.reasoner

    @property
    def total(self) -> int:
        return self.qwen3_vl_equivalent + self.generator + self.dm_streams

    def table(self) -> str:
        rows = [
            ("vision (ViT + mergers)", self.vision),
            ("vocabulary (embeddings + LM head)", self.vocabulary),
            ("reasoner tower", self.reasoner),
            ("generator tower", self.generator),
            ("DM projections + timestep embedding", self.dm_streams),
            ("Qwen3-VL equivalent (vision + vocabulary + reasoner)", self.qwen3_vl_equivalent),
            ("total", self.total),
        ]
        return "\n".join(f"{name:<54} {count:>16,} ({count / 1e9:7.3f} B)" for name, count in rows)


def _group(name: str) -> str:
    if name.startswith("layers."):
        return name.split(".")[2]  # "reasoner" or "generator"
    if name in ("reasoner_norm.weight", "generator_norm.weight"):
        return name.split("_")[0]
    if name.startswith(("embed_tokens.", "lm_head.")):
        return "vocabulary"
    if name.startswith(("dm_streams.", "timestep_embedding.")):
        return "dm_streams"
    raise KeyError(f"parameter {name!r} belongs to no group")


def count_parameters(model: MoTModel, vision: nn.Module | None = None) -> ParameterCounts:
    """Counts by group; a tied LM head counts once (named_parameters lists shared tensors once)."""
    counts = dict.fromkeys(("vision", "vocabulary", "reasoner", "generator", "dm_streams"), 0)
    for name, parameter in model.named_parameters():
        counts[_group(name)] += parameter.numel()
    if vision is not None:
        counts["vision"] = sum(p.numel() for p in vision.parameters())
    return ParameterCounts(**counts)


def build_on_meta(config: MoTConfig) -> tuple[MoTModel, VisionEncoder | None]:
    """The model and its ViT (if the config has one) on the meta device: no memory, no init time."""
    with torch.device("meta"):
        model = MoTModel(config)
        vision = VisionEncoder(config.vision) if config.vision is not None else None
    return model, vision


def main(argv: list[str] | None = None) -> ParameterCounts:
    parser = argparse.ArgumentParser(
        description="Build a model config on the meta device and print its parameter counts."
    )
    parser.add_argument("config", help="YAML file with a 'model:' section, e.g. configs/model/nano.yaml")
    args = parser.parse_args(argv)
    config = load_model_config(args.config)
    start = time.perf_counter()
    counts = count_parameters(*build_on_meta(config))
    print(f"{args.config}: built on the meta device in {time.perf_counter() - start:.2f} s")
    print(counts.table())
    return counts


if __name__ == "__main__":
    main()
