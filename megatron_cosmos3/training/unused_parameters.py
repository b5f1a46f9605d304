"""Which trainable parameters a training pack can leave out of the autograd graph, decided from the
config alone (docs/DESIGN.md, "Data parallelism without find_unused_parameters").

DDP must search the graph for unused parameters after every forward (``find_unused_parameters``)
only when some may be unused; that search costs a graph traversal per step and logs a warning on
every rank in steps where nothing was unused. A pack uses a parameter when its rows reach it:

* a DM stream's input/output projections (``dm_streams.media_*.<kind>``, ``dm_streams.action_*.<e>``)
  only when the pack holds that stream — certain only when every task of the stage lays it out
  (an action stream only when the model has a single embodiment);
* the Generator's attention inputs (norm, q/k/v and their norms) only when the pack holds DM rows;
  its output projection and MLP, the heads and the whole Reasoner run on every pack (an empty
  stream still passes through them);
* the model's own ViT only when the pack holds pictures: certain only when every task requires one;
* MoE expert weights under ``moe_expert_impl=loop`` only for experts that got tokens (the grouped
  GEMMs take every expert's weights).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from megatron_cosmos3.model.moe import grouped_mm_takes
from megatron_cosmos3.tasks.registry import get_task

# DM stream roles of the task registry -> the stream kinds of a pack (an image is a one-frame video).
STREAM_KINDS = {"image": "video", "video": "video", "audio": "audio", "actions": "action"}
GENERATOR_ATTENTION_INPUTS = (".generator.input_layernorm.", ".generator.self_attn.q", ".generator.self_attn.k")
GENERATOR_VALUES = ".generator.self_attn.v_proj."


def possibly_unused(model: nn.Module, tasks: Iterable[str]) -> list[str]:
    """Names of ``model``'s (a ``MoTModel``, maybe sharded) trainable parameters that some pack drawn
    from ``tasks`` leaves unused; call after the stage froze what it freezes."""
    config = model.config
    specs = [get_task(name) for name in tasks]
    kinds_everywhere = set.intersection(*({STREAM_KINDS[role.stream] for role in spec.dm} for spec in specs))
    if "action" in kinds_everywhere and len(config.embodiments) == 1:
        kinds_everywhere.add(f"action/{next(iter(config.embodiments))}")
    dm_everywhere = all(spec.dm for spec in specs)
    pictures_everywhere = all(spec.vit == "required" for spec in specs)
    unused = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.startswith("dm_streams."):
            used = _stream_kind(name) in kinds_everywhere
        elif any(part in name for part in GENERATOR_ATTENTION_INPUTS) or GENERATOR_VALUES in name:
            used = dm_everywhere
        elif name.startswith("vision."):
            used = pictures_everywhere
        elif name.endswith(("mlp.gate_up_proj", "mlp.down_proj")):  # MoE expert weights
            used = config.moe_expert_impl == "grouped" and _grouped_everywhere(model, name)
        else:
            used = True
        if not used:
            unused.append(name)
    return unused


def _grouped_everywhere(model: nn.Module, name: str) -> bool:
    """Whether this MoE's experts run as grouped GEMMs in fp32 and bf16 alike (else they loop)."""
    moe = model.get_submodule(name.rsplit(".", 1)[0])
    num_experts, hidden_size, ffn_size = moe.down_proj.shape
    return all(grouped_mm_takes(dtype, hidden_size, ffn_size) for dtype in (torch.float32, torch.bfloat16))


def _stream_kind(name: str) -> str:
    """``dm_streams.media_in.video.weight`` -> "video"; ``dm_streams.action_out.<e>.bias`` -> "action/<e>"."""
    _, family, key = name.split(".")[:3]
    return f"action/{key}" if family.startswith("action") else key
