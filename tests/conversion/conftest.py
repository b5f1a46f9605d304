"""Fixtures of the conversion tests: the tiny random Qwen3-VL folder and its transformers model
(defined in qwen3_vl_tiny.py, which tests/inference uses too)."""

from qwen3_vl_tiny import hf_folder, hf_model  # noqa: F401  (fixtures)
