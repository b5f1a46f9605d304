"""Checkpoint conversion: Hugging Face Qwen3-VL <-> our MoT model (both towers) and ViT.

Python API::

    from megatron_cosmos3.conversion import load_qwen3_vl, reasoner_logits, export_qwen3_vl
    model, vision = load_qwen3_vl("/models/Qwen3-VL-8B-Instruct")
    logits = reasoner_logits(model, vision, **processor(text=..., images=..., return_tensors="pt"))
    export_qwen3_vl(model, vision, "/models/exported", copy_files_from="/models/Qwen3-VL-8B-Instruct")

Command line: ``python -m megatron_cosmos3.conversion --help``.
"""

from megatron_cosmos3.conversion.hf_inputs import reasoner_logits, understanding_batch
from megatron_cosmos3.conversion.hf_qwen3_vl import export_qwen3_vl, load_qwen3_vl
from megatron_cosmos3.conversion.safetensors_io import ConversionError

__all__ = ["ConversionError", "export_qwen3_vl", "load_qwen3_vl", "reasoner_logits", "understanding_batch"]
