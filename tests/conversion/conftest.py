"""Fixtures of the conversion tests: the tiny random Qwen3-VL folder and its transformers model."""

from pathlib import Path

import pytest
from qwen3_vl_tiny import random_qwen3_vl, save_sharded, tiny_hf_config


@pytest.fixture(scope="session")
def hf_folder(tmp_path_factory) -> Path:
    """The tiny random Qwen3-VL saved in >= 2 safetensors shards plus the index (fp32)."""
    return save_sharded(random_qwen3_vl(tiny_hf_config()), tmp_path_factory.mktemp("qwen3_vl_tiny"))


@pytest.fixture(scope="session")
def hf_model(hf_folder):
    from transformers import Qwen3VLForConditionalGeneration

    return Qwen3VLForConditionalGeneration.from_pretrained(str(hf_folder)).eval()
